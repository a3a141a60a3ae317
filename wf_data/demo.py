"""`wf-data demo`: the whole loop on the embedded corpus, on CPU, in a few minutes.

Prepares the three-domain demo corpus (cached), trains a tiny random-init Llama on the EXP3
mixture fed by the per-domain loss, saves model + optimizer + loader with torch DCP, restores
them into fresh objects, checks that the following batches are identical, and prints a summary.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from wf_data import atomic
from wf_data.config import MixingConfig, load_data_config
from wf_data.data.deliver.factory import get_eval_loaders, get_loader
from wf_data.data.mix.feedback import MixtureFeedback, row_loss_from_logits
from wf_data.data.prepare.demo_corpus import ensure_demo_data
from wf_data.extras import requires
from wf_data.integrations.checkpoint import load_with_dcp, save_with_dcp

with requires("torch", "hf", feature="wf-data demo"):
    import torch


@dataclasses.dataclass
class DemoOptions:
    """Knobs of the demo run; the defaults finish in a few minutes on 2 cores.

    ``compare``: also train a static arm (same seed, model init and token budget) and print
    both arms' held-out losses. ``overrides``: data-config overrides for every arm
    (``"mixing.alpha=0.8"``).
    """

    steps: int = 150
    resume_check_steps: int = 5
    seq_len: int = 256
    global_batch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 2
    learning_rate: float = 3e-3
    eval_batches: int = 4
    eval_batch_size: int = 2
    seed: int = 0
    out_dir: str | None = None
    compare: bool = False
    overrides: tuple[str, ...] = ()


def build_tiny_llama(vocab_size: int, options: DemoOptions) -> torch.nn.Module:
    """A random-init Llama small enough to train on CPU (nothing downloaded)."""
    with requires("torch", "hf", feature="wf-data demo"):
        from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(options.seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=options.hidden_size,
        intermediate_size=options.hidden_size * 3,
        num_hidden_layers=options.num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=options.seq_len,
        tie_word_embeddings=True,
        # Without a KV cache transformers builds the packed-document mask from position_ids;
        # with one it silently attends across the documents packed in a row.
        use_cache=False,
    )
    return LlamaForCausalLM(config)


def row_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean token loss per row, ``(B,)`` float32, over the tokens whose label is not -100.

    ``position_ids`` restart per packed document, from which the model masks attention to
    each document; ``labels`` mask the first token of each, so no loss crosses a boundary.
    """
    logits = model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
    ).logits
    return row_loss_from_logits(logits, batch["labels"])


def _train_steps(model, optimizer, feedback, batches, steps, bar=None, record=None):
    for _ in range(steps):
        batch = next(batches)
        loss_per_row = row_losses(model, batch)
        loss = loss_per_row.mean()
        optimizer.zero_grad()
        loss.backward()
        if feedback is not None:  # None: a static mixture, nothing to feed back
            feedback.observe(loss_per_row.detach(), batch["domain_ids"])
        optimizer.step()
        if feedback is not None:
            feedback.apply()
        if record is not None:
            record.append(batch["input_ids"].clone())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")


@torch.no_grad()
def evaluate(model, eval_loaders, max_batches: int) -> dict[str, float]:
    """Mean validation loss per domain over the first ``max_batches`` held-out batches.

    Each eval loader is reset first, so every evaluation sees the same rows.
    """
    losses = {}
    for name, loader in eval_loaders.items():
        loader.reset()
        values = []
        for index, batch in enumerate(loader):
            if index >= max_batches:
                break
            values.append(row_losses(model, batch).mean().item())
        losses[name] = float(np.mean(values)) if values else float("nan")
    return losses


