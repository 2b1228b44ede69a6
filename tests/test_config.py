"""Configuration: one source of truth for keys and defaults, validated before any round."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedrank.common.config import CLIENT_KEYS, FedrankConfig
from fedrank.common.errors import CheckpointError, ConfigError
from fedrank.server.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from fedrank.simulations.simulate import run_federation

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package (a dependency of flwr)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_app_config_matches_the_defaults() -> None:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        project = tomllib.load(fh)
    app_config = project["tool"]["flwr"]["app"]["config"]
    assert app_config == FedrankConfig.defaults()
    assert project["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedrank.server.server_app:app",
        "clientapp": "fedrank.client.client_app:app",
    }
    # connections live in $FLWR_HOME/config.toml; a legacy section would be rewritten by flwr
    assert "federations" not in project["tool"]["flwr"]


def test_every_key_is_documented() -> None:
    text = (ROOT / "docs" / "federation.md").read_text(encoding="utf-8")
    missing = [k for k in FedrankConfig.defaults() if f"`{k}`" not in text]
    assert not missing


def test_round_trip_and_hyphen_or_underscore_keys() -> None:
    cfg = FedrankConfig.from_run_config({"num-server-rounds": 7, "local_epochs": 3})
    assert cfg.num_server_rounds == 7 and cfg.local_epochs == 3
    assert FedrankConfig.from_run_config(cfg.to_dict()) == cfg
    assert set(cfg.client_dict()) == set(CLIENT_KEYS)
    assert cfg.replace(**{"score-mode": "broadcast"}).score_mode == "broadcast"


def test_weights_take_numbers_and_schedules() -> None:
    cfg = FedrankConfig.from_run_config({"rank-weight": "linear:0:2:100", "label-weight": 1})
    weights = cfg.composite_loss().weights(step=50)
    assert weights["rank"] == pytest.approx(1.0) and weights["label"] == 1.0
    assert not FedrankConfig.from_run_config({"rank-weight": 0}).uses_teacher
    assert FedrankConfig.from_run_config({}).uses_teacher


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"num-rounds": 3}, "num-rounds"),  # unknown key
        ({"rank-loss": "rank_magic"}, "rank-loss"),  # unknown loss
        ({"label-loss": "rank_l2"}, "label-loss"),  # loss of another family
        ({"rank-weight": -0.5}, "rank-weight"),  # negative weight
        ({"label-weight": "linear:1:-1:10"}, "label-weight"),  # negative in a schedule
        ({"data-path": ""}, "data-path"),  # missing data
        ({"data-path": "  "}, "data-path"),
        ({"num-server-rounds": 0}, "num-server-rounds"),
        ({"num-server-rounds": "3"}, "num-server-rounds"),  # wrong type
        ({"fraction-train": 0.0}, "fraction-train"),
        ({"score-mode": "multicast"}, "score-mode"),
        ({"strategy": "fedsgd"}, "strategy"),
        ({"learning-rate": -1.0}, "learning-rate"),
        ({"student-hidden": "16,x"}, "student-hidden"),
        ({"resume": "yes"}, "resume"),
        ({"client-policy-options": "{not json"}, "client-policy-options"),
        ({"client-policy-options": "[1, 2]"}, "client-policy-options"),  # not an object
        ({"partition-attribute": "height"}, "partition-attribute"),
        ({"partition-power": -1.0}, "partition-power"),
        ({"device-features": "abc"}, "device-features"),
        ({"device-features": "0"}, "device-features"),
        ({"device-features": "1.5"}, "device-features"),
        ({"device-features": "1,-2"}, "device-features"),
        ({"device-features": "3", "student-features": "all"}, "device-features"),
        ({"pair-weight": "quadratic"}, "pair-weight"),
        ({"weight-ranks": "oracle"}, "weight-ranks"),
        # the default rank-loss (rank_softmax_ce) and rank-label-loss take no pair weights
        ({"pair-weight": "rank_gap"}, "pair-weight"),
    ],
)
def test_bad_values_name_the_key(values: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        FedrankConfig.from_run_config(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"seed": 2**70}, r"'seed' must be <= 4294967295"),
        ({"seed": 2**32}, r"'seed' must be <= 4294967295"),
        ({"local-steps": 2**64}, r"'local-steps' must fit in 64 bits"),
        ({"student-hidden": "100000000"}, r"'student-hidden' allows at most 8 layers of at most"),
        ({"student-hidden": ",".join(["8"] * 9)}, r"'student-hidden' allows at most 8 layers"),
        ({"teacher-d-model": 2**40, "teacher-heads": 1}, r"'teacher-d-model' must be <= 4096"),
        ({"teacher-layers": 1000}, r"'teacher-layers' must be <= 48"),
        ({"batch-size": 10**7}, r"'batch-size' must be <= 65536"),
        (
            {"min-replies": 3, "min-available-nodes": 2},
            r"'min-replies' \(3\) must be <= 'min-available-nodes' \(2\)",
        ),
    ],
)
def test_upper_bounds_and_contradicting_keys(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FedrankConfig.from_run_config(values)


def test_values_at_the_bounds_are_accepted() -> None:
    cfg = FedrankConfig.from_run_config(
        {
            "seed": 2**32 - 1,
            "student-hidden": ",".join(["4096"] * 8),
            "teacher-d-model": 4096,
            "min-replies": 2,
            "min-available-nodes": 2,
        }
    )
    assert cfg.seed == 2**32 - 1 and len(cfg.hidden_sizes()) == 8


def test_huge_sizes_fail_in_the_cli_in_one_line(capsys) -> None:
    from fedrank.cli import main as fedrank

    rc = fedrank(
        ["simulate", "--clients", "2", "--rounds", "1", "--set", "seed=1180591620717411303424"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "'seed' must be <= 4294967295" in err


def test_all_weights_zero_is_an_error() -> None:
    zero = {"label-weight": 0, "rank-label-weight": 0, "rank-weight": 0, "score-weight": 0}
    with pytest.raises(ConfigError, match="weight"):
        FedrankConfig.from_run_config(zero)


def test_missing_data_path_on_disk_names_the_key(tmp_path: Path) -> None:
    cfg = FedrankConfig.from_run_config({"data-path": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="data-path"):
        cfg.check_data_path()


def test_bad_config_fails_in_the_server_app_before_any_round(tmp_path: Path) -> None:
    """The real ServerApp validates its run config first: it never touches the grid."""
    from fedrank.server.server_app import app

    for values, key in [
        ({"no-such-key": 1}, "no-such-key"),
        ({"rank-loss": "nope"}, "rank-loss"),
        ({"rank-weight": -1.0}, "rank-weight"),
        ({"data-path": ""}, "data-path"),
        ({"data-path": str(tmp_path / "missing-fold")}, "data-path"),
    ]:
        run_config = {**FedrankConfig.defaults(), "out-dir": str(tmp_path / "out"), **values}
        context = Context(
            run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
        )
        with pytest.raises(ConfigError, match=key):
            app(grid=None, context=context)  # type: ignore[arg-type]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_bad_config_fails_before_the_simulation_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="score-weight"):
        run_federation({"score-weight": -2}, tmp_path, num_clients=2)
    with pytest.raises(ConfigError, match="min-available-nodes"):
        run_federation({"min-available-nodes": 5}, tmp_path, num_clients=2)
    assert not any(tmp_path.iterdir())


def test_checkpoint_round_trip_and_corruption(tmp_path: Path) -> None:
    weights = {"net.0.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "idx": np.arange(3)}
    state = {"m_t/net.0.weight": np.ones((2, 3))}
    config = FedrankConfig.from_run_config({}).to_dict()
    path = save_checkpoint(
        tmp_path, server_round=3, weights=weights, strategy=state, meta={"config": config}
    )
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.round == 3
    assert set(ckpt.weights) == set(weights)
    np.testing.assert_array_equal(ckpt.weights["net.0.weight"], weights["net.0.weight"])
    assert ckpt.weights["idx"].dtype == np.int64
    np.testing.assert_array_equal(ckpt.strategy["m_t/net.0.weight"], state["m_t/net.0.weight"])
    # rounds and out-dir may change on resume; the loss may not
    check_compatible(ckpt, {**config, "num-server-rounds": 9, "resume": True}, path)
    with pytest.raises(CheckpointError, match="rank-weight"):
        check_compatible(ckpt, {**config, "rank-weight": 0.5}, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / "none") is None


def test_pair_weights_reach_the_pairwise_losses() -> None:
    import torch

    cfg = FedrankConfig.from_run_config(
        {
            "rank-loss": "rank_pairwise_ce",
            "rank-label-loss": "label_pairwise_logistic",
            "pair-weight": "log_discount",
            "weight-ranks": "student",
        }
    )
    assert {"pair-weight": "log_discount", "weight-ranks": "student"}.items() <= (
        cfg.client_dict().items()  # they travel to the clients
    )
    options = {t.family: t.options for t in cfg.loss_terms()}
    want = {"pair_weight": "log_discount", "weight_ranks": "student"}
    assert want.items() <= options["rank"].items()
    assert want.items() <= options["rank_label"].items()
    assert "pair_weight" not in options["label"]  # label_sigmoid_ce takes no pair weights
    # the weights change the loss the client trains with
    g = torch.Generator().manual_seed(0)
    scores, teacher = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    labels, mask = (torch.rand(4, 6, generator=g) > 0.5).float(), torch.ones(4, 6, dtype=bool)
    plain = cfg.replace(**{"pair-weight": "none"}).composite_loss()
    _, weighted = cfg.composite_loss()(scores, labels, teacher, mask)
    _, unweighted = plain(scores, labels, teacher, mask)
    assert weighted["rank"] != pytest.approx(unweighted["rank"])
    assert weighted["label"] == pytest.approx(unweighted["label"])
    # one pairwise loss is enough; teacher ranks on a label loss need the teacher's scores
    only_label = FedrankConfig.from_run_config(
        {"rank-label-loss": "label_pairwise_logistic", "pair-weight": "rank_gap", "rank-weight": 0}
    )
    assert only_label.uses_teacher


def test_device_features_pick_the_students_columns() -> None:
    from fedrank.common.features import restrict_features

    default = [0, 2, 4]
    cfg = FedrankConfig.from_run_config({})
    assert cfg.device_columns(10, default=default) == default  # "": the data's default
    assert cfg.replace(**{"student-features": "all"}).device_columns(10, default) is None
    for text, keep in (("4", 4), ("0.5", 0.5), ("1, 3,7", [1, 3, 7])):
        cols = cfg.replace(**{"device-features": text, "seed": 3}).device_columns(10, default)
        assert cols == restrict_features(10, keep, seed=3).tolist()
    assert len(cfg.replace(**{"device-features": "0.5"}).device_columns(10, default)) == 5
    for text in ("11", "1,10"):  # more columns than the data has, a column outside it
        with pytest.raises(ConfigError, match="device-features"):
            cfg.replace(**{"device-features": text}).device_columns(10, default)


def test_client_policy_options_are_a_json_object() -> None:
    assert FedrankConfig.from_run_config({}).policy_options() == {}
    text = '{"candidates": [{"rank-weight": 0.5}, {"rank-weight": 2.0}], "scale": 0.1}'
    cfg = FedrankConfig.from_run_config({"client-policy-options": text})
    assert cfg.policy_options()["scale"] == 0.1
