"""Feedback from training into the data mixture: per-domain losses and an optimizer wrapper.

The trainer computes a loss per row (`masked_row_loss`, `row_loss_from_logits`), reduces it per
domain (`per_domain_loss`) and hands it to the mixture; `InfluenceAwareOptimizer` does the last
two for a torch training loop, all-reducing over the data-parallel group so that every rank's
bandit holds the same weights.

Functions accept numpy, torch and JAX arrays and answer in the input's framework. torch and jax
are imported only when an input (or `InfluenceAwareOptimizer`) needs them, so numpy-only users
pay for neither. This module imports nothing from `wf_data.distributed`.
"""

from __future__ import annotations

import numbers
import sys
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "InfluenceAwareOptimizer",
    "masked_row_loss",
    "per_domain_loss",
    "row_loss_from_logits",
]

IGNORE_INDEX = -100


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


# --- InfluenceAwareOptimizer ------------------------------------------------------------------
# The class subclasses torch.optim.Optimizer (LR schedulers insist on it), so it is built on
# first access (PEP 562 module __getattr__): importing this module does not import torch.


def _infer_num_domains(mixture: Any) -> int | None:
    num_domains = getattr(mixture, "num_domains", None)
    if num_domains is not None:
        return int(num_domains)
    for name in ("policy", "weights"):
        value = getattr(mixture, name, None)
        if callable(value):
            try:
                value = value()
            except TypeError:
                continue
        if value is not None:
            try:
                return len(value)
            except TypeError:
                continue
    return None


