"""The lrexp import graph, read from the source (no module is imported): no cycle between lrexp modules, and
every lrexp import inside a function says why it is there.

The three source folders form one namespace (pyproject's package-dir): src/lrexp -> lrexp, kernels/ ->
lrexp.kernels, data_modules/ -> lrexp.data_modules. An edge is an `import` or `from` statement outside an
`if TYPE_CHECKING:` block; `from pkg import name` is an edge to `pkg.name` when that is a module, else to
`pkg`.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"lrexp": ROOT / "src" / "lrexp", "lrexp.kernels": ROOT / "kernels",
           "lrexp.data_modules": ROOT / "data_modules"}


def module_files() -> Dict[str, Path]:
    """{dotted module name: file} of every lrexp module; a package is named by its __init__.py."""
    modules = {}
    for prefix, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([prefix, *parts])] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, in_function: bool = False) -> Iterator[Tuple[ast.stmt, bool]]:
    """Every import statement outside `if TYPE_CHECKING:`, with whether it sits inside a function."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (pair for child in node.orelse for pair in _imports(ast.Module([child], []), in_function))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        else:
            yield from _imports(node, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _targets(node: ast.stmt, module: str, is_package: bool, modules: Dict[str, Path]) -> List[str]:
    """The lrexp modules one import statement of `module` names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "lrexp"]
    if node.level:  # relative: from the package of `module`, up level - 1 more
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != "lrexp":
        return []
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def import_graph() -> Tuple[Dict[str, Set[str]], List[Tuple[str, int, str]]]:
    """{module: modules it imports} over lrexp, and every function-level lrexp import as (file, line, module)."""
    modules = module_files()
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    local: List[Tuple[str, int, str]] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for node, in_function in _imports(tree):
            targets = [t for t in _targets(node, name, path.name == "__init__.py", modules) if t in modules]
            graph[name].update(t for t in targets if t != name)
            if in_function and targets:
                local.append((str(path.relative_to(ROOT)), node.lineno, targets[0]))
    return graph, local


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle as [a, b, ..., a], or None (depth-first search, modules in name order)."""
    done: Set[str] = set()
    path: List[str] = []
    on_path: Set[str] = set()

    def visit(node: str) -> Optional[List[str]]:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            found = visit(start)
            if found:
                return found
    return None


def test_the_graph_sees_every_folder_and_resolves_package_members_to_modules():
    graph, _ = import_graph()
    assert {"lrexp.cli", "lrexp.kernels.attention.op", "lrexp.data_modules.corpora"} <= set(graph)
    assert "lrexp.layers.block" in graph["lrexp.layers"]  # `from lrexp.layers import block`: the module


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_lrexp_modules():
    cycle = find_cycle(import_graph()[0])
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_function_level_lrexp_import_says_why():
    """A comment saying why it is not at the top (an optional heavy dependency, or a light command that must
    not load torch or lightning at start-up): on the import's line or the line above, or, for a block of
    imports written together, on the block's first line or the line above it."""
    unexplained = []
    for file, line, module in import_graph()[1]:
        lines = (ROOT / file).read_text().splitlines()
        first = line - 1  # 0-based index of the block's first import line
        while first > 0 and lines[first - 1].strip().startswith(("from ", "import ")):
            first -= 1
        said = any("#" in lines[i] for i in range(first, line)) or lines[first - 1].strip().startswith("#")
        if not said:
            unexplained.append(f"{file}:{line} imports {module}")
    assert not unexplained, "function-level imports without a reason:\n" + "\n".join(unexplained)
