"""Checks a client update must pass before it is aggregated.

A malformed, non-finite or oversized update is rejected with a reason a person can act on; the
round then goes on with the others (`fedlr.lora.rounds.aggregate_round`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlr.adapters import Adapter
from fedlr.errors import ConfigError
from fedlr.lora.lowrank import difference_norm, frobenius_norm
from fedlr.lora.strategies.base import ClientUpdate, Strategy


@dataclass(frozen=True)
class ValidationPolicy:
    """`max_update_norm`: bound on ||dW_k - dW_start||_F over all modules and trainable extras
    (None: no bound). `min_valid_updates`: fewer valid updates than this fail the round (0:
    never, as client-level DP needs: its rounds are released whoever took part)."""

    max_update_norm: float | None = None
    min_valid_updates: int = 1

    def __post_init__(self) -> None:
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ConfigError(f"max_update_norm must be > 0, got {self.max_update_norm}")
        if self.min_valid_updates < 0:
            raise ConfigError(f"min_valid_updates must be >= 0, got {self.min_valid_updates}")


def _shape(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def _structure_problem(update: ClientUpdate, strategy: Strategy) -> str | None:
    spec = strategy.spec
    if update.client_id not in spec.ranks:
        return f"client {update.client_id!r} has no rank assignment in this federation"
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        return f"num_examples must be a positive integer, got {n!r}"
    lora = update.adapter.lora
    unknown = sorted(set(lora) - set(spec.modules))
    if unknown:
        return f"unknown modules {unknown[:3]} (not among the federation's LoRA target modules)"
    missing = sorted(set(spec.modules) - set(lora))
    if missing:
        return f"missing modules {missing[:3]} (every target module must be sent)"
    assigned = spec.ranks[update.client_id]
    for name, f in lora.items():
        shape = spec.modules[name]
        r = f.A.shape[0] if f.A.ndim == 2 else -1
        if (
            f.A.ndim != 2
            or f.B.ndim != 2
            or f.A.shape[1] != shape.d_in
            or f.B.shape != (shape.d_out, r)
        ):
            return (
                f"wrong shape in {name}: A {_shape(f.A)}, B {_shape(f.B)}; expected A r x "
                f"{shape.d_in} and B {shape.d_out} x r"
            )
        if r > assigned:
            return f"{name} has rank {r}, above the client's assigned rank {assigned}"
        if not (math.isfinite(f.scaling) and f.scaling > 0):
            return f"{name} has LoRA scaling {f.scaling!r}; it must be a positive number"
    if strategy.head == "train":
        extras, expected = update.adapter.extras, spec.extras
        if set(extras) != set(expected):
            return (
                f"trainable tensors outside LoRA {sorted(extras)} differ from the federation's "
                f"{sorted(expected)}"
            )
        for name, t in extras.items():
            if tuple(t.shape) != tuple(expected[name]):
                return f"wrong shape in {name}: {_shape(t)}, expected {tuple(expected[name])}"
    return None


def non_finite(adapter: Adapter) -> str | None:
    for key, t in adapter.tensors().items():
        if not torch.is_floating_point(t):
            return f"{key} has dtype {t.dtype}; LoRA tensors must be floating point"
        if not bool(torch.isfinite(t).all()):
            return f"non-finite values (NaN or Inf) in {key.replace('::', ' of ')}"
    return None


def update_norm(update: ClientUpdate, start: Adapter) -> float:
    """||dW_k - dW_start||_F over every module, plus the change of trainable extras."""
    total = 0.0
    for name, f in update.adapter.lora.items():
        x = f.effective()
        base = start.lora.get(name)
        total += (difference_norm(x, base.effective()) if base else frobenius_norm(x)) ** 2
    for name, t in update.adapter.extras.items():
        ref = start.extras.get(name)
        total += float(torch.linalg.vector_norm(t - ref if ref is not None else t)) ** 2
    return math.sqrt(total)


def validate_update(
    update: ClientUpdate, strategy: Strategy, start: Adapter, policy: ValidationPolicy
) -> str | None:
    """The reason to reject `update`, or None. `start` is what the client was sent this round."""
    problem = _structure_problem(update, strategy) or non_finite(update.adapter)
    if problem:
        return problem
    if not strategy.trains_a:
        for name, f in update.adapter.lora.items():
            sent = start.lora[name].A
            if f.A.shape != sent.shape or not torch.equal(f.A, sent):
                return f"A of {name} differs from the one sent, but {strategy.name} freezes A"
    if policy.max_update_norm is not None:
        norm = update_norm(update, start)
        if norm > policy.max_update_norm:
            return f"update norm {norm:.4g} exceeds max_update_norm {policy.max_update_norm:.4g}"
    return None
