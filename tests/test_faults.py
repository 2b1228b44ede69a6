"""Faults and bad input: crashed, slow and malicious clients, a killed server, broken files.

- reply screening (:mod:`fedrank.server.update_validation`) on real Flower messages;
- the real strategy with bad replies: they are rejected and the global model is what the good
  replies make it;
- Flower's simulation runtime with clients that crash, time out or send NaN / wrong shapes /
  missing keys: the run completes with the others, each failure logged with its node;
- the server process killed between rounds (SIGKILL) and started again with ``resume=true``;
- bad input on a device or in a configuration: clear errors naming the file, key or set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from support import TINY_TEACHER, instruction_metadata, reply_metadata, write_letor

from fedrank.common.errors import CheckpointError, ConfigError, DataFormatError, ScoreTableError
from fedrank.common.reply_schema import TRAIN_METRICS
from fedrank.server.update_validation import NotEnoughReplies, screen_replies

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# ---- messages ----------------------------------------------------------------------------------
GLOBAL = {
    "net.0.weight": np.zeros((4, 3), np.float32),
    "net.0.bias": np.zeros(4, np.float32),
    "feature_indices": np.arange(3, dtype=np.int64),
}


def _arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()})


def _reply(node: int, weights: dict[str, np.ndarray] | None = None, examples=10, **kw) -> Message:
    weights = {k: np.array(v) for k, v in (weights or GLOBAL).items()}
    metrics = MetricRecord({**dict.fromkeys(TRAIN_METRICS.required, 0), "num_examples": examples})
    content = RecordDict({"arrays": _arrays(weights), "metrics": metrics})
    return Message(content, metadata=reply_metadata(node, **kw))


def _error(node: int, reason: str, code: int = 2, **kw) -> Message:
    return Message(Error(code=code, reason=reason), metadata=reply_metadata(node, **kw))


def _sent(node: int) -> Message:
    """An instruction message as the grid leaves it after sending (message id set)."""
    return Message(RecordDict({"arrays": _arrays(GLOBAL)}), metadata=instruction_metadata(node))


def _changed(**changes: np.ndarray) -> dict[str, np.ndarray]:
    return {**GLOBAL, **changes}


BAD_REPLIES = {
    "nan": (_changed(**{"net.0.bias": np.array([0, np.nan, 0, 0], np.float32)}), "non-finite"),
    "inf": (_changed(**{"net.0.weight": np.full((4, 3), np.inf, np.float32)}), "non-finite"),
    "shape": (_changed(**{"net.0.weight": np.zeros((5, 3), np.float32)}), "has shape (5, 3)"),
    "missing": ({k: v for k, v in GLOBAL.items() if k != "net.0.bias"}, "miss key 'net.0.bias'"),
    "extra": (_changed(extra=np.zeros(2, np.float32)), "unexpected key 'extra'"),
    "columns": (_changed(feature_indices=np.array([0, 1, 7])), "integer buffer 'feature_indices'"),
    "dtype": (_changed(**{"net.0.bias": np.array(["a"] * 4)}), "unsupported dtype"),
}


@pytest.mark.parametrize("name", sorted(BAD_REPLIES))
def test_bad_update_is_rejected_with_reason(name, caplog):
    weights, reason = BAD_REPLIES[name]
    good = _reply(11, _changed(**{"net.0.bias": np.ones(4, np.float32)}))
    bad = _reply(22, weights)
    with caplog.at_level(logging.WARNING, logger="fedrank"):
        result = screen_replies(3, [good, bad], global_arrays=_arrays(GLOBAL))
    assert [m.metadata.src_node_id for m in result.valid] == [11]
    (rejection,) = result.rejected
    assert rejection.node_id == 22 and rejection.kind == "invalid"
    assert reason in rejection.reason
    assert "round 3" in caplog.text and "node 22" in caplog.text and reason in caplog.text


def test_pickled_array_on_the_wire_is_never_unpickled(capsys):
    """A reply whose array bytes are a pickled object array: rejected, nothing executed."""
    import io

    class Evil:
        def __reduce__(self):
            return (print, ("PWNED",))

    buf = io.BytesIO()
    np.save(buf, np.array([Evil()], dtype=object), allow_pickle=True)
    weights = _arrays(GLOBAL)
    weights["net.0.bias"] = Array(
        dtype="object", shape=(1,), stype="numpy.ndarray", data=buf.getvalue()
    )
    metrics = MetricRecord({**dict.fromkeys(TRAIN_METRICS.required, 0), "num_examples": 3})
    content = RecordDict({"arrays": weights, "metrics": metrics})
    evil = Message(content, metadata=reply_metadata(66))
    result = screen_replies(1, [_reply(1), evil], global_arrays=_arrays(GLOBAL))
    assert result.failed_nodes == [66]
    assert "cannot be decoded" in result.rejected[0].reason
    assert "PWNED" not in capsys.readouterr().out


@pytest.mark.parametrize("examples", [0, -3, float("nan"), float("inf")])
def test_bad_example_count_is_rejected(examples):
    result = screen_replies(
        1, [_reply(1), _reply(2, examples=examples)], global_arrays=_arrays(GLOBAL)
    )
    assert result.failed_nodes == [2]
    assert "num_examples" in result.rejected[0].reason


def test_crashed_and_silent_nodes_are_named_and_the_round_goes_on(caplog):
    sent = [_sent(n) for n in (1, 2, 3, 4)]
    # node 2's ClientApp raised; node 3 went offline and the SuperLink answered for it (such
    # replies come from the SuperLink's own node id, 1); node 4 never answered
    replies = [
        _reply(1),
        _error(2, "ValueError: injected"),
        _error(1, "Node Unavailable", code=5, reply_to="ins-3"),
    ]
    with caplog.at_level(logging.WARNING, logger="fedrank"):
        result = screen_replies(5, replies, global_arrays=_arrays(GLOBAL), sent=sent, min_replies=1)
    assert [m.metadata.src_node_id for m in result.valid] == [1]
    kinds = {r.node_id: r.kind for r in result.rejected}
    assert kinds == {2: "crash", 3: "unavailable", 4: "missing"}
    for node in (2, 3, 4):
        assert f"node {node}" in caplog.text
    # fewer usable replies than the configured minimum: a clear error naming every failure
    with pytest.raises(NotEnoughReplies, match=r"only 1 usable train replies, 'min-replies' is 2"):
        screen_replies(5, replies, global_arrays=_arrays(GLOBAL), sent=sent, min_replies=2)


def test_update_norm_is_bounded_and_example_weight_capped():
    """The defences: an update longer than max-update-norm is scaled down to it (direction
    kept); a claimed example count is capped by the node's hello and the per-run maximum."""
    from fedrank.server.defences import Defences, prepare_updates, update_norm

    far = _reply(9, _changed(**{"net.0.weight": np.full((4, 3), 10.0, np.float32)}), 1e12)
    near = _reply(1, _changed(**{"net.0.bias": np.full(4, 0.5, np.float32)}), 7)
    caps = {9: 40, 1: 100}
    prepared, refused = prepare_updates(
        [(9, far), (1, near)], _arrays(GLOBAL), Defences(5.0, 50), caps.get
    )
    assert not refused
    far_p, near_p = prepared
    assert far_p.norm == pytest.approx(np.sqrt(12) * 10.0) and far_p.clipped
    assert update_norm(far_p.message.content["arrays"], _arrays(GLOBAL)) == pytest.approx(5.0)
    np.testing.assert_allclose(  # same direction, shorter
        far_p.message.content["arrays"]["net.0.weight"].numpy(), np.full((4, 3), 5 / np.sqrt(12))
    )
    assert far_p.weight == 40 and far_p.claimed == 1e12  # capped by its hello
    assert near_p.weight == 7 and not near_p.clipped and near_p.norm == pytest.approx(1.0)
    assert far_p.message.content["arrays"]["net.0.weight"].numpy().dtype == np.float64
    np.testing.assert_array_equal(  # integer buffers pass untouched
        far_p.message.content["arrays"]["feature_indices"].numpy(), GLOBAL["feature_indices"]
    )
    (capped,), _ = prepare_updates([(9, far)], _arrays(GLOBAL), Defences(0.0, 30), lambda n: None)
    assert capped.weight == 30 and not capped.clipped  # the per-run maximum; 0: no norm bound
    _, (refused,) = prepare_updates([(9, far)], _arrays(GLOBAL), Defences(), lambda n: 0)
    assert "no training sets" in refused.reason


