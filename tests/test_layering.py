"""Import layering: `wf_data.data` and `wf_data.distributed` never import each other.

The one top-level module both may share is `wf_data.atomic` (the checkpoint path), which
imports neither.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wf_data"
SHARED = {"wf_data.atomic"}


def _imports(file: Path) -> set[str]:
    """Absolute module names imported anywhere in `file` (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith("wf_data")}


def _wf_data_imports(package: str) -> dict[str, set[str]]:
    return {
        str(file.relative_to(PACKAGE.parent)): _imports(file)
        for file in sorted((PACKAGE / package).rglob("*.py"))
    }


@pytest.mark.parametrize(
    ("package", "forbidden"), [("data", "distributed"), ("distributed", "data")]
)
def test_data_and_distributed_do_not_import_each_other(package, forbidden):
    offending = {
        file: sorted(name for name in names if name.startswith(f"wf_data.{forbidden}"))
        for file, names in _wf_data_imports(package).items()
    }
    assert not {file: names for file, names in offending.items() if names}


def test_distributed_imports_only_itself_and_the_shared_checkpoint_path():
    for file, names in _wf_data_imports("distributed").items():
        outside = {name for name in names if not name.startswith("wf_data.distributed")}
        assert outside <= SHARED | {"wf_data"}, f"{file} imports {sorted(outside)}"


def test_the_shared_module_imports_no_wf_data_package():
    for module in SHARED:
        file = PACKAGE.parent / (module.replace(".", "/") + ".py")
        assert _imports(file) == set()
