"""What a job may make a deployed node read and allocate, set on the node (`fedlr client`),
never by the server.

A job names its data source and its model, and sizes the work (rank, labels, sequence length,
steps, batch). A node that took those from the server would read any file it can (a non-private
job then leaks it through the adapter), download any hub model or dataset, and allocate what a
hostile server asks. So a node trains only on its own `--data` file, or on the built-in task,
or on a source it allows (`--allow-data`); loads only the presets or a model it allows
(`--allow-model`); and refuses a job past its size limits, before it loads or reads anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedlr.data.sources import BUILTIN
from fedlr.errors import ConfigError, NodeLimitError
from fedlr.models.sources import PRESETS
from fedlr.settings.specs import ModelSpec
from fedlr.wire import Job

SEPARATOR = os.pathsep  # between the entries of an allow-list in Flower's node config
MARK = "job-policy"  # present in the node config of every node `fedlr client` started


def same_source(name: str, allowed: str) -> bool:
    """One name: equal as given (a hub name, a preset) or as the same file or folder."""
    if name == allowed:
        return True
    path, other = Path(name).expanduser(), Path(allowed).expanduser()
    return path.exists() and other.exists() and path.resolve() == other.resolve()


@dataclass(frozen=True)
class NodePolicy:
    """Allow-lists and size limits of one node; every limit is a positive integer."""

    data: tuple[str, ...] = ()  # sources beyond the node's own --data and the built-in task
    models: tuple[str, ...] = ()  # models beyond the presets
    max_rank: int = 64
    max_labels: int = 1000
    max_length: int = 2048
    max_local_steps: int = 10_000
    max_batch_size: int = 256

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("max_") and (isinstance(value, bool) or not isinstance(
                    value, int) or value < 1):
                raise ConfigError(f"--{f.name.replace('_', '-')} must be a positive integer, "
                                  f"got {value!r}")
        for entry in (*self.data, *self.models):
            if not entry or SEPARATOR in entry or '"' in entry or "\\" in entry or (
                    not entry.isprintable()):
                raise ConfigError(f"--allow-data/--allow-model entry {entry!r} is empty or has "
                                  f"{SEPARATOR!r}, a quote, backslash or control character; "
                                  "choose another path")

    def check_model(self, model: ModelSpec, who: str) -> None:
        """Before the model is loaded (a preload too): a preset or an allowed model, within the
        label and length limits."""
        if model.name not in PRESETS and not any(same_source(model.name, m)
                                                 for m in self.models):
            raise NodeLimitError(
                f"node {who} refuses model {model.name[:200]!r}: not a preset {PRESETS} and not "
                "allowed on this node; its operator can allow it with `fedlr client "
                "--allow-model NAME`")
        self._at_most(who, "labels", model.num_labels, self.max_labels, "--max-labels")
        self._at_most(who, "model max_length", model.max_length, self.max_length,
                      "--max-length")

    def check_job(self, job: Job, local_data: str | None, who: str) -> None:
        """Before any work: the job's model, data source and sizes."""
        model, data, train = job.model_spec(), job.data_spec(), job.train_config()
        self.check_model(model, who)
        if local_data is None and data.source != BUILTIN and not any(
                same_source(data.source, d) for d in self.data):
            raise NodeLimitError(
                f"node {who} refuses data source {data.source[:200]!r}: it trains only on its "
                f"own --data file, the built-in task {BUILTIN!r} or a source its operator "
                "allows with `fedlr client --allow-data SOURCE`")
        self._at_most(who, "rank", job.rank, self.max_rank, "--max-rank")
        self._at_most(who, "labels", len(job.labels), self.max_labels, "--max-labels")
        for what, value in (("data max_length", data.max_length),
                            ("max_length", train.max_length)):
            self._at_most(who, what, value, self.max_length, "--max-length")
        self._at_most(who, "local_steps", train.local_steps, self.max_local_steps,
                      "--max-local-steps")
        for what, value in (("batch_size", train.batch_size),
                            ("eval_batch_size", train.eval_batch_size)):
            self._at_most(who, what, value, self.max_batch_size, "--max-batch-size")

    @staticmethod
    def _at_most(who: str, what: str, value: int, limit: int, option: str) -> None:
        if value > limit:
            raise NodeLimitError(f"node {who} refuses {what} {value}: above its {option} "
                                 f"{limit}")

    def node_config(self) -> dict[str, str | int]:
        """The policy as Flower node-config entries (what `from_node_config` reads)."""
        entries: dict[str, str | int] = {MARK: 1}
        for f in fields(self):
            value = getattr(self, f.name)
            key = f"allow-{f.name}" if f.name in ("data", "models") else f.name.replace("_", "-")
            entries[key] = SEPARATOR.join(value) if isinstance(value, tuple) else value
        return entries

    @classmethod
    def from_node_config(cls, node: dict[str, Any]) -> NodePolicy | None:
        """The policy `fedlr client` put into Flower's node config; None for a node it did not
        start (a simulation's virtual node: the run's own machine)."""
        if MARK not in node:
            return None
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f"allow-{f.name}" if f.name in ("data", "models") else f.name.replace("_", "-")
            if key not in node:
                continue
            raw = node[key]
            values[f.name] = (tuple(e for e in str(raw).split(SEPARATOR) if e)
                              if f.name in ("data", "models") else int(raw))
        return cls(**values)