def training_state(model, optimizer) -> dict:
    """Model and optimizer (moments initialised, as DCP loads in place); the mixture's state,
    pending feedback included, is in the loader state."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def load_training_state(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )


@dataclasses.dataclass
class Arm:
    """One training run of the demo: what it trains with and what it measured.

    ``mixing``: the arm's mixing settings; ``history``: ``(step, {domain: weight})`` every
    sixth of the run; ``eval_after``: held-out loss per domain after ``options.steps`` steps.
    """

    name: str
    mixing: MixingConfig
    loader: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    feedback: MixtureFeedback | None
    history: list[tuple[int, dict[str, float]]] = dataclasses.field(default_factory=list)
    eval_after: dict[str, float] = dataclasses.field(default_factory=dict)
    train_seconds: float = 0.0


def _make_arm(name: str, options: DemoOptions, eval_loaders, mixing: Sequence[str]) -> Arm:
    """A fresh loader, model (same init for a given seed), optimizer and feedback.

    ``mixing``: overrides that make this arm (``mixing.kind=static``); the demo config's
    mixing otherwise. Feedback measures the held-out losses that ``reference_losses: auto`` asks
    for with the demo's own evaluation.
    """
    overrides = [
        f"seq_len={options.seq_len}",
        f"global_batch_size={options.global_batch_size}",
        f"seed={options.seed}",
        *options.overrides,
        *mixing,
    ]
    cfg = load_data_config("demo", overrides)
    loader = get_loader(cfg, framework="torch")
    from wf_data.data.text.tokenization import TokenizerWrapper

    vocab_size = TokenizerWrapper.from_pretrained(None).vocab_size
    model = build_tiny_llama(vocab_size, options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.learning_rate)
    feedback = None
    if cfg.mixing.kind == "exp3":
        feedback = MixtureFeedback(
            loader, evaluate=lambda: evaluate(model, eval_loaders, options.eval_batches)
        )
    return Arm(name, cfg.mixing, loader, model, optimizer, feedback)


def train_arm(arm: Arm, options: DemoOptions, eval_loaders, batches=None) -> Any:
    """Trains ``options.steps`` steps, records the mixture and the final held-out losses;
    returns the batch iterator (the run goes on from there)."""
    batches = iter(arm.loader) if batches is None else batches
    arm.history.append((0, arm.loader.mixture))
    started = time.perf_counter()
    report_every = max(1, options.steps // 6)
    with tqdm(total=options.steps, desc=f"training ({arm.name})", unit="step") as bar:
        for done in range(0, options.steps, report_every):
            steps = min(report_every, options.steps - done)
            _train_steps(arm.model, arm.optimizer, arm.feedback, batches, steps, bar)
            arm.history.append((done + steps, arm.loader.mixture))
    arm.train_seconds = time.perf_counter() - started
    arm.eval_after = evaluate(arm.model, eval_loaders, options.eval_batches)
    return batches


def resume_check(arm: Arm, batches, options: DemoOptions, eval_loaders, checkpoint: Path) -> bool:
    """Saves model + optimizer + loader, trains on, restores all three into fresh objects and
    checks that the next ``resume_check_steps`` batches are identical."""
    if checkpoint.exists():
        shutil.rmtree(checkpoint)
    save_with_dcp(checkpoint, arm.loader, training_state(arm.model, arm.optimizer))
    expected: list[torch.Tensor] = []
    _train_steps(
        arm.model, arm.optimizer, arm.feedback, batches, options.resume_check_steps, None, expected
    )
    # A fresh process would do exactly this: new loader, model and optimizer, then restore.
    fresh = _make_arm(arm.name, options, eval_loaders, [])
    state = training_state(fresh.model, fresh.optimizer)
    load_with_dcp(checkpoint, fresh.loader, state)
    load_training_state(fresh.model, fresh.optimizer, state)
    resumed: list[torch.Tensor] = []
    _train_steps(
        fresh.model,
        fresh.optimizer,
        fresh.feedback,
        iter(fresh.loader),
        options.resume_check_steps,
        None,
        resumed,
    )
    fresh.loader.close()
    return all(torch.equal(a, b) for a, b in zip(expected, resumed, strict=True))


def _print_weights(history: list[tuple[int, dict[str, float]]]) -> None:
    names = list(history[0][1])
    print("\nEXP3 mixture weights (the policy rows are drawn with)")
    print(f"{'step':>6} " + " ".join(f"{n:>8}" for n in names))
    for step, weights in history:
        print(f"{step:>6} " + " ".join(f"{weights[n]:>8.3f}" for n in names))


def run_demo(options: DemoOptions | None = None) -> dict:
    """Runs the demo and returns its summary (also printed).

    The online arm trains with the demo config's mixing, is checkpointed and resumed; with
    ``options.compare`` a static arm (the sources' weights, same seed, model init and token
    budget) trains too and both arms' held-out losses are printed side by side.
    """
    options = options or DemoOptions()
    started = time.perf_counter()
    print("Preparing the demo corpus (cached after the first run)...")
    data_root = ensure_demo_data()
    print(f"  shards in {data_root}")

    eval_overrides = [
        f"seq_len={options.seq_len}",
        f"seed={options.seed}",
        *options.overrides,
        f"global_batch_size={options.eval_batch_size}",
    ]
    eval_loaders = get_eval_loaders("demo", framework="torch", overrides=eval_overrides)
    online = _make_arm("online", options, eval_loaders, [])
    eval_before = evaluate(online.model, eval_loaders, options.eval_batches)
    batches = train_arm(online, options, eval_loaders)
    _print_weights(online.history)
    stats = online.loader.stats()
    state_bytes = len(str(online.loader.state_dict()))

    out_dir = Path(options.out_dir or tempfile.mkdtemp(prefix="wf-data-demo-"))
    checkpoint = out_dir / f"step-{options.steps}"
    identical = resume_check(online, batches, options, eval_loaders, checkpoint)
    print(
        f"\nResume check: {options.resume_check_steps} batches after restoring step "
        f"{options.steps}: {'IDENTICAL' if identical else 'DIFFERENT'}"
    )
    summary = {
        "steps": options.steps,
        "mixing": _mixing_settings(online.mixing),
        "tokens_served": stats["data/tokens_served"],
        "train_tokens_per_s": stats["data/tokens_served"] / online.train_seconds,
        "fill": stats["data/fill"],
        "initial_weights": online.history[0][1],
        "final_weights": online.history[-1][1],
        "token_share": {n: stats[f"data/token_share/{n}"] for n in online.loader.domain_names},
        "eval_loss_before": eval_before,
        "eval_loss_after": online.eval_after,
        "resume_identical": identical,
        "checkpoint": str(checkpoint),
        "state_bytes": state_bytes,
    }
    online.loader.close()
    if options.compare:
        static = _make_arm("static", options, eval_loaders, ["mixing.kind=static"])
        train_arm(static, options, eval_loaders)
        static.loader.close()
        summary["static_eval_loss_after"] = static.eval_after
        summary["comparison"] = compare_arms(online.eval_after, static.eval_after)
    summary["seconds"] = time.perf_counter() - started
    atomic.write_json(out_dir / "summary.json", summary)  # for scripts comparing seeds
    _print_summary(summary, online.loader.domain_names)
    for loader in eval_loaders.values():
        loader.close()
    return summary


def compare_arms(online: dict[str, float], static: dict[str, float]) -> dict[str, Any]:
    """Per-domain and average held-out loss of both arms, online minus static, and the winner
    (the arm with the lower average; a tie below 0.0005 nats is called a tie)."""
    names = list(online)
    average_online = float(np.mean([online[n] for n in names]))
    average_static = float(np.mean([static[n] for n in names]))
    difference = average_online - average_static
    winner = "tie" if abs(difference) < 5e-4 else ("online" if difference < 0 else "static")
    return {
        "online": dict(online),
        "static": dict(static),
        "difference": {n: online[n] - static[n] for n in names},
        "average_online": average_online,
        "average_static": average_static,
        "average_difference": difference,
        "winner": winner,
    }


def _mixing_settings(mixing: MixingConfig) -> str:
    """'exp3 smoothed_mean/excess_loss' (or 'static'): what an arm mixes with."""
    return "static" if mixing.kind == "static" else f"exp3 {mixing.update_rule}/{mixing.reward}"


def _print_summary(summary: dict, names) -> None:
    # configured: the sources' weights (the bandit's prior); final: the policy rows are drawn
    # with now; realised: the share of training tokens each domain actually got.
    print(f"\nSummary (mixing: {summary['mixing']})")
    print(
        f"{'domain':<8} {'configured':>10} {'final':>7} {'realised':>9} {'eval before':>11} "
        f"{'eval after':>10}"
    )
    for name in names:
        print(
            f"{name:<8} {summary['initial_weights'][name]:>10.3f} "
            f"{summary['final_weights'][name]:>7.3f} {summary['token_share'][name]:>9.3f} "
            f"{summary['eval_loss_before'][name]:>11.3f} {summary['eval_loss_after'][name]:>10.3f}"
        )
    print(
        f"steps {summary['steps']}, tokens {summary['tokens_served']:.0f} "
        f"({summary['train_tokens_per_s']:.0f} tokens/s incl. model), fill "
        f"{summary['fill']:.3f}, loader state {summary['state_bytes']} bytes, resume "
        f"{'identical' if summary['resume_identical'] else 'DIFFERENT'}, checkpoint "
        f"{summary['checkpoint']}, {summary['seconds']:.0f} s in all"
    )
    if "comparison" in summary:
        _print_comparison(summary["comparison"], summary["steps"])


def _print_comparison(comparison: dict, steps: int) -> None:
    names = list(comparison["online"])
    print(f"\nHeld-out loss after {steps} steps, same seed, model init and tokens (lower wins)")
    print(f"{'arm':<20}" + "".join(f"{n:>8}" for n in names) + f"{'average':>9}")
    for arm in ("online", "static", "difference"):
        label = "online minus static" if arm == "difference" else arm
        values = comparison[arm]
        average = comparison[f"average_{arm}"]
        sign = "+" if arm == "difference" else ""
        print(
            f"{label:<20}"
            + "".join(f"{values[n]:>{sign}8.3f}" for n in names)
            + f"{average:>{sign}9.3f}"
        )
    winner = comparison["winner"]
    verdict = "a tie" if winner == "tie" else f"{winner} mixing wins"
    print(f"{verdict} (average held-out loss {comparison['average_difference']:+.3f})")
