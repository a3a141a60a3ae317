"""Simulate online data mixing (EXP3) against static weights on synthetic domains.

Each synthetic domain's loss falls with the rows trained on it, `L_d(n) = a_d + b_d (1 + n)^-c_d`,
at its own rate `c_d`; each step draws a batch's domains from the mixer's policy, observes the
domains' mean loss with seeded noise, and feeds it back. EXP3 should move weight toward the
domains whose loss stays high (slow learners); static weights never move.

    uv run python tools/simulate_odm.py --steps 500 --out outputs/simulate_odm.png

The functions return arrays so that notebooks (and a future `wf_data/viz.py`) can reuse them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wf_data import atomic
from wf_data.data.mix.exp3 import Exp3


@dataclass(frozen=True)
class SyntheticDomains:
    """Domains whose expected loss after n rows is `floor + scale * (1 + n) ** -rate`.

    names: K domain names; floor, scale, rate: (K,) float64; noise: standard deviation of one
    row's loss around the expectation, one for all domains or (K,).
    """

    names: tuple[str, ...]
    floor: np.ndarray
    scale: np.ndarray
    rate: np.ndarray
    noise: float | np.ndarray = 0.3

    def __post_init__(self) -> None:
        k = len(self.names)
        object.__setattr__(self, "noise", np.broadcast_to(np.float64(self.noise), (k,)).copy())
        for field in ("floor", "scale", "rate"):
            value = np.asarray(getattr(self, field), dtype=np.float64)
            if value.shape != (k,):
                raise ValueError(
                    f"SyntheticDomains.{field}: expected shape ({k},), got {value.shape}"
                )
            object.__setattr__(self, field, value)

    @property
    def num_domains(self) -> int:
        """K."""
        return len(self.names)

    def expected_loss(self, rows_seen: np.ndarray) -> np.ndarray:
        """(K,) expected loss of each domain after `rows_seen` (K,) rows trained on it."""
        return self.floor + self.scale * (1.0 + rows_seen) ** -self.rate


def many_domains(num_domains: int = 22, noise: float = 1.0, seed: int = 0) -> SyntheticDomains:
    """`num_domains` domains with seeded floors, scales and rates; one of them (the last) is
    unlearnable: a high floor and no decrease, like a domain of random tokens."""
    rng = np.random.default_rng([seed, 22])
    floor = rng.uniform(1.0, 3.0, num_domains)
    scale = rng.uniform(1.0, 3.0, num_domains)
    rate = rng.uniform(0.05, 0.6, num_domains)
    floor[-1], scale[-1], rate[-1] = 9.0, 0.0, 0.0
    names = tuple(f"d{i:02d}" for i in range(num_domains - 1)) + ("random",)
    return SyntheticDomains(names=names, floor=floor, scale=scale, rate=rate, noise=noise)


def default_domains(noise: float = 0.3) -> SyntheticDomains:
    """Five domains: `math` learns slowly (its loss stays high), `code` learns fast."""
    return SyntheticDomains(
        names=("web", "code", "math", "books", "wiki"),
        floor=np.array([2.0, 1.0, 1.5, 2.2, 1.8]),
        scale=np.array([2.0, 3.0, 3.0, 1.5, 2.0]),
        rate=np.array([0.30, 0.60, 0.08, 0.20, 0.40]),
        noise=noise,
    )


def study_domains() -> SyntheticDomains:
    """The five domains of `tools/mixing_study.py` as curves: from ~9 nats at init (a random
    model over 8k tokens) to roughly the losses the study's static arm ends at after ~190 rows
    each: prose and code learn slowly, math faster, `small` fastest, `random` only its unigram
    statistics (0.25 nats, then nothing). Row noise: 0.35-0.6 nats as measured on the demo's
    domains (detrended per-row training loss); 0.1 for rows of random tokens, whose loss barely
    varies (every token costs about the same), 0.3 for the small JSON documents (assumed)."""
    return SyntheticDomains(
        names=("prose", "code", "math", "random", "small"),
        floor=np.array([5.0, 4.8, 1.0, 8.8, 0.5]),
        scale=np.array([4.0, 4.2, 8.0, 0.25, 8.5]),
        rate=np.array([0.15, 0.16, 0.17, 0.5, 0.37]),
        noise=np.array([0.35, 0.6, 0.35, 0.1, 0.3]),
    )


@dataclass(frozen=True)
class SimulationResult:
    """Per-step record of one simulated run (T steps, K domains).

    policy: (T, K) weights the step's batch was drawn with; loss: (T, K) expected loss before the
    step; rows_seen: (T, K) cumulative rows per domain after the step.
    """

    mixer: str
    names: tuple[str, ...]
    policy: np.ndarray
    loss: np.ndarray
    rows_seen: np.ndarray

    @property
    def final_policy(self) -> np.ndarray:
        """(K,) policy of the last step."""
        return self.policy[-1]


def simulate(
    domains: SyntheticDomains,
    *,
    mixer: str = "exp3",
    steps: int = 500,
    batch_size: int = 32,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    alpha: float = 0.9,
    spike_prob: float = 0.0,
    **bandit_options,
) -> SimulationResult:
    """Run `steps` steps of `mixer` ("exp3" or "static") over `domains`.

    weights: the static weights, and EXP3's prior (uniform when None). The batch's domains and
    the loss noise come from `np.random.default_rng([seed, ...])`, so both mixers see the same
    random streams. spike_prob: chance that an observed domain's loss is replaced by 1e308 (a
    corrupted value) in a step. bandit_options: further `Exp3` keyword arguments
    (update_rule, reward, min_weight, warmup_steps, reward_cap...).
    """
    if mixer not in ("exp3", "static"):
        raise ValueError(f"simulate: mixer must be 'exp3' or 'static', got {mixer!r}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"simulate: steps and batch_size must be >= 1, got {steps}, {batch_size}")
    k = domains.num_domains
    bandit = Exp3(k, alpha=alpha, prior=weights, seed=seed, **bandit_options)
    static = bandit.policy()  # the normalised prior
    draw_rng = np.random.default_rng([seed, 0])
    noise_rng = np.random.default_rng([seed, 1])
    rows_seen = np.zeros(k)
    policy_log = np.empty((steps, k))
    loss_log = np.empty((steps, k))
    rows_log = np.empty((steps, k))
    for step in range(steps):
        policy = bandit.policy() if mixer == "exp3" else static
        counts = draw_rng.multinomial(batch_size, policy)
        expected = domains.expected_loss(rows_seen)
        # The mean of `count` rows' noisy losses: noise shrinks as 1/sqrt(count).
        noise = noise_rng.standard_normal(k) * domains.noise / np.sqrt(np.maximum(counts, 1))
        # Losses are >= 0; a noisy draw below 0 is clipped, as a real mean loss would be.
        observed = np.where(counts > 0, np.maximum(expected + noise, 0.0), np.nan)
        if spike_prob > 0:
            observed[(counts > 0) & (noise_rng.random(k) < spike_prob)] = 1e308
        if mixer == "exp3":
            bandit.update(observed)
        rows_seen = rows_seen + counts
        policy_log[step], loss_log[step], rows_log[step] = policy, expected, rows_seen
    return SimulationResult(mixer, domains.names, policy_log, loss_log, rows_log)


def format_table(results: Sequence[SimulationResult], report_steps: Sequence[int]) -> str:
    """Text table of each run's policy at `report_steps`, then its final per-domain loss."""
    names = results[0].names
    width = max(8, *(len(name) + 2 for name in names))
    header = f"{'mixer':<8}{'step':>6}" + "".join(f"{name:>{width}}" for name in names)
    lines = [header, "-" * len(header)]
    for result in results:
        for step in report_steps:
            row = result.policy[step]
            lines.append(
                f"{result.mixer:<8}{step:>6}" + "".join(f"{value:>{width}.3f}" for value in row)
            )
        final_loss = result.loss[-1]
        lines.append(
            f"{result.mixer:<8}{'loss':>6}"
            + "".join(f"{value:>{width}.3f}" for value in final_loss)
            + f"   mean {final_loss.mean():.3f}"
        )
    return "\n".join(lines)


