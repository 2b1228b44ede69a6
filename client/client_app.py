"""fedrank ClientApp: trains the small student on the sets this node holds.

Messages it handles (Flower Message API):

- ``query.hello``: reports what the node holds (its set ids in ``targeted`` mode) and which
  teacher-score version it has cached;
- ``query.scores``: teacher scores for the node's sets; cached in ``context.state`` so the
  server sends them once per node and teacher version;
- ``train``: one ``ArrayRecord`` (the global student) + one ``ConfigRecord`` (settings, loss
  weights, round) -> local training with the composite loss -> the new weights and metrics;
- ``evaluate``: the global student on the node's held-out sets.

Its data comes from ``node_config``: ``partition-id``/``num-partitions`` in a simulation, or
``data-path`` (a LETOR file or folder) on a device (see :mod:`client.local_data`). A device's
``node_config`` may also cap threads, steps, seconds, batch size and memory per round
(:mod:`client.device`); training reports what it used (``device-*`` metrics).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.device import DeviceSettings
from client.local_data import LocalData, load_local_data
from client.trainer import evaluate_student, planned_steps, settings_from_config, train_student
from common.config import CLIENT_KEYS, FedrankConfig
from common.errors import DataFormatError, ScoreTableError
from common.models import build_model
from common.records import load_arrays, model_to_arrays, score_table_from_record

app = ClientApp()

STATE_SCORES = "teacher-scores"  # ArrayRecord in context.state
STATE_META = "teacher-meta"  # ConfigRecord in context.state: version, received count

_TABLES: dict[tuple[int, str], Any] = {}  # (node id, version) -> ScoreTable, per process
_TABLES_LOCK = threading.Lock()


# ---- helpers ---------------------------------------------------------------------------------
def _settings(config: ConfigRecord) -> FedrankConfig:
    return FedrankConfig.from_run_config({k: v for k, v in config.items() if k in CLIENT_KEYS})


def _device(context: Context) -> DeviceSettings:
    """The device's own limits from its ``node_config`` (ConfigError on an unknown key), with
    its thread count applied."""
    device = DeviceSettings.from_node_config(context.node_config)
    device.apply()
    return device


def _local(context: Context, config: ConfigRecord) -> LocalData:
    if "partition-id" in context.node_config:
        torch.set_num_threads(1)  # simulated clients share the machine's cores
    settings = {k: v for k, v in config.items() if k in CLIENT_KEYS}
    return load_local_data(context.node_config, settings)


def _held_version(context: Context) -> str:
    meta = context.state.config_records.get(STATE_META)
    return str(meta["version"]) if meta is not None and "version" in meta else ""


def _table(context: Context, version: str) -> Any:
    """The cached teacher table of ``version``; ScoreTableError if the node lacks it."""
    held = _held_version(context)
    if held != version:
        raise ScoreTableError(
            f"node {context.node_id} holds teacher scores version {held or '(none)'!r}, the "
            f"server trains with version {version!r}: the scores were not delivered"
        )
    key = (context.node_id, version)
    with _TABLES_LOCK:
        table = _TABLES.get(key)
    if table is None:
        table = score_table_from_record(context.state.array_records[STATE_SCORES])
        with _TABLES_LOCK:
            _TABLES[key] = table
    return table


def _metrics(values: dict[str, Any]) -> MetricRecord:
    out: dict[str, int | float] = {}
    for k, v in values.items():
        if isinstance(v, (bool, np.bool_, int, np.integer)):
            out[k] = int(v)
        elif isinstance(v, (float, np.floating)) and np.isfinite(v):
            out[k] = float(v)
    return MetricRecord(out)


def _student(
    config: ConfigRecord, arrays: ArrayRecord, context: Context, local: LocalData
) -> torch.nn.Module:
    """The global student; DataFormatError naming the node's data when its sets have another
    number of features than the federation's student expects."""
    spec = json.loads(str(config["model-spec"]))
    expected = int(spec.get("num_features", local.train.num_features))
    if local.train.num_features != expected:
        path = context.node_config.get("data-path", config.get("data-path", ""))
        raise DataFormatError(
            f"'data-path' {str(path)!r} ({local.source}) has {local.train.num_features} "
            f"features per item, the federation's student expects {expected}: give data with "
            "the features the federation was set up with"
        )
    model = build_model(spec)
    load_arrays(model, arrays)
    return model


def _validation_ndcg(model: torch.nn.Module, sets: Any) -> float:
    """Mean NDCG@10 of ``model`` on ``sets`` by their labels (what a client can measure)."""
    from common.metrics import ndcg
    from common.models import score_sets

    scores = score_sets(model, sets)
    batch = sets.pad(extra={"s": scores})
    return float(torch.nanmean(ndcg(batch.extra["s"], batch.labels, batch.mask, k=10)))


