"""The run directory: a stable contract between a run and whoever reads it afterwards.

    run.json                         resolved config, package versions, seed
    metrics.jsonl                    one JSON object per round
    privacy.json                     DP accounting: per client (sample level), client level
    rounds/NNNN/global.safetensors   the global adapter after round NNNN (flora: that round's
                                     exact stacked update); clients/<id>.safetensors on request
    adapter/                         the final adapter in PEFT format
    checkpoint/                      state after the last completed round, for --resume
    nodes/<id>/ledger.json           fedlr simulate: each simulated node's own privacy ledger
                                     (a deployed node keeps it on its own disk)
    data/shards.safetensors          fedlr simulate: every client's tokenised shard, which the
                                     workers read (`fedlr.data.packed`)
    timeline.json                    fedlr simulate: when each phase ran, start-up to report
                                     (`fedlr.server.timeline`)

Every file is written atomically, run.json first, and a round writes its checkpoint last (its JSON
names its tensors), so a run killed at any instant resumes: from the last checkpointed round, or
from the start when none was written; what a killed round left behind is discarded.
"""

from __future__ import annotations

import json
import platform
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from fedlr.adapters import Adapter, save_adapter
from fedlr.atomic import atomic_write, write_json
from fedlr.errors import ConfigError
from fedlr.run_metrics import METRICS_FILE, read_metrics

PACKAGES = ("fedlr", "torch", "flwr", "opacus", "peft", "transformers", "dp-accounting")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


class RunDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def checkpoint_json(self) -> Path:
        return self.root / "checkpoint" / "checkpoint.json"

    @property
    def nodes(self) -> Path:
        return self.root / "nodes"

    @property
    def shards(self) -> Path:
        return self.root / "data" / "shards.safetensors"

    @property
    def timeline(self) -> Path:
        return self.root / "timeline.json"

    @property
    def started(self) -> bool:
        return (self.root / "run.json").is_file()

    def prepare(self, resume: bool) -> None:
        """Refuse to overwrite a run; refuse to resume a directory that does not exist."""
        if resume:
            if not self.root.is_dir():
                raise ConfigError(f"nothing to resume: {self.root} does not exist; start the run "
                                  "without --resume")
            return
        if self.root.exists() and (not self.root.is_dir() or any(self.root.iterdir())):
            raise ConfigError(
                f"run directory {self.root} already exists; pass --resume to continue it or "
                "choose another --out"
            )

    def write_run_json(self, config: dict[str, Any], extra: dict[str, Any]) -> None:
        write_json(self.root / "run.json", {"config": config, "versions": package_versions(),
                                            "seed": config.get("seed"), **extra})

    def round_dir(self, round_: int) -> Path:
        return self.root / "rounds" / f"{round_:04d}"

    def save_global(self, round_: int, adapter: Adapter) -> None:
        save_adapter(adapter, self.round_dir(round_) / "global.safetensors")

    def save_client(self, round_: int, client_id: str, adapter: Adapter) -> None:
        save_adapter(adapter, self.round_dir(round_) / "clients" / f"{client_id}.safetensors")

    # -- metrics ---------------------------------------------------------------------------

    def append_metrics(self, record: dict[str, Any]) -> None:
        path = self.root / METRICS_FILE
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        lines.append(json.dumps(record, sort_keys=True) + "\n")
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(lines)))

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.root / METRICS_FILE)

    def discard_after(self, last_round: int) -> None:
        """Drop what a round after the checkpoint left (a run killed before that round's
        checkpoint): its metrics line and its rounds/ folder; it runs again."""
        kept = [r for r in self.read_metrics() if r["round"] <= last_round]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        atomic_write(self.root / METRICS_FILE, lambda tmp: Path(tmp).write_text(text))
        for folder in sorted((self.root / "rounds").glob("[0-9]*")):
            if folder.is_dir() and int(folder.name) > last_round:
                shutil.rmtree(folder)

    # -- checkpoint ------------------------------------------------------------------------

    def save_checkpoint(
        self, round_: int, tensors: dict[str, Tensor], info: dict[str, Any]
    ) -> None:
        folder = self.root / "checkpoint"
        name = f"state-{round_:04d}.safetensors"
        flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        atomic_write(folder / name, lambda tmp: save_file(flat, tmp))
        write_json(self.checkpoint_json, {**info, "round": round_, "tensors": name})
        for old in folder.glob("state-*.safetensors"):
            if old.name != name:
                old.unlink()

    def load_checkpoint(self) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """The last checkpoint, or None when the run was killed before its first."""
        if not self.checkpoint_json.is_file():
            return None
        info = json.loads(self.checkpoint_json.read_text())
        with safe_open(str(self.checkpoint_json.parent / info["tensors"]), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        return tensors, info