def _build_influence_aware_optimizer() -> type:
    import torch

    class InfluenceAwareOptimizer(torch.optim.Optimizer):
        """A torch optimizer that also feeds per-domain losses back to the data mixture.

        `observe(row_loss, domain_ids)` accumulates per-domain loss sums and row counts
        (float64, detached, on CPU). Every `update_every` calls of `step()`, after stepping the
        wrapped optimizer, the sums and counts are all-reduced (SUM) over `process_group` when
        torch.distributed is initialised (a CPU float64 tensor for gloo, the current CUDA device
        for NCCL) and `mixture.update(mean_loss)` receives a (K,) float64 array with NaN for the
        domains no rank observed; then the accumulators reset. Every rank thus hands the same
        numbers to its mixture. An interval in which no rank observed any row calls no update.

        Args:
          optimizer: the torch optimizer to wrap; `param_groups`, `state`, `defaults`,
            `zero_grad`, `add_param_group` and unknown attributes delegate to it (LR schedulers
            can take this wrapper).
          mixture: any object with `update(losses)` taking a (K,) array with NaN for unobserved
            domains (`Exp3`, `Exp3Mixing`, a loader's mixture).
          update_every: optimizer steps per mixture update (>= 1).
          process_group: the data-parallel group (None: the default group).
          num_domains: K; by default `mixture.num_domains`, else `len(mixture.policy())` or
            `len(mixture.weights)`.

        All ranks must call `step()` the same number of times (the all-reduce is collective); a
        step skipped by a GradScaler on every rank keeps its rows for the next update.
        For torch DCP, checkpoint `.optimizer` as usual and `influence_state_dict()` beside it.
        """

        def __init__(
            self,
            optimizer: torch.optim.Optimizer,
            mixture: Any,
            *,
            update_every: int = 1,
            process_group: Any = None,
            num_domains: int | None = None,
        ) -> None:
            # Optimizer.__init__ is not called on purpose: the wrapped optimizer owns the
            # parameters and state.
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(
                    "InfluenceAwareOptimizer: optimizer must be a torch.optim.Optimizer, got "
                    f"{type(optimizer).__name__}"
                )
            if not callable(getattr(mixture, "update", None)):
                raise TypeError(
                    "InfluenceAwareOptimizer: mixture must have an update(losses) method, got "
                    f"{type(mixture).__name__}"
                )
            if isinstance(update_every, bool) or not isinstance(update_every, numbers.Integral):
                raise TypeError(
                    f"InfluenceAwareOptimizer: update_every must be an int, got {update_every!r}"
                )
            if update_every < 1:
                raise ValueError(
                    f"InfluenceAwareOptimizer: update_every must be >= 1, got {update_every}"
                )
            if num_domains is None:
                num_domains = _infer_num_domains(mixture)
                if num_domains is None:
                    raise ValueError(
                        "InfluenceAwareOptimizer: cannot tell the number of domains from "
                        f"{type(mixture).__name__}; pass num_domains="
                    )
            self.optimizer = optimizer
            self.mixture = mixture
            self.update_every = int(update_every)
            self.process_group = process_group
            self.num_domains = _check_num_domains(num_domains)
            self._loss_sums = np.zeros(self.num_domains, dtype=np.float64)
            self._row_counts = np.zeros(self.num_domains, dtype=np.float64)
            self._steps = 0

        # -- delegation to the wrapped optimizer ----------------------------------------------

        @property
        def param_groups(self) -> list[dict[str, Any]]:
            return self.optimizer.param_groups

        @param_groups.setter
        def param_groups(self, value: list[dict[str, Any]]) -> None:
            self.optimizer.param_groups = value

        @property
        def state(self) -> Any:
            return self.optimizer.state

        @state.setter
        def state(self, value: Any) -> None:
            self.optimizer.state = value

        @property
        def defaults(self) -> dict[str, Any]:
            return self.optimizer.defaults

        @defaults.setter
        def defaults(self, value: dict[str, Any]) -> None:
            self.optimizer.defaults = value

        def __getattr__(self, name: str) -> Any:
            # Only reached for attributes this wrapper lacks (e.g. train()/eval() of some
            # optimizers). "optimizer" itself must not recurse while unpickling.
            if name == "optimizer":
                raise AttributeError(name)
            return getattr(self.optimizer, name)

        def __getstate__(self) -> dict[str, Any]:
            return self.__dict__

        def __setstate__(self, state: dict[str, Any]) -> None:
            self.__dict__.update(state)

        def zero_grad(self, set_to_none: bool = True) -> None:
            """Delegates to the wrapped optimizer."""
            self.optimizer.zero_grad(set_to_none=set_to_none)

        def add_param_group(self, param_group: dict[str, Any]) -> None:
            """Delegates to the wrapped optimizer."""
            self.optimizer.add_param_group(param_group)

        def __repr__(self) -> str:
            return (
                f"InfluenceAwareOptimizer({self.optimizer!r}, num_domains={self.num_domains}, "
                f"update_every={self.update_every}, steps={self._steps})"
            )

        # -- feedback ---------------------------------------------------------------------------

        @property
        def steps(self) -> int:
            """Number of `step()` calls so far."""
            return self._steps

        def observe(self, row_loss: Any, domain_ids: Any) -> None:
            """Add a micro-batch's (B,) row losses of (B,) domains to the accumulators."""
            sums, counts = _domain_sums(row_loss, domain_ids, self.num_domains)
            if isinstance(sums, torch.Tensor):
                both = torch.stack([sums.to(torch.float64), counts.to(torch.float64)]).cpu()
                sums, counts = both[0].numpy(), both[1].numpy()
            self._loss_sums += np.asarray(sums, dtype=np.float64)
            self._row_counts += np.asarray(counts, dtype=np.float64)

        def step(self, closure: Any = None) -> Any:
            """Step the wrapped optimizer; every `update_every` steps, update the mixture."""
            loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
            self._steps += 1
            if self._steps % self.update_every == 0:
                self._update_mixture()
            return loss

        def _update_mixture(self) -> None:
            loss_sums, row_counts = self._all_reduce(self._loss_sums, self._row_counts)
            self._loss_sums = np.zeros(self.num_domains, dtype=np.float64)
            self._row_counts = np.zeros(self.num_domains, dtype=np.float64)
            if not row_counts.any():
                return
            mean_loss = np.divide(
                loss_sums, row_counts, out=np.full(self.num_domains, np.nan), where=row_counts > 0
            )
            for domain in np.flatnonzero((row_counts > 0) & ~np.isfinite(mean_loss)):
                warnings.warn(
                    f"InfluenceAwareOptimizer: domain {domain} mean loss is "
                    f"{float(mean_loss[domain])!r} over {int(row_counts[domain])} rows",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self.mixture.update(mean_loss)

        def _all_reduce(
            self, loss_sums: np.ndarray, row_counts: np.ndarray
        ) -> tuple[np.ndarray, np.ndarray]:
            dist = torch.distributed
            if not (dist.is_available() and dist.is_initialized()):
                return loss_sums, row_counts
            backend = str(dist.get_backend(self.process_group)).lower()
            device = (
                torch.device("cuda", torch.cuda.current_device())
                if "nccl" in backend
                else torch.device("cpu")
            )
            both = torch.from_numpy(np.concatenate([loss_sums, row_counts])).to(device)
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=self.process_group)
            both = both.cpu().numpy()
            return both[: self.num_domains], both[self.num_domains :]

        # -- checkpointing ----------------------------------------------------------------------

        def influence_state_dict(self) -> dict[str, Any]:
            """This rank's accumulators and step counter (JSON-serialisable, K floats each)."""
            return {
                "num_domains": self.num_domains,
                "update_every": self.update_every,
                "steps": self._steps,
                "loss_sums": self._loss_sums.tolist(),
                "row_counts": self._row_counts.tolist(),
            }

        def load_influence_state_dict(self, state: dict[str, Any]) -> None:
            """Restore `influence_state_dict()` output (same number of domains)."""
            if int(state["num_domains"]) != self.num_domains:
                raise ValueError(
                    "InfluenceAwareOptimizer.load_state_dict: state has num_domains="
                    f"{int(state['num_domains'])}, this optimizer has {self.num_domains}"
                )
            loss_sums = np.array(state["loss_sums"], dtype=np.float64)
            row_counts = np.array(state["row_counts"], dtype=np.float64)
            if loss_sums.shape != (self.num_domains,) or row_counts.shape != loss_sums.shape:
                raise ValueError(
                    "InfluenceAwareOptimizer.load_state_dict: loss_sums and row_counts must "
                    f"have {self.num_domains} entries, got {loss_sums.shape} and "
                    f"{row_counts.shape}"
                )
            self._loss_sums, self._row_counts = loss_sums, row_counts
            self._steps = int(state["steps"])

        def state_dict(self) -> dict[str, Any]:
            """{"optimizer": the wrapped optimizer's state_dict, "influence": accumulators}."""
            return {
                "optimizer": self.optimizer.state_dict(),
                "influence": self.influence_state_dict(),
            }

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            """Restore `state_dict()` output: optimizer state, accumulators, step counter."""
            if set(state_dict) != {"optimizer", "influence"}:
                raise ValueError(
                    "InfluenceAwareOptimizer.load_state_dict: expected keys "
                    f"['influence', 'optimizer'], got {sorted(state_dict)}"
                )
            self.optimizer.load_state_dict(state_dict["optimizer"])
            self.load_influence_state_dict(state_dict["influence"])

    # Pickle finds the class by module and qualified name, i.e. through __getattr__ below.
    InfluenceAwareOptimizer.__module__ = __name__
    InfluenceAwareOptimizer.__qualname__ = "InfluenceAwareOptimizer"
    return InfluenceAwareOptimizer


def __getattr__(name: str) -> Any:
    if name == "InfluenceAwareOptimizer":
        cls = _build_influence_aware_optimizer()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
