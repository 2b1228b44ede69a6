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
``data-path`` (a LETOR file or folder) on a device (see :mod:`fedrank.client.local_data`). A
device's ``node_config`` may also cap threads, steps, epochs, seconds, batch size, memory and the
student's size (:mod:`fedrank.client.device`); training reports what it used (``device-*`` metrics).

Every reply has the fixed shape of :mod:`fedrank.common.reply_schema`. A fedrank error on the node
(its ``node_config``, its data, the teacher scores, the settings it was sent) is answered as
Flower's ``Message.error`` with the code of its kind (``NODE_ERROR_CODES``) and a one-line
message; the server decides by the code what that costs the node. Anything else the handler
raises reaches the server as Flower's own error (a crash).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from fedrank.client.device import DeviceSettings
from fedrank.client.local_data import LocalData, clear_cache, load_local_data
from fedrank.client.trainer import TrainSettings, planned_steps, train_student
from fedrank.common.config import CLIENT_KEYS, FedrankConfig
from fedrank.common.errors import ConfigError, FedrankError, ScoreTableError
from fedrank.common.evaluation import evaluate_model, mean_ndcg
from fedrank.common.models import build_model, count_parameters, score_sets
from fedrank.common.records import load_arrays, model_to_arrays, score_table_from_record
from fedrank.common.reply_schema import (
    EVALUATE_METRICS,
    NODE_ERROR_CODES,
    TRAIN_METRICS,
    HelloStatus,
    ScoresAck,
)

app = ClientApp()
log = logging.getLogger("fedrank.client")

STATE_SCORES = "teacher-scores"  # ArrayRecord in context.state
STATE_META = "teacher-meta"  # ConfigRecord in context.state: version, received count

_TABLES: dict[tuple[int, str], Any] = {}  # (node id, version) -> ScoreTable, per process
_TABLES_LOCK = threading.Lock()


def clear_process_caches() -> None:
    """Forget what this process cached: loaded data, teacher score tables, parsed settings
    and built students (tests; a new ClientApp process starts with all empty)."""
    clear_cache()
    with _TABLES_LOCK:
        _TABLES.clear()
    for cached in (_settings_of, _spec_size):
        cached.cache_clear()
    _STUDENTS.by_spec = {}


# ---- errors the server reads by kind ---------------------------------------------------------
class NodeFailure(FedrankError):
    """A fedrank error on this node, with the kind the server acts on (``NODE_ERROR_CODES``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _kind_of(err: FedrankError) -> str:
    return err.kind if isinstance(err, NodeFailure) else "error"


def _structured_errors(
    handler: Callable[[Message, Context], Message],
) -> Callable[[Message, Context], Message]:
    """Answer a fedrank error as ``Message.error`` with its kind's code and a one-line reason."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except FedrankError as err:
            kind = _kind_of(err)
            reason = f"{kind}: node {context.node_id}: {err}"
            log.error("%s failed: %s", msg.metadata.message_type, reason)  # the device's log
            return Message(Error(code=NODE_ERROR_CODES[kind], reason=reason), reply_to=msg)

    return wrapped


# ---- helpers ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _settings_of(text: str) -> FedrankConfig:
    """The client settings of a JSON text; parsed once per process and text (the settings
    repeat across a round's messages, and a parse costs about as much as a small step)."""
    return FedrankConfig.from_run_config(json.loads(text))


def _settings(config: ConfigRecord) -> FedrankConfig:
    values = {k: v for k, v in config.items() if k in CLIENT_KEYS}
    try:
        text = json.dumps(values, sort_keys=True)
    except TypeError:  # a value JSON cannot hold (bytes): parsed directly, not cached
        text = None
    try:
        return FedrankConfig.from_run_config(values) if text is None else _settings_of(text)
    except ConfigError as err:
        raise NodeFailure("settings", f"the server's settings are invalid: {err}") from None


def _device(context: Context) -> DeviceSettings:
    """The device's own limits from its ``node_config``, with its thread count applied;
    a bad ``node_config`` (an unknown key, a bad value) is a ``node-config`` failure."""
    try:
        device = DeviceSettings.from_node_config(context.node_config)
    except ConfigError as err:
        raise NodeFailure("node-config", str(err)) from None
    device.apply()
    return device


