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
from pathlib import Path

import numpy as np
from tqdm import tqdm

from wf_data.data.deliver.factory import get_eval_loaders, get_loader
from wf_data.data.mix.feedback import MixtureFeedback, row_loss_from_logits
from wf_data.data.prepare.demo_corpus import ensure_demo_data
from wf_data.extras import requires
from wf_data.integrations.checkpoint import load_with_dcp, save_with_dcp

with requires("torch", "hf", feature="wf-data demo"):
    import torch


@dataclasses.dataclass
class DemoOptions:
    """Knobs of the demo run; the defaults finish in a few minutes on 2 cores."""

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
        feedback.observe(loss_per_row.detach(), batch["domain_ids"])
        optimizer.step()
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


def _make_run(options: DemoOptions):
    overrides = [
        f"seq_len={options.seq_len}",
        f"global_batch_size={options.global_batch_size}",
        f"seed={options.seed}",
        "mixing.kind=exp3",
    ]
    loader = get_loader("demo", framework="torch", overrides=overrides)
    from wf_data.data.text.tokenization import TokenizerWrapper

    vocab_size = TokenizerWrapper.from_pretrained(None).vocab_size
    model = build_tiny_llama(vocab_size, options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.learning_rate)
    return loader, model, optimizer, MixtureFeedback(loader), overrides


def _print_weights(history: list[tuple[int, dict[str, float]]]) -> None:
    names = list(history[0][1])
    print("\nEXP3 mixture weights (the policy rows are drawn with)")
    print(f"{'step':>6} " + " ".join(f"{n:>8}" for n in names))
    for step, weights in history:
        print(f"{step:>6} " + " ".join(f"{weights[n]:>8.3f}" for n in names))


def run_demo(options: DemoOptions | None = None) -> dict:
    """Runs the demo and returns its summary (also printed)."""
    options = options or DemoOptions()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    print("Preparing the demo corpus (cached after the first run)...")
    data_root = ensure_demo_data()
    print(f"  shards in {data_root}")

    loader, model, optimizer, feedback, overrides = _make_run(options)
    eval_overrides = [*overrides, f"global_batch_size={options.eval_batch_size}"]
    eval_loaders = get_eval_loaders("demo", framework="torch", overrides=eval_overrides)
    eval_before = evaluate(model, eval_loaders, options.eval_batches)
    history = [(0, loader.mixture)]
    batches = iter(loader)
    train_started = time.perf_counter()
    report_every = max(1, options.steps // 6)
    with tqdm(total=options.steps, desc="training", unit="step") as bar:
        for done in range(0, options.steps, report_every):
            steps = min(report_every, options.steps - done)
            _train_steps(model, optimizer, feedback, batches, steps, bar)
            history.append((done + steps, loader.mixture))
    train_seconds = time.perf_counter() - train_started
    _print_weights(history)

    out_dir = Path(options.out_dir or tempfile.mkdtemp(prefix="wf-data-demo-"))
    checkpoint = out_dir / f"step-{options.steps}"
    if checkpoint.exists():
        shutil.rmtree(checkpoint)
    save_with_dcp(checkpoint, loader, training_state(model, optimizer))
    stats = loader.stats()
    tokens_served = stats["data/tokens_served"]
    expected: list[torch.Tensor] = []
    _train_steps(model, optimizer, feedback, batches, options.resume_check_steps, record=expected)

    # A fresh process would do exactly this: new loader, model and optimizer, then restore.
    loader2, model2, optimizer2, feedback2, _ = _make_run(options)
    state = training_state(model2, optimizer2)
    load_with_dcp(checkpoint, loader2, state)
    load_training_state(model2, optimizer2, state)
    resumed: list[torch.Tensor] = []
    _train_steps(
        model2, optimizer2, feedback2, iter(loader2), options.resume_check_steps, record=resumed
    )
    identical = all(torch.equal(a, b) for a, b in zip(expected, resumed, strict=True))
    print(
        f"\nResume check: {options.resume_check_steps} batches after restoring step "
        f"{options.steps}: {'IDENTICAL' if identical else 'DIFFERENT'}"
    )
    eval_after = evaluate(model, eval_loaders, options.eval_batches)
    summary = {
        "steps": options.steps,
        "mixing": _mixing_settings(overrides),
        "tokens_served": tokens_served,
        "train_tokens_per_s": tokens_served / train_seconds,
        "fill": stats["data/fill"],
        "initial_weights": history[0][1],
        "final_weights": history[-1][1],
        "token_share": {n: stats[f"data/token_share/{n}"] for n in loader.domain_names},
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "resume_identical": identical,
        "checkpoint": str(checkpoint),
        "state_bytes": len(str(loader.state_dict())),
        "seconds": time.perf_counter() - started,
    }
    _print_summary(summary, loader.domain_names)
    for closable in (loader, loader2, *eval_loaders.values()):
        closable.close()
    return summary


def _mixing_settings(overrides) -> str:
    """'exp3 smoothed_mean/excess_loss' (or 'static'): what the demo's config mixes with."""
    from wf_data.config import load_data_config

    mixing = load_data_config("demo", overrides).mixing
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
