"""Carrying messages over Flower's Grid: `Parts` as Flower records and back, one exchange
(`exchange`: push, then pull the replies as they come), and one exchange with a round's nodes
(`Transport`), bytes counted both ways, a batched group's messages bundled into one and its
answer unbundled."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedlr.grouping import Grouping
from fedlr.lora.rounds import Rejection
from fedlr.wire import Parts, bundle, unbundle
from fedlr.wire_fields import GROUP_FIELD

# Flower's grids look for replies every 0.1 s (simulation) or every 3 s (deployment), so every
# exchange ended on average 0.05 s or 1.5 s after its last reply arrived. Pulling starts at
# POLL_FIRST_SECONDS and doubles up to POLL_MAX_SECONDS: a short exchange is noticed within
# milliseconds, a long one costs at most 1 / POLL_MAX_SECONDS pulls a second.
POLL_FIRST_SECONDS = 0.002
POLL_MAX_SECONDS = 0.05
IN_FLIGHT_PER_WORKER = 8
SCAN_BUDGET = 40_000  # node-by-message checks a look of Flower's simulation engine may cost


def exchange(grid: Grid, messages: Iterable[Message], timeout: float | None,
             sleep: Callable[[float], None] = time.sleep,
             clock: Callable[[], float] = time.monotonic,
             window: int | None = None, outstanding: set[str] | None = None) -> list[Message]:
    """`Grid.send_and_receive`'s contract (push every message, then the replies that arrive
    until all are in or `timeout` seconds pass; None waits for all), noticing the last reply
    within POLL_MAX_SECONDS. `window`: at most that many messages unanswered at once, the next
    pushed as replies come (see `InFlight`); None pushes them all at once. `outstanding`: ids of
    messages pushed earlier whose replies count too (a slow node's late answer is not lost); on
    return it holds every id still unanswered, and the messages never pushed are dropped."""
    queue = list(messages)
    window = len(queue) if window is None else max(1, window)
    pending = set(grid.push_messages(queue[:window])) - {None}
    queue = queue[window:]
    if outstanding is not None:
        pending |= outstanding
    deadline = None if timeout is None else clock() + timeout
    replies: list[Message] = []
    wait = POLL_FIRST_SECONDS
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending -= {m.metadata.reply_to_message_id for m in arrived}
        left = None if deadline is None else deadline - clock()
        if queue and len(pending) < window and (left is None or left > 0):
            more, queue = queue[:window - len(pending)], queue[window - len(pending):]
            pending |= set(grid.push_messages(more)) - {None}
        if not pending or (left is not None and left <= 0):
            break
        sleep(wait if left is None else min(wait, left))
        wait = min(POLL_MAX_SECONDS, 2 * wait)
    if outstanding is not None:
        outstanding.clear()
        outstanding.update(pending)
    return replies


@dataclass(frozen=True)
class InFlight:
    """How many messages a simulation leaves unanswered at once (`exchange`'s window).

    Flower's simulation engine looks for every node's messages every 0.1 s, and each look
    scans every stored message: n messages for n nodes cost O(n^2) a look, and a training
    exchange lasts many looks (at 200 clients a third of the driver's core, taken from the
    workers). A training exchange therefore keeps IN_FLIGHT_PER_WORKER messages per worker out
    (a worker answers one at a time, so these keep it busy). A short exchange (identifying the
    nodes, the secure-aggregation stages after training) is over within a few looks and goes at
    once, unless so many nodes would make even those looks long (SCAN_BUDGET)."""

    workers: int
    nodes: int

    def limit(self, training: bool) -> int:
        busy = IN_FLIGHT_PER_WORKER * self.workers
        return busy if training else max(busy, SCAN_BUDGET // max(1, self.nodes))


def records(parts: Parts) -> RecordDict:
    """Parts as Flower carries them (the ClientApp unwraps them the same way)."""
    return RecordDict({"arrays": ArrayRecord(torch_state_dict=parts.arrays),
                       "fields": ConfigRecord(parts.fields)})


def unwrap(message: Message) -> Parts:
    return Parts(message.content["arrays"].to_torch_state_dict(),
                 dict(message.content["fields"]))


def size(content: RecordDict) -> int:
    """Bytes of a message's tensors and of its text and byte fields."""
    fields = content["fields"].values() if "fields" in content else ()
    text = sum(len(v) for v in fields if isinstance(v, str | bytes))
    return (content["arrays"].count_bytes() if "arrays" in content else 0) + text


@dataclass
class Transport:
    """One exchange with a round's nodes over the Grid: each client's message out, each answer
    back (or a Rejection: the node failed, or its node is offline), bytes counted both ways.

    With `groups` (a simulation's batched engine) each group's messages travel as one, to the
    node of its first client, whose worker trains them together; the answer is unbundled, so
    everything after the transport sees one reply per client either way."""

    grid: Grid
    nodes: dict[str, int]
    timeout: float | None
    grouping: Grouping | None = None
    groups: list[list[str]] = field(default_factory=list)
    in_flight: InFlight | None = None  # a simulation's; deployed: every message at once
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0  # waiting for the nodes: their training and Flower's carrying

    def send(self, parts: dict[str, Parts], training: bool = True
             ) -> dict[str, Parts | Rejection]:
        """`training`: the messages make their nodes train (long), or not (a short stage)."""
        carried = self._carried(parts)
        messages = []
        for carrier, (p, _) in carried.items():
            content = records(p)
            self.bytes_down += size(content)
            messages.append(Message(content=content, dst_node_id=self.nodes[carrier],
                                    message_type="train"))
        started = time.perf_counter()
        window = None if self.in_flight is None else self.in_flight.limit(training)
        replies = exchange(self.grid, messages, self.timeout, window=window)
        self.seconds += time.perf_counter() - started
        # by the message answered: Flower's own error replies (node offline) come from the
        # SuperLink, not from the node; the grid gave each message its id when it pushed it
        sent_to = {m.metadata.message_id: c for m, c in zip(messages, carried, strict=True)}
        out: dict[str, Parts | Rejection] = {}
        for reply in replies:
            carrier = sent_to.get(reply.metadata.reply_to_message_id)
            if carrier is None:
                continue  # not an answer to these messages
            members = carried[carrier][1]
            if reply.has_error():
                out.update({c: Rejection(c, f"client failed: {str(reply.error.reason)[:500]}",
                                         "client failed") for c in members})
                continue
            out.update(self._answers(members, reply))
        return out

    def group_fields(self) -> dict[str, str | int]:
        """What a group's worker is told besides the jobs: the engine and its pass size."""
        assert self.grouping is not None
        return {"engine": self.grouping.engine, "chunk_tokens": self.grouping.chunk_tokens}

    def _carried(self, parts: dict[str, Parts]) -> dict[str, tuple[Parts, list[str]]]:
        """What each carrier node is sent, and for which clients."""
        groups = [[c for c in g if c in parts] for g in self.groups]
        grouped = {c for g in groups for c in g}
        out = {c: (p, [c]) for c, p in parts.items() if c not in grouped}
        for group in filter(None, groups):
            out[group[0]] = (bundle({c: parts[c] for c in group}, **self.group_fields()), group)
        return out

    def _answers(self, members: list[str], reply: Message) -> dict[str, Parts | Rejection]:
        """Each member's own reply, its bytes counted. Whatever a reply's content is (records
        of the wrong kind, tensors that do not convert), a failure to read it is its members'
        rejection, never the round's end."""
        try:
            self.bytes_up += size(reply.content)
            parts = unwrap(reply)
            each = unbundle(parts) if len(members) > 1 or GROUP_FIELD in parts.fields else {
                members[0]: parts}
        except Exception as exc:  # the nodes' input alone: their rejection
            why = f"malformed reply ({type(exc).__name__}: {str(exc)[:300]})"
            return {c: Rejection(c, why, "malformed reply") for c in members}
        return {c: each[c] if c in each else Rejection(c, "its group's reply left it out",
                                                        "malformed reply") for c in members}