def _local(context: Context, config: ConfigRecord) -> LocalData:
    if "partition-id" in context.node_config:
        torch.set_num_threads(1)  # simulated clients share the machine's cores
    settings = {k: v for k, v in config.items() if k in CLIENT_KEYS}
    try:
        return load_local_data(context.node_config, settings)
    except FedrankError as err:
        raise NodeFailure("data", str(err)) from None


def _held_version(context: Context) -> str:
    meta = context.state.config_records.get(STATE_META)
    return str(meta["version"]) if meta is not None and "version" in meta else ""


def _table(context: Context, version: str) -> Any:
    """The cached teacher table of ``version``; a ``stale-scores`` failure if the node lacks
    it (e.g. a restarted SuperNode)."""
    held = _held_version(context)
    if held != version:
        raise NodeFailure(
            "stale-scores",
            f"node {context.node_id} holds teacher scores version {held or '(none)'!r}, the "
            f"server trains with version {version!r}: the scores were not delivered",
        )
    key = (context.node_id, version)
    with _TABLES_LOCK:
        table = _TABLES.get(key)
    if table is None:
        table = score_table_from_record(context.state.array_records[STATE_SCORES])
        with _TABLES_LOCK:
            _TABLES[key] = table
    return table


def _aligned(context: Context, version: str, sets: Any) -> np.ndarray:
    """The cached teacher scores of ``version`` for ``sets``; a ``scores`` failure naming the
    set when they do not match."""
    table = _table(context, version)
    try:
        return table.align(sets)
    except ScoreTableError as err:
        raise NodeFailure("scores", str(err)) from None


def _numbers(values: dict[str, Any]) -> dict[str, int | float]:
    """Plain Python numbers (numpy scalars and bools converted) of the numeric ``values``."""
    out: dict[str, int | float] = {}
    for k, v in values.items():
        if isinstance(v, (bool, np.bool_, int, np.integer)):
            out[k] = int(v)
        elif isinstance(v, (float, np.floating)):
            out[k] = float(v)
    return out


@functools.lru_cache(maxsize=8)
def _spec_size(spec_text: str) -> int:
    """Parameters of the student ``spec_text`` describes, counted on the meta device (nothing
    allocated: a device checks its cap before it builds anything)."""
    with torch.device("meta"):
        return count_parameters(build_model(json.loads(spec_text)))


_STUDENTS = threading.local()  # per thread: model spec text -> the student built for it


def _reused_student(spec_text: str) -> torch.nn.Module:
    """The student of ``spec_text``, built once per thread and process and overwritten by each
    message's weights (every parameter and buffer is in its state dict, and :func:`load_arrays`
    requires all of them): building and initialising it per message cost about as much as a
    small training step. Per thread, so two handlers never share one."""
    built = getattr(_STUDENTS, "by_spec", None)
    if built is None:
        built = _STUDENTS.by_spec = {}
    model = built.get(spec_text)
    if model is None:
        built.clear()  # one federation's student at a time
        model = built[spec_text] = build_model(json.loads(spec_text))
    return model


def _student(
    config: ConfigRecord,
    arrays: ArrayRecord,
    context: Context,
    local: LocalData,
    device: DeviceSettings,
) -> torch.nn.Module:
    """The global student, within the device's size cap (``device-cap`` failure otherwise);
    a ``data`` failure naming the node's data when its sets have another number of features
    than the federation's student expects."""
    try:
        spec_text = str(config["model-spec"])
        spec = json.loads(spec_text)
        size = _spec_size(spec_text)
    except (ValueError, TypeError, ConfigError, AttributeError) as err:
        raise NodeFailure("settings", f"the server's model spec is invalid: {err}") from None
    refused = device.check_model(size)
    if refused:
        raise NodeFailure("device-cap", refused)
    expected = int(spec.get("num_features", local.train.num_features))
    if local.train.num_features != expected:
        path = context.node_config.get("data-path", config.get("data-path", ""))
        raise NodeFailure(
            "data",
            f"'data-path' {str(path)!r} ({local.source}) has {local.train.num_features} "
            f"features per item, the federation's student expects {expected}: give data with "
            "the features the federation was set up with",
        )
    model = _reused_student(spec_text)
    load_arrays(model, arrays)
    return model


def _validation_ndcg(model: torch.nn.Module, sets: Any) -> float:
    """Mean NDCG@10 of ``model`` on ``sets`` by their labels (what a client can measure)."""
    return mean_ndcg(sets, score_sets(model, sets))["ndcg@10"]