def _seed(config: ConfigRecord, local: LocalData) -> int:
    base = int(config.get("seed", 0))
    rnd = int(config.get("server-round", 0))
    return (base * 1_000_003 + rnd * 10_007 + local.client_key) % (2**31 - 1)


# ---- message handlers -------------------------------------------------------------------------
@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Report the sets this node holds and the teacher-score version it has cached."""
    config = msg.content["config"]
    local = _local(context, config)
    _device(context)  # a misconfigured device fails on its first message
    status: dict[str, Any] = {
        "held-version": _held_version(context) or "none",
        "num-sets": int(local.set_ids.size),
        "num-train-sets": int(local.train.num_sets),
        "client-key": int(local.client_key),
        "source": local.source,
    }
    if str(config.get("score-mode", "targeted")) == "targeted":
        status["set-ids"] = [str(s) for s in local.set_ids.tolist()]
    return Message(RecordDict({"status": ConfigRecord(status)}), reply_to=msg)


@app.query("scores")
def receive_scores(msg: Message, context: Context) -> Message:
    """Cache the teacher scores in ``context.state``; in ``targeted`` mode check that they are
    exactly this node's sets."""
    config = msg.content["config"]
    record = msg.content["scores"]
    table = score_table_from_record(record)
    local = _local(context, config)
    mode = str(config.get("score-mode", "targeted"))
    held = set(local.set_ids.tolist())
    got = set(table.set_ids.tolist())
    missing = sorted(held - got)
    if missing:
        raise ScoreTableError(
            f"teacher scores for set {missing[0]!r} are missing ({len(missing)} of {len(held)} "
            f"local sets lack scores, version {table.version})"
        )
    exact = got == held
    if mode == "targeted" and not exact:
        extra = sorted(got - held)
        raise ScoreTableError(
            f"targeted teacher scores hold {len(extra)} set(s) this node does not hold, e.g. "
            f"{extra[0]!r}"
        )
    # lengths must match too: align raises naming the first set whose length differs
    table.align(local.train)
    if local.holdout is not None:
        table.align(local.holdout)
    meta = context.state.config_records.get(STATE_META)
    received = int(meta["received"]) + 1 if meta is not None else 1
    context.state[STATE_SCORES] = record
    context.state[STATE_META] = ConfigRecord({"version": table.version, "received": received})
    with _TABLES_LOCK:
        _TABLES[(context.node_id, table.version)] = table
    ack = {
        "version": table.version,
        "num-sets": int(table.num_sets),
        "local-sets": len(held),
        "exact-match": bool(exact),
        "received-count": received,
    }
    return Message(RecordDict({"ack": ConfigRecord(ack)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global student on the local sets; reply with the new weights and metrics."""
    config = msg.content["config"]
    settings = _settings(config)
    local = _local(context, config)
    device = _device(context)
    model = _student(config, msg.content["arrays"], context, local)
    loss = settings.composite_loss()
    teacher = None
    version = str(config.get("teacher-version", "none"))
    if loss.needs_teacher:
        teacher = _table(context, version).align(local.train)
    rnd = int(config.get("server-round", 1))
    run = settings_from_config(
        settings, proximal_mu=float(config.get("proximal-mu", 0.0)), seed=_seed(config, local)
    )
    # global step of this round's first step (loss-weight schedules), before device caps
    per_round = planned_steps(run, local.train.num_sets)
    run = dataclasses.replace(run, step_offset=(rnd - 1) * per_round)
    run = device.train_settings(run, local.train)  # device caps only lower the server's
    validate = bool(config.get("report-validation", False)) and local.holdout is not None
    start = _validation_ndcg(model, local.holdout) if validate else None
    values = train_student(
        model, local.train, loss, run, teacher=teacher, label_mask=local.label_mask
    )
    if validate:  # the reward of adaptive client policies: local validation gain
        values["val-ndcg@10-start"] = start
        values["val-ndcg@10"] = _validation_ndcg(model, local.holdout)
    values.update(device.report(run))
    meta = context.state.config_records.get(STATE_META)
    values["scores-received"] = int(meta["received"]) if meta is not None else 0
    values["client-key"] = int(local.client_key)
    content = RecordDict({"arrays": model_to_arrays(model), "metrics": _metrics(values)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Metrics of the global student on the local held-out sets (training sets if none)."""
    config = msg.content["config"]
    settings = _settings(config)
    local = _local(context, config)
    _device(context)
    model = _student(config, msg.content["arrays"], context, local)
    sets = local.holdout if local.holdout is not None else local.train
    teacher = None
    version = str(config.get("teacher-version", "none"))
    if version != "none" and _held_version(context) == version:
        teacher = _table(context, version).align(sets)
    values = evaluate_student(model, sets, teacher=teacher, loss=settings.composite_loss())
    values["on-train-sets"] = int(local.holdout is None)
    return Message(RecordDict({"metrics": _metrics(values)}), reply_to=msg)
