"""Teacher scores to the clients, in messages of their own, once per node and teacher version.

Two modes (``score-mode``):

- ``broadcast``: every node gets the whole table (the scores of every set a device may hold);
- ``targeted``: each node first reports the ids of the sets it holds (``query.hello``) and gets
  the scores of exactly those sets.

Before a training round the server calls :meth:`ScoreDistributor.hello` with the connected
nodes and :meth:`ScoreDistributor.ensure` with the sampled ones. A node it has not heard from
yet, or that it was told to :meth:`~ScoreDistributor.forget` (it failed or was restarted), gets
a ``query.hello`` (it reports its client key, its sets and the version it already holds); a
node that lacks the current version gets a ``query.scores`` message with the scores, which the
node caches in ``context.state``. Train messages therefore stay one ``ArrayRecord`` + one
``ConfigRecord``. Every delivery is recorded with its bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.errors import FedrankError, ScoreTableError
from common.records import record_nbytes, score_table_to_record
from common.score_table import ScoreTable

__all__ = [
    "ScoreDistributor",
    "Delivery",
    "check_replies",
    "exchange",
    "is_fedrank_error",
    "is_stale_scores_error",
]

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


@dataclass
class NodeInfo:
    """What the server knows about a node."""

    node_id: int
    set_ids: list[str] | None = None
    num_sets: int = 0
    client_key: int | None = None
    source: str = ""
    version: str = ""  # teacher-score version the node holds (as far as the server knows)
    confirmed: bool = False  # its hello is current (False: ask again before it trains)
    last_metrics: dict[str, Any] = field(default_factory=dict)

    def policy_view(self) -> dict[str, Any]:
        return {
            "num-sets": self.num_sets,
            "client-key": self.client_key,
            "source": self.source,
            "last-metrics": dict(self.last_metrics),
        }


def exchange(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Push ``messages`` and pull their replies, like ``Grid.send_and_receive``, but polling
    with a short, growing interval (5 ms to 100 ms): a round of small messages does not wait
    for a fixed 100 ms poll (simulation) or 3 s poll (deployment) after its last reply."""
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    interval = 0.005
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if pending:
            time.sleep(interval)
            interval = min(interval * 1.5, 0.1)
    return replies


# errors of the user's data or configuration: a node reporting one stops the run
FEDRANK_ERRORS = (
    "ScoreTableError",
    "DataFormatError",
    "ConfigError",
    "CheckpointError",
    "FedrankError",
)


def is_fedrank_error(reason: str) -> bool:
    """True if a node's error reason is one of fedrank's user-facing errors."""
    return any(name in reason for name in FEDRANK_ERRORS)


# what the ClientApp says when asked to train with a teacher-score version it does not hold
# (client.client_app._table); after a SuperNode restart this is expected, not a user error
STALE_SCORES = "holds teacher scores version"


def is_stale_scores_error(reason: str) -> bool:
    """True if a node failed because it lacks the current teacher scores (e.g. a restarted
    SuperNode: same node id, cached state lost): the server sends them again."""
    return STALE_SCORES in reason


def check_replies(
    replies: Iterable[Message], what: str, failures: dict[int, str] | None = None
) -> list[Message]:
    """The usable replies. A node failing with one of fedrank's errors (bad data, scores or
    settings) fails the run, naming the node and the reason: a mismatch is never silent.
    Other failures (a crashed node) go to ``failures`` (node -> reason) when given."""
    ok = []
    for msg in replies:
        if not msg.has_error():
            ok.append(msg)
            continue
        text = f"{what}: node {msg.metadata.src_node_id} failed: {msg.error.reason}"
        if failures is None or is_fedrank_error(msg.error.reason):
            raise FedrankError(text)
        log.warning(text)
        failures[int(msg.metadata.src_node_id)] = msg.error.reason
    return ok


