"""Poisoning clients for robustness benchmarks and tests: the project's real ClientApp with a
mod that turns chosen simulated partitions hostile.

A poisoner trains honestly, then replies with its update flipped and scaled
(``w_global - scale * (w - w_global)``: a sign flip, ``scale`` times as long) and claims
``claim`` examples (a lying count). Everything else reaches the real ClientApp as is.

The mod acts only on messages whose ``score-mode`` is ``when`` (default ``targeted``), so one
start of the simulation runtime can run an attacked federation and a clean reference
(``score-mode = "broadcast"``: the same training, the whole score table to every node).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod.utils import make_ffn
from flwr.clientapp import ClientApp

from fedrank.client.client_app import app as real_app

__all__ = ["poisoned_client_app", "poisoned_reply"]


def poisoned_reply(reply: Message, msg: Message, scale: float, claim: int) -> Message:
    """``reply`` (an honest training reply to ``msg``) with its update flipped and scaled by
    ``scale`` and its example count replaced by ``claim``."""
    sent = msg.content.array_records["arrays"]
    got = reply.content.array_records["arrays"]
    arrays = ArrayRecord()
    for key in got:
        new, old = got[key].numpy(), sent[key].numpy()
        if new.dtype.kind == "f":
            new = (old - scale * (new - old)).astype(new.dtype)
        arrays[key] = Array(np.array(new))
    metrics = MetricRecord({**dict(reply.content["metrics"]), "num_examples": int(claim)})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def poisoned_client_app(
    poisoners: Collection[int],
    *,
    scale: float = 10.0,
    claim: int = 10**12,
    when: str = "targeted",
) -> ClientApp:
    """The real ClientApp; the partitions in ``poisoners`` poison their training replies."""
    hostile = frozenset(int(p) for p in poisoners)

    def mod(msg: Message, context: Context, call_next: Callable) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type != "train" or reply.has_error():
            return reply
        config = msg.content.config_records.get("config")
        partition = int(context.node_config.get("partition-id", -1))
        if config is None or str(config.get("score-mode")) != when or partition not in hostile:
            return reply
        return poisoned_reply(reply, msg, scale, claim)

    app = ClientApp()
    app._call = make_ffn(real_app.__call__, [mod])
    return app
