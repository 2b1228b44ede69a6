"""A ClientApp that misbehaves on purpose, for the fault tests.

:func:`faulty_client_app` wraps the project's real ClientApp with a mod that, for the
``(partition-id, server-round)`` pairs in ``faults``, makes the client

- ``crash``: raise in the middle of training;
- ``sleep``: answer only after ``sleep-seconds`` (longer than the round's timeout);
- ``nan``: reply with NaN in its weights;
- ``shape``: reply with a weight of the wrong shape;
- ``missing``: reply without one of the weights.

Only ``train`` messages are touched; every other message reaches the real ClientApp as is.

:func:`chaos_client_app` wraps it with a plan of hostile and broken nodes for a whole run
(:data:`CHAOS`): crashing, slow, NaN, lying, poisoning, misconfigured and stale nodes, each
by partition id, each fault at the node's n-th training message. It misbehaves only when the
server's messages say ``score-mode = targeted``, so one start of the simulation runtime can
run a chaotic federation and a clean one (``broadcast``: the same training, the whole score
table to every node) on the same nodes.

The module lives in ``tests/`` so the simulation's workers import it by name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod.utils import make_ffn
from flwr.clientapp import ClientApp

from fedrank.client.client_app import STATE_META, STATE_SCORES
from fedrank.client.client_app import app as real_app
from fedrank.common.reply_schema import PROTOCOL
from fedrank.simulations.attacks import poisoned_reply


def _round(msg: Message) -> int:
    config = msg.content.config_records.get("config")
    return int(config.get("server-round", 0)) if config is not None else 0


def _corrupt(reply: Message, kind: str, original: Message) -> Message:
    content = reply.content
    arrays = content.array_records["arrays"]
    keys = list(arrays.keys())
    floats = [k for k in keys if arrays[k].numpy().dtype.kind == "f"]
    new = ArrayRecord({k: Array(np.array(arrays[k].numpy())) for k in keys})
    if kind == "nan":
        value = np.array(new[floats[0]].numpy())
        value.flat[0] = np.nan
        new[floats[0]] = Array(value)
    elif kind == "shape":
        value = new[floats[0]].numpy()
        new[floats[0]] = Array(np.zeros((value.shape[0] + 1, *value.shape[1:]), value.dtype))
    elif kind == "missing":
        del new[floats[-1]]
    else:
        raise ValueError(kind)
    records = {"arrays": new, **{k: v for k, v in content.metric_records.items()}}
    return Message(RecordDict(records), reply_to=original)


def make_fault_mod(
    faults: Mapping[tuple[int, int], str], sleep_seconds: float = 0.0
) -> Callable[[Message, Context, Callable[[Message, Context], Message]], Message]:
    def mod(msg: Message, context: Context, call_next: Callable) -> Message:
        if msg.metadata.message_type != "train":
            return call_next(msg, context)
        key = (int(context.node_config.get("partition-id", -1)), _round(msg))
        kind = faults.get(key)
        if kind == "crash":
            raise RuntimeError(f"injected crash of partition {key[0]} in round {key[1]}")
        if kind == "sleep":
            time.sleep(sleep_seconds)
            return call_next(msg, context)
        reply = call_next(msg, context)
        if kind in ("nan", "shape", "missing") and not reply.has_error():
            return _corrupt(reply, kind, msg)
        return reply

    return mod


def faulty_client_app(
    faults: Mapping[tuple[int, int], str], sleep_seconds: float = 0.0
) -> ClientApp:
    """The project's ClientApp with :func:`make_fault_mod` around every message."""
    app = ClientApp()
    app._call = make_ffn(real_app.__call__, [make_fault_mod(dict(faults), sleep_seconds)])
    return app


