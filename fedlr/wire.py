"""The wire format, both directions, owned here and nowhere else, Flower-free.

Down: a `TrainJob`, the client's downlink adapter as flat tensors and one JSON `Job` (who it is,
the round, its rank, what to train, how: model, data, training and DP settings, and under DP the
ledger the server holds for it). The client needs nothing else, so the same ClientApp serves a
simulation and a deployment. Up: a `TrainReply` (the trained factors, B alone where A is frozen,
the example count, metrics, and the node's own ledger) or a `Refusal` with its reason.

Each message becomes `Parts` (tensors and scalar fields) and back; the Flower glue on each side
only wraps Parts in a RecordDict (`fedlr.client.jobs`, `fedlr.server.transport`). A reply that
does not decode raises `WireError`, which the server records as a malformed reply.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedlr.adapters import Adapter, adapter_from_tensors
from fedlr.errors import ConfigError, FedlrError
from fedlr.privacy.sample_level import PrivacyLedger
from fedlr.settings.specs import DataSpec, DPConfig, ModelSpec, TrainConfig
from fedlr.wire_fields import GROUP_FIELD

Scalar = str | int | float | bool | bytes


class WireError(FedlrError):
    """A message that does not decode: a field is missing or has the wrong type."""


@dataclass(frozen=True)
class Parts:
    """A message as any transport carries it: tensors, and scalar fields."""

    arrays: dict[str, Tensor]
    fields: dict[str, Scalar]


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
    labels: list[str] = field(default_factory=list)  # the run's class names, in id order

    def to_json(self) -> str:
        """Its fields are JSON values already: no deep copy (`asdict` took about 60 ms of the
        server's work in a round of 200 clients)."""
        return json.dumps(vars(self))

    @classmethod
    def from_json(cls, text: str) -> Job:
        return cls(**json.loads(text))

    def model_spec(self) -> ModelSpec:
        return spec_from_fields(self.model)

    def data_spec(self) -> DataSpec:
        return DataSpec(**self.data)

    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.train, dp=DPConfig(**self.dp) if self.dp else None)


def spec_from_fields(model: dict[str, Any]) -> ModelSpec:
    return ModelSpec(**{**model, "targets": tuple(model["targets"] or ()) or None})


@dataclass(frozen=True)
class Preload:
    """The model session every job of a run asks for (its spec with the targets the server's host
    resolved, alpha, device): sent when a node is identified, so that the node loads the base
    while the server is still building its own, and its first job finds it in its cache. Jobs
    carry the same fields (`Coordinator.job`)."""

    model: dict[str, Any]
    alpha: float
    device: str

    @classmethod
    def for_run(cls, spec: ModelSpec, targets: list[str], alpha: float, train: TrainConfig
                ) -> Preload:
        return cls({**asdict(spec), "targets": list(targets)}, alpha, train.device)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Preload:
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError) as exc:
            raise WireError(f"a preload that does not decode: {exc}") from exc

    def model_spec(self) -> ModelSpec:
        return spec_from_fields(self.model)


