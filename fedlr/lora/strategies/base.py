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
from fedlr.errors import ConfigError
from fedlr.lora.lowrank import (
    LowRank,
    frobenius_norm,
    kaiming_uniform_a,
)
from fedlr.lora.strategies.traits import StrategyTraits
from fedlr.lora.sums import SecureSum, SumSpec
from fedlr.settings.specs import HEAD_MODES, HETERO_METHODS


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
    """A client's trained adapter; `start`, once validated, is the adapter it trained from."""

    client_id: str
    adapter: Adapter
    num_examples: int
    start: Adapter | None = None

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
    """One aggregation algorithm. Subclasses implement `aggregate`; most reuse the rest. What
    differs between strategies outside aggregation is a method or trait here, never a test of the
    strategy's name elsewhere."""

    traits: ClassVar[StrategyTraits]
    every_round_released: ClassVar[bool] = False  # a round with no valid update still releases

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

    @property
    def name(self) -> str:
        return self.traits.name

    @property
    def trains_a(self) -> bool:
        return self.traits.trains_a

    @property
    def default_head(self) -> str:
        return self.traits.default_head

    @property
    def trains_head(self) -> bool:
        """Whether clients train (and the server averages) the tensors outside LoRA."""
        return self.head == "train" and bool(self.spec.extras)

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

    def round_release(self, state: GlobalState) -> dict[str, LowRank]:
        """What a round publishes as its global adapter (dW = B A): the global LoRA."""
        return dict(state.lora)

    def global_update(self, state: GlobalState) -> dict[str, LowRank]:
        """The whole update to the base so far, exactly: the global LoRA."""
        return dict(state.lora)

    def export_lora(self, state: GlobalState, export_rank: int | None
                    ) -> tuple[dict[str, LoraFactors], dict[str, Any]]:
        """The run's final LoRA in PEFT's scaling, at the federation's largest rank, and facts
        about it (`export_rank` only applies to strategies whose update outgrows that rank)."""
        rank = self.spec.max_rank
        scaling = self.spec.scaling(rank)
        return {name: LoraFactors.from_effective(x, scaling) for name, x in state.lora.items()}, {}

    def trained_tensors(self, state: GlobalState) -> dict[str, Tensor]:
        """The state's tensors clients train, keyed `lora_B::name`, `lora_A::name` (when A is
        trained), `extra::name` (when the head is): the space a private round clips and noises
        and a secure round sums. Fixed by the state, never by the updates."""
        tensors: dict[str, Tensor] = {}
        for name in sorted(state.lora):
            g = state.lora[name]
            tensors[f"lora_B::{name}"] = g.B
            if self.trains_a:
                tensors[f"lora_A::{name}"] = g.A
        if self.trains_head:
            for name in sorted(state.extras):
                tensors[f"extra::{name}"] = state.extras[name]
        return tensors

    def after_noise(self, x: LowRank) -> LowRank:
        """Post-processing of a privatised global module (client-level DP): none."""
        return x

    def audited_form(self) -> Strategy:
        """The strategy whose release an empirical client-level audit measures: this one."""
        return self

    # -- downlink ------------------------------------------------------------------------------

    def fit_to_rank(self, global_update: LowRank, rank: int) -> LowRank:
        """The client's starting adapter: leading components (states are kept SVD-ordered when
        the method needs it, so truncation is then the best rank-r approximation)."""
        return global_update.truncated(rank)

    def downlink(self, state: GlobalState, client_id: str, since_round: int = 0) -> Adapter:
        """What client `client_id` starts its local training from, in its own LoRA scaling."""
        rank = self.spec.ranks[client_id]
        lora, energy = self.fitted(state, rank)
        meta = {"round": state.round, "client_id": client_id, "rank": rank}
        if energy:
            meta["energy_kept_min"] = min(energy.values())
        return Adapter(lora=dict(lora), extras=dict(state.extras), meta=meta)

    def fitted(self, state: GlobalState, rank: int
               ) -> tuple[dict[str, LoraFactors], dict[str, float]]:
        """The factors every client of rank `rank` starts from, and the energy of each module
        that fitting to the rank kept. A round plans hundreds of downlinks from one state, so
        each rank's are computed once: kept while the state and its modules are the same
        objects (states are never changed in place; each round makes a new one)."""
        modules = tuple(state.lora.values())
        memo = self.__dict__.setdefault("_fitted", {})
        hit = memo.get(rank)
        if hit is not None and hit[0] is state and len(hit[1]) == len(modules) and all(
                a is b for a, b in zip(hit[1], modules, strict=True)):
            return hit[2], hit[3]
        scaling = self.spec.scaling(rank)
        lora, energy = {}, {}
        for name, g in state.lora.items():
            part = g if rank == g.rank else self.fit_to_rank(g, rank)
            lora[name] = LoraFactors.from_effective(part, scaling)
            if part is not g:
                total = frobenius_norm(g)
                energy[name] = 1.0 if total == 0 else (frobenius_norm(part) / total) ** 2
        memo[rank] = (state, modules, lora, energy)
        return lora, energy

    def starting_adapter(self, state: GlobalState, client_id: str) -> Adapter:
        """The LoRA and extras a client starts local training from (no base update to merge):
        the reference for validating what it sends back."""
        return self.downlink(state, client_id)

    # -- secure aggregation --------------------------------------------------------------------

    def secure_sum(self, state: GlobalState) -> SumSpec:
        """What clients sum under secure aggregation: their trained tensors at the largest rank,
        weighted; refused (ConfigError) where the aggregate needs individual updates."""
        self.traits.check_secure_aggregation(self.hetero, self.spec.mixed_ranks)
        shapes = {k: tuple(t.shape) for k, t in self.trained_tensors(state).items()}
        return SumSpec(shapes, self.spec.max_rank)

    def aggregate_sum(self, state: GlobalState, total: SecureSum
                      ) -> tuple[GlobalState, AggregationReport]:
        """The next state from the secure sum of the round's weighted parts."""
        self.traits.check_secure_aggregation(self.hetero, self.spec.mixed_ranks)
        raise NotImplementedError(f"{self.name} declares no secure aggregation")

    def mean_extras(self, state: GlobalState, total: SecureSum) -> dict[str, Tensor]:
        """The head's weighted mean from a secure sum, or the state's own when it is frozen."""
        if not self.trains_head:
            return dict(state.extras)
        return {name: total.tensors[f"extra::{name}"] / total.weight for name in state.extras}

    def sum_report(self, new_round: int, total: SecureSum, smallest_denominator: float
                   ) -> AggregationReport:
        """A secure round's report: no per-client weights or residual (the server has neither),
        the bound on each aggregated value's encoding error, and how many values were clipped."""
        return AggregationReport(
            self.name, new_round, {}, math.nan, math.nan, {},
            details={**self.describe(), "secagg_quantization_error":
                     total.value_error / smallest_denominator,
                     "secagg_clipped_values": total.clipped},
        )

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
        if not self.trains_head or not updates[0].adapter.extras:
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
