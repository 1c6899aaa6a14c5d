"""The layout holds: the tuner imports neither identification nor the app, identification does not import the app,
no module of `peft_ila` or `benchmarks` takes part in an import cycle (imports inside functions count too), the
benchmarks use only the library's public names and their own core, and the core imports no study."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE, BENCHMARKS = ROOT / "peft_ila", ROOT / "benchmarks"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(package: Path) -> dict[str, set[tuple[str, str | None]]]:
    """Every module of `package` -> what it imports, at any depth of its code: (module, name) for `from module import
    name` (relative imports resolved), (module, None) for `import module`."""
    out = {}
    for path in package.rglob("*.py"):
        name = module_name(path)
        here = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here.rsplit(".", node.level - 1)[0] if node.level else ""
                found.update((".".join(filter(None, [base, node.module])), alias.name) for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update((alias.name, None) for alias in node.names)
        out[name] = found
    return out


def imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Every module of `package` -> the modules of that package it imports."""
    names = imported_names(package)
    graph = {}
    for name, found in names.items():
        targets = {f"{module}.{alias}" if f"{module}.{alias}" in names else module for module, alias in found if alias}
        targets |= {module for module, alias in found if alias is None}
        graph[name] = {t for t in targets if t in names and t != name}  # `from . import x` may name a module
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
    for package in (PACKAGE, BENCHMARKS):
        assert_no_cycle(imports(package))


def assert_no_cycle(graph: dict[str, set[str]]) -> None:
    done, path = set(), []

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


def test_no_function_of_the_library_is_longer_than_a_screen():
    long = []
    for path in [*PACKAGE.glob("tuner/*.py"), *PACKAGE.glob("identification/*.py"), *PACKAGE.glob("app/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):  # the docstring
                    body = body[1:] or body
                lines = body[-1].end_lineno - body[0].lineno + 1
                if lines > 60:
                    long.append(f"{path.name}:{node.name} ({lines} lines)")
    assert not long, long


def private_imports(found: dict[str, set[tuple[str, str | None]]]) -> list[str]:
    """`module: what` for every name or module of peft_ila starting with `_` that a module imports."""
    private = []
    for module, names in found.items():
        for source, name in names:
            parts = [*source.split("."), *([name] if name else [])]
            if parts[0] == "peft_ila" and any(part.startswith("_") for part in parts):
                private.append(f"{module}: {'.'.join(parts)}")
    return sorted(private)


def test_benchmarks_use_the_library_s_public_names_and_their_own_core():
    found = imported_names(BENCHMARKS)
    assert not private_imports(found), private_imports(found)
    assert not [m for m, names in found.items() for source, _ in names if source.split(".")[0] in ("tests", "conftest")]
    graph = imports(BENCHMARKS)
    core = [module for module in graph if module.startswith("benchmarks.core")]
    assert core and all(t.startswith("benchmarks.core") for module in core for t in graph[module]), core


def test_a_private_name_or_module_of_the_library_is_caught():
    found = {"benchmarks.x": {("peft_ila.app.cli", "_hidden"), ("peft_ila", "ILAConfig"), ("peft_ila._quiet", None)}}
    assert private_imports(found) == ["benchmarks.x: peft_ila._quiet", "benchmarks.x: peft_ila.app.cli._hidden"]


def test_every_command_of_the_cli_is_shorter_than_forty_lines():
    """A command reads as its steps: checks, setup, the work, the output; the rest lives in named helpers."""
    tree = ast.parse((PACKAGE / "app" / "cli.py").read_text())
    commands = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("cmd_")]
    assert len(commands) >= 7
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in commands}
    assert not {name: lines for name, lines in lengths.items() if lines >= 40}
