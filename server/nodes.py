"""Which connected SuperNode is which client of the federation.

Each node declares its client id when it is started (`fedlr client --partition-id K`, or Flower's
simulation engine for virtual clients); the server asks every new node once (a `query` message)
and keeps the answer; the question carries the run's `Preload`, so the node loads the base model
before it answers, while the server is still getting ready. A client's identity is then stable
when its node reconnects with another node id, when other nodes leave, and across a server
restart, so its privacy ledger, rank and data always belong together.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedlr.errors import FedlrError
from fedlr.server.transport import InFlight, exchange
from fedlr.wire import Preload
from fedlr.wire_fields import PRELOAD_FIELD

log = logging.getLogger("fedlr")
QUERY_TIMEOUT_SECONDS = 60.0


def identity_of(reply: Message) -> tuple[ConfigRecord, int, int]:
    """(the identity record, partition id, num-partitions) of a node's answer; raises on
    anything else (a missing record or field, a value that is not an integer)."""
    identity = reply.content["identity"]
    if not isinstance(identity, ConfigRecord):
        raise TypeError(f"identity is a {type(identity).__name__}, not a ConfigRecord")
    values = identity["partition-id"], identity["num-partitions"]
    for name, value in zip(("partition-id", "num-partitions"), values, strict=True):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} {str(value)[:40]!r} is not an integer")
    return identity, values[0], values[1]


@dataclass
class NodeDirectory:
    num_clients: int
    clients: dict[str, int] = field(default_factory=dict)  # client id -> node id
    ignored: dict[int, str] = field(default_factory=dict)  # node id -> why it is not a client
    failed: dict[int, str] = field(default_factory=dict)  # node id -> its last error reply
    asked: dict[str, int] = field(default_factory=dict)  # unanswered query's id -> node id
    preload: Preload | None = None  # what each node loads before it answers
    in_flight: InFlight | None = None  # a simulation's; deployed: every query at once

    def refresh(self, grid: Grid) -> None:
        """Forget nodes that went offline and identify the ones that appeared. A node is asked
        once: a query unanswered within QUERY_TIMEOUT_SECONDS (a node still starting, loading
        the base model) stays out, and later refreshes take its late answer without waiting
        for it (a node that never answers costs one timeout, not one a round)."""
        online = set(grid.get_node_ids())
        self.clients = {c: n for c, n in self.clients.items() if n in online}
        self.asked = {m: n for m, n in self.asked.items() if n in online}
        known = set(self.clients.values()) | set(self.ignored) | set(self.asked.values())
        queries = [Message(content=self.query(), dst_node_id=n, message_type="query")
                   for n in sorted(online - known)]
        if not queries and not self.asked:
            return
        window = None if self.in_flight is None else self.in_flight.limit(training=False)
        outstanding = set(self.asked)
        replies = exchange(grid, queries, QUERY_TIMEOUT_SECONDS if queries else 0.0,
                           window=window, outstanding=outstanding)
        # both grids give each message its id as they push it
        self.asked.update({q.metadata.message_id: q.metadata.dst_node_id for q in queries})
        self.asked = {m: n for m, n in self.asked.items() if m in outstanding}
        for reply in replies:
            self.register(reply)

    def query(self) -> RecordDict:
        if self.preload is None:
            return RecordDict()
        return RecordDict({PRELOAD_FIELD: ConfigRecord({"json": self.preload.to_json()})})

    def register(self, reply: Message) -> None:
        """Take a node's answer: a node whose answer is not a well-formed identity is ignored
        with the reason (its reply is its own input: never the run's end)."""
        if reply.has_error():  # asked again at the next refresh (e.g. it refuses the run's app)
            node, reason = reply.metadata.src_node_id, str(reply.error.reason)[:500]
            if self.failed.get(node) != reason:
                log.warning("node %s did not identify itself: %s", node, reason)
            self.failed[node] = reason
            return
        node = reply.metadata.src_node_id
        try:
            identity, partition, declared = identity_of(reply)
        except Exception as exc:  # the node's input alone: it is ignored, the run goes on
            self.ignore(node, f"its identity reply is malformed ({exc}); a node answers with "
                              "integer partition-id and num-partitions (`fedlr client`)")
            return
        client = str(partition)
        if declared != self.num_clients:
            self.ignore(node, f"it says num-partitions={declared}, the run has {self.num_clients} "
                              "clients; restart it with the run's --num-partitions")
        elif not 0 <= partition < self.num_clients:
            self.ignore(node, f"its partition id {client} is not in [0, {self.num_clients})")
        elif client in self.clients:
            self.ignore(node, f"client {client} is already node {self.clients[client]}; every "
                              "node needs its own --partition-id")
        else:
            self.clients[client] = node
            log.info("node %s is client %s (%s; data: %s)", node, client,
                     str(identity.get("device", "?"))[:40], str(identity.get("data", "?"))[:200])

    def ignore(self, node: int, why: str) -> None:
        """Never asked again: a node is identified once (`refresh` runs every round)."""
        self.ignored[node] = why
        log.warning("ignoring node %s: %s", node, why)

    def wait(self, grid: Grid, *, seconds: float, at_least: int) -> None:
        """Until every client is connected, or `seconds` pass with at least `at_least`."""
        deadline = time.monotonic() + seconds
        while True:
            self.refresh(grid)
            if len(self.clients) == self.num_clients:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
        missing = sorted(set(map(str, range(self.num_clients))) - set(self.clients), key=int)
        if len(self.clients) < at_least:
            raise FedlrError(
                f"{len(self.clients)} of {self.num_clients} clients connected after {seconds:.0f} "
                f"s (missing {missing}), at least {at_least} needed; start the missing clients or "
                "raise connect_timeout"
                + "".join(f"; node {n} answered: {why}" for n, why in self.failed.items()
                          if n not in self.clients.values())
            )
        log.warning("starting with %d of %d clients; missing %s", len(self.clients),
                    self.num_clients, missing)
