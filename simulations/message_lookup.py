"""A cheaper message poll for Flower's simulation engine while a simulation runs here.

Flower 1.42's simulation engine polls its in-memory LinkState every 0.1 s, once per simulated
node (``vce_api.add_messages_to_queue``), and each poll
(``InMemoryLinkState.get_message_ins``) runs the full validity check
(``_check_stored_messages``: the lock, the clock, the TTL and federation checks) on *every*
stored message before it looks at the message's destination. A round sends one message per
node and they stay stored until their replies are pulled, so with N nodes each poll cycle
makes N x N checks: at 100 clients the poll thread kept a core busy for the whole round, and
at 1,000 clients one cycle took seconds.

:func:`engine_message_poll` swaps in, for the duration of a simulation:

- :func:`get_message_ins_per_node`: the lookup skips the messages of other nodes (and those
  already delivered) before checking them. It returns the same messages in the same order,
  marked delivered the same way; the checks (and the purge of an expired or invalid message)
  still run on each message the node could receive;
- :func:`add_messages_to_queue_by_scan`: each poll cycle first scans the store once for the
  nodes that have an undelivered message and asks only those (still one message per node per
  cycle, so a node never runs two messages at once), instead of asking every node; as a
  cycle is now cheap, it runs every 20 ms instead of 100 ms.

Messages delivered but not answered yet are checked when their replies are pulled, as in
Flower. Both apply only to the Flower version they were written against (another version
keeps Flower's own code) and are undone when the simulation ends.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from queue import Queue

import flwr
from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkState
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now

__all__ = [
    "WRITTEN_FOR",
    "add_messages_to_queue_by_scan",
    "engine_message_poll",
    "get_message_ins_per_node",
]

WRITTEN_FOR = "1.42."  # the Flower releases whose engine poll and lookup these mirror
# seconds between poll cycles (Flower's engine: 0.1): a cycle is one scan of the store now,
# so polling more often costs little and a round's messages start sooner
POLL_INTERVAL = 0.02


def get_message_ins_per_node(
    self: InMemoryLinkState,
    node_id: int,
    limit: int | None,
    *,
    run_id: int | None = None,
) -> list[Message]:
    """``InMemoryLinkState.get_message_ins`` (Flower 1.42) checking only ``node_id``'s
    undelivered messages."""
    if limit is not None and limit < 1:
        raise AssertionError("`limit` must be >= 1")
    found: list[Message] = []
    with self.lock:
        for msg_id, msg in list(self.message_ins_store.items()):
            metadata = msg.metadata
            if metadata.dst_node_id != node_id or metadata.delivered_at != "":
                continue  # not this node's to receive: no check needed to skip it
            self._check_stored_messages({msg_id})  # may purge it (expired, invalid)
            msg_ins = self.message_ins_store.get(msg_id)
            if msg_ins is not None and (run_id is None or msg_ins.metadata.run_id == run_id):
                found.append(msg_ins)
            if limit and len(found) == limit:
                break
    delivered_at = now().isoformat()
    for msg_ins in found:
        msg_ins.metadata.delivered_at = delivered_at
    return found


def nodes_with_undelivered(state: LinkState, nodes: Mapping[int, int]) -> list[int]:
    """The nodes of ``nodes`` (in its order) that have a message not delivered yet, found in
    one scan of an in-memory store; every node for another kind of LinkState."""
    if not isinstance(state, InMemoryLinkState):
        return list(nodes)
    with state.lock:
        waiting = {
            m.metadata.dst_node_id
            for m in state.message_ins_store.values()
            if m.metadata.delivered_at == ""
        }
    return [node for node in nodes if node in waiting]


def add_messages_to_queue_by_scan(
    state: LinkState,
    queue: Queue[Message],
    nodes_mapping: Mapping[int, int],
    f_stop: threading.Event,
) -> None:
    """``vce_api.add_messages_to_queue`` (Flower 1.42) asking only the nodes that have a
    message waiting: at most one message per node and cycle, a cycle every
    :data:`POLL_INTERVAL` seconds."""
    while not f_stop.is_set():
        for node_id in nodes_with_undelivered(state, nodes_mapping):
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        f_stop.wait(POLL_INTERVAL)


@contextlib.contextmanager
def engine_message_poll() -> Iterator[bool]:
    """Within the block the engine polls with :func:`add_messages_to_queue_by_scan` and
    :func:`get_message_ins_per_node` (yields True), unless this Flower is not the version
    they were written for (yields False, Flower's own code is kept)."""
    if not flwr.__version__.startswith(WRITTEN_FOR):
        yield False
        return
    lookup = InMemoryLinkState.__dict__["get_message_ins"]
    poll = vce_api.add_messages_to_queue
    InMemoryLinkState.get_message_ins = get_message_ins_per_node  # type: ignore[method-assign]
    vce_api.add_messages_to_queue = add_messages_to_queue_by_scan
    try:
        yield True
    finally:
        InMemoryLinkState.get_message_ins = lookup  # type: ignore[method-assign]
        vce_api.add_messages_to_queue = poll
