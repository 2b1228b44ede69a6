"""Teacher scores to the clients, in messages of their own, once per node and teacher version.

Two modes (``score-mode``):

- ``broadcast``: every node gets the whole table (the scores of every set a device may hold);
- ``targeted``: each node reports the ids of the sets it holds in its hello
  (:class:`fedrank.server.nodes.NodeRegistry`) and gets the scores of exactly those sets.

Before training, :meth:`ScoreDistributor.ensure` sends a ``query.scores`` message to each
sampled node that lacks the current version; the node caches the scores in ``context.state``
and acknowledges them (:class:`fedrank.common.reply_schema.ScoresAck`). Train messages therefore
stay one ``ArrayRecord`` + one ``ConfigRecord``. Every delivery is recorded with its bytes.

A node that cannot be served costs that node, never the run: no reply, a crash, a wrong or
malformed acknowledgement leave it out of this round; sets the teacher has no scores for, or
scores that do not match the node's sets, leave it out of the run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedrank.common.records import record_nbytes, score_table_to_record
from fedrank.common.reply_schema import PERSISTENT_ERRORS, ReplySchemaError, ScoresAck, error_kind
from fedrank.common.score_table import ScoreTable
from fedrank.server.nodes import NodeInfo, NodeRegistry, by_destination, exchange
from fedrank.server.update_validation import Rejection

__all__ = ["ScoreDistributor", "Delivery"]

log = logging.getLogger("fedrank.server")


@dataclass
class Delivery:
    """One ``query.scores`` message: which node, which round, what it carried."""

    round: int
    node_id: int
    version: str
    num_sets: int
    nbytes: int
    exact_match: bool
    received_count: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ScoreDistributor:
    """Sends teacher scores to nodes that lack the current version.

    Args:
        table: the scores of every set a device may hold (train and validation sets).
        mode: ``broadcast`` or ``targeted``.
        dtype: ``float32`` or ``float16`` (the payload's precision).
        nodes: the run's node registry (what each node holds).
        timeout: seconds to wait for replies.
    """

    def __init__(
        self,
        table: ScoreTable | None,
        mode: str,
        dtype: str,
        nodes: NodeRegistry,
        timeout: float = 600.0,
    ) -> None:
        self.table = table
        self.payload_table = None
        if table is not None:
            self.payload_table = table.to_float16() if dtype == "float16" else table
        self.mode = mode
        self.dtype = dtype
        self.nodes = nodes
        self.timeout = timeout
        self.deliveries: list[Delivery] = []
        self._broadcast_record = None
        self.seconds = 0.0

    @property
    def version(self) -> str:
        return self.payload_table.version if self.payload_table is not None else ""

    def _record_for(self, info: NodeInfo) -> Any:
        """The scores for ``info``'s node; a str (why not) when the node cannot get them."""
        assert self.payload_table is not None
        if self.mode == "broadcast":
            if self._broadcast_record is None:
                self._broadcast_record = score_table_to_record(self.payload_table)
            return self._broadcast_record
        if info.set_ids is None:
            return "the node has not reported its set ids"
        unknown = [s for s in info.set_ids if s not in self.payload_table]
        if unknown:
            return (
                f"the node holds set {unknown[0]!r}, which has no teacher score "
                f"({len(unknown)} such sets)"
            )
        return score_table_to_record(self.payload_table.subset(info.set_ids))

    def ensure(
        self, grid: Grid, server_round: int, node_ids: Iterable[int]
    ) -> tuple[dict[int, int], list[Rejection]]:
        """Make every node in ``node_ids`` hold the current version.

        Returns the bytes sent per node this round (0 for nodes that already held it) and the
        nodes that could not be served (they do not train this round; those whose sets do not
        fit the teacher's scores are excluded from the run).
        """
        start = time.perf_counter()
        node_ids = [int(n) for n in node_ids]
        sent: dict[int, int] = {n: 0 for n in node_ids}
        problems: list[Rejection] = []
        if self.payload_table is None:
            return sent, problems
        messages, sizes = [], {}
        for n in node_ids:
            info = self.nodes.node(n)
            if info.version == self.version:
                continue
            record = self._record_for(info)
            if isinstance(record, str):
                problems.append(self.nodes.failed(n, "query.scores", "scores", record, True))
                continue
            sizes[n] = record_nbytes(record)
            config = self.nodes.config(version=self.version)
            content = RecordDict({"scores": record, "config": config})
            messages.append(Message(content, dst_node_id=n, message_type="query.scores"))
        if messages:
            replies = by_destination(messages, exchange(grid, messages, self.timeout))
            for n in sizes:
                problem = self._read_ack(server_round, n, replies.get(n), sizes[n])
                if problem is None:
                    sent[n] = sizes[n]
                else:
                    problems.append(problem)
        self.seconds += time.perf_counter() - start
        return sent, problems

    def _read_ack(
        self, server_round: int, n: int, reply: Message | None, nbytes: int
    ) -> Rejection | None:
        what = "query.scores"
        if reply is None:
            return Rejection(n, "no reply before the round's timeout", "missing", what)
        if reply.has_error():
            kind = error_kind(reply.error.code)
            persistent = kind in PERSISTENT_ERRORS or kind == "scores"
            return self.nodes.failed(n, what, kind, reply.error.reason, persistent)
        try:
            record = reply.content.config_records.get("ack")
            if record is None:
                raise ReplySchemaError("scores reply has no 'ack' record")
            ack = ScoresAck.parse(record)
        except ReplySchemaError as err:
            return self.nodes.failed(n, what, "protocol", str(err), True)
        if ack.version != self.version:
            reason = (
                f"the node acknowledged teacher scores version {ack.version!r}, "
                f"expected {self.version!r}"
            )
            return Rejection(n, reason, "invalid", what)
        self.nodes.node(n).version = self.version
        delivery = Delivery(
            round=server_round,
            node_id=n,
            version=self.version,
            num_sets=ack.num_sets,
            nbytes=nbytes,
            exact_match=ack.exact_match,
            received_count=ack.received_count,
        )
        self.deliveries.append(delivery)
        log.info(
            "round %d: teacher scores (%s, %s, %d sets, %d bytes) -> node %d",
            server_round,
            self.mode,
            self.dtype,
            delivery.num_sets,
            delivery.nbytes,
            n,
        )
        return None
