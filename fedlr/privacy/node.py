"""A node's own privacy: its ledger on its own disk and limits it enforces, whatever the server
sends.

Sample-level DP protects a client's examples from the server, so the server cannot be the one
that keeps count. A node keeps its ledger in its state directory, written atomically after every
round and before its reply leaves; it merges that ledger with the one the server sends by keeping
the longer history (a shorter or different one from the server is logged and ignored); it checks
every job against limits set on the node itself; and it reports its own ledger back. One state
directory holds one ledger for the node's data across every run it trains in.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedlr.atomic import atomic_write
from fedlr.errors import ConfigError, NodeLimitError
from fedlr.privacy.sample_level import PrivacyLedger, Segment
from fedlr.settings.specs import DPConfig

log = logging.getLogger("fedlr")
LEDGER_FILE = "ledger.json"
FORMAT = 1
# `fedlr simulate` gives each simulated node the folder $FEDLR_SIMULATED_NODES/<partition id>
SIMULATED_NODES_ENV = "FEDLR_SIMULATED_NODES"


def default_state_dir(partition_id: int) -> Path:
    """Where `fedlr client` keeps a node's state unless told otherwise: the user's data dir."""
    root = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return root / "fedlr" / f"node-{partition_id}"


@dataclass(frozen=True)
class NodeLimits:
    """Limits set on the node, never by the server. `max_epsilon` is checked at the node's own
    `delta` (a server cannot loosen it by sending a larger delta). With `max_epsilon` or
    `min_noise_multiplier` set, a job without DP-SGD is refused."""

    max_epsilon: float | None = None
    delta: float = 1e-5
    min_noise_multiplier: float | None = None
    max_clip_norm: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_epsilon", "min_noise_multiplier", "max_clip_norm"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, "
                                  f"got {value!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"--budget-delta must be in (0, 1), got {self.delta!r}")

    @property
    def requires_dp(self) -> bool:
        return self.max_epsilon is not None or self.min_noise_multiplier is not None

    def check_job(self, dp: DPConfig | None, who: str) -> None:
        """Before any work: refuse a job whose settings break a limit."""
        if dp is None:
            if self.requires_dp:
                raise NodeLimitError(
                    f"node {who} refuses a job without DP-SGD: it sets --max-epsilon or "
                    "--min-noise-multiplier, so it only trains with differential privacy")
            return
        if self.max_clip_norm is not None and dp.max_grad_norm > self.max_clip_norm:
            raise NodeLimitError(
                f"node {who} refuses max_grad_norm {dp.max_grad_norm:g}: above its "
                f"--max-clip-norm {self.max_clip_norm:g}")

    def check_round(self, noise_multiplier: float, segment: Segment, ledger: PrivacyLedger,
                    who: str) -> None:
        """Before the first step of a round: the noise it would use, and the epsilon after it at
        the node's own delta."""
        if self.min_noise_multiplier is not None and noise_multiplier < self.min_noise_multiplier:
            raise NodeLimitError(
                f"node {who} refuses noise multiplier {noise_multiplier:.4g}: below its "
                f"--min-noise-multiplier {self.min_noise_multiplier:g}")
        if self.max_epsilon is None:
            return
        after = ledger.epsilon_after(segment, self.delta)
        if after > self.max_epsilon * (1 + 1e-9):
            raise NodeLimitError(
                f"node {who} refuses another round of {segment[2]} steps: its epsilon would go "
                f"from {ledger.epsilon(self.delta):.3f} to {after:.3f} at delta {self.delta:g}, "
                f"past its --max-epsilon {self.max_epsilon:g}")

    @classmethod
    def from_node_config(cls, node: dict[str, Any]) -> NodeLimits:
        """The limits `fedlr client` put into Flower's node config."""
        def number(key: str) -> float | None:
            value = node.get(key)
            return None if value in (None, "") else float(value)

        return cls(max_epsilon=number("max-epsilon"), delta=number("budget-delta") or 1e-5,
                   min_noise_multiplier=number("min-noise-multiplier"),
                   max_clip_norm=number("max-clip-norm"))

    def node_config(self) -> dict[str, float]:
        """The limits as Flower node-config entries (what `from_node_config` reads)."""
        entries = {"max-epsilon": self.max_epsilon, "budget-delta": self.delta,
                   "min-noise-multiplier": self.min_noise_multiplier,
                   "max-clip-norm": self.max_clip_norm}
        return {k: v for k, v in entries.items() if v is not None}


@dataclass(frozen=True)
class NodeState:
    """The node's ledger in `folder/ledger.json`. Without a folder (a simulation started by
    `flwr run`), the node has only what the server sends."""

    folder: Path | None

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / LEDGER_FILE

    def load(self) -> PrivacyLedger | None:
        """The persisted ledger, None if this node never trained with DP; a file that cannot be
        read is an error, never a silent reset."""
        path = self.path
        if path is None or not path.exists():
            return None
        fix = ("restore it from a backup; deleting it would reset this node's privacy ledger, "
               "so do that only knowingly")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"node state {path} is unreadable ({exc}); {fix}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(
                data.get("ledger"), dict):
            raise ConfigError(f"node state {path} is not a fedlr node ledger (format {FORMAT}); "
                              f"{fix}")
        try:
            return PrivacyLedger.from_dict(data["ledger"])
        except ConfigError as exc:
            raise ConfigError(f"node state {path}: {exc}; {fix}") from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """This node's ledger held exclusively (`flock` on a lock file beside the state dir)
        from its load to its save: two processes on one state dir (two runs, a ClientApp beside
        the warm trainer) would otherwise both train from the same ledger, and a round be lost."""
        if self.folder is None:
            yield
            return
        # beside the folder, not in it: a job refused before training leaves no state behind
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        with open(self.folder.parent / f".{self.folder.name}.lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def save(self, ledger: PrivacyLedger) -> None:
        path = self.path
        if path is None:
            return
        text = json.dumps({"format": FORMAT, "ledger": ledger.to_dict()}, indent=2) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def ledger(self, sent: dict[str, Any] | None, accountant: str, who: str) -> PrivacyLedger:
        """The ledger to train with: the node's own, or the server's where it is a longer
        history that extends the node's (the node lost state the server still has)."""
        own = self.load()
        theirs = PrivacyLedger.from_dict(sent) if sent else None
        if own is None:
            return theirs or PrivacyLedger(accountant=accountant)
        if theirs is None or (own.extends(theirs) and theirs.extends(own)):
            return own  # the usual case: the server sent back what this node reported
        if theirs.steps > own.steps and theirs.extends(own):
            log.warning("client %s: the server's ledger extends this node's (%d > %d steps); "
                        "keeping its steps, counted by this node's accountant", who,
                        theirs.steps, own.steps)
            # evidence of steps only: how they are counted stays the node's own
            return replace(theirs, accountant=own.accountant)
        log.warning("client %s: ignoring the server's ledger (%d steps), which is shorter than "
                    "or differs from this node's own (%d steps)", who, theirs.steps, own.steps)
        return own