def job_settings(train: TrainConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(train settings without DP, DP settings) as JSON-able dicts."""
    settings = asdict(train)
    dp = settings.pop("dp")
    return settings, dp


def _scalings(adapter: Adapter) -> str:
    """An adapter travels as its tensors and, in this field, each module's LoRA scaling."""
    return json.dumps({name: f.scaling for name, f in adapter.lora.items()})


def _adapter(arrays: dict[str, Tensor], fields: dict[str, Scalar],
             meta: dict[str, Any] | None = None) -> Adapter:
    return adapter_from_tensors(arrays, json.loads(str(fields["scalings"])), meta)


@dataclass(frozen=True)
class TrainJob:
    """Down: what to train (`job`) and the adapter to train from."""

    job: Job
    downlink: Adapter

    def to_parts(self) -> Parts:
        return Parts(self.downlink.tensors(),
                     {"job": self.job.to_json(), "scalings": _scalings(self.downlink)})

    @classmethod
    def from_parts(cls, parts: Parts) -> TrainJob:
        try:
            job = Job.from_json(str(parts.fields["job"]))
            return cls(job, _adapter(parts.arrays, parts.fields))
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"malformed job ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class TrainReply:
    """Up: the trained adapter, its example count and metrics, and the node's own ledger."""

    client_id: str
    adapter: Adapter
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    ledger: PrivacyLedger | None = None

    def to_parts(self, train_a: bool = True) -> Parts:
        """B alone where A was frozen: the server has A already."""
        arrays = self.adapter.tensors()
        if not train_a:
            arrays = {k: t for k, t in arrays.items() if not k.startswith("lora_A::")}
        return Parts(arrays, {
            "kind": "update",
            "client_id": self.client_id,
            "scalings": _scalings(self.adapter),
            "num_examples": self.num_examples,
            "metrics": json.dumps(self.metrics),
            "ledger": json.dumps(self.ledger.to_dict()) if self.ledger is not None else "",
        })


@dataclass(frozen=True)
class Refusal:
    """Up: the node will not train this job (its budget, its limits, its data), and why."""

    client_id: str
    reason: str

    def to_parts(self) -> Parts:
        return Parts({}, {"kind": "refusal", "client_id": self.client_id, "reason": self.reason})


def reply_from_parts(parts: Parts, start: Adapter | None = None) -> TrainReply | Refusal:
    """Decode a client's answer; `start` (the adapter it was sent) fills in a frozen A."""
    fields = parts.fields
    try:
        if fields["kind"] == "refusal":
            return Refusal(str(fields["client_id"]), str(fields["reason"]))
        if fields["kind"] != "update":
            raise ValueError(f"unknown kind {fields['kind']!r}")
        arrays = dict(parts.arrays)
        for name, f in (start.lora.items() if start is not None else ()):
            arrays.setdefault(f"lora_A::{name}", f.A)  # a B-only upload
        client, n = str(fields["client_id"]), int(fields["num_examples"])
        metrics = {k: float(v) for k, v in json.loads(str(fields["metrics"])).items()}
        ledger = (PrivacyLedger.from_dict(json.loads(str(fields["ledger"])))
                  if fields["ledger"] else None)
        adapter = _adapter(arrays, fields, {"client_id": client, "num_examples": n})
    except (KeyError, ValueError, TypeError, AttributeError, ConfigError) as exc:
        raise WireError(f"malformed reply ({type(exc).__name__}: {exc})") from None
    return TrainReply(client, adapter, n, metrics, ledger)


PACKED_FIELD = "packed"  # which tensor of a bundle's packed buffers is whose, in order


def bundle(parts: dict[str, Parts], **fields: Scalar) -> Parts:
    """Several clients' messages as one (a batched group's, in a simulation): each field under
    its client's id, the ids in order in `group`, plus `fields` for the group. The tensors
    travel packed, one flat buffer per dtype, listed in `packed`: a transport encodes a few
    buffers, not one small tensor per client and name (900 for 100 tiny clients)."""
    if any("/" in client for client in parts):
        raise ValueError("client ids in a group must not contain '/'")
    index, flat = [], {}
    for c, p in parts.items():
        for name, t in p.arrays.items():
            dtype = str(t.dtype).removeprefix("torch.")
            index.append([c, name, dtype, list(t.shape)])
            flat.setdefault(dtype, []).append(t.reshape(-1))
    return Parts(
        {f"{PACKED_FIELD}/{dtype}": torch.cat(ts) for dtype, ts in flat.items()},
        {**{f"{c}/{k}": v for c, p in parts.items() for k, v in p.fields.items()},
         **fields, GROUP_FIELD: json.dumps(list(parts)), PACKED_FIELD: json.dumps(index)},
    )


def unbundle(parts: Parts) -> dict[str, Parts]:
    """`bundle` undone: each client's own message, in the group's order (its tensors are views
    of the packed buffers)."""
    try:
        clients = [str(c) for c in json.loads(str(parts.fields[GROUP_FIELD]))]
        out: dict[str, Parts] = {c: Parts({}, {}) for c in clients}
        offsets: dict[str, int] = {}
        for client, name, dtype, shape in json.loads(str(parts.fields.get(PACKED_FIELD, "[]"))):
            buffer = parts.arrays[f"{PACKED_FIELD}/{dtype}"]
            start, size = offsets.get(dtype, 0), math.prod(shape)
            if start + size > buffer.numel():
                raise ValueError(f"{client}'s {name} runs past the packed {dtype} buffer")
            offsets[dtype] = start + size
            if client in out:
                out[client].arrays[name] = buffer[start:start + size].view(shape)
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"malformed group ({type(exc).__name__}: {exc})") from None
    for key, v in parts.fields.items():
        client, _, name = key.partition("/")
        if name and client in out:
            out[client].fields[name] = v
    return out