def plot(results: Sequence[SimulationResult], path: str | os.PathLike) -> Path:
    """Write a PNG: policy (top) and expected loss (bottom) per domain over steps, per mixer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from matplotlib.lines import Line2D

    styles = {"exp3": "-", "static": "--"}
    figure, (policy_axes, loss_axes) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = results[0].names
    for result in results:
        steps = np.arange(len(result.policy))
        linestyle = styles.get(result.mixer, ":")
        for d in range(len(names)):
            color = colors[d % len(colors)]
            policy_axes.plot(steps, result.policy[:, d], color=color, linestyle=linestyle)
            loss_axes.plot(steps, result.loss[:, d], color=color, linestyle=linestyle)
    # One legend entry per domain (colour) and per mixer (line style).
    handles = [
        Line2D([], [], color=colors[d % len(colors)], label=name) for d, name in enumerate(names)
    ]
    handles += [
        Line2D([], [], color="black", linestyle=styles.get(r.mixer, ":"), label=r.mixer)
        for r in results
    ]
    policy_axes.set_ylabel("sampling weight")
    policy_axes.set_title("Online data mixing: EXP3 vs static weights, synthetic domains")
    policy_axes.legend(handles=handles, ncol=2, fontsize="small")
    loss_axes.set_ylabel("expected domain loss")
    loss_axes.set_xlabel("training step")
    loss_axes.legend(handles=handles, ncol=2, fontsize="small")
    figure.tight_layout()
    try:
        with atomic.AtomicWriter(path) as handle:  # a reader never sees half a PNG
            figure.savefig(handle, format="png", dpi=100)
    finally:
        plt.close(figure)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: simulate EXP3 and static mixing, print a table, write the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--noise", type=float, default=0.3, help="per-row loss noise (std)")
    parser.add_argument("--domains", type=int, default=5, help="5: named demo set; else K")
    parser.add_argument("--update-rule", default="paper", choices=["paper", "smoothed_mean"])
    parser.add_argument("--reward", default="loss", choices=["loss", "loss_decrease"])
    parser.add_argument("--min-weight", type=float, default=None)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--spike-prob", type=float, default=0.0, help="chance of a 1e308 loss")
    parser.add_argument("--out", default="outputs/simulate_odm.png", help="PNG path ('' = none)")
    args = parser.parse_args(argv)

    if args.domains == 5:
        domains = default_domains(noise=args.noise)
    else:
        domains = many_domains(args.domains, noise=args.noise, seed=args.seed)
    results = [
        simulate(
            domains,
            mixer=mixer,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            alpha=args.alpha,
            spike_prob=args.spike_prob,
            update_rule=args.update_rule,
            reward=args.reward,
            min_weight=args.min_weight,
            warmup_steps=args.warmup_steps,
        )
        for mixer in ("exp3", "static")
    ]
    report_steps = sorted({0, *np.linspace(0, args.steps - 1, 6).astype(int).tolist()})
    print(format_table(results, report_steps))
    final = ", ".join(
        f"{name}={weight:.3f}"
        for name, weight in zip(domains.names, results[0].final_policy, strict=True)
    )
    print(f"final EXP3 weights: {final}")
    if args.out:
        print(f"plot: {plot(results, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