def test_evaluate_replies_are_screened_too():
    from fedrank.common.reply_schema import EVALUATE_METRICS

    def reply(node: int, **values: float) -> Message:
        metrics = {**dict.fromkeys(EVALUATE_METRICS.required, 0.5), "num_examples": 4}
        metrics["on_train_sets"] = 0
        content = RecordDict({"metrics": MetricRecord({**metrics, **values})})
        return Message(content, metadata=reply_metadata(node))

    ok = reply(1)
    undefined = reply(2, auc=float("nan"))  # no pair of differing labels on that node
    inf = reply(3, **{"ndcg@10": float("inf")})
    extra = reply(4, **{"device_memory_mb": 64.0})
    result = screen_replies(1, [ok, undefined, inf, extra], stage="evaluate")
    assert result.failed_nodes == [3, 4]
    assert "'ndcg@10' is infinite" in result.rejected[0].reason
    assert "unexpected key 'device_memory_mb'" in result.rejected[1].reason


def test_strategy_rejects_bad_updates_and_keeps_the_global_model():
    """The real strategy: bad replies never move the global model; the good ones average."""
    import torch
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedrank.common.config import FedrankConfig
    from fedrank.common.models import StudentModel
    from fedrank.common.records import model_to_arrays
    from fedrank.server.client_weights import make_policy
    from fedrank.server.strategy import TrainPlan, build_strategy

    torch.manual_seed(0)
    student = StudentModel(6, hidden=(4,), feature_indices=[0, 2, 4])
    global_arrays = model_to_arrays(student)
    base = {k: v.numpy() for k, v in global_arrays.items()}
    rng = np.random.default_rng(0)

    def moved() -> dict[str, np.ndarray]:
        return {
            k: (v + rng.normal(size=v.shape).astype(v.dtype)) if v.dtype.kind == "f" else v
            for k, v in base.items()
        }

    good = [_reply(1, moved(), examples=10), _reply(2, moved(), examples=30)]
    float_key = next(k for k, v in base.items() if v.dtype.kind == "f")
    nan = moved()
    nan[float_key] = np.full_like(nan[float_key], np.nan)
    wrong = moved()
    wrong[float_key] = np.zeros((1, *wrong[float_key].shape), np.float32)
    missing = {k: v for k, v in moved().items() if k != float_key}
    bad = [_reply(3, nan), _reply(4, wrong), _reply(5, missing), _error(6, "injected crash")]

    cfg = FedrankConfig.from_run_config({"min-available-nodes": 1})
    strategy = build_strategy(cfg, make_policy(cfg))
    arrays = strategy.aggregate_round(TrainPlan(2, global_arrays, [], [], {}), good + bad).arrays
    expected = aggregate_arrayrecords([m.content for m in good], "num_examples")
    for key in base:
        np.testing.assert_allclose(arrays[key].numpy(), expected[key].numpy(), rtol=1e-6)
        assert np.all(np.isfinite(arrays[key].numpy()))


