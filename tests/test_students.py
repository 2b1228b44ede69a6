"""Federated students with the defaults on data users bring (quick versions; the full ones are
``benchmarks/bench_students.py``), and the main job's comparison.

One start of Flower's simulation runtime (5 simulated clients, default settings) runs:

1. MQ2008 Fold1 with every column rescaled to raw-like, heavy-tailed values (each column times
   a factor in 1..1e5, half of them through exp first);
2. 60 training queries of MQ2008 Fold1, raw-like too, split over the 5 clients (about 12 sets
   per client: the small-data case).

Each must reach >= 85% of its teacher's NDCG@10 on the test split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support import MQ2008_FOLD1

from fedrank.common.datasets import load_dataset
from fedrank.common.models import build_model
from fedrank.common.run_folder import read_metrics
from fedrank.server.student_setup import fit_server_transform
from fedrank.simulations.derived_data import write_derived_fold
from fedrank.simulations.simulate import REFERENCE, compare, run_federations

REPO = Path(__file__).resolve().parents[1]
TEACHER_SHARE = 0.85

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("students")
    data = {
        "raw": write_derived_fold(MQ2008_FOLD1, root / "raw", raw=True, seed=0),
        "small": write_derived_fold(MQ2008_FOLD1, root / "small", train_sets=60, raw=True, seed=0),
    }
    configs = {
        name: {
            "data-path": str(path),
            "out-dir": str(root / name),
            "teacher-cache-dir": str(root / "teacher"),
            "fraction-evaluate": 0.0,
            "round-timeout": 300.0,
        }
        for name, path in data.items()
    }
    summaries = run_federations(list(configs.values()), num_clients=5)
    return {"root": root, "data": data, "summaries": dict(zip(configs, summaries, strict=True))}


@pytest.mark.parametrize("name", ["raw", "small"])
def test_default_student_reaches_the_teacher(runs: dict, name: str) -> None:
    summary = runs["summaries"][name]
    student = summary["student"]["metrics"]["ndcg@10"]
    teacher = summary["teacher"]["metrics"]["ndcg@10"]
    assert student >= TEACHER_SHARE * teacher, (name, student, teacher)
    assert summary["student"]["metrics"]["log_loss"] < 0.7  # calibrated, not raw-scale logits
    rows = read_metrics(runs["root"] / name / "metrics.jsonl")
    clients = rows[1]["clients_train"]
    # the floor: every client trained at least min-local-steps steps and moved the model
    assert all(c["steps"] >= 20 and c["too_short"] == 0 for c in clients)
    if name == "small":
        assert all(c["num_examples"] <= 15 for c in clients)


def test_saved_student_carries_the_servers_transform(runs: dict) -> None:
    folder = runs["root"] / "raw" / "student"
    spec = json.loads((folder / "student.json").read_text())["spec"]
    model = build_model(spec)
    state = torch.load(folder / "student.pt", weights_only=True)
    model.load_state_dict(state, strict=True)
    fitted = fit_server_transform(load_dataset(str(runs["data"]["raw"])))
    for key in ("log_columns", "shift", "scale"):
        np.testing.assert_array_equal(
            state[f"transform.{key}"].numpy(), getattr(fitted, key).numpy()
        )
    assert fitted.log_columns.sum() > 0  # raw-like columns were found heavy-tailed


def test_main_job_comparison_has_the_reference_and_the_gap(tmp_path: Path) -> None:
    config = {
        "data-path": "synthetic:num_sets=300",
        "num-server-rounds": 2,
        "teacher-epochs": 3,
        "partition-scheme": "dirichlet",
        "label-fraction": 0.2,
        "fraction-evaluate": 0.0,
        "round-timeout": 300.0,
    }
    summary = compare(config, tmp_path / "main", num_clients=3)
    table = summary["table"]
    lines = table.splitlines()
    assert "gap closed" in lines[0]
    names = [line.split("  ")[0].strip() for line in lines[2:]]
    assert names == ["teacher (server)", REFERENCE, "student: labels-only", "student: distill"]
    reference = summary["reference"]["metrics"]
    train_sets = load_dataset(config["data-path"]).train.num_sets
    assert summary["reference"]["label_sets"] == train_sets  # every training set's labels
    labels, distill = (summary["students"][k]["metrics"] for k in ("labels-only", "distill"))
    gap = reference["ndcg@10"] - labels["ndcg@10"]
    if gap > 0:
        expected = (distill["ndcg@10"] - labels["ndcg@10"]) / gap
        assert summary["gap_closed"] == pytest.approx(expected)
        assert f"{expected:.0%}" in lines[-1]
    comparison = json.loads((tmp_path / "main" / "comparison.json").read_text())
    assert [r["model"] for r in comparison["rows"]][1] == REFERENCE
    assert (tmp_path / "main" / "ndcg10.png").read_bytes()[:4] == b"\x89PNG"
