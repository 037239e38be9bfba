"""What a client masks: its part of a strategy's weighted sum, as fixed-point integers.

Masks cancel only in modular arithmetic, so every client encodes its part as integers modulo
M = 2^bits: each value x, clipped to [-c, c], becomes round(x / step) with stochastic rounding
(unbiased, error < step), and the step is chosen so that the sum of `clients` parts cannot wrap
(clients * c / step < M / 2). The server decodes the sum alone.

A part has three sections, each its own scale: the values (the strategy's tensors, already
weighted), the weights (the client's FedAvg weight, and per rank component where the strategy
averages each component over the clients holding it) and one exact count of clipped values.
The weight is w_k = min(n_k, max_weight) / max_weight: it multiplies the values in floating
point, and its sum travels exactly, as the integer sum of min(n_k, max_weight) (Flower's SecAgg+
caps weights the same way). Under client-level DP a part is the client's clipped change from its
start, unweighted, and c is the clip norm, so nothing is ever clipped twice.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from fedlr.adapters import Adapter
from fedlr.errors import ConfigError
from fedlr.lora.strategies.base import ClientUpdate
from fedlr.lora.sums import SecureSum, SumSpec
from fedlr.lora.validation import non_finite, update_norm
from fedlr.privacy.client_level import clip, padded_tensors
from fedlr.privacy.secagg.settings import check_budget, levels


@dataclass(frozen=True)
class Encoding:
    """A round's encoding, sent to every client before it trains."""

    spec: SumSpec
    value_range: float
    max_weight: int
    bits: int
    clients: int
    max_update_norm: float | None = None
    lengths: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        check_budget(self.bits, self.clients, self.max_weight)
        if not (math.isfinite(self.value_range) and self.value_range > 0):
            raise ConfigError(f"secagg_clip must be a positive number, got {self.value_range}")
        sizes = tuple(math.prod(s) for s in self.spec.shapes.values())
        object.__setattr__(self, "lengths", sizes)

    @property
    def levels(self) -> int:
        return levels(self.bits, self.clients)

    @property
    def step(self) -> float:
        return self.value_range / self.levels

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32 if self.bits == 32 else np.uint64)

    @property
    def size(self) -> int:
        """Integers in one client's part: values, weight, component weights, clipped count."""
        return sum(self.lengths) + 1 + (self.spec.rank if self.spec.components else 0) + 1

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("lengths")
        data["spec"]["shapes"] = {k: list(v) for k, v in self.spec.shapes.items()}
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Encoding:
        data = json.loads(text)
        spec = data.pop("spec")
        spec["shapes"] = {k: tuple(v) for k, v in spec["shapes"].items()}
        return cls(spec=SumSpec(**spec), **data)


def _fixed(values: np.ndarray, step: float, rng: np.random.Generator) -> np.ndarray:
    """Stochastic rounding to the grid: floor(x / step + U), unbiased, error < step."""
    return np.floor(values / step + rng.random(values.shape)).astype(np.int64)


def encode(encoding: Encoding, update: ClientUpdate, start: Adapter,
           rng: np.random.Generator) -> np.ndarray:
    """The client's part as unsigned integers mod 2^bits; raises ValueError naming what makes the
    update unfit to send (the server cannot check it once it is masked)."""
    spec = encoding.spec
    problem = non_finite(update.adapter)
    if problem:
        raise ValueError(problem)
    bound = encoding.max_update_norm
    if bound is not None and (norm := update_norm(update, start)) > bound:
        raise ValueError(f"update norm {norm:.4g} exceeds max_update_norm {bound:.4g}")
    mine = padded_tensors(update.adapter, spec.shapes)
    if spec.clip_norm is not None:  # client-level DP: the clipped change, equal weights
        ref = padded_tensors(start, spec.shapes)
        tensors, _, _ = clip({k: mine[k] - ref[k] for k in spec.shapes}, spec.clip_norm,
                             update.client_id)
        units = encoding.max_weight
    else:
        units = min(update.num_examples, encoding.max_weight)
        tensors = {k: t * (units / encoding.max_weight) for k, t in mine.items()}
    flat = (np.concatenate([t.detach().double().cpu().numpy().ravel() for t in tensors.values()])
            if tensors else np.zeros(0))
    c = encoding.value_range
    clipped = int(np.count_nonzero(np.abs(flat) > c))
    values = _fixed(np.clip(flat, -c, c), encoding.step, rng)
    weights = [units]
    if spec.components:
        rank = max((f.rank for f in update.adapter.lora.values()), default=0)
        weights += [units if j < rank else 0 for j in range(spec.rank)]
    part = np.concatenate([values, np.asarray(weights, np.int64), np.asarray([clipped])])
    return part.astype(encoding.dtype)  # two's complement: -x becomes M - x


def decode(encoding: Encoding, total: np.ndarray, clients: int,
           dtype: torch.dtype = torch.float32) -> SecureSum:
    """The unmasked sum of `clients` parts, back in floating point."""
    signed = total.astype(np.int32 if encoding.bits == 32 else np.int64).astype(np.float64)
    n_values = sum(encoding.lengths)
    values, rest = signed[:n_values] * encoding.step, signed[n_values:]
    tensors, offset = {}, 0
    for (key, shape), size in zip(encoding.spec.shapes.items(), encoding.lengths, strict=True):
        tensors[key] = torch.from_numpy(values[offset:offset + size].reshape(shape)).to(dtype)
        offset += size
    weight = float(rest[0]) / encoding.max_weight
    components = None
    if encoding.spec.components:
        components = torch.from_numpy(rest[1:1 + encoding.spec.rank] / encoding.max_weight
                                      ).to(dtype)
    return SecureSum(tensors, weight, components, clients, int(rest[-1]),
                     value_error=clients * encoding.step)