# partition id -> (what the node does, at which of its own training messages in the run: the
# node's 1st, 2nd, ... train message; empty: every one). Counting the node's own messages,
# not rounds, makes every fault happen whichever rounds the seeded sampling picks the node for.
CHAOS: dict[int, tuple[str, frozenset[int]]] = {
    1: ("nan-metric", frozenset({1})),  # a NaN loss metric: undefined, not an error
    2: ("crash", frozenset()),  # the ClientApp raises whenever it trains
    3: ("sleep", frozenset({1})),  # answers after the round's timeout
    4: ("nan", frozenset({1})),  # NaN in its weights
    5: ("lie", frozenset()),  # claims 1e12 examples (and crashes evaluating in round 2)
    6: ("poison", frozenset()),  # a sign-flipped update, ten times as long
    7: ("misconfigured", frozenset()),  # a typo in its node_config: 'max-step'
    8: ("stale", frozenset({1})),  # loses the teacher scores it was just sent (a restart)
    9: ("old-protocol", frozenset()),  # answers hello with an older reply protocol
}
STATE_TRAINS = "chaos-trains"  # ConfigRecord in context.state: train messages seen (chaos run)
POISON_SCALE = 10.0


def _config(msg: Message) -> ConfigRecord | None:
    return msg.content.config_records.get("config") if msg.has_content() else None


def _with_metrics(reply: Message, msg: Message, **changes: float) -> Message:
    metrics = MetricRecord({**dict(reply.content["metrics"]), **changes})
    content = RecordDict({"arrays": reply.content["arrays"], "metrics": metrics})
    return Message(content, reply_to=msg)


def chaos_mod(sleep_seconds: float) -> Callable:
    """The mod of :data:`CHAOS` (see the module docstring)."""

    def mod(msg: Message, context: Context, call_next: Callable) -> Message:
        config = _config(msg)
        pid = int(context.node_config.get("partition-id", -1))
        if config is None or str(config.get("score-mode")) != "targeted" or pid not in CHAOS:
            return call_next(msg, context)
        kind, nth = CHAOS[pid]
        rnd = int(config.get("server-round", 0))
        mtype = msg.metadata.message_type
        if kind == "misconfigured":  # a copy: the node's own node_config stays as it is
            typo = Context(
                run_id=context.run_id,
                node_id=context.node_id,
                node_config={**context.node_config, "max-step": 3},
                state=context.state,
                run_config=context.run_config,
            )
            return call_next(msg, typo)
        if kind == "old-protocol" and mtype == "query.hello":
            reply = call_next(msg, context)
            if reply.has_content():
                status = ConfigRecord({**dict(reply.content["status"]), "protocol": PROTOCOL - 1})
                return Message(RecordDict({"status": status}), reply_to=msg)
            return reply
        if kind == "lie" and mtype == "evaluate" and rnd == 2:
            raise RuntimeError(f"injected evaluation crash of partition {pid}")
        if mtype != "train":
            return call_next(msg, context)
        seen = context.state.config_records.get(STATE_TRAINS)
        count = (int(seen["count"]) if seen is not None else 0) + 1
        context.state[STATE_TRAINS] = ConfigRecord({"count": count})
        if nth and count not in nth:
            return call_next(msg, context)
        if kind == "crash":
            raise RuntimeError(f"injected crash of partition {pid} in round {rnd}")
        if kind == "sleep":
            time.sleep(sleep_seconds)
        if kind == "stale":
            for name in (STATE_SCORES, STATE_META):
                if name in context.state:
                    del context.state[name]
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        if kind == "nan":
            return _corrupt(reply, "nan", msg)
        if kind == "nan-metric":
            return _with_metrics(reply, msg, **{"loss_total": float("nan")})
        if kind == "lie":
            return _with_metrics(reply, msg, **{"num_examples": 10**12})
        if kind == "poison":  # flipped and scaled, with its honest example count
            return poisoned_reply(
                reply, msg, POISON_SCALE, int(reply.content["metrics"]["num_examples"])
            )
        return reply

    return mod


def chaos_client_app(sleep_seconds: float) -> ClientApp:
    """The project's ClientApp with :func:`chaos_mod` around every message."""
    app = ClientApp()
    app._call = make_ffn(real_app.__call__, [chaos_mod(sleep_seconds)])
    return app
