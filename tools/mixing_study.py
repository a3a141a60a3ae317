"""Does online mixing beat static weights? Train the same tiny model under each mixing arm.

Five domains: the demo corpus (prose, code, math), ``random`` (uniformly random token ids,
decoded and re-tokenized: unlearnable beyond unigram statistics) and ``small`` (40 short
synthetic JSON records: the loader restarts it every few dozen rows, so it is seen for many
epochs). Every arm starts from the uniform prior and trains the same random-init Llama
(`wf_data.demo.build_tiny_llama`) for the same steps and tokens with the same seed; only the
mixing differs. Arms: static weights, and the EXP3 bandit with each update rule and reward.
``excess_loss`` takes as reference the static arm's final held-out loss of the same seed (a
DoReMi-style reference model trained on the prior mixture).

Reported per arm (mean and spread over seeds): held-out loss per domain and its average,
realised token share per domain, and the first evaluated step at which the average held-out
loss reaches the static arm's final one. Writes a markdown table and a plot:

    uv run python tools/mixing_study.py                  # 3 seeds, all arms, < 10 min on 2 cores
    uv run python tools/mixing_study.py --steps 40 --seeds 0 --arms static paper-loss

Only the public loader API is used (`get_loader`, `get_eval_loaders`, `update_mixture` with
`per_domain_loss`, `stats()`, `mixture`) and the demo's model and evaluation helpers, so the
loader may change beneath it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# name -> mixing overrides; "static" must come first (excess_loss reads its final losses).
ARMS: dict[str, dict] = {
    "static": {"kind": "static"},
    "paper-loss": {"kind": "exp3", "update_rule": "paper", "reward": "loss"},
    "paper-excess": {"kind": "exp3", "update_rule": "paper", "reward": "excess_loss"},
    "paper-progress": {"kind": "exp3", "update_rule": "paper", "reward": "loss_decrease"},
    "smoothed-loss": {"kind": "exp3", "update_rule": "smoothed_mean", "reward": "loss"},
    "smoothed-excess": {"kind": "exp3", "update_rule": "smoothed_mean", "reward": "excess_loss"},
    "smoothed-progress": {
        "kind": "exp3",
        "update_rule": "smoothed_mean",
        "reward": "loss_decrease",
    },
    "prop-progress": {"kind": "exp3", "update_rule": "proportional", "reward": "loss_decrease"},
    "prop-change": {"kind": "exp3", "update_rule": "proportional", "reward": "loss_change"},
    "prop-relprogress": {
        "kind": "exp3",
        "update_rule": "proportional",
        "reward": "relative_decrease",
    },
    "prop-progress-token": {
        "kind": "exp3",
        "update_rule": "proportional",
        "reward": "loss_decrease_per_token",
    },
    "prop-excess": {"kind": "exp3", "update_rule": "proportional", "reward": "excess_loss"},
    "prop-excess-auto": {
        "kind": "exp3",
        "update_rule": "proportional",
        "reward": "excess_loss",
        "reference_losses": "auto",
        "warmup_fraction": 0.2,
    },
    "prop-relexcess": {"kind": "exp3", "update_rule": "proportional", "reward": "relative_excess"},
}
DOMAINS = ("prose", "code", "math", "random", "small")
SMALL_DOCUMENTS = 40


@dataclasses.dataclass
class StudyOptions:
    """Size of every run; the defaults fit 3 seeds x 7 arms in under 10 minutes on 2 cores."""

    steps: int = 120
    eval_every: int = 10
    seq_len: int = 128
    global_batch_size: int = 8
    hidden_size: int = 64
    num_layers: int = 2
    learning_rate: float = 3e-3
    eval_batches: int = 4
    eval_batch_size: int = 2
    min_weight: float = 0.05
    alpha: float = 0.9


@dataclasses.dataclass
class ArmResult:
    """One run: held-out loss per domain at each evaluated step, realised token share."""

    arm: str
    seed: int
    eval_steps: list[int]
    eval_loss: list[dict[str, float]]
    token_share: dict[str, float]
    final_weights: dict[str, float]
    seconds: float

    def average(self) -> np.ndarray:
        """(E,) mean held-out loss over the domains at each evaluated step."""
        return np.array([np.mean(list(losses.values())) for losses in self.eval_loss])


# ----------------------------------------------------------------------------- data


def _random_documents(tokenizer, count: int, length: int, seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 0x52])
    ids = rng.integers(0, tokenizer.vocab_size, size=(count, length))
    return [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in ids]


def _small_documents(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 0x53])
    cities = ["Lisbon", "Oslo", "Quito", "Hanoi", "Accra", "Perth", "Lima", "Riga"]
    names = ["Ada", "Bo", "Cy", "Di", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo"]
    documents = []
    for _ in range(count):
        records = [
            {
                "name": str(rng.choice(names)),
                "age": int(rng.integers(18, 90)),
                "city": str(rng.choice(cities)),
                "score": round(float(rng.random()), 2),
            }
            for _ in range(4)
        ]
        documents.append("\n".join(json.dumps(record) for record in records))
    return documents


def prepare_study_data(root: str | os.PathLike | None = None) -> dict[str, dict[str, Path]]:
    """The five domains as token shards, cached: ``{split: {domain: path}}``.

    The demo domains come from `ensure_demo_data`; ``random`` and ``small`` are written under
    ``root`` (default: beside the demo cache) on first use.
    """
    from wf_data.data.prepare import prepare
    from wf_data.data.prepare.demo_corpus import demo_cache_dir, ensure_demo_data
    from wf_data.data.text.tokenization import TokenizerWrapper

    demo = ensure_demo_data(progress=False)
    root = Path(root) if root is not None else demo_cache_dir().parent / "mixing-study"
    tokenizer = TokenizerWrapper.from_pretrained(None)
    extra = {
        ("train", "random"): lambda: _random_documents(tokenizer, 400, 200, seed=0),
        ("validation", "random"): lambda: _random_documents(tokenizer, 40, 200, seed=1),
        ("train", "small"): lambda: _small_documents(SMALL_DOCUMENTS, seed=0),
        ("validation", "small"): lambda: _small_documents(SMALL_DOCUMENTS, seed=1),
    }
    paths: dict[str, dict[str, Path]] = {"train": {}, "validation": {}}
    for domain in DOMAINS[:3]:
        paths["train"][domain] = demo / domain
        paths["validation"][domain] = demo / "validation" / domain
    for (split, domain), make in extra.items():
        out = root / split / domain
        if not (out / "manifest.json").is_file():
            jsonl = root / "jsonl" / f"{domain}-{split}.jsonl"
            _write_atomic(jsonl, "".join(json.dumps({"text": text}) + "\n" for text in make()))
            prepare([jsonl], out, tokenizer=tokenizer, name=domain, num_shards=1, progress=False)
        paths[split][domain] = out
    return paths


def study_config(paths, mixing: dict, seed: int, options: StudyOptions) -> dict:
    """The data config of one arm: uniform prior over `DOMAINS`, held-out eval sources."""
    mixing = dict(mixing)
    if mixing["kind"] == "exp3":
        mixing.setdefault("alpha", options.alpha)
        mixing.setdefault("min_weight", options.min_weight)
    return {
        "name": "mixing-study",
        "tokenizer": "wf-data-demo",
        "seq_len": options.seq_len,
        "global_batch_size": options.global_batch_size,
        "seed": seed,
        "mixing": mixing,
        "sources": {
            d: {"path": str(paths["train"][d]), "weight": 1.0, "format": "tokens"} for d in DOMAINS
        },
        "eval_sources": {
            d: {"path": str(paths["validation"][d]), "format": "tokens"} for d in DOMAINS
        },
    }


# ----------------------------------------------------------------------------- one run


def _train_steps(model, optimizer, feedback, batches, steps: int, learns: bool) -> None:
    """`steps` optimizer steps; an online mixture gets each step's per-domain mean loss."""
    from wf_data.demo import row_losses

    for _ in range(steps):
        batch = next(batches)
        loss_per_row = row_losses(model, batch)
        optimizer.zero_grad()
        loss_per_row.mean().backward()
        optimizer.step()
        if learns:
            feedback.observe(loss_per_row.detach(), batch["domain_ids"])
            feedback.apply()


