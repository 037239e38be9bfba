"""Checks a client update must pass before it is aggregated.

Everything in a reply is the client's claim, so nothing it carries decides how it is read: the
LoRA scaling must be the federation's (alpha / r, never the wire's), every tensor must have the
federation's dtype, the effective factors (scaling * B, and B A) must be finite in that dtype,
and an example count above the federation's cap only weighs as much as the cap. A malformed,
non-finite or oversized update is rejected with a reason a person can act on; the round then
goes on with the others (`fedlr.lora.rounds.aggregate_round`), and a new global state that is
not finite fails its round (`state_problem`) rather than being checkpointed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlr.adapters import Adapter
from fedlr.errors import ConfigError
from fedlr.lora.lowrank import LowRank, difference_norm, frobenius_norm
from fedlr.lora.strategies.base import ClientUpdate, GlobalState, Strategy


@dataclass(frozen=True)
class ValidationPolicy:
    """`max_update_norm`: bound on ||dW_k - dW_start||_F over all modules and trainable extras
    (None: no bound). `min_valid_updates`: fewer valid updates than this fail the round (0:
    never, as client-level DP needs: its rounds are released whoever took part).
    `max_examples`: an update's example count weighs at most this much (None: no cap), so no
    client's claimed count gives it the whole weight."""

    max_update_norm: float | None = None
    min_valid_updates: int = 1
    max_examples: int | None = None

    def __post_init__(self) -> None:
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ConfigError(f"max_update_norm must be > 0, got {self.max_update_norm}")
        if self.min_valid_updates < 0:
            raise ConfigError(f"min_valid_updates must be >= 0, got {self.min_valid_updates}")
        if self.max_examples is not None and (isinstance(self.max_examples, bool) or not (
                isinstance(self.max_examples, int) and self.max_examples >= 1)):
            raise ConfigError(f"max_examples_per_client must be a positive integer, got "
                              f"{self.max_examples!r}")

    def weight_of(self, num_examples: int) -> int:
        """The count an update is weighted by: its own, capped at `max_examples`."""
        if self.max_examples is None:
            return num_examples
        return min(num_examples, self.max_examples)


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
        expected = spec.scaling(r)
        if not (isinstance(f.scaling, float | int) and math.isclose(f.scaling, expected,
                                                                    rel_tol=1e-9)):
            return (f"{name} has LoRA scaling {f.scaling!r}, the federation's at rank {r} is "
                    f"{expected:.6g} (alpha {spec.alpha:g}); a client trains with the run's alpha")
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


def wrong_dtype(adapter: Adapter, dtype: torch.dtype) -> str | None:
    """A tensor not in the federation's dtype: the strategies mix it with the global state, which
    is in that dtype (a float64 B crashed LoRA-FAIR's solve), so it is refused, never cast."""
    for key, t in adapter.tensors().items():
        if t.dtype != dtype:
            return (f"{key.replace('::', ' of ')} has dtype {t.dtype}, the federation's is "
                    f"{dtype}; send every tensor in {dtype}")
    return None


def non_finite(adapter: Adapter) -> str | None:
    for key, t in adapter.tensors().items():
        if not torch.is_floating_point(t):
            return f"{key} has dtype {t.dtype}; LoRA tensors must be floating point"
        if not bool(torch.isfinite(t).all()):
            return f"non-finite values (NaN or Inf) in {key.replace('::', ' of ')}"
    return None


def _product_problem(what: str, x: LowRank, dtype: torch.dtype) -> str | None:
    """Why x (effective factors) is not a finite update in `dtype`: its B or A is not finite
    (scaling * B overflowed), or B A is not (its norm, in float64, past the dtype's range)."""
    if not (bool(torch.isfinite(x.B).all()) and bool(torch.isfinite(x.A).all())):
        return f"{what} has non-finite factors"
    norm = frobenius_norm(LowRank(x.B.double(), x.A.double()))
    if not (math.isfinite(norm) and norm <= torch.finfo(dtype).max):
        return f"{what} (B A) is not finite in {dtype}"
    return None


def non_finite_effective(adapter: Adapter, dtype: torch.dtype) -> str | None:
    """The check that matters to the aggregate: every module's update as the strategies use it."""
    for name, f in adapter.lora.items():
        if problem := _product_problem(f"the effective update of {name} (its scaling * B, A)",
                                       f.effective(), dtype):
            return problem
    return None


def state_problem(state: GlobalState, dtype: torch.dtype) -> str | None:
    """Why a new global state must not be released or checkpointed (a non-finite factor, extra
    or product), or None: no resume could recover one."""
    factors = [*state.lora.items(), *((f"{n} of round {t + 1}", x)
                                      for t, step in enumerate(state.history)
                                      for n, x in step.items())]
    for name, x in factors:
        if problem := _product_problem(f"the new global update of {name}", x, dtype):
            return problem
    for name, t in state.extras.items():
        if not bool(torch.isfinite(t).all()):
            return f"the new global {name} is not finite"
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
    dtype = strategy.spec.dtype
    problem = (_structure_problem(update, strategy) or wrong_dtype(update.adapter, dtype)
               or non_finite(update.adapter) or non_finite_effective(update.adapter, dtype))
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
