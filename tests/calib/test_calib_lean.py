"""optimum_fair.calib stays pure torch: no transformers, no config objects."""

import ast
from pathlib import Path

from optimum_fair import calib

FORBIDDEN = ("transformers", "optimum_fair.config", "optimum_fair.pipeline", "optimum_fair.arch",
             "optimum_fair.integrations")


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            parent = {0: "", 1: "optimum_fair.calib.", 2: "optimum_fair."}[node.level]
            names.add(parent + (node.module or ""))
    return names


def test_calib_modules_import_no_transformers_or_config():
    files = sorted(Path(calib.__file__).parent.glob("*.py"))
    assert len(files) >= 5
    for path in files:
        for name in _imported_modules(path):
            assert not name.startswith(FORBIDDEN), f"{path.name} imports {name}"
