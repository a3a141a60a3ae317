"""Import layering: no import cycle in `wf_data/` or `tools/`, and the stage order of the flow.

`wf_data.data.<stage>` imports only stages up to its own in `STAGES`; `wf_data.integrations`
may import the data stages; `wf_data.distributed` imports only itself and the shared modules;
the data stages never import integrations, distributed or the command-line modules. Every
import counts, function-level ones included; `from pkg import name` counts as importing
`pkg.name` when that is a module, else `pkg`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wf_data"
# The data stages in the order a batch goes through them; a stage imports only earlier ones.
STAGES = ("workers", "text", "shards", "prepare", "plan", "mix", "read", "deliver")
# Top-level modules every layer may import (they import no other wf_data module but each other).
SHARED = {"wf_data.atomic", "wf_data.extras"}
# What the data stages may import besides the stages: the shared modules, the typed config and
# the package root `wf_data.data` (lazy exports and the batch-schema constants; no stage import).
DATA_MAY_IMPORT = SHARED | {"wf_data.config", "wf_data.data"}


def _module_name(file: Path, root: Path) -> str:
    parts = list(file.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(file: Path, modules: dict[str, Path], root: Path) -> set[str]:
    """The modules of `modules` that `file` imports anywhere (function-level imports included).

    `from pkg import name` is `pkg.name` when that is a module, else `pkg`; relative imports
    are resolved; a bare `import bench_loader` in tools/ (run with tools/ on sys.path) is
    `tools.bench_loader`.
    """
    this = _module_name(file, root)
    package = this if file.name == "__init__.py" else this.rpartition(".")[0]
    found = set()

    def resolve(name: str) -> str | None:
        if name in modules:
            return name
        if file.parent == root / "tools" and f"tools.{name}" in modules:
            return f"tools.{name}"
        return None

    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [
                f"{base}.{alias.name}" if resolve(f"{base}.{alias.name}") else base
                for alias in node.names
            ]
        else:
            continue
        found.update(module for module in map(resolve, names) if module and module != this)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """`{module: modules it imports}` over `root`/wf_data/ and `root`/tools/ (packages by their
    `__init__`)."""
    files = sorted([*(root / "wf_data").rglob("*.py"), *(root / "tools").glob("*.py")])
    modules = {_module_name(file, root): file for file in files}
    return {name: _imports(file, modules, root) for name, file in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (`[a, b, ..., a]`) per strongly connected component of more than one module,
    found with Tarjan's algorithm; sorted, each starting at its smallest name."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(_cycle_in(graph, component) for component in components)


def _cycle_in(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected `component`."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in sorted(graph[node] & members):
            if target == start:
                return [*paths[node], start]
            if target not in paths:
                paths[target] = [*paths[node], target]
                queue.append(target)
    raise AssertionError(f"no cycle through {start} in {component}")


def _layer(module: str) -> str:
    """`data.<stage>`, `data` (the public API package), or the top-level name under wf_data."""
    parts = module.split(".")
    if parts[:2] == ["wf_data", "data"]:
        return "data" if len(parts) == 2 else f"data.{parts[2]}"
    return ".".join(parts[:2])


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """`importer -> imported (reason)` for each import against the stage order."""
    violations = []
    for module, imported in sorted(graph.items()):
        if not module.startswith("wf_data."):
            continue
        layer = _layer(module)
        for target in sorted(imported):
            target_layer = _layer(target)
            if not target.startswith("wf_data.") or target_layer == layer:
                continue
            reason = None
            if layer.startswith("data."):
                stage = STAGES.index(layer[5:])
                if target_layer.startswith("data."):
                    if STAGES.index(target_layer[5:]) > stage:
                        reason = f"stage {layer[5:]} imports the later stage {target_layer[5:]}"
                elif target not in DATA_MAY_IMPORT:
                    reason = f"a data stage imports {target_layer}"
            elif layer == "wf_data.distributed" and target not in SHARED:
                reason = "distributed imports only itself and the shared modules"
            elif module in SHARED and target not in SHARED:
                reason = "a shared module imports only the other shared modules"
            if reason:
                violations.append(f"{module} -> {target} ({reason})")
    return violations


def test_every_data_module_is_in_a_stage():
    strays = [
        name
        for name in import_graph()
        if name.startswith("wf_data.data.") and name.split(".")[2] not in STAGES
    ]
    assert not strays, f"data modules outside the stages {STAGES}: {strays}"


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    report = "\n".join(" -> ".join(cycle) for cycle in cycles)
    print(f"{len(cycles)} import cycles" + (f":\n{report}" if cycles else ""))
    assert not cycles, f"{len(cycles)} import cycles:\n{report}"


def test_stage_order():
    violations = layering_violations(import_graph())
    assert not violations, "imports against the layering:\n" + "\n".join(violations)


def test_the_checker_resolves_imports_and_finds_cycles(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    violations = layering_violations(
        {
            "wf_data.data.mix.exp3": {"wf_data.data.read.rows", "wf_data.data.plan.plans"},
            "wf_data.data.read.rows": {"wf_data.integrations.torch_dataset", "wf_data.atomic"},
            "wf_data.distributed.fsdp2": {"wf_data.data.deliver.loader", "wf_data.atomic"},
            "wf_data.integrations.torch_dataset": {"wf_data.data.deliver.loader"},
        }
    )
    assert violations == [
        "wf_data.data.mix.exp3 -> wf_data.data.read.rows (stage mix imports the later stage read)",
        "wf_data.data.read.rows -> wf_data.integrations.torch_dataset (a data stage imports "
        "wf_data.integrations)",
        "wf_data.distributed.fsdp2 -> wf_data.data.deliver.loader (distributed imports only "
        "itself and the shared modules)",
    ]
    # Resolution: `from pkg import submodule`, `from pkg import name`, relative and function-level.
    (tmp_path / "wf_data" / "data" / "plan").mkdir(parents=True)
    (tmp_path / "tools").mkdir()
    for name in (
        "wf_data/__init__.py",
        "wf_data/data/__init__.py",
        "wf_data/data/plan/__init__.py",
    ):
        (tmp_path / name).write_text("")
    (tmp_path / "wf_data/data/plan/plans.py").write_text("X = 1\n")
    (tmp_path / "wf_data/data/plan/batching.py").write_text(
        "from . import plans\ndef f():\n    from wf_data.data.plan import X\n"
    )
    (tmp_path / "tools/bench.py").write_text("import bench_planning\n")
    (tmp_path / "tools/bench_planning.py").write_text("from wf_data.data.plan import plans\n")
    graph = import_graph(tmp_path)
    assert graph["wf_data.data.plan.batching"] == {"wf_data.data.plan.plans", "wf_data.data.plan"}
    assert graph["tools.bench"] == {"tools.bench_planning"}
    assert graph["tools.bench_planning"] == {"wf_data.data.plan.plans"}


def test_distributed_imports_only_itself_and_the_shared_modules():
    graph = import_graph()
    for module, imported in graph.items():
        if module.startswith("wf_data.distributed"):
            outside = {name for name in imported if not name.startswith("wf_data.distributed")}
            assert outside <= SHARED, f"{module} imports {sorted(outside)}"


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
    files = sorted([*PACKAGE.rglob("*.py"), *(ROOT / "tools").rglob("*.py")])
    offending = [
        f"{file.relative_to(ROOT)}:{line} {what}"
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
