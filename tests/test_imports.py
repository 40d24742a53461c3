"""The package's structure: no two modules import each other, directly or around a longer loop.

Every import counts, at the top of a module or inside a function (a function-local import is still
a dependency: it only runs later). Read with `ast`, without importing anything."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "selfextend_gguf"


def module_names() -> dict[str, Path]:
    """{"selfextend_gguf.evaluate.harness": its path, ...}; a package is named by its __init__.py."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module `name` imports anywhere in its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..settings import y
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module
            for alias in node.names:  # `from . import chat` imports the module selfextend_gguf.chat
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in modules else source)
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One loop of imports [a, b, ..., a], or None (depth-first search)."""
    state = {}  # name -> "open" while on the current path, "done" once fully explored
    path = []

    def visit(name):
        state[name] = "open"
        path.append(name)
        for imported in sorted(graph[name]):
            if state.get(imported) == "open":
                return path[path.index(imported):] + [imported]
            if imported not in state:
                cycle = visit(imported)
                if cycle:
                    return cycle
        path.pop()
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_relative_and_function_local_imports():
    graph = import_graph()
    assert "selfextend_gguf.settings" in graph["selfextend_gguf.llama"]      # from . import settings
    assert "selfextend_gguf.gguf_info" in graph["selfextend_gguf.evaluate.methods"]  # from ..gguf_info import
    assert "selfextend_gguf.llama" in graph["selfextend_gguf"]               # inside __getattr__


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "modules that import each other: " + " -> ".join(cycle)


def test_a_cycle_is_found_and_printed():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
