"""What travels between server and client, Flower-free: a training job and adapter tensors.

The server's message to a client carries its downlink adapter as flat tensors and one JSON job:
who it is, the round, its rank, what to train, how (model, data, training and DP settings) and,
under DP, its privacy ledger so far. The client needs nothing else, so the same ClientApp serves a
simulation and a deployment.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from fedlr.adapters import Adapter
from fedlr.config import DataSpec, DPConfig, ModelSpec, TrainConfig


@dataclass
class Job:
    client_id: str
    round: int
    rank: int
    train_a: bool
    train_head: bool
    seed: int
    alpha: float
    model: dict[str, Any]
    data: dict[str, Any]
    train: dict[str, Any]
    dp: dict[str, Any] | None = None
    ledger: dict[str, Any] | None = None
    scalings: dict[str, float] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)  # the run's class names, in id order

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Job:
        return cls(**json.loads(text))

    def model_spec(self) -> ModelSpec:
        return ModelSpec(**{**self.model, "targets": tuple(self.model["targets"] or ()) or None})

    def data_spec(self) -> DataSpec:
        return DataSpec(**self.data)

    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.train, dp=DPConfig(**self.dp) if self.dp else None)


def job_settings(train: TrainConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(train settings without DP, DP settings) as JSON-able dicts."""
    settings = asdict(train)
    dp = settings.pop("dp")
    return settings, dp


def adapter_payload(adapter: Adapter) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Flat tensors and LoRA scalings of an adapter, for a message."""
    return adapter.tensors(), {name: f.scaling for name, f in adapter.lora.items()}