# ---- Flower's simulation runtime with faulty clients -------------------------------------------
SIM_CONFIG = {
    "num-server-rounds": 3,
    **TINY_TEACHER,
    "local-epochs": 1,
    "fraction-evaluate": 0.0,
    # generous: the first contact of 4 simulated nodes on a busy 2-core machine can take > 20 s
    "round-timeout": 60.0,
    "min-replies": 1,
}
# the slow client answers this long after the round's timeout
SLOW_MARGIN = 30.0


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_simulation_survives_crashed_slow_and_malicious_clients(tmp_path):
    """Round 2: partition 1 crashes, 2 sends NaN, 3 a wrong shape; round 3: partition 1 drops a
    key and partition 2 answers after the round's timeout. Partition 0 is always fine."""
    out = tmp_path / "run"
    faults = {(1, 2): "crash", (2, 2): "nan", (3, 2): "shape", (1, 3): "missing", (2, 3): "sleep"}
    encoded = json.dumps([[list(k), v] for k, v in faults.items()])
    slow = float(SIM_CONFIG["round-timeout"]) + SLOW_MARGIN
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.path[:0] = [{str(REPO)!r}, {str(TESTS)!r}]
        from fault_clients import faulty_client_app
        from fedrank.server.server_app import make_server_app
        from fedrank.simulations.runtime import RayOptions, start_simulation
        config = {{**{SIM_CONFIG!r}, "out-dir": {str(out)!r}, "min-available-nodes": 4}}
        faults = {{tuple(k): v for k, v in json.loads({encoded!r})}}
        start_simulation(
            make_server_app([config]),
            faulty_client_app(faults, sleep_seconds={slow!r}),
            4,
            ray=RayOptions(num_cpus=4),
        )
        """
    )
    proc = _run_python(code, tmp_path, timeout=400)
    assert (out / "summary.json").is_file(), proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert len(rows[1]["clients_train"]) == 4
    for row in rows[1:]:
        assert np.isfinite(row["ndcg@10"])
    round2, round3 = rows[2], rows[3]
    assert [c["client_key"] for c in round2["clients_train"]] == [0]
    reasons2 = " | ".join(r["reason"] for r in round2["rejected"])
    assert len(round2["rejected"]) == 3
    assert "injected crash" in reasons2 and "non-finite" in reasons2 and "has shape" in reasons2
    reasons3 = " | ".join(r["reason"] for r in round3["rejected"])
    assert "miss key" in reasons3 and "no reply" in reasons3
    assert sorted(c["client_key"] for c in round3["clients_train"]) == [0, 3]
    assert all(isinstance(r["node"], int) for r in round2["rejected"] + round3["rejected"])
    log = proc.stdout + proc.stderr
    assert "rejected" in log and "injected crash" in log


def _run_python(code: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (own session); kill its whole tree on timeout."""
    from deploy_helpers import Processes

    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    procs = Processes(cwd, env)
    p = procs.start("python", [sys.executable, "-c", code])
    try:
        p.wait_exit(timeout)
    finally:
        procs.stop_all()
    text = p.log()
    return subprocess.CompletedProcess(p.args, p.popen.returncode, text, "")


