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


def commands() -> set[str]:
    """The modules that are commands: they define main()."""
    return {path.stem for path in PACKAGE.glob("*.py")
            if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in ast.parse(path.read_text()).body)}


def test_no_module_imports_a_command():
    """Commands are thin: they parse, call the library and print; the library never imports one of them."""
    graph, cmds = package_imports(), commands()
    assert {"main", "sampling", "evaluate", "demo", "export", "classifier"} <= cmds
    assert not cmds & {"generation", "recipe", "checkpoint", "metrics", "cli", "train", "config"}
    offenders = {(module, imported) for module, imports in graph.items() for imported in imports & cmds}
    assert not offenders, offenders


def test_the_command_check_finds_a_planted_import():
    graph = package_imports()
    graph["generation"] = graph["generation"] | {"export"}
    assert {(m, i) for m, imports in graph.items() for i in imports & commands()} == {("generation", "export")}


def test_the_debug_flag_and_the_parser_style_live_in_one_place():
    sources = {path.stem: path.read_text() for path in PACKAGE.glob("*.py")}
    assert [name for name, text in sources.items() if '"--debug"' in text] == ["cli"]
    assert [name for name, text in sources.items() if "import argparse" in text] == ["cli"]