def run_arm(
    arm: str,
    seed: int,
    paths,
    options: StudyOptions,
    reference: dict[str, float] | None = None,
) -> ArmResult:
    """Train one arm for `options.steps` steps and evaluate every `options.eval_every`."""
    import torch

    from wf_data.data.deliver.factory import get_eval_loaders, get_loader
    from wf_data.data.mix.feedback import MixtureFeedback
    from wf_data.demo import DemoOptions, build_tiny_llama, evaluate

    started = time.perf_counter()
    mixing = dict(ARMS[arm])
    if mixing.get("reference_losses") == "auto":
        mixing["total_steps"] = options.steps
    elif mixing.get("reward") in ("excess_loss", "relative_excess"):
        if reference is None:
            raise ValueError(f"arm {arm!r} needs the static arm's final losses as reference")
        mixing["reference_losses"] = reference
    cfg = study_config(paths, mixing, seed, options)
    loader = get_loader(cfg, framework="torch")
    eval_cfg = {**cfg, "global_batch_size": options.eval_batch_size}
    eval_loaders = get_eval_loaders(eval_cfg, framework="torch")
    demo_options = DemoOptions(
        seq_len=options.seq_len,
        hidden_size=options.hidden_size,
        num_layers=options.num_layers,
        seed=seed,
    )
    model = build_tiny_llama(loader_vocab_size(), demo_options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.learning_rate)
    # reference_losses: auto measures with the study's own evaluation.
    feedback = MixtureFeedback(
        loader, evaluate=lambda: evaluate(model, eval_loaders, options.eval_batches)
    )
    batches = iter(loader)
    eval_steps, eval_loss = [0], [evaluate(model, eval_loaders, options.eval_batches)]
    done = 0
    while done < options.steps:
        chunk = min(options.eval_every, options.steps - done)
        _train_steps(model, optimizer, feedback, batches, chunk, learns=mixing["kind"] == "exp3")
        done += chunk
        eval_steps.append(done)
        eval_loss.append(evaluate(model, eval_loaders, options.eval_batches))
    stats = loader.stats()
    result = ArmResult(
        arm=arm,
        seed=seed,
        eval_steps=eval_steps,
        eval_loss=eval_loss,
        token_share={d: float(stats[f"data/token_share/{d}"]) for d in DOMAINS},
        final_weights={d: float(w) for d, w in loader.mixture.items()},
        seconds=time.perf_counter() - started,
    )
    for closable in (loader, *eval_loaders.values()):
        closable.close()
    return result