@pytest.mark.slow
def test_server_killed_between_rounds_resumes_without_losing_or_repeating_rounds(tmp_path):
    from deploy_helpers import Processes, descendants, wait_until

    from fedrank.server.checkpoint import load_checkpoint

    out = tmp_path / "run"
    rounds = 6

    def script(resume: bool) -> str:
        config = {
            **SIM_CONFIG,
            "num-server-rounds": rounds,
            "out-dir": str(out),
            "teacher-cache-dir": str(tmp_path / "teacher"),
            "resume": resume,
        }
        config.pop("min-replies")
        return textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(REPO)!r})
            from fedrank.simulations.simulate import run_federation
            run_federation({config!r}, {str(out)!r}, num_clients=2)
            """
        )

    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    procs = Processes(tmp_path, env)
    try:
        first = procs.start("first", [sys.executable, "-c", script(False)])
        wait_until(
            lambda: (out / "metrics.jsonl").is_file() and len(_rows(out)) >= 3,
            300,
            interval=0.2,
            what="round 2 of the first run",
        )
        # the server dies abruptly: SIGKILL, no clean-up of its own
        tree = descendants(first.pid)
        os.kill(first.pid, signal.SIGKILL)
        first.wait_exit(30)
        for pid, _ in tree:  # the simulation's workers, which the dead server cannot stop
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    finally:
        procs.stop_all()
    checkpoint = load_checkpoint(out)
    assert checkpoint is not None
    done = checkpoint.round
    assert 1 <= done < rounds, "the first run was not interrupted"
    before = {r["round"]: r for r in _rows(out) if r["round"] <= done}

    proc = _run_python(script(True), tmp_path, timeout=400)
    log = proc.stdout
    assert (out / "summary.json").is_file(), log[-4000:]
    assert f"resuming from {out} after round {done}" in log
    rows = _rows(out)
    assert [r["round"] for r in rows] == list(range(rounds + 1))  # none lost, none repeated
    for r in rows[: done + 1]:
        assert r == before[r["round"]]  # completed rounds are kept as they were
    assert load_checkpoint(out).round == rounds
    summary = json.loads((out / "summary.json").read_text())
    assert summary["student"]["rounds"] == rounds


# ---- bad input ---------------------------------------------------------------------------------
def test_malformed_letor_on_a_device_names_file_and_line(tmp_path):
    from fedrank.client.local_data import load_local_data

    bad = tmp_path / "device.txt"
    bad.write_text("1 qid:1 1:0.5 2:0.1\n0 qid:1 1:oops 2:0.3\n")
    with pytest.raises(DataFormatError) as err:
        load_local_data({"data-path": str(bad)}, {"seed": 0})
    assert str(bad) in str(err.value) and "line 2" in str(err.value)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_missing_device_data_path_names_the_key(tmp_path):
    from fedrank.client.local_data import load_local_data

    with pytest.raises(ConfigError, match="'data-path'.*does not exist"):
        load_local_data({"data-path": str(tmp_path / "nope.txt")}, {"seed": 0})


def test_configuration_typo_names_the_key():
    from fedrank.common.config import FedrankConfig

    with pytest.raises(ConfigError, match="unknown configuration key 'num-server-round'"):
        FedrankConfig.from_run_config({"num-server-round": 3})
    with pytest.raises(ConfigError, match="'score-mode'"):
        FedrankConfig.from_run_config({"score-mode": "everything"})


def test_teacher_scores_for_unknown_sets_name_the_set():
    from fedrank.common.example_sets import ExampleSets
    from fedrank.common.score_table import ScoreTable

    sets = ExampleSets(
        features=np.zeros((3, 2)), labels=np.zeros(3), offsets=[0, 2, 3], set_ids=["a", "b"]
    )
    table = ScoreTable.from_scores(sets.take([0]), np.zeros(2, np.float32))
    with pytest.raises(ScoreTableError, match="'b'"):
        table.align(sets)


def test_corrupt_or_truncated_checkpoint_is_a_clear_error(tmp_path):
    from fedrank.server.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint

    save_checkpoint(
        tmp_path,
        server_round=2,
        weights={"w": np.ones(3, np.float32)},
        strategy={},
        meta={"config": {}},
    )
    path = tmp_path / CHECKPOINT_FILE
    raw = path.read_bytes()
    for data in (raw[: len(raw) // 2], raw[:-7], b"", b"garbage" * 50):
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=str(path)):
            load_checkpoint(tmp_path)
    # a flipped byte: refused, unless it hit bytes nothing reads (e.g. a zip timestamp)
    for pos in np.random.default_rng(1).choice(len(raw), size=25, replace=False):
        flipped = bytearray(raw)
        flipped[int(pos)] ^= 0xFF
        path.write_bytes(bytes(flipped))
        try:
            loaded = load_checkpoint(tmp_path)
        except CheckpointError as err:
            assert str(path) in str(err)
            continue
        assert loaded.round == 2 and loaded.weights["w"].tolist() == [1.0, 1.0, 1.0]


# ---- optional differential privacy -------------------------------------------------------------
def test_privacy_budget_grows_with_rounds_and_shrinks_with_noise():
    from fedrank.server.privacy import epsilon

    assert 4.0 < epsilon(1.0, 1, 1e-5) < 5.0  # one Gaussian release, sigma 1
    assert epsilon(1.0, 10, 1e-5) > epsilon(1.0, 5, 1e-5) > epsilon(1.0, 1, 1e-5)
    assert epsilon(2.0, 10, 1e-5) < epsilon(1.0, 10, 1e-5)
    assert epsilon(0.0, 3, 1e-5) == float("inf") and epsilon(1.0, 0, 1e-5) == 0.0


def test_dp_settings_come_from_the_checked_configuration():
    """The configuration is the one validator: a bad DP key fails there, naming it."""
    from fedrank.common.config import FedrankConfig
    from fedrank.server.privacy import DPSettings

    assert not DPSettings.from_config(FedrankConfig.from_run_config({})).enabled
    s = DPSettings.from_config(
        FedrankConfig.from_run_config({"dp-noise-multiplier": 1.1, "dp-clipping-norm": 0.5})
    )
    assert s.enabled and s.clipping_norm == 0.5 and s.delta == 1e-5
    with pytest.raises(ConfigError, match="'dp-clipping-norm' must be > 0"):
        FedrankConfig.from_run_config({"dp-noise-multiplier": 1.0, "dp-clipping-norm": 0})
    with pytest.raises(ConfigError, match="'dp-delta'"):
        FedrankConfig.from_run_config({"dp-delta": 2.0})


def test_dp_wrapper_clips_adds_noise_keeps_columns_and_reports_budget():
    import torch

    from fedrank.common.config import FedrankConfig
    from fedrank.common.models import StudentModel
    from fedrank.common.records import model_to_arrays
    from fedrank.server.client_weights import make_policy
    from fedrank.server.privacy import DPSettings, epsilon, wrap_strategy
    from fedrank.server.strategy import TrainPlan, build_strategy

    torch.manual_seed(0)
    global_arrays = model_to_arrays(StudentModel(6, hidden=(4,), feature_indices=[0, 2, 4]))
    base = {k: v.numpy() for k, v in global_arrays.items()}
    floats = [k for k, v in base.items() if v.dtype.kind == "f"]

    def far(node: int, examples: int) -> Message:  # an update of norm 100 (before clipping)
        weights = dict(base)
        total = sum(base[k].size for k in floats)
        for k in floats:
            weights[k] = base[k] + np.float32(100.0 / np.sqrt(total))
        return _reply(node, weights, examples=examples)

    cfg = FedrankConfig.from_run_config({"min-available-nodes": 1})
    inner = build_strategy(cfg, make_policy(cfg))
    # almost no noise: the aggregate is the clipped update, whatever the example counts
    dp = wrap_strategy(inner, DPSettings(noise_multiplier=1e-9, clipping_norm=2.0), 2)
    result = dp.aggregate_round(TrainPlan(1, global_arrays, [], [], {}), [far(1, 10), far(2, 1000)])
    arrays = result.arrays
    update = np.sqrt(sum(np.sum((arrays[k].numpy() - base[k]) ** 2) for k in floats))
    assert update == pytest.approx(2.0, rel=1e-4)
    np.testing.assert_array_equal(arrays["feature_indices"].numpy(), base["feature_indices"])
    assert arrays["feature_indices"].numpy().dtype == np.int64
    assert dp.budget["delta"] == 1e-5 and dp.budget["epsilon"] > 1e6  # no real noise
    assert len(result.clients) == 2 and result.budget == dp.budget

    # real noise: std sigma * clip / n on every float weight, budget per round
    dp = wrap_strategy(inner, DPSettings(noise_multiplier=1.0, clipping_norm=2.0), 2)
    same = [_reply(1, base), _reply(2, base)]
    for rnd in (1, 2, 3):
        arrays = dp.aggregate_round(TrainPlan(rnd, global_arrays, [], [], {}), same).arrays
        noise = np.concatenate([(arrays[k].numpy() - base[k]).ravel() for k in floats])
        assert 0.3 < float(np.std(noise)) < 2.0  # expected 1.0 * 2.0 / 2
        assert dp.budget["epsilon"] == pytest.approx(epsilon(1.0, rnd, 1e-5))


def _call_train(node_config: dict, num_features: int = 46, **settings) -> Message:
    """The ClientApp's train handler, called as Flower calls it (label losses only)."""
    from flwr.app import ConfigRecord, Context

    import fedrank.client.client_app as client_app
    from fedrank.client.local_data import clear_cache
    from fedrank.common.config import FedrankConfig
    from fedrank.common.models import StudentModel
    from fedrank.common.records import model_to_arrays

    student = StudentModel(num_features, hidden=(4,))
    cfg = FedrankConfig.from_run_config({"rank-weight": 0, "score-weight": 0, **settings})
    config = ConfigRecord(
        {
            **cfg.client_dict(),
            "model-spec": json.dumps(student.spec),
            "teacher-version": "",
            "server-round": 1,
        }
    )
    msg = Message(
        RecordDict({"arrays": model_to_arrays(student), "config": config}),
        metadata=instruction_metadata(5, message_id="m1"),
    )
    context = Context(
        run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={}
    )
    clear_cache()
    return client_app.train(msg, context)


def test_device_data_with_another_feature_count_names_the_file(tmp_path):
    data = write_letor(tmp_path / "device.txt", features=40)
    reply = _call_train({"data-path": str(data)}, num_features=46)
    assert reply.has_error()
    text = reply.error.reason
    assert text.startswith("data: ") and str(data) in text and "40" in text and "46" in text


def test_client_honours_and_reports_device_settings(tmp_path):
    import torch

    data = write_letor(tmp_path / "device.txt", sets=40)
    threads = torch.get_num_threads()
    try:
        reply = _call_train(
            {"data-path": str(data), "threads": 1, "max-steps": 2, "batch-size": 3},
            **{"local-epochs": 5, "batch-size": 16},
        )
        metrics = reply.content["metrics"]
        assert metrics["steps"] <= 2
        assert metrics["device_threads"] == 1
        assert metrics["device_batch_size"] == 3 and metrics["device_max_steps"] == 2
        typo = _call_train({"data-path": str(data), "max-step": 2})
        assert typo.has_error() and "'max-step'" in typo.error.reason
        assert "did you mean 'max-steps'" in typo.error.reason
    finally:
        torch.set_num_threads(threads)
