"""Other teachers feed a real federation (Flower's simulation runtime, MQ2008 Fold1).

The worked example of docs/teacher.md, "distil the ranker you already have": a TREC run from
an existing ranker -> ``fedrank teacher --scores`` -> a federation with
``teacher-kind = "imported"``; and a federation with ``teacher-kind = "lightgbm"``. Both run in
one start of the runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support import MQ2008_FOLD1

from fedrank.cli import main as fedrank
from fedrank.common.datasets import load_dataset
from fedrank.common.run_folder import read_metrics
from fedrank.server.teacher import concat_splits
from fedrank.simulations.simulate import run_federations

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def write_ranker_run(path: Path) -> None:
    """The run of "the ranker you already have": here BM25 of the whole document (LETOR
    feature 25), every item of every split, in TREC run format."""
    sets = concat_splits(load_dataset(str(MQ2008_FOLD1)).splits)
    score = sets.features[:, 24]
    with open(path, "w") as fh:
        for k in range(sets.num_sets):
            lo, hi = int(sets.offsets[k]), int(sets.offsets[k + 1])
            for rank, i in enumerate(np.argsort(-score[lo:hi], kind="stable"), 1):
                doc = sets.item_ids[lo + i]
                fh.write(f"{sets.set_ids[k]} Q0 {doc} {rank} {float(score[lo + i])} bm25\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("teacher-kinds")
    run = root / "bm25.run"
    write_ranker_run(run)
    teacher = root / "bm25-teacher"
    argv = ["teacher", "--scores", str(run), "--data", str(MQ2008_FOLD1), "--out", str(teacher)]
    assert fedrank(argv) == 0
    base = {
        "data-path": str(MQ2008_FOLD1),
        "teacher-cache-dir": str(root / "cache"),
        "num-server-rounds": 2,
        "fraction-evaluate": 0.0,
        "round-timeout": 300.0,
    }
    configs = {
        "imported": {
            **base,
            "teacher-kind": "imported",
            "teacher-scores": str(teacher),
            "out-dir": str(root / "imported"),
        },
        "lightgbm": {
            **base,
            "teacher-kind": "lightgbm",
            "lightgbm-trees": 40,
            "lightgbm-leaves": 15,
            "out-dir": str(root / "lightgbm"),
        },
    }
    summaries = run_federations(list(configs.values()), num_clients=2, num_cpus=1)
    return {
        "root": root,
        "teacher": teacher,
        "summaries": dict(zip(configs, summaries, strict=True)),
    }


def test_imported_scores_are_distilled(runs: dict) -> None:
    summary = runs["summaries"]["imported"]
    made = json.loads((runs["teacher"] / "metrics.json").read_text())
    teacher = summary["teacher"]
    assert teacher["kind"] == "imported" and teacher["parameters"] == 0
    assert teacher["score_table_version"] == made["score_table"]["version"]
    # the server's teacher metrics come from the imported scores on the test split
    assert teacher["metrics"]["ndcg@10"] == pytest.approx(made["splits"]["test"]["ndcg@10"])
    deliveries = summary["federation"]["score_deliveries"]
    assert sum(d["num_sets"] for d in deliveries) == 471 + 157  # train + vali, once each
    rows = read_metrics(runs["root"] / "imported" / "metrics.jsonl")
    # distillation pulls the student's ranking towards the imported ranker's
    assert rows[-1]["kendall_tau"] > rows[0]["kendall_tau"] + 0.05


def test_lightgbm_teacher_trains_caches_and_feeds_the_federation(runs: dict) -> None:
    summary = runs["summaries"]["lightgbm"]
    teacher = summary["teacher"]
    assert teacher["kind"] == "lightgbm" and teacher["parameters"] > 0
    folder = Path(teacher["path"])
    assert folder.name.startswith("lightgbm-") and (folder / "model.txt").is_file()
    info = json.loads((folder / "teacher.json").read_text())
    assert info["score_table_version"] == teacher["score_table_version"]
    assert info["config"]["trees"] == 40 and teacher["metrics"]["ndcg@10"] > 0.42
    rows = read_metrics(runs["root"] / "lightgbm" / "metrics.jsonl")
    assert rows[-1]["ndcg@10"] > rows[0]["ndcg@10"] + 0.01
    assert rows[-1]["kendall_tau"] > rows[0]["kendall_tau"]