def loader_vocab_size() -> int:
    """Vocabulary of the demo tokenizer (the model's output size)."""
    from wf_data.data.text.tokenization import TokenizerWrapper

    return TokenizerWrapper.from_pretrained(None).vocab_size


# ----------------------------------------------------------------------------- report


def steps_to_reach(result: ArmResult, target: float) -> int | None:
    """First evaluated step whose average held-out loss is <= `target`; None if never."""
    for step, value in zip(result.eval_steps, result.average(), strict=True):
        if value <= target:
            return step
    return None


def summarise(results: Sequence[ArmResult]) -> list[dict]:
    """One row per arm: mean and std over seeds of every reported figure."""
    static_final = {r.seed: r.average()[-1] for r in results if r.arm == "static"}
    rows = []
    for arm in dict.fromkeys(r.arm for r in results):
        runs = [r for r in results if r.arm == arm]
        final = np.array([[r.eval_loss[-1][d] for d in DOMAINS] for r in runs])  # (S, D)
        share = np.array([[r.token_share[d] for d in DOMAINS] for r in runs])
        reach = [steps_to_reach(r, static_final[r.seed]) for r in runs if r.seed in static_final]
        rows.append(
            {
                "arm": arm,
                "seeds": len(runs),
                "loss_mean": final.mean(axis=0),
                "loss_std": final.std(axis=0),
                "average_mean": final.mean(axis=1).mean(),
                "average_std": final.mean(axis=1).std(),
                "share_mean": share.mean(axis=0),
                "share_std": share.std(axis=0),
                "reach": reach,
                "seeds_run": [r.seed for r in runs],
                "averages": final.mean(axis=1).tolist(),
            }
        )
    return rows


def _spread(means, stds) -> list[str]:
    return [f"{m:.3f} ± {s:.3f}" for m, s in zip(means, stds, strict=True)]


