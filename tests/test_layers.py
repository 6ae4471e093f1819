"""The layers import downwards only: models are pure torch, data never reaches up to tasks (README, Architecture)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fmlab"
FORBIDDEN = {
    "models": ("lightning", "hydra", "omegaconf", "fmlab.tasks", "fmlab.data", "fmlab.interop", "fmlab.training",
               "fmlab.resolve", "fmlab.callbacks"),
    "data": ("fmlab.tasks", "fmlab.training", "fmlab.evaluation", "fmlab.interop.export"),
    "resolve.py": ("fmlab.tasks", "fmlab.data", "fmlab.training", "lightning"),
    "interop": ("fmlab.training", "fmlab.evaluation", "fmlab.data"),
}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_downwards(layer: str) -> None:
    files = [SRC / layer] if layer.endswith(".py") else sorted((SRC / layer).rglob("*.py"))
    assert files and files[0].exists()
    offences = [
        f"{f.relative_to(SRC)} imports {name}"
        for f in files for name in sorted(imported_modules(f))
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[layer])
    ]
    assert not offences, offences


def test_the_check_sees_function_level_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from fmlab.tasks.base import Task\n")
    assert "fmlab.tasks.base" in imported_modules(module)
