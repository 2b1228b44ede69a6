"""What the server knows about each node, and how it talks to nodes.

:class:`NodeRegistry` keeps one :class:`NodeInfo` per node id (the server's own identity for a
node, which a node cannot choose):

- :meth:`NodeRegistry.wait_for_nodes`: a bounded wait for ``min-available-nodes`` before
  every round; after ``node-wait-timeout`` the round goes on with the nodes that are there if
  they can give ``min-replies`` replies, else the run stops with one line saying so (a
  shortage the run already went on with costs no new wait until more nodes are lost);
- :meth:`NodeRegistry.hello`: once per round, a ``query.hello`` to each connected node the
  server has not heard from (new, failed or restarted nodes); a node that does not answer is
  asked again after 1, 2, 4, ... rounds, so a silent node costs one timeout now and then, not
  one every round. The node reports its client key,
  its sets, the teacher-score version it holds and its size cap
  (:class:`fedrank.common.reply_schema.HelloStatus`); its ``node_config`` is checked on the node
  then. Only nodes whose hello is current are sampled;
- :meth:`NodeRegistry.exclude`: a node whose failure will not go away by asking again (a bad
  ``node_config``, data that does not fit the federation, another reply protocol, a student
  larger than the device allows) is left out of the rest of the run, logged once and listed
  in the summary; the others go on.

:func:`exchange` sends messages and collects their replies within a timeout;
:func:`by_destination` attributes replies to the node each message went to.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedrank.common.errors import FedrankError
from fedrank.common.reply_schema import PERSISTENT_ERRORS, HelloStatus, ReplySchemaError, error_kind
from fedrank.server.update_validation import Rejection

__all__ = ["NodeInfo", "NodeRegistry", "NotEnoughNodes", "by_destination", "exchange"]

log = logging.getLogger("fedrank.server")


class NotEnoughNodes(FedrankError):
    """Too few nodes are connected (or usable) to go on; the message says how many and why."""


@dataclass
class NodeInfo:
    """What the server knows about a node."""

    node_id: int
    set_ids: list[str] | None = None
    num_sets: int = 0
    num_train_sets: int = 0
    max_parameters: int = 0
    client_key: int | None = None
    source: str = ""
    version: str = ""  # teacher-score version the node holds (as far as the server knows)
    confirmed: bool = False  # its hello is current (False: ask again before it trains)
    excluded: str = ""  # why the node is left out of the run ("": it is not)
    silent: int = 0  # hello queries in a row it did not answer
    next_hello: int = 0  # the first round it is asked again after not answering
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
    every fiftieth of the time waited so far (at least 5 ms, at most 100 ms): the last reply is
    picked up within 2% of the exchange's time, not after a fixed 100 ms poll (simulation) or
    3 s poll (deployment), and a long exchange polls ten times a second."""
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    start = time.monotonic()
    deadline = start + timeout
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if pending:
            time.sleep(min(max((time.monotonic() - start) / 50, 0.005), 0.1))
    return replies


def by_destination(sent: Iterable[Message], replies: Iterable[Message]) -> dict[int, Message]:
    """Replies by the node their message went to (a SuperLink answering for an unreachable
    node replies from its own id); a second reply, or one to a message this step did not
    send, is ignored."""
    destination = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent}
    out: dict[int, Message] = {}
    for reply in replies:
        node = destination.get(reply.metadata.reply_to_message_id)
        if node is not None and node not in out:
            out[node] = reply
    return out


