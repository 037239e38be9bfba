"""Where a run's wall time goes outside its rounds: the spans of `fedlr simulate`'s phases,
written to `timeline.json` in the run directory.

The rounds time their own parts (`metrics.jsonl`); what they do not see is the process's start-up,
building the federation, starting Ray, Flower and the workers, and shutting down: a fixed cost
that decides how fast a short run is. Some phases run at the same time (Ray starts and the nodes
load their model while the federation is built), so spans may overlap.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedlr.atomic import write_json

# The phases of `fedlr simulate`, with what each covers (README, benchmarks/peer.py).
PHASES = {
    "start-up": "interpreter and imports, from the process's start to the simulation's entry",
    "ray": "Ray's start (in the background; meanwhile Flower's engine is imported)",
    "federation": "data, model and round-0 evaluation; shards packed for the workers "
                  "(in the background)",
    "flower": "Flower's simulation engine started, up to the ServerApp's entry",
    "nodes": "the workers started and identified, each with the run's model loaded",
    "federation wait": "the nodes ready, the federation not yet",
    "rounds": "the rounds (timed in metrics.jsonl)",
    "export": "the final adapter exported",
    "flower shutdown": "Flower's engine stopped",
    "ray shutdown": "Ray stopped",
    "report": "plot and report",
}


def process_start() -> float:
    """When this process started (epoch seconds). On Linux from its start in clock ticks since
    boot: psutil adds those to a boot time rounded to the second, up to a second off."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        since_boot = int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)
    except (OSError, AttributeError, ValueError, IndexError):  # not Linux
        import psutil

        return psutil.Process().create_time()


class Timeline:
    def __init__(self) -> None:
        self.start = process_start()
        self.spans: dict[str, tuple[float, float]] = {}

    def add(self, name: str, start: float, end: float | None = None) -> None:
        """The phase `name` ran from `start` (epoch seconds) to `end` (now by default)."""
        self.spans[name] = (start, time.time() if end is None else end)

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = time.time()
        yield
        self.add(name, start)

    def seconds(self) -> dict[str, float]:
        return {name: end - start for name, (start, end) in self.spans.items()}

    def outside_rounds(self) -> str:
        """One line for the report: every phase so far but the rounds, in seconds."""
        parts = [f"{name} {seconds:.1f}" for name, seconds in self.seconds().items()
                 if name != "rounds"]
        return "seconds outside the rounds (some overlap): " + ", ".join(parts)

    def write(self, path: Path) -> None:
        write_json(path, {
            "process_start": self.start,
            "spans": {name: {"start": start - self.start, "end": end - self.start,
                             "seconds": end - start, "about": PHASES.get(name, "")}
                      for name, (start, end) in self.spans.items()},
        })
