"""Identifying nodes: a node slower than the query timeout (still starting, loading its base
model on a busy machine) is asked once and identified by its late answer, and a node that never
answers costs one timeout, not one every round."""

from __future__ import annotations

import time
from uuid import uuid4

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedlr.server import nodes
from fedlr.server.nodes import NodeDirectory

TIMEOUT = 0.2


@pytest.fixture(autouse=True)
def in_a_run(monkeypatch):
    """Flower stamps every Message with the run it belongs to, as the ServerApp's process is."""
    for name, value in (("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    monkeypatch.setattr(nodes, "QUERY_TIMEOUT_SECONDS", TIMEOUT)


class Grid:
    """Node id -> seconds it takes to answer a query (None: never), as Flower's grid keeps
    every pushed message until its reply is pulled."""

    def __init__(self, delays: dict[int, float | None]) -> None:
        self.delays, self.pushed = delays, {}
        self.asked: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(self.delays)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            self.pushed[msg.metadata.message_id] = (msg, time.monotonic())
            self.asked.append(msg.metadata.dst_node_id)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        replies = []
        for message_id in list(ids):
            msg, when = self.pushed[message_id]
            delay = self.delays[msg.metadata.dst_node_id]
            if delay is not None and time.monotonic() >= when + delay:
                del self.pushed[message_id]
                identity = ConfigRecord({"partition-id": msg.metadata.dst_node_id,
                                         "num-partitions": 3})
                replies.append(Message(content=RecordDict({"identity": identity}),
                                       reply_to=msg))
        return replies


def test_a_node_slower_than_the_timeout_is_asked_once_and_its_late_answer_counts():
    grid = Grid({0: 0.0, 1: 3 * TIMEOUT, 2: 0.0})
    directory = NodeDirectory(3)
    directory.refresh(grid)
    assert directory.clients == {"0": 0, "2": 2}  # node 1 is still loading
    time.sleep(3 * TIMEOUT)
    directory.refresh(grid)
    assert directory.clients == {"0": 0, "1": 1, "2": 2}
    assert sorted(grid.asked) == [0, 1, 2]  # nobody asked twice
    assert directory.asked == {}


def test_waiting_for_the_clients_takes_a_late_answer_within_connect_timeout():
    grid = Grid({0: 0.0, 1: 3 * TIMEOUT, 2: 0.0})
    directory = NodeDirectory(3)
    directory.wait(grid, seconds=10 * TIMEOUT, at_least=3)
    assert directory.clients == {"0": 0, "1": 1, "2": 2} and sorted(grid.asked) == [0, 1, 2]


def test_a_node_that_never_answers_costs_one_timeout_not_one_a_round():
    grid = Grid({0: 0.0, 1: None, 2: 0.0})
    directory = NodeDirectory(3)
    directory.refresh(grid)
    start = time.monotonic()
    for _ in range(5):  # five more rounds
        directory.refresh(grid)
    assert time.monotonic() - start < TIMEOUT
    assert directory.clients == {"0": 0, "2": 2} and sorted(grid.asked) == [0, 1, 2]


def test_a_node_that_left_with_its_query_unanswered_is_asked_anew_when_it_is_back():
    grid = Grid({0: 0.0, 1: None})
    directory = NodeDirectory(3)
    directory.refresh(grid)
    del grid.delays[1]  # it went offline: its query is forgotten
    directory.refresh(grid)
    assert directory.asked == {}
    grid.delays[1] = 0.0  # back, with another process and this time quick
    directory.refresh(grid)
    assert directory.clients == {"0": 0, "1": 1} and grid.asked == [0, 1, 1]
