"""Feedback from training into the data mixture: per-domain losses and `MixtureFeedback`.

The trainer computes a loss per row (`masked_row_loss`, `row_loss_from_logits`), reduces it per
domain (`per_domain_loss`) and hands it to the loader's mixture; `MixtureFeedback` does the
last two explicitly (`observe` per batch, `apply` per update), all-reducing over the
data-parallel group so that every rank's bandit holds the same weights. Nothing happens inside
`optimizer.step()`.

Functions accept numpy, torch and JAX arrays and answer in the input's framework. torch and jax
are imported only when an input needs them, so numpy-only users
pay for neither. This module imports nothing from `wf_data.distributed`.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from wf_data.data import IGNORE_INDEX

__all__ = [
    "MixtureFeedback",
    "masked_row_loss",
    "per_domain_loss",
    "row_loss_from_logits",
]


def _framework(array: Any) -> str:
    """'torch', 'jax' or 'numpy', without importing a framework the caller has not imported."""
    torch_module = sys.modules.get("torch")
    if torch_module is not None and isinstance(array, torch_module.Tensor):
        return "torch"
    jax_module = sys.modules.get("jax")
    if jax_module is not None and isinstance(array, jax_module.Array):
        return "jax"
    return "numpy"


def _is_concrete_jax(array: Any) -> bool:
    import jax

    return not isinstance(array, jax.core.Tracer)


def _check_shapes(name: str, row_loss_shape: tuple, domain_ids_shape: tuple) -> None:
    if len(row_loss_shape) != 1:
        raise ValueError(f"{name}: row_loss must be 1-D (B,), got shape {tuple(row_loss_shape)}")
    if tuple(domain_ids_shape) != tuple(row_loss_shape):
        raise ValueError(
            f"{name}: domain_ids must have the shape of row_loss {tuple(row_loss_shape)}, "
            f"got {tuple(domain_ids_shape)}"
        )


def _check_num_domains(num_domains: Any) -> int:
    if isinstance(num_domains, bool) or not isinstance(num_domains, numbers.Integral):
        raise TypeError(f"num_domains must be an int, got {type(num_domains).__name__}")
    if num_domains < 1:
        raise ValueError(f"num_domains must be >= 1, got {num_domains}")
    return int(num_domains)


def _raise_out_of_range(low: int, high: int, num_domains: int) -> None:
    raise ValueError(
        f"per_domain_loss: domain_ids must lie in [0, {num_domains}), got values from {low} to "
        f"{high}"
    )


def _domain_sums(row_loss: Any, domain_ids: Any, num_domains: int) -> tuple[Any, Any]:
    """Per-domain loss sums and row counts, NaN rows left out: ((K,) float, (K,) int)."""
    num_domains = _check_num_domains(num_domains)
    framework = _framework(row_loss)
    if framework == "torch":
        return _domain_sums_torch(row_loss, domain_ids, num_domains)
    if framework == "jax":
        return _domain_sums_jax(row_loss, domain_ids, num_domains)
    return _domain_sums_numpy(row_loss, domain_ids, num_domains)


def _domain_sums_numpy(row_loss: Any, domain_ids: Any, num_domains: int) -> tuple[Any, Any]:
    loss = np.asarray(row_loss, dtype=np.float64)
    ids = np.asarray(domain_ids)
    _check_shapes("per_domain_loss", loss.shape, ids.shape)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"per_domain_loss: domain_ids must be integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_domains):
        _raise_out_of_range(int(ids.min()), int(ids.max()), num_domains)
    ids = ids.astype(np.intp, copy=False)
    valid = ~np.isnan(loss)
    sums = np.bincount(ids, weights=np.where(valid, loss, 0.0), minlength=num_domains)
    counts = np.bincount(ids, weights=valid, minlength=num_domains).astype(np.int64)
    return sums, counts


def _domain_sums_torch(row_loss: Any, domain_ids: Any, num_domains: int) -> tuple[Any, Any]:
    import torch

    loss = row_loss.detach()
    if not loss.is_floating_point():
        loss = loss.to(torch.float32)
    ids = torch.as_tensor(domain_ids, device=loss.device)
    _check_shapes("per_domain_loss", tuple(loss.shape), tuple(ids.shape))
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"per_domain_loss: domain_ids must be integers, got dtype {ids.dtype}")
    ids = ids.long()
    # One host sync, but index_add_ on an out-of-range id is a device-side assert on CUDA.
    if ids.numel() and bool(((ids < 0) | (ids >= num_domains)).any()):
        _raise_out_of_range(int(ids.min()), int(ids.max()), num_domains)
    # Sums of bf16/fp16 losses accumulate in float32 at least.
    acc_dtype = torch.promote_types(loss.dtype, torch.float32)
    valid = ~torch.isnan(loss)
    zeros = torch.zeros((), dtype=acc_dtype, device=loss.device)
    sums = torch.zeros(num_domains, dtype=acc_dtype, device=loss.device).index_add_(
        0, ids, torch.where(valid, loss.to(acc_dtype), zeros)
    )
    counts = torch.zeros(num_domains, dtype=torch.int64, device=loss.device).index_add_(
        0, ids, valid.to(torch.int64)
    )
    return sums, counts


def _domain_sums_jax(row_loss: Any, domain_ids: Any, num_domains: int) -> tuple[Any, Any]:
    import jax
    import jax.numpy as jnp

    loss = jax.lax.stop_gradient(jnp.asarray(row_loss))
    if not jnp.issubdtype(loss.dtype, jnp.floating):
        loss = loss.astype(jnp.float32)
    ids = jnp.asarray(domain_ids)
    _check_shapes("per_domain_loss", loss.shape, ids.shape)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"per_domain_loss: domain_ids must be integers, got dtype {ids.dtype}")
    # Out-of-range scatter indices are silently dropped by XLA: check them outside jit.
    if ids.size and _is_concrete_jax(ids):
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= num_domains:
            _raise_out_of_range(low, high, num_domains)
    acc_dtype = jnp.promote_types(loss.dtype, jnp.float32)
    valid = ~jnp.isnan(loss)
    sums = (
        jnp.zeros(num_domains, acc_dtype).at[ids].add(jnp.where(valid, loss, 0).astype(acc_dtype))
    )
    counts = jnp.zeros(num_domains, jnp.int32).at[ids].add(valid.astype(jnp.int32))
    return sums, counts


def per_domain_loss(row_loss: Any, domain_ids: Any, num_domains: int) -> tuple[Any, Any]:
    """Mean loss and row count per domain, in the framework of `row_loss`.

    Args:
      row_loss: (B,) float, one loss per row (see `masked_row_loss`). torch tensor, JAX array or
        anything numpy accepts. Rows whose loss is NaN (no loss tokens) are left out.
      domain_ids: (B,) int, the row's domain in [0, num_domains); converted to the framework
        (and device) of `row_loss`.
      num_domains: K.

    Returns:
      (mean_loss (K,) float with NaN where a domain has no row, counts (K,) int). numpy answers
      float64/int64; torch float32 at least (float64 for float64 input)/int64 on the input's
      device, detached; JAX float32 at least/int32, under `stop_gradient`, usable inside jit.
    """
    sums, counts = _domain_sums(row_loss, domain_ids, num_domains)
    framework = _framework(row_loss)
    if framework == "torch":
        import torch

        mean = torch.where(counts > 0, sums / counts.clamp_min(1), torch.nan)
    elif framework == "jax":
        import jax.numpy as jnp

        mean = jnp.where(counts > 0, sums / jnp.maximum(counts, 1), jnp.nan)
    else:
        mean = np.divide(sums, counts, out=np.full(num_domains, np.nan), where=counts > 0)
    return mean, counts


def masked_row_loss(token_loss: Any, labels: Any, *, ignore_index: int = IGNORE_INDEX) -> Any:
    """Mean token loss per row over the tokens whose label is not `ignore_index`.

    Args:
      token_loss: (B, L) float per-token loss (already aligned with `labels`).
      labels: (B, L) int, `ignore_index` where a token carries no loss.

    Returns:
      (B,) float in the framework of `token_loss`; NaN for a row without any loss token.
      Differentiable (torch, JAX): it can serve as the training loss's building block.
    """
    framework = _framework(token_loss)
    if tuple(token_loss.shape) != tuple(labels.shape) or len(token_loss.shape) != 2:
        raise ValueError(
            f"masked_row_loss: token_loss and labels must both be (B, L), got "
            f"{tuple(token_loss.shape)} and {tuple(labels.shape)}"
        )
    if framework == "torch":
        import torch

        mask = torch.as_tensor(labels, device=token_loss.device) != ignore_index
        zero = torch.zeros((), dtype=token_loss.dtype, device=token_loss.device)
        total = torch.where(mask, token_loss, zero).sum(dim=1)
        count = mask.sum(dim=1)
        return torch.where(count > 0, total / count.clamp_min(1), torch.nan)
    xp = _array_module(framework)
    token_loss = xp.asarray(token_loss)
    mask = xp.asarray(labels) != ignore_index
    total = xp.where(mask, token_loss, 0).sum(axis=1)
    count = mask.sum(axis=1)
    return xp.where(count > 0, total / xp.maximum(count, 1), xp.nan)


def row_loss_from_logits(
    logits: Any, labels: Any, *, shift: bool = True, ignore_index: int = IGNORE_INDEX
) -> Any:
    """Mean cross-entropy per row from next-token logits: (B, L, V) float, (B, L) int -> (B,).

    With `shift=True` (the wf-data batch convention, as in Hugging Face models) `labels` is
    aligned with `input_ids` and position t's logits predict `labels[:, t + 1]`. torch uses
    `cross_entropy` in float32; numpy and JAX a float32 log-softmax.
    """
    if len(logits.shape) != 3 or tuple(logits.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"row_loss_from_logits: expected logits (B, L, V) and labels (B, L), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    framework = _framework(logits)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    if framework == "torch":
        import torch
        import torch.nn.functional as F

        labels = torch.as_tensor(labels, device=logits.device).long()
        token_loss = F.cross_entropy(
            logits.float().flatten(0, 1),
            labels.flatten(),
            ignore_index=ignore_index,
            reduction="none",
        ).view(labels.shape)
        return masked_row_loss(token_loss, labels, ignore_index=ignore_index)
    xp = _array_module(framework)
    logits = xp.asarray(logits).astype(xp.float32)
    labels = xp.asarray(labels)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_norm = xp.log(xp.exp(shifted).sum(axis=-1))
    targets = xp.where(labels == ignore_index, 0, labels).astype(xp.int32)
    picked = xp.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]
    return masked_row_loss(log_norm - picked, labels, ignore_index=ignore_index)


def _array_module(framework: str) -> Any:
    if framework == "jax":
        import jax.numpy as jnp

        return jnp
    return np


# --- MixtureFeedback ---------------------------------------------------------------------------


class MixtureFeedback:
    """Per-domain training losses to a loader's mixture, as two explicit calls.

    `observe(row_loss, domain_ids)` after a (micro-)batch's forward: per-domain loss sums and
    row counts, all-reduced (SUM) over `process_group` when torch.distributed is initialised,
    are added to the loader's pending feedback (`loader.observe_losses`). Pending feedback is
    part of `loader.state_dict()`, the same on every rank, so a checkpoint between two calls
    loses nothing. `apply()` (e.g. every `mixing.update_every` optimizer steps, on every rank)
    hands the mean loss of each observed domain to `loader.update_mixture` and clears it.

    `evaluate`: a function returning the held-out loss per domain (`{name: loss}`, the same on
    every rank; e.g. a mean over a few batches of each of `get_eval_loaders`), for mixtures with
    ``reference_losses: auto``: `apply()` calls it when the mixture asks (`loader.reference_due`,
    twice per run) and hands the result to `loader.record_reference`. Without it such a mixture
    fails at its first update after the measurement it needed.

    `loader` is a `wf_data.data.DataLoader` (or any object with `num_domains`,
    `observe_losses(loss_sums, row_counts)` and `apply_observed()`, plus `reference_due` and
    `record_reference(losses)` when `evaluate` is given).
    """

    def __init__(
        self,
        loader: Any,
        *,
        process_group: Any = None,
        evaluate: Callable[[], Mapping[str, float]] | None = None,
    ) -> None:
        for name in ("observe_losses", "apply_observed"):
            if not callable(getattr(loader, name, None)):
                raise TypeError(
                    f"MixtureFeedback needs a loader with {name}(), got {type(loader).__name__}"
                )
        if evaluate is not None and not callable(evaluate):
            raise TypeError(f"MixtureFeedback: evaluate must be callable, got {evaluate!r}")
        self.loader = loader
        self.num_domains = _check_num_domains(loader.num_domains)
        self.process_group = process_group
        self.evaluate = evaluate

    def observe(self, row_loss: Any, domain_ids: Any) -> None:
        """Adds (B,) row losses of (B,) domains (any framework) to the pending feedback.

        Collective under torch.distributed: every rank calls it the same number of times.
        """
        sums, counts = _domain_sums(row_loss, domain_ids, self.num_domains)
        if _framework(sums) == "torch":
            both = _torch_module().stack([sums.double(), counts.double()]).cpu().numpy()
        else:
            both = np.stack([np.asarray(sums, np.float64), np.asarray(counts, np.float64)])
        both = _all_reduce(both, self.process_group)
        self.loader.observe_losses(both[0], both[1])

    def apply(self) -> None:
        """Updates the mixture with the pending mean losses (none observed: no update), then
        measures the held-out losses if the mixture's reference asks for them now."""
        self.loader.apply_observed()
        if self.evaluate is not None and self.loader.reference_due:
            self.loader.record_reference(self.evaluate())

    def __repr__(self) -> str:
        return f"MixtureFeedback(num_domains={self.num_domains})"


def _torch_module() -> Any:
    import torch

    return torch


def _all_reduce(both: np.ndarray, process_group: Any) -> np.ndarray:
    """(2, K) float64 summed over the group's ranks (unchanged without torch.distributed)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return both
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return both
    backend = str(dist.get_backend(process_group)).lower()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if "nccl" in backend
        else torch.device("cpu")
    )
    tensor = torch.from_numpy(both.copy()).to(device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group)
    return tensor.cpu().numpy()
