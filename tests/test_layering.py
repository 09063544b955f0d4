"""No module imports one that sits above it: config/errors/io/collectives, then data/models/optim/
augment, then train, then experiments/analysis/report, then the CLI."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "bigbatch"
LAYERS = {
    "config": 0,
    "errors": 0,
    "io": 0,
    "collectives": 0,
    "data": 1,
    "models": 1,
    "optim": 1,
    "augment": 1,
    "train": 2,
    "experiments": 3,
    "analysis": 3,
    "report": 3,
    "cli": 4,
    "__main__": 4,
}


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[1]]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bigbatch."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("bigbatch."))
    return found


def test_every_module_imports_only_its_layer_or_below():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts == ("bigbatch", "__init__"):
            continue  # the public API names modules of every layer, imported on first use
        module = ".".join(parts)
        for imported in _imports(path):
            if _layer(imported) > _layer(module):
                violations.append(f"{module} imports {imported}")
    assert not violations, violations


def test_the_check_sees_function_level_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from bigbatch.report.plots import plt\n")
    assert _imports(source) == {"bigbatch.report.plots"}
