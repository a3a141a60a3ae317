"""Tests for wf_data.data.mix.feedback: per-domain losses and InfluenceAwareOptimizer."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wf_data.data.deliver.loader import DataLoader
from wf_data.data.mix.exp3 import Exp3
from wf_data.data.mix.feedback import (
    MixtureFeedback,
    masked_row_loss,
    per_domain_loss,
    row_loss_from_logits,
)
from wf_data.data.mix.mixing import Exp3Policy, mix_plans

NUM_DOMAINS = 5


def sample_rows(seed=0, batch=64):
    """(B,) float32-representable row losses with one NaN row, and ids leaving domain 4 empty."""
    rng = np.random.default_rng([seed, 3])
    row_loss = rng.uniform(0.5, 4.0, size=batch).astype(np.float32).astype(np.float64)
    domain_ids = rng.integers(0, NUM_DOMAINS - 1, size=batch).astype(np.int32)
    row_loss[5] = np.nan
    return row_loss, domain_ids


def reference_per_domain(row_loss, domain_ids, num_domains):
    means, counts = np.full(num_domains, np.nan), np.zeros(num_domains, dtype=np.int64)
    for d in range(num_domains):
        values = [v for v, i in zip(row_loss, domain_ids, strict=True) if i == d and v == v]
        counts[d] = len(values)
        if values:
            means[d] = math.fsum(values) / len(values)
    return means, counts


# --- per_domain_loss ---------------------------------------------------------------------------


def test_per_domain_loss_numpy_matches_reference():
    row_loss, domain_ids = sample_rows()
    mean, counts = per_domain_loss(row_loss, domain_ids, NUM_DOMAINS)
    expected_mean, expected_counts = reference_per_domain(row_loss, domain_ids, NUM_DOMAINS)
    assert mean.dtype == np.float64 and counts.dtype == np.int64
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-12)
    np.testing.assert_array_equal(counts, expected_counts)
    assert np.isnan(mean[4]) and counts[4] == 0
    assert counts.sum() == len(row_loss) - 1  # the NaN row is left out


def test_per_domain_loss_equal_across_torch_numpy_and_jax():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    row_loss, domain_ids = sample_rows(seed=1)
    mean_np, counts_np = per_domain_loss(row_loss, domain_ids, NUM_DOMAINS)

    mean_torch, counts_torch = per_domain_loss(
        torch.tensor(row_loss, dtype=torch.float32), torch.tensor(domain_ids), NUM_DOMAINS
    )
    assert isinstance(mean_torch, torch.Tensor) and mean_torch.dtype == torch.float32
    assert counts_torch.dtype == torch.int64
    mean_jax, counts_jax = per_domain_loss(
        jnp.asarray(row_loss, dtype=jnp.float32), jnp.asarray(domain_ids), NUM_DOMAINS
    )
    assert isinstance(mean_jax, jax.Array)
    jitted = jax.jit(per_domain_loss, static_argnums=2)(
        jnp.asarray(row_loss, dtype=jnp.float32), jnp.asarray(domain_ids), NUM_DOMAINS
    )
    for mean, counts in [(mean_torch, counts_torch), (mean_jax, counts_jax), jitted]:
        np.testing.assert_allclose(np.asarray(mean), mean_np, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(counts), counts_np)
    # float64 torch keeps float64: equal to numpy to rounding.
    mean64, _ = per_domain_loss(torch.tensor(row_loss), torch.tensor(domain_ids), NUM_DOMAINS)
    assert mean64.dtype == torch.float64
    np.testing.assert_allclose(mean64.numpy(), mean_np, rtol=1e-12)


def test_per_domain_loss_torch_details():
    row_loss, domain_ids = sample_rows(seed=2)
    loss = torch.tensor(row_loss, dtype=torch.bfloat16, requires_grad=True)
    mean, counts = per_domain_loss(loss, domain_ids, NUM_DOMAINS)  # numpy ids are converted
    assert mean.dtype == torch.float32 and not mean.requires_grad
    expected, _ = per_domain_loss(loss.detach().float().numpy(), domain_ids, NUM_DOMAINS)
    np.testing.assert_allclose(mean.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_per_domain_loss_validates(framework):
    convert = {
        "numpy": np.asarray,
        "torch": torch.as_tensor,
        "jax": lambda x: pytest.importorskip("jax.numpy").asarray(x),
    }[framework]
    loss = convert(np.array([1.0, 2.0, 3.0], dtype=np.float32))
    with pytest.raises(
        ValueError, match=r"domain_ids must lie in \[0, 3\), got values from 0 to 3"
    ):
        per_domain_loss(loss, convert(np.array([0, 1, 3])), 3)
    with pytest.raises(ValueError, match="got values from -1"):
        per_domain_loss(loss, convert(np.array([-1, 1, 2])), 3)
    with pytest.raises(ValueError, match="shape of row_loss"):
        per_domain_loss(loss, convert(np.array([0, 1])), 3)
    with pytest.raises(TypeError, match="integers"):
        per_domain_loss(loss, convert(np.array([0.0, 1.0, 2.0])), 3)
    with pytest.raises(ValueError, match="1-D"):
        per_domain_loss(convert(np.ones((3, 2), dtype=np.float32)), convert(np.zeros(3, int)), 3)
    with pytest.raises(ValueError, match="num_domains"):
        per_domain_loss(loss, convert(np.array([0, 0, 0])), 0)


def test_importing_influence_does_not_import_torch_or_jax():
    code = (
        "import sys, numpy as np\n"
        "from wf_data.data.mix.feedback import per_domain_loss, masked_row_loss\n"
        "mean, counts = per_domain_loss(np.array([1.0, 3.0]), np.array([1, 1]), 2)\n"
        "assert counts.tolist() == [0, 2] and mean[1] == 2.0\n"
        "assert 'torch' not in sys.modules and 'jax' not in sys.modules, 'framework imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


# --- masked_row_loss / row_loss_from_logits ------------------------------------------------------


def token_batch(seed=0, batch=4, seq_len=9, vocab=11):
    rng = np.random.default_rng([seed, 4])
    logits = rng.normal(size=(batch, seq_len, vocab)).astype(np.float32)
    labels = rng.integers(0, vocab, size=(batch, seq_len)).astype(np.int32)
    labels[rng.random((batch, seq_len)) < 0.3] = -100
    labels[:, 0] = -100
    labels[2] = -100  # a row without any loss token
    return logits, labels


def reference_row_loss(logits, labels):
    """Shifted next-token cross-entropy, one row and position at a time."""
    rows = []
    for row_logits, row_labels in zip(logits.astype(np.float64), labels, strict=True):
        losses = []
        for t in range(len(row_labels) - 1):
            target = row_labels[t + 1]
            if target != -100:
                z = row_logits[t]
                losses.append(math.log(np.exp(z - z.max()).sum()) + z.max() - z[target])
        rows.append(sum(losses) / len(losses) if losses else math.nan)
    return np.array(rows)


def test_masked_row_loss_across_frameworks():
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(9)
    token_loss = rng.uniform(0, 5, size=(4, 7)).astype(np.float32)
    _, labels = token_batch(seq_len=7)
    expected = np.array(
        [
            token_loss[b][labels[b] != -100].mean() if (labels[b] != -100).any() else np.nan
            for b in range(4)
        ]
    )
    results = [
        masked_row_loss(token_loss, labels),
        masked_row_loss(torch.tensor(token_loss), torch.tensor(labels)).numpy(),
        np.asarray(masked_row_loss(jnp.asarray(token_loss), jnp.asarray(labels))),
    ]
    for result in results:
        np.testing.assert_allclose(result, expected, rtol=1e-6)
        assert np.isnan(result[2])
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        masked_row_loss(token_loss, labels[:, :3])


def test_masked_row_loss_is_differentiable_in_torch():
    token_loss = torch.rand(4, 7, requires_grad=True)
    _, labels = token_batch(seq_len=7)
    row_loss = masked_row_loss(token_loss, torch.tensor(labels))
    row_loss[~torch.isnan(row_loss)].sum().backward()
    assert torch.isfinite(token_loss.grad).all()
    assert (token_loss.grad[torch.tensor(labels) == -100] == 0).all()


def test_row_loss_from_logits_across_frameworks():
    jnp = pytest.importorskip("jax.numpy")
    logits, labels = token_batch()
    expected = reference_row_loss(logits, labels)
    results = [
        row_loss_from_logits(logits, labels),
        row_loss_from_logits(torch.tensor(logits), torch.tensor(labels)).numpy(),
        np.asarray(row_loss_from_logits(jnp.asarray(logits), jnp.asarray(labels))),
    ]
    for result in results:
        np.testing.assert_allclose(result, expected, rtol=1e-5)
    # The rows then feed per_domain_loss; the NaN row (no loss token) counts for nothing.
    _, counts = per_domain_loss(results[1], np.array([0, 0, 1, 1]), 2)
    np.testing.assert_array_equal(counts, [2, 1])


# --- MixtureFeedback ---------------------------------------------------------------------------


def exp3_loader():
    from tests.data.deliver.test_loader import make_loader

    return make_loader("exp3")


def test_feedback_observes_then_applies_explicitly():
    loader, reference = exp3_loader(), exp3_loader()
    feedback = MixtureFeedback(loader)
    rows = []
    for step in range(2):
        batch = next(loader)
        next(reference)
        row_loss = torch.tensor([3.0, 1.0, float("nan"), 2.0]) + step
        feedback.observe(row_loss, torch.as_tensor(batch["domain_ids"]))
        rows.append((row_loss.numpy(), batch["domain_ids"]))
    assert loader.policy.bandit.step == 0, "observe alone never updates"
    assert loader.state_dict()["feedback"] != reference.state_dict()["feedback"]
    feedback.apply()
    assert loader.policy.bandit.step == 1
    mean, _ = per_domain_loss(
        np.concatenate([r[0] for r in rows]).astype(np.float64),
        np.concatenate([r[1] for r in rows]),
        3,
    )
    reference.update_mixture(mean)
    assert loader.mixture == pytest.approx(reference.mixture)
    feedback.apply()  # nothing pending: no update
    assert loader.policy.bandit.step == 1


def test_feedback_takes_numpy_and_jax_and_refuses_non_loaders():
    jnp = pytest.importorskip("jax.numpy")
    loader = exp3_loader()
    feedback = MixtureFeedback(loader)
    feedback.observe(np.array([1.0, 3.0]), np.array([0, 0]))
    feedback.observe(jnp.array([2.0]), jnp.array([2]))
    assert loader.state_dict()["feedback"] == {"a": [4.0, 2.0], "b": [0.0, 0.0], "c": [2.0, 1.0]}
    with pytest.raises(TypeError, match="observe_losses"):
        MixtureFeedback(Exp3(3))


def auto_reference_loader():
    """A numpy loader whose EXP3 mixture measures its references (warm-up 4 of 12 updates)."""
    from tests.data.deliver.test_loader import GLOBAL_BATCH, mixing

    static, reader = mixing("static")
    bandit = Exp3(
        3,
        prior=[0.5, 0.3, 0.2],
        update_rule="proportional",
        reward="relative_excess",
        reference_losses="auto",
        warmup_steps=4,
        total_steps=12,
        min_weight=0.05,
    )
    mixer = mix_plans(static.datasets, Exp3Policy(bandit), seed=1)
    return DataLoader(mixer, reader, global_batch_size=GLOBAL_BATCH, framework="numpy")


def held_out(calls):
    """An evaluate function that logs its calls and answers falling losses by name."""

    def evaluate():
        calls.append(len(calls))
        return {"a": 6.0 / (1 + len(calls)), "b": 3.0, "c": 2.0 - 0.5 * len(calls)}

    return evaluate


def feed(loader, feedback, steps):
    batches = []
    for _ in range(steps):
        batch = next(loader)
        batches.append(batch["input_ids"])
        row_loss = 4.0 - batch["domain_ids"] - 0.1 * loader.step
        feedback.observe(row_loss, batch["domain_ids"])
        feedback.apply()
    return batches


def test_feedback_measures_auto_references_when_due_and_resumes_exactly():
    loader, calls = auto_reference_loader(), []
    feedback = MixtureFeedback(loader, evaluate=held_out(calls))
    feed(loader, feedback, 3)  # the first measurement is due after update 2
    assert calls == [0]
    state = loader.state_dict()  # between the two measurements
    expected = feed(loader, feedback, 7)
    assert calls == [0, 1]
    bandit = loader.mixer.policy.bandit
    assert bandit.reference_losses is not None and bandit.policy()[1] == pytest.approx(0.05)

    restored, restored_calls = auto_reference_loader(), [0]
    restored.load_state_dict(state)
    resumed = feed(restored, MixtureFeedback(restored, evaluate=held_out(restored_calls)), 7)
    assert restored_calls == [0, 1]  # only the second measurement, after the restore
    for got, want in zip(resumed, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert restored.mixture == loader.mixture


def test_feedback_without_evaluate_fails_at_the_update_after_a_missed_measurement():
    loader = auto_reference_loader()
    feedback = MixtureFeedback(loader)
    feed(loader, feedback, 2)
    assert loader.reference_due
    with pytest.raises(RuntimeError, match=r"evaluate=\.\.\.\) does it"):
        feed(loader, feedback, 1)
    with pytest.raises(TypeError, match="evaluate must be callable"):
        MixtureFeedback(loader, evaluate="losses")


# --- two gloo processes ------------------------------------------------------------------------

GLOO_STEPS = 6
GLOO_UPDATE_EVERY = 2


def gloo_rows(rank, step):
    """Rank-specific rows: rank 0 sees domains 0-1, rank 1 domains 0-2."""
    rng = np.random.default_rng([17, step, rank])
    size = 3 + 2 * rank
    domain_ids = rng.integers(0, 2 + rank, size=size)
    return rng.uniform(0.5, 4.0, size=size), domain_ids


def _gloo_worker(rank, world_size, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        loaders = {"default_group": exp3_loader(), "explicit_group": exp3_loader()}
        feedbacks = {
            "default_group": MixtureFeedback(loaders["default_group"]),
            "explicit_group": MixtureFeedback(
                loaders["explicit_group"], process_group=dist.new_group([0, 1])
            ),
        }
        for step in range(GLOO_STEPS):
            row_loss, domain_ids = gloo_rows(rank, step)
            for feedback in feedbacks.values():
                feedback.observe(torch.tensor(row_loss), torch.tensor(domain_ids))
                if (step + 1) % GLOO_UPDATE_EVERY == 0:
                    feedback.apply()
        states = {name: loader.state_dict() for name, loader in loaders.items()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(states))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_all_reduce_over_two_gloo_processes_gives_identical_loader_states(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(
        _gloo_worker,
        args=(2, str(tmp_path / "store"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    states = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert states[0] == states[1]

    expected = exp3_loader()  # one process over the union of both ranks' rows
    for first in range(0, GLOO_STEPS, GLOO_UPDATE_EVERY):
        rows = [gloo_rows(r, s) for s in range(first, first + GLOO_UPDATE_EVERY) for r in (0, 1)]
        mean, _ = per_domain_loss(
            np.concatenate([loss for loss, _ in rows]),
            np.concatenate([ids for _, ids in rows]),
            3,
        )
        expected.update_mixture(mean)
    policy = expected.state_dict()["pipeline"]["parent"]["parent"]["policy"]
    for name in ("default_group", "explicit_group"):
        state = states[0][name]["pipeline"]["parent"]["parent"]["policy"]
        assert state["step"] == GLOO_STEPS // GLOO_UPDATE_EVERY
        np.testing.assert_allclose(state["rewards"], policy["rewards"], rtol=1e-12)