def _seed(config: ConfigRecord, local: LocalData) -> int:
    base = int(config.get("seed", 0))
    rnd = int(config.get("server-round", 0))
    return (base * 1_000_003 + rnd * 10_007 + local.client_key) % (2**31 - 1)


# ---- message handlers -------------------------------------------------------------------------
@app.query("hello")
@_structured_errors
def hello(msg: Message, context: Context) -> Message:
    """Report the sets this node holds, the teacher-score version it has cached and its size
    cap; a bad ``node_config`` or unreadable data is reported here, on the first message."""
    config = msg.content["config"]
    device = _device(context)
    local = _local(context, config)
    targeted = str(config.get("score-mode", "targeted")) == "targeted"
    status = HelloStatus(
        held_version=_held_version(context) or "none",
        num_sets=int(local.set_ids.size),
        num_train_sets=int(local.train.num_sets),
        client_key=int(local.client_key),
        source=local.source,
        max_parameters=int(device.max_parameters),
        set_ids=tuple(str(s) for s in local.set_ids.tolist()) if targeted else None,
    )
    return Message(RecordDict({"status": status.record()}), reply_to=msg)


@app.query("scores")
@_structured_errors
def receive_scores(msg: Message, context: Context) -> Message:
    """Cache the teacher scores in ``context.state``; in ``targeted`` mode check that they are
    exactly this node's sets."""
    config = msg.content["config"]
    record = msg.content["scores"]
    local = _local(context, config)
    try:
        return _cache_scores(msg, context, config, record, local)
    except ScoreTableError as err:
        raise NodeFailure("scores", str(err)) from None


def _cache_scores(
    msg: Message, context: Context, config: ConfigRecord, record: ArrayRecord, local: LocalData
) -> Message:
    table = score_table_from_record(record)
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
    ack = ScoresAck(
        version=table.version,
        num_sets=int(table.num_sets),
        local_sets=len(held),
        exact_match=bool(exact),
        received_count=received,
    )
    return Message(RecordDict({"ack": ack.record()}), reply_to=msg)


def _round_inputs(
    msg: Message, context: Context
) -> tuple[FedrankConfig, DeviceSettings, LocalData, torch.nn.Module]:
    """What a train or evaluate message needs: the run's client settings, the device's
    limits, the node's data and the global student loaded from the message."""
    config = msg.content["config"]
    settings = _settings(config)
    device = _device(context)
    local = _local(context, config)
    return settings, device, local, _student(config, msg.content["arrays"], context, local, device)


@app.train()
@_structured_errors
def train(msg: Message, context: Context) -> Message:
    """Train the global student on the local sets; reply with the new weights and metrics."""
    config = msg.content["config"]
    settings, device, local, model = _round_inputs(msg, context)
    loss = settings.composite_loss()
    teacher = None
    version = str(config.get("teacher-version", "none"))
    if loss.needs_teacher:
        teacher = _aligned(context, version, local.train)
    rnd = int(config.get("server-round", 1))
    run = TrainSettings.from_config(
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
        values["val_ndcg@10_start"] = start
        values["val_ndcg@10"] = _validation_ndcg(model, local.holdout)
    values.update(device.report(run))
    meta = context.state.config_records.get(STATE_META)
    values["scores_received"] = int(meta["received"]) if meta is not None else 0
    values["client_key"] = int(local.client_key)
    metrics = TRAIN_METRICS.record(_numbers(values))
    content = RecordDict({"arrays": model_to_arrays(model), "metrics": metrics})
    return Message(content, reply_to=msg)


@app.evaluate()
@_structured_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Metrics of the global student on the local held-out sets (training sets if none)."""
    config = msg.content["config"]
    settings, device, local, model = _round_inputs(msg, context)
    sets = local.holdout if local.holdout is not None else local.train
    teacher = None
    version = str(config.get("teacher-version", "none"))
    if version != "none" and _held_version(context) == version:
        teacher = _aligned(context, version, sets)
    values = evaluate_model(model, sets, teacher=teacher, loss=settings.composite_loss())
    values["on_train_sets"] = int(local.holdout is None)
    return Message(RecordDict({"metrics": EVALUATE_METRICS.record(_numbers(values))}), reply_to=msg)
