"""Layering: no import cycles between the parts of the package (its top-level modules and subpackages).

The graph is read from the source: an edge `a -> b` for every import of `b` in `a`, at module level or inside a
function (a lazy import still ties the two together), but not under `if TYPE_CHECKING:`. Parts are the top-level
modules and subpackages of molmo2_jax; `from molmo2_jax import x` counts as an import of `x` when `x` is a module.
Run as a script, it prints the graph and its cycles over all parts.
"""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "molmo2_jax"


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "molmo2_jax":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent / dotted.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        submodules = [name for alias in node.names if _is_module(name := f"{node.module}.{alias.name}")]
        return submodules if node.module == "molmo2_jax" and submodules else [node.module, *submodules]
    return []


def import_graph() -> dict[str, set[str]]:
    """`{part: parts it imports}` over molmo2_jax."""
    graph: dict[str, set[str]] = {}

    def visit(node: ast.AST, source: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            for target in filter(None, map(_part, _imported(child))):
                if target != source:
                    graph.setdefault(source, set()).add(target)
            visit(child, source)

    for file in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("molmo2_jax", *file.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        visit(ast.parse(file.read_text()), _part(module))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one part (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_no_import_cycles_between_the_parts_of_the_package():
    graph = import_graph()
    assert len(graph) >= 20  # every part was read ("__init__" is molmo2_jax itself)
    assert cycles(graph) == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


if __name__ == "__main__":
    graph = import_graph()
    focus = set(sys.argv[1].split(",")) if len(sys.argv) > 1 else set(graph)
    for part in sorted(focus & set(graph)):
        print(f"{part} -> {', '.join(sorted(graph[part] & focus))}")
    print("cycles:", cycles({a: graph[a] & focus for a in focus & set(graph)}) or "none")
