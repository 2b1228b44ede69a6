"""A per-node message lookup for Flower's simulation engine while a simulation runs here.

Flower 1.42's simulation engine polls its in-memory LinkState every 0.1 s, once per simulated
node (``vce_api.add_messages_to_queue``), and each poll
(``InMemoryLinkState.get_message_ins``) runs the full validity check
(``_check_stored_messages``: the lock, the clock, the TTL and federation checks) on *every*
stored message before it looks at the message's destination. A round sends one message per
node and they stay stored until their replies are pulled, so with N nodes each poll makes
N x N checks: at 100 clients the poll thread alone kept a core busy for the whole round, and
at 1,000 clients one poll took seconds.

:func:`per_node_message_lookup` swaps in a lookup that skips the messages of other nodes
before checking them. It returns the same messages in the same order, marked delivered the
same way; the checks (and the purge of an expired or invalid message) still run on each
message the node could receive, and other nodes' messages are checked when their own node is
polled (or when their replies are pulled). It applies only to the Flower version it was
written against (another version keeps Flower's own lookup) and is undone when the
simulation ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import flwr
from flwr.app import Message
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now

__all__ = ["WRITTEN_FOR", "get_message_ins_per_node", "per_node_message_lookup"]

WRITTEN_FOR = "1.42."  # the Flower releases whose InMemoryLinkState.get_message_ins it mirrors


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


@contextlib.contextmanager
def per_node_message_lookup() -> Iterator[bool]:
    """Within the block, ``InMemoryLinkState.get_message_ins`` is
    :func:`get_message_ins_per_node` (yields True), unless this Flower is not the version it
    was written for (yields False, Flower's lookup is kept)."""
    if not flwr.__version__.startswith(WRITTEN_FOR):
        yield False
        return
    original = InMemoryLinkState.__dict__["get_message_ins"]
    InMemoryLinkState.get_message_ins = get_message_ins_per_node  # type: ignore[method-assign]
    try:
        yield True
    finally:
        InMemoryLinkState.get_message_ins = original  # type: ignore[method-assign]