def format_markdown(rows: Sequence[dict], options: StudyOptions) -> str:
    """Two markdown tables: final held-out loss (with steps-to-static) and token share."""
    header = "| arm | " + " | ".join(DOMAINS) + " | average | steps to static final |"
    rule = "|---" * (len(DOMAINS) + 3) + "|"
    lines = [
        f"Held-out loss after {options.steps} steps (mean ± std over seeds; lower is better). "
        "Steps to static final: first evaluated step (every "
        f"{options.eval_every}) at which the average reaches the static arm's final average, "
        "per seed ('-' = never).",
        "",
        header,
        rule,
    ]
    for row in rows:
        cells = _spread(row["loss_mean"], row["loss_std"])
        reach = ", ".join("-" if r is None else str(r) for r in row["reach"])
        lines.append(
            f"| {row['arm']} | "
            + " | ".join(cells)
            + f" | **{row['average_mean']:.3f}** ± {row['average_std']:.3f} | {reach} |"
        )
    lines += ["", "Average held-out loss per seed (the rows above, seed by seed).", ""]
    seeds = rows[0]["seeds_run"]
    lines += ["| seed | " + " | ".join(row["arm"] for row in rows) + " |"]
    lines += ["|---" * (len(rows) + 1) + "|"]
    for index, seed in enumerate(seeds):
        cells = [f"{row['averages'][index]:.3f}" for row in rows]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines.append(
        "| mean ± std | "
        + " | ".join(f"{row['average_mean']:.3f} ± {row['average_std']:.3f}" for row in rows)
        + " |"
    )
    lines += ["", "Realised token share per domain (mean ± std over seeds).", ""]
    lines += ["| arm | " + " | ".join(DOMAINS) + " |", "|---" * (len(DOMAINS) + 1) + "|"]
    for row in rows:
        cells = _spread(row["share_mean"], row["share_std"])
        lines.append(f"| {row['arm']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def docs_markers(seeds: Sequence[int]) -> tuple[str, str]:
    """The comments around the tables of one seed set in a docs page: a page holds one
    section per seed set (the seeds settings were chosen on, and the confirmation seeds)."""
    label = " ".join(map(str, seeds))
    return (
        f"<!-- mixing-study:begin seeds {label} (written by tools/mixing_study.py --docs) -->",
        f"<!-- mixing-study:end seeds {label} -->",
    )


def write_docs(path: str | os.PathLike, table: str, seeds: Sequence[int]) -> Path:
    """Replaces the text between the `docs_markers(seeds)` in `path` with `table`, headed by
    the date, the machine and the seeds."""
    import datetime
    import platform

    path = Path(path)
    text = path.read_text()
    begin, end = docs_markers(seeds)
    if begin not in text or end not in text:
        raise ValueError(f"{path}: no {begin!r} ... {end!r} section to replace")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    stamp = (
        f"Measured on {datetime.date.today().isoformat()}, {platform.system()} "
        f"{platform.machine()}, {os.cpu_count()} cores, seeds {', '.join(map(str, seeds))}."
    )
    _write_atomic(path, f"{head}{begin}\n{stamp}\n\n{table}{end}{tail}")
    return path


def plot(results: Sequence[ArmResult], path: str | os.PathLike) -> Path:
    """PNG: average held-out loss over steps per arm (left), token share per arm (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wf_data.viz import save_figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arms = list(dict.fromkeys(r.arm for r in results))
    figure, (loss_axes, share_axes) = plt.subplots(1, 2, figsize=(13, 5))
    for arm in arms:
        runs = [r for r in results if r.arm == arm]
        curves = np.array([r.average() for r in runs])
        steps = runs[0].eval_steps
        line = loss_axes.plot(steps, curves.mean(axis=0), label=arm)[0]
        loss_axes.fill_between(
            steps, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.15
        )
    loss_axes.set_xlabel("training step")
    loss_axes.set_ylabel("average held-out loss over domains")
    loss_axes.set_title("Held-out loss (mean, min-max over seeds)")
    loss_axes.legend(fontsize="small")
    bottom = np.zeros(len(arms))
    for domain in DOMAINS:
        share = np.array(
            [np.mean([r.token_share[domain] for r in results if r.arm == arm]) for arm in arms]
        )
        share_axes.bar(arms, share, bottom=bottom, label=domain)
        bottom += share
    share_axes.set_ylabel("realised token share")
    share_axes.set_title("Tokens per domain")
    share_axes.tick_params(axis="x", rotation=30)
    share_axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    try:
        return save_figure(figure, path, dpi=100)
    finally:
        plt.close(figure)


def _write_atomic(path: Path, text: str) -> None:
    """`wf_data.atomic.write_text`, creating the directory first."""
    from wf_data import atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, text)


class _InlinePool:
    """`jobs=1`: run in this process (no spawn, no second torch import)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        from concurrent.futures import Future

        future = Future()
        future.set_result(fn(*args))
        return future


def _run_in_worker(arm, seed, paths, options, reference) -> ArmResult:
    import torch

    # One thread per process: on a shared 2-core machine a second one mostly spins (measured
    # 6x slower); the study runs `jobs` processes side by side instead.
    torch.set_num_threads(1)
    return run_arm(arm, seed, paths, options, reference)


def run_study(
    options: StudyOptions,
    seeds: Sequence[int],
    arms: Sequence[str],
    jobs: int = 2,
    log=print,
    cache_dir: str | os.PathLike | None = None,
) -> list[ArmResult]:
    """Every arm for every seed on `jobs` processes; the static arms run first, as they are
    the excess rewards' reference. Results come in (seed, arm) order.

    With `cache_dir`, each finished run is kept there as JSON and reused by a later call with
    the same arm settings, seed and options (a study can be extended arm by arm)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    paths = prepare_study_data()
    online = [arm for arm in arms if arm != "static"]
    results: dict[tuple[int, str], ArmResult] = {}
    pool = (
        _InlinePool()
        if jobs == 1
        else ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
    )
    with pool:
        for phase in (["static"], online):
            submitted = {}
            for seed in seeds:
                for arm in phase:
                    reference = results[seed, "static"].eval_loss[-1] if arm != "static" else None
                    cached = _cached_run(cache_dir, arm, seed, options, reference)
                    submitted[seed, arm] = cached or pool.submit(
                        _run_in_worker, arm, seed, paths, options, reference
                    )
            for (seed, arm), job in submitted.items():
                result = job if isinstance(job, ArmResult) else job.result()
                results[seed, arm] = result
                if not isinstance(job, ArmResult):
                    _cache_run(cache_dir, result, options, reference_of(results, seed, arm))
                log(
                    f"seed {seed} {arm:<18} average held-out {result.average()[-1]:.3f}  "
                    f"({result.seconds:.0f} s{', cached' if isinstance(job, ArmResult) else ''})"
                )
    return [results[seed, arm] for seed in seeds for arm in ARMS if arm in arms or arm == "static"]


def reference_of(results, seed: int, arm: str) -> dict[str, float] | None:
    """The static arm's final held-out losses, the reference an online arm of `seed` ran with."""
    return results[seed, "static"].eval_loss[-1] if arm != "static" else None


def _cache_key(arm: str, seed: int, options: StudyOptions, reference) -> dict:
    return {
        "arm": arm,
        "mixing": ARMS[arm],
        "seed": seed,
        "options": dataclasses.asdict(options),
        "reference": reference,
    }


def _cached_run(cache_dir, arm, seed, options, reference) -> ArmResult | None:
    if cache_dir is None:
        return None
    path = Path(cache_dir) / f"{arm}-seed{seed}.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved["key"] != json.loads(json.dumps(_cache_key(arm, seed, options, reference))):
        return None
    return ArmResult(**saved["result"])


def _cache_run(cache_dir, result: ArmResult, options: StudyOptions, reference) -> None:
    if cache_dir is not None:
        key = _cache_key(result.arm, result.seed, options, reference)
        entry = {"key": key, "result": dataclasses.asdict(result)}
        _write_atomic(Path(cache_dir) / f"{result.arm}-seed{result.seed}.json", json.dumps(entry))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the study, print and write the table, write the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = StudyOptions()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (1 thread each)")
    parser.add_argument("--out-dir", default="outputs", help="where the table, JSON and plot go")
    parser.add_argument(
        "--cache-dir", default=None, help="keep each run here and reuse it when nothing changed"
    )
    parser.add_argument("--docs", default=None, help="also write the tables into this page")
    args = parser.parse_args(argv)
    options = dataclasses.replace(defaults, steps=args.steps, eval_every=args.eval_every)
    started = time.perf_counter()
    results = run_study(options, args.seeds, args.arms, jobs=args.jobs, cache_dir=args.cache_dir)
    table = format_markdown(summarise(results), options)
    print("\n" + table)
    out_dir = Path(args.out_dir)
    _write_atomic(out_dir / "mixing_study.md", table)
    _write_atomic(
        out_dir / "mixing_study.json",
        json.dumps([dataclasses.asdict(r) for r in results], indent=1),
    )
    if args.docs:
        print(f"docs: {write_docs(args.docs, table, args.seeds)}")
    print(f"plot: {plot(results, out_dir / 'mixing_study.png')}")
    print(f"{len(results)} runs in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
