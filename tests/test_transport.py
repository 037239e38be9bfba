"""`exchange`: Flower's send-and-receive contract (push, then pull until every reply is in or the
timeout passes), with replies noticed within POLL_MAX_SECONDS instead of Flower's fixed 0.1 s
(simulation) or 3 s (deployment). Played on a scripted grid and a fake clock: no test waits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlr.server.transport import (
    IN_FLIGHT_PER_WORKER,
    POLL_FIRST_SECONDS,
    POLL_MAX_SECONDS,
    SCAN_BUDGET,
    InFlight,
    exchange,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


class ScriptedGrid:
    """Message i is answered `arrivals[i]` seconds after it is pushed (None: never)."""

    def __init__(self, arrivals: list[float | None], clock: Clock) -> None:
        self.arrivals, self.clock = arrivals, clock
        self.pulls: list[float] = []
        self.pushed: dict[str, tuple[int, float]] = {}  # id -> (message index, when)
        self.delivered: set[str] = set()
        self.most_in_flight = 0

    def push_messages(self, messages):
        ids = []
        for message in messages:
            ids.append(f"m{message}")
            self.pushed[ids[-1]] = (message, self.clock.now)
        self.most_in_flight = max(self.most_in_flight, len(self.pushed) - len(self.delivered))
        return ids

    def pull_messages(self, ids):
        self.pulls.append(self.clock.now)
        ready = [m for m in ids if m in self.pushed and m not in self.delivered
                 and (t := self.arrivals[self.pushed[m][0]]) is not None
                 and self.pushed[m][1] + t <= self.clock.now]
        self.delivered.update(ready)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=m)) for m in ready]


def run(arrivals: list[float | None], timeout: float | None, window: int | None = None
        ) -> tuple[list[str], ScriptedGrid, Clock]:
    clock = Clock()
    grid = ScriptedGrid(arrivals, clock)
    replies = exchange(grid, range(len(arrivals)), timeout, sleep=clock.sleep, clock=clock,
                       window=window)
    return sorted(r.metadata.reply_to_message_id for r in replies), grid, clock


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 30.0), min_size=1, max_size=20))
def test_every_reply_is_collected_and_the_last_is_noticed_within_the_poll_cap(arrivals):
    replies, grid, clock = run(arrivals, timeout=None)
    assert replies == sorted(f"m{i}" for i in range(len(arrivals)))
    last = max(arrivals)
    assert last <= grid.pulls[-1] <= last + POLL_MAX_SECONDS + 1e-9
    assert clock.now == grid.pulls[-1]  # no sleep after the last reply


def test_pulls_back_off_from_the_first_interval_to_the_cap():
    _, _, clock = run([1.0], timeout=None)
    assert clock.sleeps[0] == POLL_FIRST_SECONDS
    assert all(b == min(POLL_MAX_SECONDS, 2 * a) for a, b in zip(clock.sleeps, clock.sleeps[1:],
                                                                 strict=False))
    assert max(clock.sleeps) == POLL_MAX_SECONDS


@pytest.mark.parametrize("timeout", [0.0, 0.5, 2.0])
def test_the_timeout_returns_what_arrived_and_never_waits_past_it(timeout):
    replies, grid, clock = run([0.1, None, 1.0], timeout=timeout)
    assert replies == [m for m, t in (("m0", 0.1), ("m2", 1.0)) if t <= timeout]
    assert clock.now == pytest.approx(timeout)
    assert grid.pulls[-1] == pytest.approx(timeout)  # one last look at the deadline


def test_no_message_pulls_nothing():
    replies, grid, clock = run([], timeout=None)
    assert replies == [] and grid.pulls == [] and clock.sleeps == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 5.0), min_size=1, max_size=30), st.integers(1, 8))
def test_a_window_keeps_at_most_that_many_in_flight_and_pushes_every_message_in_order(
        arrivals, window):
    replies, grid, _ = run(arrivals, timeout=None, window=window)
    assert replies == sorted(f"m{i}" for i in range(len(arrivals)))
    assert grid.most_in_flight == min(window, len(arrivals))
    pushed_order = sorted(grid.pushed.values(), key=lambda p: (p[1], p[0]))
    assert [i for i, _ in pushed_order] == list(range(len(arrivals)))


def test_a_window_refills_as_replies_come_not_after_the_whole_wave():
    # two slots: message 0 is slow, 1 and 2 quick; 2 goes out once 1 is answered, while 0 is
    # still out, so everything is in at about 3 s, not 3 + 0.1 + 0.1
    replies, grid, clock = run([3.0, 0.1, 0.1], timeout=None, window=2)
    assert replies == ["m0", "m1", "m2"]
    assert grid.pushed["m2"][1] <= 0.1 + POLL_MAX_SECONDS + 1e-9
    assert clock.now <= 3.0 + POLL_MAX_SECONDS + 1e-9


def test_the_timeout_also_bounds_a_window_and_messages_never_pushed_get_no_reply():
    replies, grid, clock = run([None, None, 0.1], timeout=1.0, window=2)
    assert replies == [] and "m2" not in grid.pushed
    assert clock.now == pytest.approx(1.0)


@given(st.integers(1, 64), st.integers(1, 100_000))
def test_a_simulation_trains_a_few_per_worker_and_sends_short_stages_at_once_unless_huge(
        workers, nodes):
    in_flight = InFlight(workers, nodes)
    busy = IN_FLIGHT_PER_WORKER * workers
    assert in_flight.limit(training=True) == busy  # however many nodes
    short = in_flight.limit(training=False)
    assert short >= busy  # never starves the workers
    # every node's message at once while a look of Flower's engine stays within the budget
    assert (short >= nodes) == (nodes * nodes <= SCAN_BUDGET or busy >= nodes)
    assert short == busy or short * nodes <= SCAN_BUDGET


def test_nothing_more_is_pushed_once_the_deadline_has_passed():
    # one slot; message 0 is answered exactly at the deadline: message 1 would train for a
    # reply that nobody waits for (and spend its node's privacy budget), so it stays unsent
    replies, grid, clock = run([1.0, 0.1], timeout=1.0, window=1)
    assert replies == ["m0"] and "m1" not in grid.pushed
    assert clock.now == pytest.approx(1.0)
