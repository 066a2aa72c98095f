"""The layering of docs/architecture.md: a module imports only from its own layer or the layers below."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# docs/architecture.md, top to bottom.
LAYERS = [
    {"cli", "forkserver"},
    {"study", "launch", "sweep", "sweep_spec", "eval_shards", "exact_study", "report", "exact_report", "bench"},
    {"train", "evaluate", "metrics", "extractors", "calibration", "exact", "tracking"},
    {"losses", "networks", "attention", "triton_attention", "samplers", "ema"},
    {"config", "trigflow", "gmm", "shapes", "data", "checkpoint", "fileio", "seedstats"},
]


def _layer(module: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if module in names)


def _scm_imports(path: Path) -> set[str]:
    """Every scm module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "scm":
            parts = node.module.split(".")
            names.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("scm."))
    return names


def _files():
    """(module, path) of every library file; a package's files count as the package (scm/bench/*.py: bench)."""
    for path in sorted((ROOT / "scm").glob("*.py")):
        if path.stem != "__init__":
            yield path.stem, path
    for path in sorted((ROOT / "scm").glob("*/*.py")):
        yield path.parent.name, path


def test_every_module_has_a_layer():
    assert {module for module, _ in _files()} == set().union(*LAYERS)


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for module, path in _files():
        for name in _scm_imports(path):
            if _layer(name) < _layer(module):
                upward.append(f"{module} -> {name}")
    assert not upward


def test_the_library_does_not_reach_into_tests_or_outside_the_repository():
    for _, path in _files():
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(n)}
        literals = [n.value for n in ast.walk(tree)
                    if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]
        assert not [v for v in literals if "tests/" in v], path.name  # no default path into the test tree
        text = path.read_text()
        assert "../shared" not in text and "method.md" not in text and "stack-notes" not in text, path.name
