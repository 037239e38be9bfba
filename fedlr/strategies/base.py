"""The small interface every aggregation strategy implements, and what they share.

Strategies are pure: `aggregate(state, updates)` returns a new state and a report and never touches
its inputs, so a failed round leaves the global state exactly as it was and checkpoints are trivial.
All math happens in the *effective* form dW = B_eff @ A with each client's LoRA scaling folded into
B_eff; scalings only reappear at the boundary (`downlink`), so clients of different ranks (and so
different alpha / r) mix exactly.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedlr.adapters import Adapter, LoraFactors
from fedlr.config import HEAD_MODES, HETERO_METHODS
from fedlr.errors import ConfigError
from fedlr.lowrank import (
    LowRank,
    concat,
    dense_is_cheaper,
    difference_norm,
    frobenius_norm,
    kaiming_uniform_a,
)


@dataclass(frozen=True)
class ModuleShape:
    d_out: int
    d_in: int


@dataclass(frozen=True)
class FederationSpec:
    """What the server knows before round 1: target modules, each client's rank, LoRA alpha."""

    modules: Mapping[str, ModuleShape]
    ranks: Mapping[str, int]
    alpha: float = 16.0
    rslora: bool = False
    extras: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if not self.modules:
            raise ConfigError("no LoRA target modules: give at least one module")
        if not self.ranks:
            raise ConfigError("no clients: the federation needs at least one client rank")
        smallest = min(min(s.d_out, s.d_in) for s in self.modules.values())
        for client, rank in self.ranks.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
                raise ConfigError(f"client {client}: rank must be a positive integer, got {rank!r}")
            if rank > smallest:
                raise ConfigError(
                    f"client {client}: rank {rank} exceeds the smallest module dimension "
                    f"{smallest}; use a rank <= {smallest}"
                )
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"lora alpha must be a positive number, got {self.alpha!r}")

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())

    @property
    def mixed_ranks(self) -> bool:
        return len(set(self.ranks.values())) > 1

    def scaling(self, rank: int) -> float:
        """PEFT's LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / math.sqrt(rank) if self.rslora else self.alpha / rank


@dataclass(frozen=True)
class ClientUpdate:
    client_id: str
    adapter: Adapter
    num_examples: int

    def effective(self) -> dict[str, LowRank]:
        return {name: f.effective() for name, f in self.adapter.lora.items()}


@dataclass
class GlobalState:
    """The server's state between rounds.

    `lora`: the global adapter in effective form at the federation's max rank (empty for FLoRA);
    `history`: FLoRA's exact stacked update of every round, so any client can catch up exactly.
    """

    round: int = 0
    lora: dict[str, LowRank] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)
    history: list[dict[str, LowRank]] = field(default_factory=list)

    def to_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Flat tensors and JSON info, for a checkpoint."""
        flat: dict[str, Tensor] = {}
        for name, x in self.lora.items():
            flat[f"lora_A::{name}"], flat[f"lora_B::{name}"] = x.A, x.B
        for name, t in self.extras.items():
            flat[f"extra::{name}"] = t
        for t, update in enumerate(self.history):
            for name, x in update.items():
                flat[f"history_A::{t}::{name}"], flat[f"history_B::{t}::{name}"] = x.A, x.B
        return flat, {"round": self.round, "history_len": len(self.history)}

    @classmethod
    def from_tensors(cls, flat: Mapping[str, Tensor], info: Mapping[str, Any]) -> GlobalState:
        state = cls(round=int(info["round"]))
        state.history = [{} for _ in range(int(info["history_len"]))]
        for key, tensor in flat.items():
            kind, _, rest = key.partition("::")
            if kind == "lora_A":
                state.lora[rest] = LowRank(flat[f"lora_B::{rest}"], tensor)
            elif kind == "extra":
                state.extras[rest] = tensor
            elif kind == "history_A":
                t, _, name = rest.partition("::")
                state.history[int(t)][name] = LowRank(flat[f"history_B::{rest}"], tensor)
        return state


@dataclass
class AggregationReport:
    """What one aggregation did, including how far the global dW is from sum_k p_k dW_k."""

    strategy: str
    round: int
    weights: dict[str, float]
    residual: float
    residual_max: float
    residual_per_module: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)


def client_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """p_k = n_k / sum n: FedAvg's example-count weighting."""
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def stack(
    effective: Sequence[Mapping[str, LowRank]], weights: Sequence[float], name: str
) -> LowRank:
    """[p_1 B_1 ... p_K B_K] over [A_1; ...; A_K]: sum_k p_k dW_k exactly, for any ranks."""
    terms = [e[name] for e in effective]
    stacked = concat(terms)
    ranks = torch.tensor([t.rank for t in terms])
    column_weights = torch.repeat_interleave(torch.tensor(weights, dtype=stacked.B.dtype), ranks)
    stacked.B.mul_(column_weights)  # in place on the fresh concatenation: one pass, no copies
    return stacked


