"""Optional dependencies: which extra installs which package, and the one-line error when a
feature's extra is missing (``pip install 'wf-data[torch]'``).

The core install serves the numpy path (prepare, plan, mix, read, numpy batches); every import
of an optional package sits inside ``requires(...)`` at the place that needs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# Extra -> the top-level modules it installs (import names, not distribution names).
EXTRAS: dict[str, tuple[str, ...]] = {
    "torch": ("torch", "torchdata"),
    "jax": ("jax", "jaxlib", "orbax"),
    "hf": ("transformers", "jinja2"),
    "plot": ("matplotlib",),
    "beam": ("apache_beam",),
    "titan": ("torchtitan",),
}
_EXTRA_OF = {module: extra for extra, modules in EXTRAS.items() for module in modules}


class MissingExtraError(ModuleNotFoundError):
    """A feature needs an optional package that is not installed; the message names the extra."""


@contextlib.contextmanager
def requires(*extras: str, feature: str) -> Iterator[None]:
    """Turn a missing optional package, imported in the ``with`` block, into MissingExtraError
    naming ``feature`` and ``pip install 'wf-data[EXTRA,...]'`` for ``extras``.

    Only a missing module of an extra is translated; any other ImportError passes unchanged.
    """
    unknown = [extra for extra in extras if extra not in EXTRAS]
    if unknown or not extras:
        raise ValueError(f"extras must be some of {sorted(EXTRAS)}, got {list(extras)}")
    try:
        yield
    except ModuleNotFoundError as error:
        module = (error.name or "").partition(".")[0]
        if module not in _EXTRA_OF:
            raise
        raise MissingExtraError(
            f"{feature} needs {module}, which is not installed: "
            f"pip install 'wf-data[{','.join(extras)}]'",
            name=module,
        ) from None
