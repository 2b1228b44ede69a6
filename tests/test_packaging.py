"""One installed name, and an app bundle with only the apps' code.

- The wheel (built by setuptools from ``pyproject.toml``, non-editable) holds one top-level
  package, ``fedrank``, with the four layer folders mapped inside it. Installed into a fresh
  virtual environment and imported from outside the checkout, ``fedrank.server.server_app``
  and the ``fedrank`` command work and no generic ``common``/``server``/``client``/
  ``simulations`` package can be imported. The fresh environment gets the wheel only; its
  dependencies (torch, flwr, ...) are reached through a path file pointing at this
  environment's site-packages (installing them again would need the internet).
- The FAB (Flower app bundle) built by Flower's own builder from ``[tool.flwr.app]`` carries
  ``pyproject.toml``, ``fedrank/`` and the ``common``/``server``/``client`` folders: no
  tests, benchmarks, docs or simulations.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_FOLDERS = {"fedrank", "common", "server", "client"}
SCENARIOS = REPO_ROOT / "simulations" / "scenarios"
NOT_IN_BUNDLE = {"tests", "benchmarks", "docs", "simulations", "scripts", "runs"}


def _checkout_copy(dest: Path) -> Path:
    """The repository's files as a user's checkout has them (no venv, caches or run output)."""
    shutil.copytree(
        REPO_ROOT,
        dest,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "runs", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
        ),
    )
    return dest


def test_fab_carries_only_the_apps_code(tmp_path: Path) -> None:
    app = _checkout_copy(tmp_path / "app")
    assert {"tests", "benchmarks", "docs"} <= {p.name for p in app.iterdir()}  # there to leave
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()
    tops = {name.split("/")[0] for name in names if not name.startswith(".info/")}
    assert tops == APP_FOLDERS | {"pyproject.toml"}, sorted(tops)
    assert not tops & NOT_IN_BUNDLE
    # the components named in [tool.flwr.app.components] are in it, and every module of them
    assert {"fedrank/__init__.py", "server/server_app.py", "client/client_app.py"} <= set(names)
    for layer in ("common", "server", "client"):
        modules = {f"{layer}/{p.name}" for p in (REPO_ROOT / layer).glob("*.py")}
        assert modules <= set(names), sorted(modules - set(names))


@pytest.mark.slow
def test_wheel_installs_one_package_and_it_imports_outside_the_checkout(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(_checkout_copy(tmp_path / "src"))],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("fedrank-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"fedrank", wheel.name.split("-py")[0] + ".dist-info"}, sorted(tops)
    scenarios = {f"fedrank/simulations/scenarios/{p.name}" for p in SCENARIOS.glob("*.toml")}
    assert scenarios and scenarios <= set(names)  # package data travels too
    assert not any(n.startswith(("fedrank/tests/", "fedrank/benchmarks/")) for n in names)

    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--ignore-installed", "-q", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    assert (site / "fedrank" / "server" / "server_app.py").is_file(), install.stdout
    # then the dependencies from this environment (a plain path: its .pth files, among them
    # the editable install of this checkout, are not run); after the install, so that pip
    # does not take this environment's fedrank for the wheel's
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    probe = """
import importlib, json, fedrank, fedrank.server.server_app, fedrank.client.client_app
failed = {}
for name in ("common", "server", "client", "simulations"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        failed[name] = True
print(json.dumps({"fedrank": fedrank.__file__, "paths": list(fedrank.__path__),
                  "server_app": fedrank.server.server_app.__file__, "missing": failed}))
"""
    run = subprocess.run(
        [str(python), "-c", probe], cwd=outside, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["missing"] == dict.fromkeys(("common", "server", "client", "simulations"), True)
    assert Path(seen["fedrank"]).parent == site / "fedrank"
    assert seen["paths"] == [str(site / "fedrank")]  # nothing from a checkout
    assert Path(seen["server_app"]) == site / "fedrank" / "server" / "server_app.py"
    # the console script of the wheel runs its dispatcher
    cli = subprocess.run(
        [str(env_dir / "bin" / "fedrank"), "--help"], cwd=outside, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0 and "usage: fedrank COMMAND" in cli.stdout, cli.stderr