class IdealUpdate:
    """dW* = sum_k p_k dW_k of one module, exact, as stacked factors.

    Distances to it are what every residual needs. The dense d_out x d_in product is formed once,
    and only where that is cheaper than the QR route on the stacked factors (many clients).
    """

    def __init__(self, stacked: LowRank, shared: bool = False) -> None:
        self.stacked = stacked
        self.shared = shared  # dW* is the aggregate itself: a zero distance by construction
        d_out, d_in = stacked.shape
        self._dense = stacked.dense() if dense_is_cheaper(d_out, d_in, stacked.rank) else None
        self.norm = (
            float(torch.linalg.matrix_norm(self._dense))
            if self._dense is not None
            else frobenius_norm(stacked)
        )

    @classmethod
    def of(
        cls, effective: Sequence[Mapping[str, LowRank]], weights: Sequence[float], name: str
    ) -> IdealUpdate:
        return cls(stack(effective, weights, name))

    @classmethod
    def over_shared_a(
        cls,
        effective: Sequence[Mapping[str, LowRank]],
        weights: Sequence[float],
        name: str,
        shared: LowRank,
    ) -> IdealUpdate:
        """dW* where clients trained B against leading rows of one A (FFA-LoRA, FedSVD), given
        `shared` = (sum_k p_k pad(B_k), A): then sum_k p_k B_k A[:r_k] = shared exactly, without
        stacking. Falls back to stacking if any client's A is not those rows."""
        if all(torch.equal(e[name].A, shared.A[: e[name].rank]) for e in effective):
            return cls(shared, shared=True)
        return cls.of(effective, weights, name)

    def distance(self, x: LowRank) -> float:
        """||x - dW*||_F."""
        if self._dense is not None:
            return float(torch.linalg.matrix_norm(x.dense() - self._dense))
        return difference_norm(x, self.stacked)


def weighted_padded_b(factors: Sequence[LowRank], weights: Sequence[float], rank: int) -> Tensor:
    """sum_k p_k pad(B_k) at `rank`, all that the strategies with a frozen A average."""
    B = factors[0].B.new_zeros(factors[0].B.shape[0], rank)
    for x, p in zip(factors, weights, strict=True):
        B[:, : x.rank].add_(x.B, alpha=p)
    return B


def norm_weights(factors: Sequence[LowRank], fallback: Sequence[float]) -> list[float]:
    """HetLoRA's sparsity-weighted aggregation (Cho et al. 2024): p_k proportional to
    ||B_k A_k||_F, so a client whose update is small (pruned, or barely trained) counts less;
    `fallback` when every update is zero."""
    norms = [frobenius_norm(x) for x in factors]
    total = sum(norms)
    return [n / total for n in norms] if total > 0 else list(fallback)


def hetlora_average(previous: LowRank, factors: Sequence[LowRank], weights: Sequence[float]
                    ) -> LowRank:
    """FedIT's average of A and B at `previous`'s rank, one rank component at a time: component
    j is the weighted mean over the clients that hold it (rank > j), weights renormalised among
    them; a component none of them holds keeps `previous`'s value. With equal ranks this is
    sum_k p_k A_k, sum_k p_k B_k. (Plain zero padding would shrink the tail by the share of
    clients that hold it, and zero it, for good, in a round where only smaller ranks report.)"""
    rank = previous.rank
    A, B = torch.zeros_like(previous.A), torch.zeros_like(previous.B)
    held = torch.zeros(rank, dtype=previous.A.dtype, device=previous.A.device)
    for x, p in zip(factors, weights, strict=True):
        A[: x.rank].add_(x.A, alpha=p)
        B[:, : x.rank].add_(x.B, alpha=p)
        held[: x.rank] += p
    kept = held == 0
    share = torch.where(kept, torch.ones_like(held), held)
    A, B = A / share[:, None], B / share
    A[kept], B[:, kept] = previous.A[kept], previous.B[:, kept]
    return LowRank(B, A)


def residual_summary(
    terms: Mapping[str, tuple[float, float]],
) -> tuple[float, float, dict[str, float]]:
    """From per-module (||dW_global - dW*||, ||dW*||): the residual over all modules together,
    the max over modules, and each module's."""
    per_module, num_sq, den_sq = {}, 0.0, 0.0
    for name, (num, den) in terms.items():
        per_module[name] = num / den if den > 0 else (0.0 if num == 0 else math.inf)
        num_sq += num**2
        den_sq += den**2
    overall = math.sqrt(num_sq / den_sq) if den_sq > 0 else (0.0 if num_sq == 0 else math.inf)
    return overall, max(per_module.values()), per_module


