"""What many test modules share: the real data's place, the tiny teacher of quick runs and the
metadata of hand-made Flower messages.

``conftest.py`` hands the data's place out as fixtures (``mq2008_dir``, ``mq2008_fold1``);
modules that need it at import time (module-level configs, helpers) import it from here, so
it is written once, and so is the tiny teacher that quick federations share.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Metadata

REPO_ROOT = Path(__file__).resolve().parents[1]
# the LETOR 4.0 MQ2008 folds beside the repository (read-only; never copied into it)
MQ2008_DIR = REPO_ROOT / ".." / "shared" / "data" / "MQ2008"
MQ2008_FOLD1 = MQ2008_DIR / "Fold1"
# what a device install must neither hold nor import: server-side distributions and layers
SERVER_SIDE = (
    "matplotlib",
    "ray",
    "optuna",
    "lightgbm",
    "pyarrow",
    "fedrank.server",
    "fedrank.simulations",
)

# the smallest set-transformer teacher that still trains: runs that test the federation, not
# the teacher, start in seconds with it
TINY_TEACHER: dict[str, Any] = {
    "teacher-epochs": 1,
    "teacher-d-model": 16,
    "teacher-heads": 2,
    "teacher-layers": 1,
}


def reply_metadata(node: int, kind: str = "train", reply_to: str = "") -> Metadata:
    """A reply's metadata as node ``node`` sends it to the server (reply to ``ins-<node>``)."""
    return Metadata(
        run_id=1,
        message_id=f"reply-{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id=reply_to or f"ins-{node}",
        group_id="1",
        created_at=time.time(),
        ttl=3600,
        message_type=kind,
    )


def instruction_metadata(node: int, kind: str = "train", message_id: str = "") -> Metadata:
    """An instruction's metadata as the grid leaves it after sending to ``node`` (its id set:
    ``ins-<node>`` unless given)."""
    return Metadata(
        run_id=1,
        message_id=message_id or f"ins-{node}",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600,
        message_type=kind,
    )


def write_letor(path: Path, *, sets: int = 12, items: int = 5, features: int = 46) -> Path:
    """A seeded LETOR file of ``sets`` sets of ``items`` items (binary labels, docids), as a
    device's own data file."""
    rng = np.random.default_rng(0)
    lines = []
    for q in range(sets):
        for i in range(items):
            feats = " ".join(f"{j + 1}:{rng.random():.3f}" for j in range(features))
            lines.append(f"{int(rng.random() > 0.6)} qid:{q} {feats} #docid = d{q}-{i}\n")
    path.write_text("".join(lines))
    return path
