"""The LightGBM LambdaMART teacher: training with early stopping, text-model files, the cache,
the CLI, the configuration keys and the teacher-kind dispatch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedrank.common.config import FedrankConfig
from fedrank.common.datasets import load_dataset
from fedrank.common.errors import CheckpointError, ConfigError
from fedrank.common.evaluation import evaluate_scores
from fedrank.common.example_sets import ExampleSets
from fedrank.common.score_table import ScoreTable
from fedrank.server.lightgbm_teacher import (
    MODEL_FILE,
    LightGBMConfig,
    lightgbm_cache_key,
    load_lightgbm_teacher,
    train_lightgbm,
    train_or_load_lightgbm,
)
from fedrank.server.teacher import concat_splits
from fedrank.server.teacher_cli import main as teacher_main
from fedrank.server.teachers import run_teacher, teacher_parameters

FAST = LightGBMConfig(trees=60, leaves=15, early_stopping=10, num_threads=1)


@pytest.fixture(scope="module")
def fold1(mq2008_dir: Path):
    return load_dataset(str(mq2008_dir / "Fold1"))


@pytest.fixture(scope="module")
def trained(fold1):
    return train_lightgbm(fold1.train, fold1.vali, FAST)


def test_training_learns_to_rank_and_stops_early(fold1, trained):
    test = fold1.test
    scores = trained.score(test)
    assert scores.dtype == np.float32 and scores.shape == (test.num_items,)
    assert evaluate_scores(test, scores)["ndcg@10"] > 0.42  # unranked order: about 0.36
    info = trained.info
    assert 1 <= info["best_iteration"] <= info["trees_trained"] <= FAST.trees
    assert trained.num_trees == info["best_iteration"]  # only the best trees are kept
    assert trained.parameters > trained.num_trees
    # with early stopping off every tree is kept
    full = train_lightgbm(fold1.train, fold1.vali, LightGBMConfig(trees=7, early_stopping=0))
    assert full.num_trees == 7 and full.info["stopped"] == "trees"


def test_training_is_deterministic_whatever_the_thread_count(fold1, trained):
    again = train_lightgbm(
        fold1.train, fold1.vali, LightGBMConfig(**{**FAST.to_dict(), "num_threads": 2})
    )
    np.testing.assert_array_equal(again.score(fold1.test), trained.score(fold1.test))


def test_non_integer_labels_are_refused():
    sets = ExampleSets(np.zeros((4, 2)), [0.0, 0.5, 1.0, 0.0], [0, 2, 4], ["a", "b"])
    with pytest.raises(ConfigError, match="needs integer labels 0..30"):
        train_lightgbm(sets, None, FAST)


def test_cache_reuses_and_versions_the_teacher(tmp_path: Path, fold1, mq2008_dir: Path):
    first = train_or_load_lightgbm(fold1, FAST, tmp_path)
    assert not first.cached and first.path.name.startswith("lightgbm-")
    files = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}
    assert set(files) == {MODEL_FILE, "teacher.json", "scores"}
    assert first.table.num_sets == sum(s.num_sets for s in fold1.splits.values())
    all_sets = concat_splits(fold1.splits)
    np.testing.assert_array_equal(first.table.align(all_sets), first.model.score(all_sets))
    info = json.loads((first.path / "teacher.json").read_text())
    assert info["score_table_version"] == first.table.version and info["kind"] == "lightgbm"
    assert set(info["split_metrics"]) == {"train", "vali", "test"}
    assert MODEL_FILE in info["model_file"] and "tree" in (first.path / MODEL_FILE).read_text()

    second = train_or_load_lightgbm(load_dataset(str(mq2008_dir / "Fold1")), FAST, tmp_path)
    assert second.cached and second.path == first.path
    assert second.table.equals(first.table)
    assert {p.name: p.stat().st_mtime_ns for p in second.path.iterdir()} == files
    np.testing.assert_array_equal(second.model.score(fold1.test), first.model.score(fold1.test))

    threads = LightGBMConfig(**{**FAST.to_dict(), "num_threads": 2})
    assert lightgbm_cache_key(fold1.splits, threads) == lightgbm_cache_key(fold1.splits, FAST)
    leaves = LightGBMConfig(**{**FAST.to_dict(), "leaves": 7})
    assert lightgbm_cache_key(fold1.splits, leaves) != lightgbm_cache_key(fold1.splits, FAST)


def test_damaged_cache_is_retrained_and_a_modified_model_refused(tmp_path: Path, fold1):
    first = train_or_load_lightgbm(fold1, FAST, tmp_path)
    model = first.path / MODEL_FILE
    model.write_text(model.read_text().replace("leaf_value=", "leaf_value=1", 1))
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_lightgbm_teacher(first.path)
    again = train_or_load_lightgbm(fold1, FAST, tmp_path)
    assert not again.cached and again.table.equals(first.table)
    load_lightgbm_teacher(first.path)  # repaired


def test_cli_trains_lightgbm(tmp_path: Path, mq2008_dir: Path, capsys):
    out = tmp_path / "lgb"
    argv = ["--kind", "lightgbm", "--data", str(mq2008_dir / "Fold1"), "--out", str(out)]
    assert teacher_main([*argv, "--trees", "30", "--leaves", "15", "-q", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "lightgbm teacher:" in printed and "test  NDCG@1" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "lightgbm" and metrics["config"]["trees"] == 30
    table = ScoreTable.load(out / "scores")
    assert metrics["score_table"]["version"] == table.version
    test = load_dataset(str(mq2008_dir / "Fold1")).test
    np.testing.assert_array_equal(table.align(test), load_lightgbm_teacher(out).score(test))
    with pytest.raises(ConfigError, match="'lightgbm-leaves' must be an integer >= 2"):
        teacher_main([*argv, "--leaves", "1", "-q"])


def test_teacher_kind_dispatch(tmp_path: Path, fold1, mq2008_dir: Path):
    cfg = FedrankConfig.from_run_config(
        {
            "data-path": str(mq2008_dir / "Fold1"),
            "teacher-kind": "lightgbm",
            "lightgbm-trees": 20,
            "lightgbm-leaves": 7,
        }
    )
    bundle = run_teacher(cfg, fold1, tmp_path)
    assert bundle.model.num_trees <= 20 and bundle.info["config"]["leaves"] == 7
    assert teacher_parameters(bundle) == bundle.model.parameters > 0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"teacher-kind": "xgboost"}, "'teacher-kind' must be one of set-transformer, lightgbm"),
        ({"teacher-kind": "imported"}, "'teacher-kind' = imported needs 'teacher-scores'"),
        ({"teacher-scores": "run.txt"}, "set 'teacher-kind' = imported"),
        ({"lightgbm-trees": 0}, "'lightgbm-trees' must be >= 1"),
        ({"lightgbm-leaves": 1}, "'lightgbm-leaves' must be >= 2"),
        ({"lightgbm-early-stopping": -1}, "'lightgbm-early-stopping' must be >= 0"),
        ({"lightgbm-learning-rate": 0.0}, "'lightgbm-learning-rate' must be > 0"),
        ({"lightgbm-min-data-in-leaf": 0}, "'lightgbm-min-data-in-leaf' must be >= 1"),
    ],
)
def test_teacher_kind_keys_are_checked(values: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        FedrankConfig.from_run_config(values)
