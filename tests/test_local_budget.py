"""The local budget: steps per round from a dozen sets to thousands, the floor, the device cap,
and the "too short to move the model" flag (client metrics and server warning)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fedrank.client.device import DeviceSettings
from fedrank.client.trainer import (
    MIN_RELATIVE_UPDATE,
    TrainSettings,
    planned_steps,
    train_student,
)
from fedrank.common.config import FedrankConfig
from fedrank.common.errors import ConfigError
from fedrank.common.models import StudentModel
from fedrank.common.reply_schema import TRAINER_METRICS
from fedrank.common.synthetic import SyntheticConfig, generate_synthetic
from fedrank.server.federation import _warn_short_training


@pytest.mark.parametrize(
    ("num_sets", "settings", "expected"),
    [
        (12, TrainSettings(epochs=2, min_steps=20, batch_size=16), 20),  # the floor
        (10_000, TrainSettings(epochs=2, min_steps=20, batch_size=16), 1250),  # epochs
        (300, TrainSettings(epochs=2, min_steps=20, batch_size=16), 38),
        (12, TrainSettings(epochs=2, min_steps=20, steps=7), 7),  # local-steps: exact
        (12, TrainSettings(epochs=0, min_steps=5), 5),
        (12, TrainSettings(epochs=2, min_steps=20, max_steps=3), 3),  # a device cap
        (0, TrainSettings(min_steps=20), 0),
    ],
)
def test_planned_steps(num_sets: int, settings: TrainSettings, expected: int) -> None:
    assert planned_steps(settings, num_sets) == expected


def test_defaults_give_a_dozen_sets_enough_steps() -> None:
    cfg = FedrankConfig()
    s = TrainSettings(
        epochs=cfg.local_epochs, min_steps=cfg.min_local_steps, batch_size=cfg.batch_size
    )
    assert planned_steps(s, 12) >= 20
    assert planned_steps(s, 10_000) == cfg.local_epochs * 625


@pytest.fixture(scope="module")
def small_client():
    data = generate_synthetic(SyntheticConfig(num_sets=12, min_items=10, max_items=20), seed=1)
    return data.sets, data.student_columns


def _train(sets, columns, settings: TrainSettings) -> dict[str, float]:
    torch.manual_seed(0)
    model = StudentModel(sets.num_features, hidden=(8,), feature_indices=columns)
    loss = FedrankConfig.from_run_config({"score-weight": 0, "rank-weight": 0}).composite_loss()
    return train_student(model, sets, loss, settings)


def test_a_dozen_sets_take_the_floor_and_move_the_model(small_client, one_torch_thread) -> None:
    sets, columns = small_client
    out = _train(sets, columns, TrainSettings(epochs=2, min_steps=20, batch_size=16))
    assert set(TRAINER_METRICS) <= set(out)  # the list a reply schema derives from
    assert out["steps"] == 20 and out["steps_planned"] == 20
    assert out["relative_update"] > MIN_RELATIVE_UPDATE and out["too_short"] == 0


def test_long_sets_train_within_the_same_budget(one_torch_thread) -> None:
    data = generate_synthetic(SyntheticConfig(num_sets=12, min_items=300, max_items=300), seed=2)
    out = _train(data.sets, data.student_columns, TrainSettings(epochs=2, min_steps=20))
    assert out["steps"] == 20 and out["num_items"] == 3600 and out["too_short"] == 0


def test_a_device_cap_below_the_floor_is_flagged(small_client, one_torch_thread) -> None:
    sets, columns = small_client
    capped = DeviceSettings(max_steps=2).train_settings(
        TrainSettings(epochs=2, min_steps=20, batch_size=16), sets
    )
    out = _train(sets, columns, capped)
    assert out["steps"] == 2 and out["steps_planned"] == 20 and out["too_short"] == 1


def test_a_round_that_does_not_move_the_weights_is_flagged(small_client, one_torch_thread) -> None:
    sets, columns = small_client
    out = _train(sets, columns, TrainSettings(min_steps=20, learning_rate=1e-9, optimizer="sgd"))
    assert out["steps"] == 20 and out["relative_update"] < MIN_RELATIVE_UPDATE
    assert out["too_short"] == 1


def test_server_logs_a_warning_for_short_rounds(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("fedrank")
    log.propagate = True  # let caplog see the ServerApp's own handler's records
    try:
        with caplog.at_level(logging.WARNING, logger="fedrank"):
            _warn_short_training(3, [{"too_short": 0, "steps": 20.0}])
            assert not caplog.records
            replies = [
                {"too_short": 1, "steps": 2.0, "relative_update": 0.0},
                {"too_short": 0, "steps": 20.0, "relative_update": 0.2},
            ]
            _warn_short_training(3, replies)
    finally:
        log.propagate = False
    text = caplog.records[-1].getMessage()
    assert "round 3" in text and "1 of 2 clients" in text and "min-local-steps" in text


def test_config_checks_the_budget_keys() -> None:
    assert FedrankConfig.from_run_config({"min-local-steps": 0}).min_local_steps == 0
    with pytest.raises(ConfigError, match="'min-local-steps'"):
        FedrankConfig.from_run_config({"min-local-steps": -1})
    with pytest.raises(ConfigError, match="would not train"):
        FedrankConfig.from_run_config({"local-epochs": 0, "local-steps": 0, "min-local-steps": 0})
    assert "min-local-steps" in FedrankConfig().client_dict()
    np.testing.assert_equal(FedrankConfig().feature_transform, True)
