"""`exchange`: Flower's send-and-receive contract (push, then pull until every reply is in or the
timeout passes), with replies noticed within POLL_MAX_SECONDS instead of Flower's fixed 0.1 s
(simulation) or 3 s (deployment). Played on a scripted grid and a fake clock: no test waits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlr.server.transport import POLL_FIRST_SECONDS, POLL_MAX_SECONDS, exchange


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
    """Message i is answered `arrivals[i]` seconds after the push (None: never)."""

    def __init__(self, arrivals: list[float | None], clock: Clock) -> None:
        self.arrivals, self.clock = arrivals, clock
        self.pulls: list[float] = []
        self.delivered: set[str] = set()

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls.append(self.clock.now)
        ready = [f"m{i}" for i, t in enumerate(self.arrivals)
                 if t is not None and t <= self.clock.now and f"m{i}" in set(ids)
                 and f"m{i}" not in self.delivered]
        self.delivered.update(ready)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=m)) for m in ready]


def run(arrivals: list[float | None], timeout: float | None) -> tuple[list[str], ScriptedGrid,
                                                                       Clock]:
    clock = Clock()
    grid = ScriptedGrid(arrivals, clock)
    replies = exchange(grid, [object()] * len(arrivals), timeout, sleep=clock.sleep, clock=clock)
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
