"""The feature transform: fitting (heavy tails, constant columns), non-finite inputs, its place
inside the student and the teacher (spec, strict state dicts, exports), the server's restore,
and raw-like data (the synthetic knob, rescaled MQ2008) that needs it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from support import MQ2008_FOLD1

from fedrank.client.export import export_student
from fedrank.client.student_files import load_exported
from fedrank.client.trainer import TrainSettings, train_student
from fedrank.common.config import FedrankConfig
from fedrank.common.datasets import load_dataset
from fedrank.common.errors import ConfigError, DataFormatError
from fedrank.common.evaluation import evaluate_model
from fedrank.common.feature_transform import FeatureTransform, fit_transform, heavy_tail_z
from fedrank.common.letor import read_letor, read_letor_folder, write_letor
from fedrank.common.models import (
    StudentModel,
    TeacherModel,
    build_model,
    count_parameters,
    score_sets,
)
from fedrank.common.records import load_arrays, model_to_arrays, restore_transform
from fedrank.common.synthetic import (
    RawScaling,
    SyntheticConfig,
    generate_synthetic,
    raw_like_splits,
)
from fedrank.server.student_setup import build_student
from fedrank.simulations.derived_data import write_derived_fold

REPO = Path(__file__).resolve().parents[1]


def _columns(n: int = 20_000, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    counts = rng.pareto(1.5, n) * 10  # power-law counts
    sparse = np.where(rng.random(n) < 0.8, 0.0, rng.lognormal(3.0, 2.0, n))  # zero-inflated
    columns = {
        "gaussian": rng.normal(5.0, 2.0, n),
        "uniform": rng.uniform(0.0, 1e5, n),
        "exponential": rng.exponential(1.0, n),
        "lognormal": rng.lognormal(0.0, 2.0, n) * 1e3,
        "counts": counts,
        "sparse": sparse,
        "signed heavy": rng.standard_t(1.5, n) * 1e4,
        "constant": np.full(n, 7.5),
        "zeros": np.zeros(n),
        "unit interval": rng.beta(0.5, 3.0, n),  # MQ2008-like 0..1 feature
    }
    return np.stack(list(columns.values()), axis=1), list(columns)


def test_heavy_tailed_columns_are_logged_and_others_not() -> None:
    x, names = _columns()
    transform = FeatureTransform.fit(x)
    logged = {n for n, flag in zip(names, transform.log_columns.tolist(), strict=True) if flag}
    assert logged == {"lognormal", "counts", "sparse", "signed heavy"}
    # the criterion is scale-free: a unit-variance gaussian sits far below the threshold
    assert heavy_tail_z(np.random.default_rng(1).normal(size=100_000)) < 6


def test_fitted_output_is_standardised_and_constant_columns_are_zero() -> None:
    x, names = _columns()
    transform = FeatureTransform.fit(x)
    z = transform(torch.from_numpy(x)).numpy()
    assert np.all(np.isfinite(z)) and np.abs(z).max() <= transform.clip
    for j, name in enumerate(names):
        if name in ("constant", "zeros"):
            assert np.all(z[:, j] == 0.0), name
        elif name != "signed heavy":  # its clipped tails move the moments a little
            assert abs(z[:, j].mean()) < 0.05 and abs(z[:, j].std() - 1) < 0.05, name


def test_non_finite_inputs_never_reach_the_model_as_nan() -> None:
    x, _ = _columns(2_000)
    x[::7, 0] = np.nan  # non-finite values in the data are ignored when fitting
    transform = FeatureTransform.fit(x)
    assert torch.isfinite(transform.shift).all() and torch.isfinite(transform.scale).all()
    probe = torch.tensor([[np.nan, np.inf, -np.inf, 1e38, -1e38, 0, 0, 0, 0, 0]])
    z = transform(probe)[0]
    assert torch.isfinite(z).all()
    assert z[0] == 0.0  # NaN -> the column mean
    assert z[1] == transform.clip and z[2] == -transform.clip
    assert z[3] == transform.clip and z[4] == -transform.clip
    # a column with no finite value at all
    empty = FeatureTransform.fit(np.full((5, 1), np.nan))
    assert empty(torch.tensor([[3.0]])).item() == 3.0


def test_bad_fit_input_and_specs_are_clear_errors() -> None:
    with pytest.raises(DataFormatError, match="features"):
        FeatureTransform.fit(np.zeros(5))
    with pytest.raises(ConfigError, match="clip"):
        FeatureTransform(3, clip=0.0)
    with pytest.raises(ConfigError, match="unknown keys"):
        FeatureTransform.from_spec({"num_features": 3, "mean": 1})
    with pytest.raises(DataFormatError, match="fitted on 3 columns"):
        FeatureTransform(3)(torch.zeros(1, 4))


def test_subset_is_the_same_transform_on_those_columns() -> None:
    x, _ = _columns(3_000)
    transform = FeatureTransform.fit(x)
    cols = [1, 4, 8]
    sub = transform.subset(cols)
    full = transform(torch.from_numpy(x))[:, cols]
    torch.testing.assert_close(sub(torch.from_numpy(x[:, cols])), full)


@pytest.mark.parametrize("kind", ["student", "teacher"])
def test_models_rebuild_from_spec_with_strict_state_dicts(kind: str) -> None:
    x, _ = _columns(500)
    transform = FeatureTransform.fit(x)
    torch.manual_seed(0)
    if kind == "student":
        cols = [0, 3, 4, 9]
        model = StudentModel(
            10, hidden=(8,), feature_indices=cols, transform=transform.subset(cols)
        )
        plain = StudentModel(10, hidden=(8,), feature_indices=cols)
    else:
        model = TeacherModel(10, d_model=8, num_heads=2, num_layers=1, transform=transform)
        plain = TeacherModel(10, d_model=8, num_heads=2, num_layers=1)
    model.eval()
    spec = json.loads(json.dumps(model.spec))  # JSON-able, as exports and checkpoints keep it
    assert spec["transform"]["num_features"] == (4 if kind == "student" else 10)
    rebuilt = build_model(spec).eval()
    state = model.state_dict()
    assert {k for k in state if k.startswith("transform.")} == {
        "transform.log_columns",
        "transform.shift",
        "transform.scale",
    }
    rebuilt.load_state_dict(state, strict=True)
    features = torch.from_numpy(x[:24].reshape(2, 12, 10).astype(np.float32))
    torch.testing.assert_close(rebuilt(features), model(features))
    # buffers, not parameters: the transform adds nothing to train
    assert count_parameters(model) == count_parameters(plain)
    # a spec from before the transform existed still builds (no transform)
    old = {k: v for k, v in spec.items() if k != "transform"}
    assert build_model(old).transform is None
    with pytest.raises(RuntimeError, match="transform"):
        build_model(old).load_state_dict(state, strict=True)


def test_transform_width_must_match_the_columns_read() -> None:
    with pytest.raises(ConfigError, match="fitted on 5"):
        StudentModel(10, feature_indices=[1, 2], transform=FeatureTransform(5))


def test_restore_transform_puts_the_servers_values_back() -> None:
    transform = FeatureTransform.fit(_columns(500)[0])
    student = StudentModel(10, hidden=(4,), transform=transform)
    server = model_to_arrays(student)
    # what a hostile client or the averaging of noisy updates may return
    returned = ArrayRecord({k: Array(v.numpy() * 0 + 3) for k, v in server.items()})
    restored = restore_transform(returned, server)
    assert list(restored) == list(server)
    for key in server:
        expected = server[key] if key.startswith("transform.") else returned[key]
        np.testing.assert_array_equal(restored[key].numpy(), expected.numpy())
    # an older checkpoint without the transform keys gets them
    legacy = ArrayRecord({k: v for k, v in server.items() if not k.startswith("transform.")})
    load_arrays(student, restore_transform(legacy, server))


def test_export_carries_the_transform(tmp_path: Path) -> None:
    splits = raw_like_splits(read_letor_folder(MQ2008_FOLD1), seed=0)
    transform = fit_transform(splits["train"], splits["vali"])
    torch.manual_seed(0)
    student = StudentModel(46, hidden=(8,), transform=transform).eval()
    test = splits["test"]
    expected = score_sets(student, test)
    for fmt in ("safetensors", "onnx"):
        path = tmp_path / f"s.{fmt}"
        export_student(student, path, fmt, source={"round": 1})
        exported = load_exported(path)
        np.testing.assert_allclose(exported.score_sets(test), expected, rtol=1e-4, atol=1e-4)


# ---- raw-like data -----------------------------------------------------------------------------
def test_raw_scale_knob_keeps_labels_and_ranking_information() -> None:
    plain = generate_synthetic(SyntheticConfig(num_sets=200), seed=3).sets
    raw = generate_synthetic(SyntheticConfig(num_sets=200, raw_scale=1e5), seed=3).sets
    np.testing.assert_array_equal(raw.labels, plain.labels)
    np.testing.assert_array_equal(raw.relevance, plain.relevance)
    assert np.abs(raw.features).max() > 1e4 > np.abs(plain.features).max()
    for j in range(plain.num_features):  # every column mapped monotonically
        order = np.argsort(plain.features[:, j], kind="stable")
        assert np.all(np.diff(raw.features[order, j]) >= 0), j
    assert FeatureTransform.fit(raw.features).log_columns.sum() >= 3
    with pytest.raises(ConfigError, match="raw_scale"):
        SyntheticConfig(raw_scale=0.5)
    spec = load_dataset("synthetic:num_sets=100,raw_scale=1000")
    assert np.abs(spec.train.features).max() > 100


def test_raw_scaling_is_seeded_and_shared_by_splits() -> None:
    x = np.random.default_rng(0).uniform(0, 1, (300, 6))
    a, b = RawScaling.draw(x, seed=4), RawScaling.draw(x, seed=4)
    np.testing.assert_array_equal(a.apply(x), b.apply(x))
    assert not np.array_equal(a.apply(x), RawScaling.draw(x, seed=5).apply(x))
    assert a.exp_columns.any() and (~a.exp_columns).any()
    assert np.all((a.factors >= 1) & (a.factors <= 1e5))


def test_letor_writer_round_trips(tmp_path: Path) -> None:
    sets = raw_like_splits({"train": read_letor(MQ2008_FOLD1 / "vali.txt.gz")}, seed=1)["train"]
    for name in ("vali.txt", "vali.txt.gz"):
        back = read_letor(write_letor(sets, tmp_path / name), cache=False)
        np.testing.assert_array_equal(back.features, sets.features)
        np.testing.assert_array_equal(back.labels, sets.labels)
        np.testing.assert_array_equal(back.offsets, sets.offsets)
        assert back.set_ids.tolist() == sets.set_ids.tolist()
        assert back.item_ids.tolist() == sets.item_ids.tolist()


def test_derived_fold_keeps_a_subset_and_rescales(tmp_path: Path) -> None:
    folder = write_derived_fold(MQ2008_FOLD1, tmp_path / "fold", train_sets=60, raw=True, seed=2)
    derived = read_letor_folder(folder, cache=False)
    original = read_letor_folder(MQ2008_FOLD1)
    assert derived["train"].num_sets == 60
    assert set(derived["train"].set_ids) <= set(original["train"].set_ids)
    assert derived["test"].num_sets == original["test"].num_sets
    assert np.abs(derived["train"].features).max() > 1e3


def test_student_on_raw_features_needs_the_transform(one_torch_thread) -> None:
    """Centrally, on raw-like synthetic data: the fitted transform gives the student the
    ranking and calibration it has on the normalised data; without it, it falls apart."""
    results = {}
    for name, data in (
        ("plain", "synthetic:num_sets=400"),
        ("raw", "synthetic:num_sets=400,raw_scale=1e5"),
    ):
        dataset = load_dataset(data)
        for use in (True, False):
            cfg = FedrankConfig.from_run_config({"data-path": data, "feature-transform": use})
            model = build_student(cfg, dataset)
            loss = FedrankConfig.from_run_config(
                {"score-weight": 0, "rank-weight": 0}
            ).composite_loss()
            train_student(model, dataset.train, loss, TrainSettings(steps=150, batch_size=16))
            results[name, use] = evaluate_model(model, dataset.test)
    plain, raw, raw_off = results["plain", True], results["raw", True], results["raw", False]
    assert raw["ndcg@10"] > plain["ndcg@10"] - 0.05
    assert raw["log_loss"] < plain["log_loss"] * 1.1
    assert raw_off["log_loss"] > 2 * raw["log_loss"]
    # already-normalised data: the transform does not make the student worse
    assert plain["ndcg@10"] >= results["plain", False]["ndcg@10"] - 0.03
