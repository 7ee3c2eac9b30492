"""The layers point one way: vitparity (the shared core) below exporter and compare, which never import each other,
and zoo and bench on top. Read from the sources' imports (ast), so a new upward import or circle fails here."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

# Each package and the packages it may import; no exception.
ALLOWED = {
    "vitparity": set(),
    "exporter": {"vitparity"},
    "compare": {"vitparity"},
    "zoo": {"vitparity", "exporter", "compare"},
    "bench": {"vitparity", "exporter", "compare"},
}


def _imports(path: Path, package: str = "") -> list[tuple[str, int]]:
    """(module imported, line) for every import in the file, relative ones made absolute."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return _imports_in(path.read_text(), module, path.name == "__init__.py")


def _imports_in(source: str, module: str, is_package: bool = False) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts[: len(parts) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # "from compare import run" imports the module compare.run: name each alias too, the graph keeps
            # the longest name that is a module ("vitparity.artifact.write_atomic" -> vitparity.artifact).
            found += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]
        elif isinstance(node, ast.Call) and _dynamic_import(node.func) and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.append((node.args[0].value, node.lineno))  # __import__("zoo.sweep"), importlib.import_module("zoo")
    return found


def _dynamic_import(func) -> bool:
    """Whether a call's function is __import__ or import_module (importlib.import_module, or imported bare)."""
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    return name in ("__import__", "import_module")


def _graph() -> dict[str, set[str]]:
    graph = {}
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            graph[module] = {name for name, _ in _imports(path, package) if name.split(".")[0] in ALLOWED}
    return graph


def test_no_package_imports_a_layer_above_it_or_beside_it():
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for name, line in _imports(path, package):
                top = name.split(".")[0]
                relative = str(path.relative_to(ROOT))
                if top in ALLOWED and top != package and top not in allowed:
                    wrong.append(f"{relative}:{line} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle_between_modules():
    graph = _graph()

    def resolve(name: str) -> str | None:  # "vitparity.artifact.write_atomic" -> "vitparity.artifact"
        while name and name not in graph:
            name = name.rpartition(".")[0]
        return name or None

    edges = {module: {resolve(name) for name in names} - {None, module} for module, names in graph.items()}
    # A package's __init__ importing its own modules is how Python packages work, not a circle of design.
    edges = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in edges.items()}
    state, circles = {}, []

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_the_check_can_fail():
    """The import reader makes relative imports absolute and sees a layer's upward import, on hand-made sources."""
    assert _imports_in("from .errors import UserError\n", "vitparity.artifact") == [("vitparity.errors.UserError", 1)]
    assert _imports_in("from . import run\n", "compare", is_package=True) == [("compare.run", 1)]
    assert _imports_in("def f():\n    from exporter import artifact\n", "compare.run") == [("exporter.artifact", 2)]
    # however the import is spelled
    assert _imports_in("x = __import__('zoo.sweep', fromlist=['main'])\n", "exporter.cli") == [("zoo.sweep", 1)]
    assert ("zoo", 2) in _imports_in("import importlib\nimportlib.import_module('zoo')\n", "exporter.cli")
