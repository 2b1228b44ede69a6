"""Shared test fixtures: the real MQ2008 data and isolated caches (``support.py`` holds the
constants modules need at import time: the data's place, the tiny teacher of quick runs).

Tests marked ``slow`` (Flower's simulation runtime, real SuperLink/SuperNode processes, a
wheel build) are left out of the default run (``addopts`` in ``pyproject.toml``); run them
with ``bash scripts/test.sh -m slow`` (``.ci/run`` runs both passes).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from support import MQ2008_DIR, MQ2008_FOLD1

from fedrank.client.client_app import clear_process_caches


@pytest.fixture(scope="session")
def mq2008_dir() -> Path:
    """The LETOR 4.0 MQ2008 folder (``../shared/data/MQ2008`` from the repo root)."""
    if not (MQ2008_DIR / "Fold1").is_dir():
        pytest.fail(
            f"MQ2008 data not found at {MQ2008_DIR} (expected ../shared/data/MQ2008 beside the "
            "repository, with Fold1..Fold5 and S1..S5.txt.gz); the real-data tests need it"
        )
    return MQ2008_DIR


@pytest.fixture(scope="session")
def mq2008_fold1(mq2008_dir: Path) -> Path:
    """MQ2008's first fold (``train``/``vali``/``test`` ``.txt.gz``)."""
    return MQ2008_FOLD1


@pytest.fixture(autouse=True, scope="session")
def _isolated_data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Parsed-data caches go to a temporary folder, never into the user's home."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDRANK_CACHE_DIR", str(tmp_path_factory.mktemp("fedrank-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _fresh_process_caches() -> Iterator[None]:
    """Each test starts and ends with the ClientApp's per-process caches empty (its loaded
    data and the score tables it holds), as a new client process would."""
    clear_process_caches()
    yield
    clear_process_caches()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Small tensors run fastest on one thread (and share a busy machine politely)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