class ScoreDistributor:
    """Sends teacher scores to nodes that lack the current version.

    Args:
        table: the scores of every set a device may hold (train and validation sets).
        mode: ``broadcast`` or ``targeted``.
        dtype: ``float32`` or ``float16`` (the payload's precision).
        client_settings: the client keys the node needs to find its data (hello messages).
        timeout: seconds to wait for replies.
    """

    def __init__(
        self,
        table: ScoreTable | None,
        mode: str,
        dtype: str,
        client_settings: Mapping[str, Any],
        timeout: float = 3600.0,
    ) -> None:
        self.table = table
        self.payload_table = None
        if table is not None:
            self.payload_table = table.to_float16() if dtype == "float16" else table
        self.mode = mode
        self.dtype = dtype
        self.client_settings = dict(client_settings)
        self.timeout = timeout
        self.nodes: dict[int, NodeInfo] = {}
        self.deliveries: list[Delivery] = []
        self._broadcast_record = None
        self.seconds = 0.0

    @property
    def version(self) -> str:
        return self.payload_table.version if self.payload_table is not None else ""

    def node(self, node_id: int) -> NodeInfo:
        return self.nodes.setdefault(node_id, NodeInfo(node_id))

    def forget(self, node_id: int) -> None:
        """Forget which teacher-score version ``node_id`` holds (it failed or was restarted):
        before it next trains it is asked again (``query.hello``), which refreshes its client
        key and sets, and it gets the scores if it lacks them. The last known client key stays
        visible to client policies until then."""
        info = self.nodes.get(int(node_id))
        if info is not None and (info.version or info.confirmed):
            log.info("node %d: asking again which teacher scores it holds", info.node_id)
            info.version = ""
            info.confirmed = False

    def _config(self, **extra: Any) -> ConfigRecord:
        return ConfigRecord({**self.client_settings, "score-mode": self.mode, **extra})

    def hello(self, grid: Grid, node_ids: Iterable[int], failures: dict[int, str]) -> None:
        """Ask nodes the server has not heard from which sets and version they hold."""
        todo = [n for n in node_ids if n not in self.nodes or not self.nodes[n].confirmed]
        if not todo:
            return
        messages = [
            Message(
                RecordDict({"config": self._config()}), dst_node_id=n, message_type="query.hello"
            )
            for n in todo
        ]
        replies = exchange(grid, messages, self.timeout)
        answered = {int(r.metadata.src_node_id) for r in replies}
        for n in todo:
            if n not in answered:
                failures[n] = "no reply to query.hello before the round's timeout"
        for reply in check_replies(replies, "hello", failures):
            status = reply.content["status"]
            info = self.node(reply.metadata.src_node_id)
            info.version = str(status["held-version"])
            info.num_sets = int(status["num-sets"])
            info.client_key = int(status["client-key"])
            info.source = str(status["source"])
            info.confirmed = True
            if "set-ids" in status:
                info.set_ids = [str(s) for s in status["set-ids"]]

    def _record_for(self, info: NodeInfo) -> Any:
        assert self.payload_table is not None
        if self.mode == "broadcast":
            if self._broadcast_record is None:
                self._broadcast_record = score_table_to_record(self.payload_table)
            return self._broadcast_record
        if info.set_ids is None:
            raise ScoreTableError(f"node {info.node_id} has not reported its set ids")
        unknown = [s for s in info.set_ids if s not in self.payload_table]
        if unknown:
            raise ScoreTableError(
                f"node {info.node_id} holds set {unknown[0]!r}, which has no teacher score "
                f"({len(unknown)} such sets)"
            )
        return score_table_to_record(self.payload_table.subset(info.set_ids))

    def ensure(
        self, grid: Grid, server_round: int, node_ids: Iterable[int]
    ) -> tuple[dict[int, int], dict[int, str]]:
        """Make every node in ``node_ids`` hold the current version.

        Returns the bytes sent per node this round (0 for nodes that already held it) and the
        nodes that could not be served (node -> reason: crashed, no reply in time); those do
        not train this round. A node failing with a fedrank error stops the run.
        """
        start = time.perf_counter()
        node_ids = list(node_ids)
        sent: dict[int, int] = {n: 0 for n in node_ids}
        failures: dict[int, str] = {}
        if self.payload_table is None:
            return sent, failures
        self.hello(grid, node_ids, failures)
        messages, sizes = [], {}
        for n in node_ids:
            if n in failures:
                continue
            info = self.node(n)
            if info.version == self.version:
                continue
            record = self._record_for(info)
            sizes[n] = record_nbytes(record)
            content = RecordDict({"scores": record, "config": self._config(version=self.version)})
            messages.append(Message(content, dst_node_id=n, message_type="query.scores"))
        if messages:
            replies = check_replies(
                exchange(grid, messages, self.timeout), "teacher scores", failures
            )
            for reply in replies:
                ack = reply.content["ack"]
                n = reply.metadata.src_node_id
                if str(ack["version"]) != self.version:
                    raise ScoreTableError(
                        f"node {n} acknowledged teacher scores version {ack['version']!r}, "
                        f"expected {self.version!r}"
                    )
                self.node(n).version = self.version
                sent[n] = sizes[n]
                delivery = Delivery(
                    round=server_round,
                    node_id=n,
                    version=self.version,
                    num_sets=int(ack["num-sets"]),
                    nbytes=sizes[n],
                    exact_match=bool(ack["exact-match"]),
                    received_count=int(ack["received-count"]),
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
            answered = {int(r.metadata.src_node_id) for r in replies}
            for n in sizes:
                if n not in answered and n not in failures:
                    failures[n] = "no reply to query.scores before the round's timeout"
        self.seconds += time.perf_counter() - start
        return sent, failures
