"""The engine's message poll used while a simulation runs: the same answers as Flower's
``InMemoryLinkState.get_message_ins`` and ``vce_api.add_messages_to_queue`` on a real
in-memory LinkState."""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from queue import Queue

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import (
    HEARTBEAT_INTERVAL_INF,
    NOOP_ACCOUNT_NAME,
    NOOP_FLWR_AID,
    SUPERLINK_NODE_ID,
)
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager

from fedrank.simulations.message_lookup import (
    add_messages_to_queue_by_scan,
    engine_message_poll,
    get_message_ins_per_node,
    nodes_with_undelivered,
)

FLOWER_LOOKUP = InMemoryLinkState.get_message_ins
FLOWER_POLL = vce_api.add_messages_to_queue


def _state_with_messages(ttls: dict[int, list[float]]) -> tuple[InMemoryLinkState, list[int]]:
    """A LinkState with one run, ``len(ttls)`` nodes and, per node, messages of those TTLs."""
    state = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    ).state()
    run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID, "")
    nodes = []
    for _ in ttls:
        node = state.create_node(
            NOOP_FLWR_AID,
            NOOP_ACCOUNT_NAME,
            secrets.token_bytes(32),
            heartbeat_interval=HEARTBEAT_INTERVAL_INF,
        )
        state.acknowledge_node_heartbeat(node_id=node, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        nodes.append(node)
    # what the ServerApp's runtime sets before it creates messages
    TaskIdentity.task_id, TaskIdentity.run_id = 1, run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    for node, node_ttls in zip(nodes, ttls.values(), strict=True):
        for i, ttl in enumerate(node_ttls):
            content = RecordDict({"c": ConfigRecord({"i": i})})
            msg = Message(content, dst_node_id=node, message_type="train", ttl=ttl)
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Grid.push_messages
            assert state.store_message_ins(msg) is not None
    return state, nodes


def _ids(messages: list[Message]) -> list[str]:
    return [m.metadata.message_id for m in messages]


@pytest.mark.parametrize("limit", [1, 2, None])
def test_the_per_node_lookup_answers_as_flowers(limit: int | None) -> None:
    plan = {0: [60.0, 60.0, 60.0], 1: [60.0], 2: [0.2, 60.0], 3: []}
    flower_state, flower_nodes = _state_with_messages(plan)
    ours_state, ours_nodes = _state_with_messages(plan)
    time.sleep(0.3)  # node 2's first message expires
    for _ in range(3):  # polled again and again, as the engine does
        for a, b in zip(flower_nodes, ours_nodes, strict=True):
            want = FLOWER_LOOKUP(flower_state, a, limit)
            got = get_message_ins_per_node(ours_state, b, limit)
            assert [m.content["c"]["i"] for m in got] == [m.content["c"]["i"] for m in want]
            assert all(m.metadata.delivered_at for m in got)
    # of the 6 messages the expired one was purged from both, nothing else was
    assert len(ours_state.message_ins_store) == 5
    assert len(flower_state.message_ins_store) == 5


def test_a_node_gets_only_its_own_undelivered_messages_once() -> None:
    state, nodes = _state_with_messages({0: [60.0, 60.0], 1: [60.0]})
    first = get_message_ins_per_node(state, nodes[0], 1)
    second = get_message_ins_per_node(state, nodes[0], 1)
    assert len(first) == len(second) == 1 and _ids(first) != _ids(second)
    assert get_message_ins_per_node(state, nodes[0], 1) == []
    assert [m.metadata.dst_node_id for m in get_message_ins_per_node(state, nodes[1], None)] == [
        nodes[1]
    ]
    with pytest.raises(AssertionError):
        get_message_ins_per_node(state, nodes[0], 0)


def _poll(poll, state: InMemoryLinkState, nodes: list[int], expected: int) -> list[int]:
    """Run an engine poll until it queued ``expected`` messages (at most 10 s), then for 3
    more of Flower's cycles (a duplicate would show); the destinations it queued, in order."""
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    mapping = {node: i for i, node in enumerate(nodes)}
    thread = threading.Thread(target=poll, args=(state, queue, mapping, stop))
    thread.start()
    deadline = time.monotonic() + 10.0
    while queue.qsize() < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    stop.set()
    thread.join()
    got = []
    while not queue.empty():
        got.append(queue.get().metadata.dst_node_id)
    return got


def test_the_scan_poll_queues_what_flowers_poll_queues() -> None:
    plan = {0: [60.0, 60.0], 1: [60.0], 2: [], 3: [60.0, 60.0, 60.0]}
    flower_state, flower_nodes = _state_with_messages(plan)
    ours_state, ours_nodes = _state_with_messages(plan)
    assert nodes_with_undelivered(ours_state, {n: 0 for n in ours_nodes}) == [
        ours_nodes[i] for i in (0, 1, 3)
    ]
    with engine_message_poll():  # both polls with the per-node lookup
        want = _poll(FLOWER_POLL, flower_state, flower_nodes, 6)
        got = _poll(add_messages_to_queue_by_scan, ours_state, ours_nodes, 6)
    # every message queued once; one per node and cycle (a node's messages never overlap)
    position = {n: i for i, n in enumerate(ours_nodes)}
    assert sorted(position[n] for n in got) == [0, 0, 1, 3, 3, 3]
    assert sorted(flower_nodes.index(n) for n in want) == [0, 0, 1, 3, 3, 3]
    first_cycle = [position[n] for n in got[:3]]
    assert first_cycle == [0, 1, 3]
    assert nodes_with_undelivered(ours_state, {n: 0 for n in ours_nodes}) == []


def test_the_poll_and_lookup_are_swapped_in_only_for_the_block() -> None:
    with engine_message_poll() as swapped:
        assert swapped  # the Flower version of this project
        assert InMemoryLinkState.get_message_ins is get_message_ins_per_node
        assert vce_api.add_messages_to_queue is add_messages_to_queue_by_scan
    assert InMemoryLinkState.get_message_ins is FLOWER_LOOKUP
    assert vce_api.add_messages_to_queue is FLOWER_POLL
    with pytest.raises(RuntimeError), engine_message_poll():
        raise RuntimeError("a simulation that fails")
    assert InMemoryLinkState.get_message_ins is FLOWER_LOOKUP
    assert vce_api.add_messages_to_queue is FLOWER_POLL
