"""Shared test fixtures: the real MQ2008 data and an isolated data cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MQ2008_DIR = REPO_ROOT / ".." / "shared" / "data" / "MQ2008"


@pytest.fixture(scope="session")
def mq2008_dir() -> Path:
    """The LETOR 4.0 MQ2008 folder (``../shared/data/MQ2008`` from the repo root)."""
    if not (MQ2008_DIR / "Fold1").is_dir():
        pytest.fail(
            f"MQ2008 data not found at {MQ2008_DIR} (expected ../shared/data/MQ2008 beside the "
            "repository, with Fold1..Fold5 and S1..S5.txt.gz); the real-data tests need it"
        )
    return MQ2008_DIR


@pytest.fixture(autouse=True, scope="session")
def _isolated_data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Parsed-data caches go to a temporary folder, never into the user's home."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDRANK_CACHE_DIR", str(tmp_path_factory.mktemp("fedrank-cache")))
    yield
    mp.undo()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Small tensors run fastest on one thread (and share a busy machine politely)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