class Strategy(ABC):
    """One aggregation algorithm. Subclasses implement `aggregate`; most reuse the rest."""

    name: ClassVar[str]
    trains_a: ClassVar[bool] = True
    default_head: ClassVar[str] = "train"

    def __init__(
        self,
        spec: FederationSpec,
        *,
        hetero: str = "hetlora",
        head: str | None = None,
        seed: int = 0,
    ) -> None:
        if hetero not in HETERO_METHODS:
            raise ConfigError(
                f"unknown heterogeneous-rank method {hetero!r}; choose one of {HETERO_METHODS}"
            )
        head = head or self.default_head
        if head not in HEAD_MODES:
            raise ConfigError(f"unknown head mode {head!r}; choose one of {HEAD_MODES}")
        self.spec, self.hetero, self.head, self.seed = spec, hetero, head, seed

    # -- state ---------------------------------------------------------------------------------

    def init_state(self, extras: Mapping[str, Tensor] | None = None) -> GlobalState:
        """Round-0 adapter: A Kaiming-uniform from `seed` (same on every client), B = 0."""
        gen = torch.Generator().manual_seed(self.seed)
        lora = {}
        for name, shape in sorted(self.spec.modules.items()):
            A = kaiming_uniform_a(self.spec.max_rank, shape.d_in, gen, self.spec.dtype)
            lora[name] = LowRank(A.new_zeros(shape.d_out, self.spec.max_rank), A)
        return GlobalState(lora=lora, extras={k: v.clone() for k, v in (extras or {}).items()})

    def describe(self) -> dict[str, Any]:
        """Settings a run records so its aggregation can be reproduced."""
        return {"strategy": self.name, "hetero": self.hetero, "head": self.head, "seed": self.seed}

    def carry_over(self, state: GlobalState) -> GlobalState:
        """A round in which no valid update arrived: the same adapter, one round later."""
        return GlobalState(round=state.round + 1, lora=dict(state.lora),
                           extras=dict(state.extras), history=list(state.history))

    # -- downlink ------------------------------------------------------------------------------

    def fit_to_rank(self, global_update: LowRank, rank: int) -> LowRank:
        """The client's starting adapter: leading components (states are kept SVD-ordered when
        the method needs it, so truncation is then the best rank-r approximation)."""
        return global_update.truncated(rank)

    def downlink(self, state: GlobalState, client_id: str, since_round: int = 0) -> Adapter:
        """What client `client_id` starts its local training from, in its own LoRA scaling."""
        rank = self.spec.ranks[client_id]
        scaling = self.spec.scaling(rank)
        lora, energy = {}, {}
        for name, g in state.lora.items():
            part = g if rank == g.rank else self.fit_to_rank(g, rank)
            lora[name] = LoraFactors.from_effective(part, scaling)
            if part is not g:
                total = frobenius_norm(g)
                energy[name] = 1.0 if total == 0 else (frobenius_norm(part) / total) ** 2
        meta = {"round": state.round, "client_id": client_id, "rank": rank}
        if energy:
            meta["energy_kept_min"] = min(energy.values())
        return Adapter(lora=lora, extras=dict(state.extras), meta=meta)

    def starting_adapter(self, state: GlobalState, client_id: str) -> Adapter:
        """The LoRA and extras a client starts local training from (no base update to merge):
        the reference for validating what it sends back."""
        return self.downlink(state, client_id)

    # -- aggregation ---------------------------------------------------------------------------

    @abstractmethod
    def aggregate(
        self, state: GlobalState, updates: Sequence[ClientUpdate]
    ) -> tuple[GlobalState, AggregationReport]:
        """Fold validated client updates into a new global state."""

    def aggregate_extras(
        self, state: GlobalState, updates: Sequence[ClientUpdate], weights: Sequence[float]
    ) -> dict[str, Tensor]:
        """FedAvg of trainable tensors outside LoRA, or the state's own when the head is frozen."""
        if self.head == "freeze" or not updates[0].adapter.extras:
            return dict(state.extras)
        out = {}
        for name in updates[0].adapter.extras:
            acc = torch.zeros_like(updates[0].adapter.extras[name])
            for u, p in zip(updates, weights, strict=True):
                acc.add_(u.adapter.extras[name], alpha=p)
            out[name] = acc
        return out

    def report(
        self,
        new_round: int,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
        residual_terms: Mapping[str, tuple[float, float]],
        **details: Any,
    ) -> AggregationReport:
        overall, worst, per_module = residual_summary(residual_terms)
        return AggregationReport(
            strategy=self.name,
            round=new_round,
            weights={u.client_id: p for u, p in zip(updates, weights, strict=True)},
            residual=overall,
            residual_max=worst,
            residual_per_module=per_module,
            details={**self.describe(), **details},
        )
