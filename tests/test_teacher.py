"""The teacher: training (improves, early stopping, deterministic), checkpoints, cache, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrank.common.datasets import load_dataset
from fedrank.common.errors import CheckpointError, ConfigError
from fedrank.common.letor import read_letor_folder
from fedrank.common.models import TeacherModel, score_sets
from fedrank.common.score_table import ScoreTable
from fedrank.server.teacher import (
    TeacherConfig,
    build_score_table,
    evaluate,
    load_teacher,
    load_teacher_info,
    save_teacher,
    teacher_cache_key,
    train_or_load_teacher,
    train_teacher,
)
from fedrank.server.teacher_cli import main as teacher_main

SMALL = "synthetic:num_sets=240,max_items=14"
FAST = {"d_model": 16, "num_heads": 2, "num_layers": 1, "epochs": 4, "batch_size": 16}


@pytest.fixture(scope="module")
def small():
    return load_dataset(SMALL)


@pytest.fixture(scope="module")
def trained(small):
    return train_teacher(small.splits["train"], small.splits["vali"], TeacherConfig(**FAST), False)


def untrained_ndcg10(sets, config: TeacherConfig) -> float:
    torch.manual_seed(config.seed)
    model = TeacherModel(sets.num_features, config.d_model, config.num_heads, config.num_layers)
    return evaluate(model, sets)["ndcg@10"]


def test_training_improves_validation_ndcg_synthetic(small, trained):
    vali = small.splits["vali"]
    before = untrained_ndcg10(vali, TeacherConfig(**FAST))
    assert trained.vali_ndcg10 > before + 0.05
    assert len(trained.history) >= 1 and trained.best_epoch >= 1
    assert all(math.isfinite(row["train_loss"]) for row in trained.history)
    assert {"train_rank_label", "train_label", "vali_ndcg@10"} <= set(trained.history[0])


def test_training_improves_validation_ndcg_mq2008(mq2008_dir: Path):
    splits = read_letor_folder(mq2008_dir / "Fold1")
    train = splits["train"].take(np.arange(160))
    vali = splits["vali"].take(np.arange(80))
    config = TeacherConfig(**{**FAST, "epochs": 5})
    before = untrained_ndcg10(vali, config)
    result = train_teacher(train, vali, config, progress=False)
    assert result.vali_ndcg10 > before + 0.03
    assert result.vali_ndcg10 > 0.40  # well above chance on MQ2008
    assert evaluate(result.model, vali)["ndcg@10"] == pytest.approx(result.vali_ndcg10, abs=2e-3)


def test_early_stopping_keeps_best(small):
    # a large learning rate without decay makes validation NDCG wander: stop and keep the best
    config = TeacherConfig(**{**FAST, "epochs": 12, "patience": 2, "lr": 0.05})
    result = train_teacher(small.splits["train"], small.splits["vali"], config, progress=False)
    values = [row["vali_ndcg@10"] for row in result.history]
    assert result.vali_ndcg10 == max(values)
    assert result.best_epoch == int(np.argmax(values)) + 1
    assert result.stopped == "early_stopping"
    assert len(values) == result.best_epoch + config.patience  # the last epoch is not the best
    # the returned weights are the best epoch's (standardisation folded in: raw features)
    assert evaluate(result.model, small.splits["vali"])["ndcg@10"] == pytest.approx(
        result.vali_ndcg10, abs=2e-3
    )


def test_max_seconds_stops_training(small):
    config = TeacherConfig(**{**FAST, "epochs": 50, "max_seconds": 1e-3})
    result = train_teacher(small.splits["train"], small.splits["vali"], config, progress=False)
    assert result.stopped == "max_seconds" and len(result.history) == 1


def test_training_is_deterministic_and_leaves_rng_alone(small, trained):
    state = torch.random.get_rng_state()
    again = train_teacher(
        small.splits["train"], small.splits["vali"], TeacherConfig(**FAST), progress=False
    )
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [r["train_loss"] for r in again.history] == [r["train_loss"] for r in trained.history]
    test = small.splits["test"]
    np.testing.assert_array_equal(score_sets(again.model, test), score_sets(trained.model, test))


def test_config_validation():
    with pytest.raises(ConfigError, match="'epochs'"):
        TeacherConfig(epochs=0)
    with pytest.raises(ConfigError, match="divisible"):
        TeacherConfig(d_model=30, num_heads=4)
    with pytest.raises(ConfigError, match="unknown teacher options.*'nope'"):
        TeacherConfig.from_dict({"nope": 1})
    assert TeacherConfig.from_dict({"d-model": 16, "num_heads": 2}).d_model == 16
    with pytest.raises(ConfigError, match="graded"):
        TeacherConfig(label_sigmoid_ce_options={"graded": "bogus"}).composite_loss()


def test_save_load_round_trip_identical_scores(tmp_path: Path, small, trained):
    folder = save_teacher(trained, tmp_path / "teacher")
    assert sorted(p.name for p in folder.iterdir()) == ["teacher.json", "teacher.pt"]
    info = load_teacher_info(folder)
    assert info["spec"]["kind"] == "teacher" and info["metrics"]["best_epoch"] == trained.best_epoch
    model = load_teacher(folder)
    assert not model.training
    sets = small.splits["test"]
    np.testing.assert_array_equal(score_sets(model, sets), score_sets(trained.model, sets))
    # the weights file is a plain tensor state dict: loads with weights_only=True
    state = torch.load(folder / "teacher.pt", weights_only=True)
    assert set(state) == set(trained.model.state_dict())


def test_load_teacher_rejects_damage(tmp_path: Path, trained):
    folder = save_teacher(trained, tmp_path / "t")
    weights = folder / "teacher.pt"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="teacher.pt"):
        load_teacher(folder)
    # truncated weights whose checksum was (wrongly) updated: torch.load itself fails
    info = json.loads((folder / "teacher.json").read_text())
    import hashlib

    info["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (folder / "teacher.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_teacher(folder)
    (folder / "teacher.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="teacher.json"):
        load_teacher(folder)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_teacher(tmp_path / "nowhere")


def test_load_teacher_rejects_nan_weights(tmp_path: Path, trained):
    folder = save_teacher(trained, tmp_path / "t")
    state = torch.load(folder / "teacher.pt", weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].clone().fill_(float("nan"))
    torch.save(state, folder / "teacher.pt")
    info = json.loads((folder / "teacher.json").read_text())
    info.pop("weights_sha256")
    (folder / "teacher.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_teacher(folder)


def test_build_score_table(small, trained):
    test = small.splits["test"]
    table = build_score_table(trained.model, test)
    assert table.num_sets == test.num_sets and table.dtype == np.float32
    np.testing.assert_array_equal(table.align(test), score_sets(trained.model, test))


def test_cache_reuses_teacher(tmp_path: Path, small):
    config = TeacherConfig(**{**FAST, "epochs": 2})
    first = train_or_load_teacher(small, config, tmp_path / "cache")
    model, table = first  # unpacks as (model, table)
    assert not first.cached
    total = sum(s.num_sets for s in small.splits.values())
    assert table.num_sets == total  # train + vali + test
    for sets in small.splits.values():
        table.align(sets)
    files = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}
    assert set(files) == {"teacher.pt", "teacher.json", "scores"}

    second = train_or_load_teacher(load_dataset(SMALL), config, tmp_path / "cache")
    assert second.cached and second.path == first.path
    assert second.table.equals(table)
    assert {p.name: p.stat().st_mtime_ns for p in second.path.iterdir()} == files
    test = small.splits["test"]
    np.testing.assert_array_equal(score_sets(second.model, test), score_sets(model, test))
    assert ScoreTable.load(second.path / "scores").version == table.version

    # thread count does not change the teacher: same key; the seed does: new key
    assert teacher_cache_key(small.splits, config) == teacher_cache_key(
        small.splits, TeacherConfig(**{**FAST, "epochs": 2, "num_threads": 2})
    )
    other = train_or_load_teacher(
        small, TeacherConfig(**{**FAST, "epochs": 2, "seed": 1}), tmp_path / "cache"
    )
    assert not other.cached and other.path != first.path


def test_cache_key_depends_on_data(small):
    config = TeacherConfig(**FAST)
    changed = dict(small.splits)
    train = changed["train"]
    features = train.features.copy()
    features[0, 0] += 1.0
    changed["train"] = type(train)(features, train.labels, train.offsets, train.set_ids)
    assert teacher_cache_key(changed, config) != teacher_cache_key(small.splits, config)


def test_damaged_cache_is_retrained(tmp_path: Path, small):
    config = TeacherConfig(**{**FAST, "epochs": 1})
    first = train_or_load_teacher(small, config, tmp_path)
    (first.path / "scores" / "scores.npy").write_bytes(b"garbage")
    again = train_or_load_teacher(small, config, tmp_path)
    assert not again.cached
    assert ScoreTable.load(again.path / "scores").equals(again.table)


def test_cli_writes_checkpoint_table_and_metrics(tmp_path: Path, capsys):
    out = tmp_path / "run"
    argv = ["--data", SMALL, "--out", str(out), "--epochs", "2", "--d-model", "16"]
    assert teacher_main([*argv, "--heads", "2", "--no-progress", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "vali  NDCG@1" in printed and "test  NDCG@1" in printed and "float16" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"train", "vali", "test"}
    assert 0 <= metrics["splits"]["test"]["ndcg@10"] <= 1
    table = ScoreTable.load(out / "scores")
    assert table.dtype == np.float32 and metrics["score_table"]["version"] == table.version
    assert metrics["score_table"]["bytes_float16"] < metrics["score_table"]["bytes_float32"]
    model = load_teacher(out)
    sets = load_dataset(SMALL).splits["test"]
    np.testing.assert_array_equal(table.align(sets), score_sets(model, sets))


def test_cli_user_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="'epochs'"):
        teacher_main(["--data", SMALL, "--out", str(tmp_path), "--epochs", "0", "-q"])
    from fedrank.cli import main as fedrank

    code = fedrank(["teacher", "--data", str(tmp_path / "missing"), "--out", str(tmp_path), "-q"])
    assert code == 2


def test_very_short_training_runs(small):
    """Ten optimiser steps or fewer (2 epochs of 5 batches) train without a warm-up phase."""
    train = small.splits["train"].take(np.arange(150))
    config = TeacherConfig(**{**FAST, "epochs": 2, "patience": 2, "batch_size": 32})
    result = train_teacher(train, None, config, False)
    assert len(result.history) == 2 and np.isfinite(result.vali_ndcg10)
    assert result.model.transform is not None  # the teacher takes raw features