class NodeRegistry:
    """The nodes of a run (see the module docstring).

    Args:
        client_settings: the client keys a node needs to find its data (sent with hello).
        score_mode: ``targeted`` (nodes report their set ids) or ``broadcast``.
        timeout: seconds to wait for hello replies.
        student_parameters: the student's size (nodes that allow less are excluded).
    """

    def __init__(
        self,
        client_settings: Mapping[str, Any],
        score_mode: str = "targeted",
        timeout: float = 600.0,
        student_parameters: int = 0,
    ) -> None:
        self.client_settings = dict(client_settings)
        self.score_mode = score_mode
        self.timeout = timeout
        self.student_parameters = int(student_parameters)
        self.nodes: dict[int, NodeInfo] = {}
        self._short: int | None = None  # connected nodes of a shortage the run went on with

    def node(self, node_id: int) -> NodeInfo:
        return self.nodes.setdefault(int(node_id), NodeInfo(int(node_id)))

    def config(self, **extra: Any) -> ConfigRecord:
        """The ConfigRecord of a query message (the node's data settings)."""
        return ConfigRecord({**self.client_settings, "score-mode": self.score_mode, **extra})

    # ---- which nodes take part -------------------------------------------------------------
    def eligible(self, node_ids: Iterable[int]) -> list[int]:
        """The nodes of ``node_ids`` that may be sampled: hello current, not excluded."""
        out = []
        for n in node_ids:
            info = self.nodes.get(int(n))
            if info is not None and info.confirmed and not info.excluded:
                out.append(int(n))
        return out

    def excluded(self) -> dict[int, str]:
        """Nodes left out of the run, and why."""
        return {n: i.excluded for n, i in sorted(self.nodes.items()) if i.excluded}

    def exclude(self, node_id: int, reason: str) -> None:
        """Leave ``node_id`` out of the rest of the run (logged once)."""
        info = self.node(node_id)
        if not info.excluded:
            info.excluded = reason
            log.warning("node %d is left out of the run: %s", info.node_id, reason)

    def forget(self, node_id: int) -> None:
        """Forget what ``node_id`` holds (it failed or was restarted): before it next trains it
        is asked again (``query.hello``), which refreshes its client key and sets, and it gets
        the teacher scores if it lacks them. The last known client key stays visible to client
        policies until then."""
        info = self.nodes.get(int(node_id))
        if info is not None and (info.version or info.confirmed):
            log.info("node %d: asking again what it holds", info.node_id)
            info.version = ""
            info.confirmed = False

    def wait_for_nodes(
        self, grid: Grid, minimum: int, timeout: float, min_replies: int, what: str
    ) -> list[int]:
        """The connected nodes that are not excluded, after waiting up to ``timeout`` seconds
        for ``minimum`` connected nodes (excluded ones count: they are there). With fewer
        after the wait: the usable ones, if at least ``min_replies``; else
        :class:`NotEnoughNodes` (``what`` names the step). A shortage the server already went
        on with costs no new wait until even fewer nodes are connected."""
        deadline = time.monotonic() + timeout
        while True:
            connected = [int(n) for n in grid.get_node_ids()]
            if len(connected) >= minimum:
                if self._short is not None:
                    log.info("%s: %d nodes connected again", what, len(connected))
                self._short = None
                break
            if self._short is not None and len(connected) >= self._short:
                break  # the same shortage as before: go on at once
            if time.monotonic() >= deadline:
                self._short = len(connected)
                log.warning(
                    "%s: %d of 'min-available-nodes' %d node(s) connected after %gs; going on "
                    "with them",
                    what,
                    len(connected),
                    minimum,
                    timeout,
                )
                break
            time.sleep(0.05)
        nodes = [n for n in connected if not self.node(n).excluded]
        if len(nodes) < min_replies:
            excluded = self.excluded()
            note = f" ({len(excluded)} excluded: {_reasons(excluded)})" if excluded else ""
            raise NotEnoughNodes(
                f"{what}: only {len(nodes)} usable node(s) connected (waited up to {timeout:g}s, "
                f"'node-wait-timeout'), 'min-replies' is {min_replies}{note}"
            )
        return nodes

    # ---- hello -----------------------------------------------------------------------------
    def hello(self, grid: Grid, node_ids: Iterable[int], server_round: int = 0) -> list[Rejection]:
        """Ask the nodes of ``node_ids`` the server has not heard from (and has not excluded,
        and that are not backing off after not answering) what they hold; returns the nodes
        that failed (excluded ones marked so)."""
        todo = []
        for n in node_ids:
            info = self.node(n)
            if not info.confirmed and not info.excluded and info.next_hello <= server_round:
                todo.append(int(n))
        if not todo:
            return []
        messages = [
            Message(
                RecordDict({"config": self.config()}), dst_node_id=n, message_type="query.hello"
            )
            for n in todo
        ]
        replies = by_destination(messages, exchange(grid, messages, self.timeout))
        problems = []
        for n in todo:
            problem = self._read_hello(n, replies.get(n))
            info = self.node(n)
            if problem is None:
                info.silent = 0
            elif not problem.excluded:
                info.silent += 1
                info.next_hello = server_round + 2 ** (info.silent - 1)
                problems.append(problem)
            else:
                problems.append(problem)
        return problems

    def _read_hello(self, n: int, reply: Message | None) -> Rejection | None:
        what = "query.hello"
        if reply is None:
            return Rejection(n, "no reply before the round's timeout", "missing", what)
        if reply.has_error():
            kind = error_kind(reply.error.code)
            return self.failed(n, what, kind, reply.error.reason, kind in PERSISTENT_ERRORS)
        try:
            record = reply.content.config_records.get("status")
            if record is None:
                raise ReplySchemaError("hello reply has no 'status' record")
            status = HelloStatus.parse(record)
        except ReplySchemaError as err:
            return self.failed(n, what, "protocol", str(err), True)
        if status.max_parameters and self.student_parameters > status.max_parameters:
            reason = (
                f"the student has {self.student_parameters:,} parameters, the device allows "
                f"at most {status.max_parameters:,} ('max-parameters' in its node_config)"
            )
            return self.failed(n, what, "device-cap", reason, True)
        info = self.node(n)
        info.version = status.held_version
        info.num_sets = status.num_sets
        info.num_train_sets = status.num_train_sets
        info.max_parameters = status.max_parameters
        info.client_key = status.client_key
        info.source = status.source
        info.set_ids = list(status.set_ids) if status.set_ids is not None else None
        info.confirmed = True
        return None

    def failed(
        self, n: int, message_type: str, kind: str, reason: str, persistent: bool
    ) -> Rejection:
        """A failure of node ``n``; a ``persistent`` one also excludes the node."""
        if persistent:
            self.exclude(n, f"{message_type}: {kind}: {reason}")
        return Rejection(n, reason, kind, message_type, excluded=persistent)


def _reasons(excluded: Mapping[int, str]) -> str:
    return "; ".join(f"node {n}: {r}" for n, r in excluded.items())
