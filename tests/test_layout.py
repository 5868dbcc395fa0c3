"""The package's shape: imports point one way between its folders, none is circular, and ARCHITECTURE.md's tree is
the package's."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hf_adafilter"
# Lowest first: a module imports only from its own folder and from folders of a lower rank.
RANKS = {
    "modeling": 0,
    "metrics": 0,
    "data": 1,
    "packaged": 1,
    "baselines": 1,
    "hub": 2,
    "training": 3,
    "compare": 4,
    "": 5,
}
MAX_MODULE_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: Path) -> set[str]:
    """The hf_adafilter modules (or packages) `path` imports, as absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                # `from . import x` names a module x of that package
                names = [f"{target}.{alias.name}" for alias in node.names] if not node.module else [target]
            else:
                names = [node.module or ""]
            imported |= {n for n in names if n.split(".")[0] == "hf_adafilter"}
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names if alias.name.split(".")[0] == "hf_adafilter"}
    return imported


def folder(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in modules:  # `from .loading import X` where X is a name, not a module
            name = name.rpartition(".")[0]
        return name or None

    return {
        name: {target for target in map(resolve, package_imports(path)) if target and target != name}
        for name, path in modules.items()
    }


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{source} -> {target}"
        for source, targets in graph.items()
        for target in targets
        if folder(source) != folder(target) and RANKS[folder(target)] >= RANKS[folder(source)]
    ]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target, [*path, target])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_imports_point_down_the_folder_ranks():
    upward = upward_imports(import_graph())
    assert not upward, f"imports from a folder to one of the same or a higher rank: {upward}"


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_checks_see_upward_imports_and_cycles():
    """The checks are only as good as the parse: real edges are found, and planted faults are caught."""
    graph = import_graph()
    assert "hf_adafilter.hub.model_card" in graph["hf_adafilter.training.cli"]
    assert "hf_adafilter.modeling.bank_ops" in graph["hf_adafilter.modeling.layers"]
    planted = {**graph, "hf_adafilter.modeling.layers": {"hf_adafilter.training.trainer"}}
    assert upward_imports(planted) == ["hf_adafilter.modeling.layers -> hf_adafilter.training.trainer"]
    assert find_cycle({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}}) == ["a.x", "a.y", "a.z", "a.x"]
    assert find_cycle({"a.x": {"a.y"}, "a.y": set()}) is None


KERNELS = {
    f"hf_adafilter.modeling.{name}"
    for name in ("bank_ops", "batchnorm_ops", "gated_training", "gated_inference", "kernel_choice")
}


def test_kernels_import_nothing_of_families_or_hub_loading():
    graph = import_graph()
    for kernel in KERNELS:
        assert graph[kernel] <= KERNELS, f"{kernel} imports {sorted(graph[kernel] - KERNELS)}"


def imports_torch(module: str) -> bool:
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return "torch" in names


def test_the_config_imports_no_torch_through_the_package():
    graph, seen, todo = import_graph(), set(), ["hf_adafilter.modeling.configuration_adafilter"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph[module]
    assert not [module for module in sorted(seen) if imports_torch(module)]


def test_no_module_is_over_the_size_limit():
    long = {
        str(path.relative_to(REPO)): lines
        for path in PACKAGE.rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by concept): {long}"


def architecture_tree() -> set[str]:
    """The paths in ARCHITECTURE.md's layout tree (its first `text` block), relative to the repository."""
    text = (REPO / "ARCHITECTURE.md").read_text()
    block = re.search(r"```text\n(.*?)```", text, re.S).group(1)
    paths, stack = set(), []
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = (len(line) - len(line.lstrip())) // 2
        entry = line.split()[0]
        stack = stack[:indent] + [entry.rstrip("/")]
        paths.add("/".join(stack))
    return paths


def test_architecture_tree_is_the_package():
    actual = {"hf_adafilter"}
    for path in PACKAGE.rglob("*"):
        if "__pycache__" in path.parts or (path.is_file() and path.suffix != ".py"):
            continue
        if path.is_dir() and path.name == "resources":
            continue  # data, not code: named in the module table
        actual.add(str(path.relative_to(REPO)))
    assert architecture_tree() == actual
