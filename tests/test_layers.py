"""The layers hold: import-linter's contract from ``pyproject.toml`` over the installed names.

``fedrank.common`` < ``fedrank.server`` | ``fedrank.client`` < ``fedrank.simulations`` <
``fedrank.cli`` (the ``fedrank`` command's dispatcher, the one module that names every layer).
In the repository the layers are the top-level folders that ``package-dir`` maps under
``fedrank``; import-linter finds a package's modules by walking its folder, so the check runs
over a view of the package as the wheel lays it out: ``fedrank/`` with the four folders linked
inside it. A second check plants a wrong import in a copy and expects the contract to break,
so the first one is known to look. No module of the package imports another fedrank module
inside a function (an import hidden there to dodge a cycle).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedrank import LAYERS

REPO_ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _package_view(root: Path, *, copy: bool = False) -> Path:
    """``root/fedrank`` laid out as the wheel installs it; the layers linked (or copied)."""
    pkg = root / "fedrank"
    pkg.mkdir(parents=True)
    for src in (REPO_ROOT / "fedrank").glob("*.py"):
        shutil.copy2(src, pkg / src.name)
    for layer in LAYERS:
        if copy:
            shutil.copytree(
                REPO_ROOT / layer, pkg / layer, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            (pkg / layer).symlink_to(REPO_ROOT / layer, target_is_directory=True)
    return root


def _lint_imports(view: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(view)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(REPO_ROOT / "pyproject.toml")],
        cwd=view,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_layer_contract_is_kept(tmp_path: Path) -> None:
    result = _lint_imports(_package_view(tmp_path))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "1 kept, 0 broken" in out, out
    # every module of the four layers was analysed (not an empty view)
    modules = sum(1 for layer in LAYERS for _ in (REPO_ROOT / layer).glob("*.py"))
    assert f"Analyzed {modules + len(list((REPO_ROOT / 'fedrank').glob('*.py')))} files" in out


@pytest.mark.parametrize(
    ("layer", "imported"),
    [
        ("common", "fedrank.server.teacher"),  # up a layer
        ("server", "fedrank.client.trainer"),  # sideways
        ("client", "fedrank.simulations.report"),  # up two layers
    ],
)
def test_a_wrong_import_breaks_the_contract(tmp_path: Path, layer: str, imported: str) -> None:
    view = _package_view(tmp_path, copy=True)
    (view / "fedrank" / layer / "planted.py").write_text(f"import {imported}\n")
    result = _lint_imports(view)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "BROKEN" in out and f"fedrank.{layer}.planted -> {imported}" in out, out


def _function_level_imports(path: Path) -> list[str]:
    """``line: module`` for every fedrank import inside a function or method of ``path``."""
    found = []
    for func in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else ["(relative)"]
            else:
                continue
            found += [
                f"{node.lineno}: {name}"
                for name in names
                if name == "(relative)" or name.split(".")[0] in {"fedrank", *LAYERS}
            ]
    return found


def test_no_fedrank_import_hides_inside_a_function() -> None:
    offenders = {
        str(path.relative_to(REPO_ROOT)): hits
        for folder in (*LAYERS, "fedrank")
        for path in sorted((REPO_ROOT / folder).glob("*.py"))
        if (hits := _function_level_imports(path))
    }
    assert offenders == {}
