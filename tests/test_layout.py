"""The package's layout holds: the tuner imports neither identification nor the app, identification does not import
the app, and no module of `peft_ila` takes part in an import cycle (imports inside functions count too)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "peft_ila"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every module of peft_ila -> the peft_ila modules it imports, at any depth of its code."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                target = ".".join(filter(None, [base, node.module]))
                for alias in node.names:  # `from . import x` may name a module
                    targets.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_the_graph_sees_relative_and_function_level_imports():
    graph = imports()
    assert "peft_ila.tuner.model" in graph["peft_ila.identification.importance"]
    assert "peft_ila.app.pipeline" in graph["peft_ila.app.cli"]  # imported inside a function
    assert "peft_ila.app" in graph["peft_ila.app.data"]  # `from . import UsageError`


def test_wings_import_only_inwards():
    for module, targets in imports().items():
        if module.startswith("peft_ila.tuner"):
            assert not [t for t in targets if not t.startswith("peft_ila.tuner")], module
        if module.startswith("peft_ila.identification"):
            assert not [t for t in targets if t.startswith("peft_ila.app")], module


def test_no_import_cycle():
    graph, done, path = imports(), set(), []

    def visit(module: str) -> None:
        if module in path:
            raise AssertionError(f"import cycle: {' -> '.join([*path[path.index(module) :], module])}")
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_no_function_of_the_tuner_or_identification_is_longer_than_a_screen():
    long = []
    for path in [*PACKAGE.glob("tuner/*.py"), *PACKAGE.glob("identification/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):  # the docstring
                    body = body[1:] or body
                lines = body[-1].end_lineno - body[0].lineno + 1
                if lines > 60:
                    long.append(f"{path.name}:{node.name} ({lines} lines)")
    assert not long, long
