"""A ClientApp that misbehaves on purpose, for the fault tests.

:func:`faulty_client_app` wraps the project's real ClientApp with a mod that, for the
``(partition-id, server-round)`` pairs in ``faults``, makes the client

- ``crash``: raise in the middle of training;
- ``sleep``: answer only after ``sleep-seconds`` (longer than the round's timeout);
- ``nan``: reply with NaN in its weights;
- ``shape``: reply with a weight of the wrong shape;
- ``missing``: reply without one of the weights.

Only ``train`` messages are touched; every other message reaches the real ClientApp as is.
The module lives in ``tests/`` so the simulation's workers import it by name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp


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
    from flwr.client.mod.utils import make_ffn

    from client.client_app import app as real

    app = ClientApp()
    app._call = make_ffn(real.__call__, [make_fault_mod(dict(faults), sleep_seconds)])
    return app
