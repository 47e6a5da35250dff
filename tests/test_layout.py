"""The package's shape: imports flow one way."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffusion"


def package_imports() -> dict[str, set[str]]:
    """module -> the package modules it imports, at any level (function-level imports included)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffusion"):
                found.add(node.module.removeprefix("diffusion").lstrip(".") or None)
                found.update(a.name for a in node.names if node.module == "diffusion")
            elif isinstance(node, ast.Import):
                found.update(a.name.removeprefix("diffusion.") for a in node.names if a.name.startswith("diffusion."))
        graph[path.stem] = {m for m in found if m and m != path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of modules that import each other in a circle, or None (depth-first search)."""
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, trail + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_module_imports_one_that_imports_it_back():
    graph = package_imports()
    assert {"train", "sampling", "generation", "visuals", "evaluate"} <= graph.keys()
    assert "generation" in graph["sampling"] and "visuals" in graph["train"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_planted_circle():
    graph = package_imports()
    graph["visuals"] = graph["visuals"] | {"train"}  # train -> visuals -> train
    assert find_cycle(graph) is not None
