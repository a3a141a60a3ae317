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


def _grain_private_names() -> set[str]:
    """Private (single-underscore) attributes of Grain's dataset and iterator base classes."""
    grain = pytest.importorskip("grain")
    bases = (grain.MapDataset, grain.IterDataset, grain.DatasetIterator)
    return {
        name
        for base in bases
        for name in dir(base)
        if name.startswith("_") and not name.startswith("__")
    }


def _private_grain_uses(tree: ast.AST, private: set[str]) -> list[tuple[int, str]]:
    """(line, what) for each `grain._src` import, attribute access to a name in `private`,
    and class attribute or method that overrides one."""
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in private:
            uses.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            modules.append(getattr(node, "module", None) or "")
            if any(module.startswith("grain._src") for module in modules):
                uses.append((node.lineno, "grain._src"))
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                targets = item.targets if isinstance(item, ast.Assign) else []
                names = {target.id for target in targets if isinstance(target, ast.Name)}
                if isinstance(item, ast.FunctionDef):
                    names.add(item.name)
                uses.extend((item.lineno, name) for name in sorted(names & private))
    return uses


def test_no_private_grain_api():
    """Only Grain's public API in wf_data/ and tools/: no `grain._src` import, no private
    attribute of Grain's base classes used or overridden (they change without notice)."""
    private = _grain_private_names()
    assert {"_parent", "_getitems", "_stats", "_MUTATES_ELEMENT_SPEC"} <= private
    files = sorted([*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "tools").rglob("*.py")])
    offending = [
        f"{file.relative_to(PACKAGE.parent)}:{line} {what}"
        for file in files
        for line, what in _private_grain_uses(ast.parse(file.read_text()), private)
    ]
    assert not offending, "private Grain API used:\n" + "\n".join(offending)


def test_the_private_grain_api_check_catches_each_kind():
    source = (
        "from grain._src.python import dataset\n"
        "class T(grain.MapDataset):\n"
        "    _MUTATES_ELEMENT_SPEC = False\n"
        "    def _getitems(self, indices):\n"
        "        return self._parent._getitems(indices)\n"
    )
    uses = _private_grain_uses(ast.parse(source), _grain_private_names())
    assert sorted(uses) == [
        (1, "grain._src"),
        (3, "_MUTATES_ELEMENT_SPEC"),
        (4, "_getitems"),
        (5, "._getitems"),
        (5, "._parent"),
    ]
