"""fedrank: federated rank distillation with Flower and PyTorch.

The distribution installs one package, ``fedrank``, with four layers (each may import only
the ones below it; ``tests/test_layers.py`` checks it with import-linter):

- ``fedrank.common``: what both sides need (data, losses, metrics, models, configuration,
  records, the evaluator, partitioners);
- ``fedrank.server`` and ``fedrank.client``: the ServerApp with the teacher, and the ClientApp
  with the on-device student (independent of each other);
- ``fedrank.simulations``: simulations, sweeps and reports;
- ``fedrank.cli``: the ``fedrank`` command's dispatcher, above all four.

In the repository the four layers are the top-level folders ``common/``, ``server/``,
``client/`` and ``simulations/``; the wheel maps them under ``fedrank/`` (``package-dir`` in
``pyproject.toml``). When this file runs from the repository or from a Flower app bundle (the
folders are next to ``fedrank/``), the package's search path also covers that folder, so
``flwr run .`` and SuperNodes import ``fedrank.server.server_app`` from the bundle itself.
"""

from __future__ import annotations

from pathlib import Path

LAYERS = ("common", "server", "client", "simulations")

_here = Path(__file__).resolve().parent
_root = _here.parent
# the repository or a Flower app bundle: the layer folders stand next to this package (an
# installed wheel has them inside it, and then the folder above is site-packages: left alone)
if not (_here / "common").is_dir() and (_root / "common" / "__init__.py").is_file():
    __path__.append(str(_root))  # noqa: F821 - a package's __path__ is set by the import system

__version__ = "0.1.0"
