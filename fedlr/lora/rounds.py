"""The round, once and without Flower: plan it (who takes part, what each is sent, what each
trains from), then close it (validate every update, aggregate the valid ones, or fail cleanly).

Every transport runs these two functions and only carries what they name: the Flower
coordinator (`fedlr.server.coordinator`), the synthetic comparison (`fedlr.demo`) and the
client-level audit (`fedlr.privacy.client_audit`). What differs between strategies is the strategy's
own business (`Strategy.downlink`, `aggregate`, `carry_over`, ...), and client-level DP is a
strategy that wraps another (`fedlr.privacy.client_level.DPFedAvg`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fedlr.adapters import Adapter
from fedlr.client_ids import client_order
from fedlr.errors import RoundFailedError
from fedlr.lora.strategies.base import AggregationReport, ClientUpdate, GlobalState, Strategy
from fedlr.lora.validation import ValidationPolicy, state_problem, validate_update
from fedlr.privacy.client_level import draw_clients

REJECTION_KINDS = ("invalid update", "duplicate", "no reply", "not connected", "client failed",
                   "refused", "malformed reply")
SECURE_RANDOM = random.SystemRandom()


@dataclass(frozen=True)
class Rejection:
    """Why a client's update is not in the round. `kind` is one of REJECTION_KINDS, what a run
    may publish where client ids and details must stay secret (client-level DP)."""

    client_id: str
    reason: str
    kind: str = "invalid update"

    def __post_init__(self) -> None:
        if self.kind not in REJECTION_KINDS:
            raise ValueError(f"unknown rejection kind {self.kind!r}; use one of {REJECTION_KINDS}")


def sample_clients(ids: Sequence[str], per_round: float, round_: int, *, seed: int,
                   private_sampling: str | None = None) -> list[str]:
    """A round's clients, sorted: reproducible from `seed` and the round, except under
    client-level DP (`private_sampling` "poisson" or "fixed"), whose amplification by sampling
    needs a draw nobody can predict or replay (the OS's entropy)."""
    if private_sampling is None:
        chosen = random.Random(f"{seed}:{round_}").sample(list(ids), int(per_round))
    else:
        chosen = draw_clients(ids, per_round, private_sampling, SECURE_RANDOM)
    return sorted(chosen, key=client_order)


@dataclass(frozen=True)
class RoundPlan:
    """One round before anyone trains. `downlinks`: what each reachable sampled client is sent;
    `starts`: what it trains from (its downlink minus any base update it merges), the reference
    its update is validated and clipped against."""

    round: int
    clients: list[str]
    downlinks: dict[str, Adapter]
    starts: dict[str, Adapter]
    unreachable: list[Rejection] = field(default_factory=list)


def plan_round(strategy: Strategy, state: GlobalState, clients: Sequence[str], *,
               reachable: Iterable[str] | None = None,
               synced: Mapping[str, int] | None = None) -> RoundPlan:
    """The downlink and start of every sampled client that can be reached (all, by default).
    `synced`: the round each client last received (FLoRA sends what it missed since)."""
    reach = set(clients if reachable is None else reachable)
    synced = synced or {}
    downlinks = {c: strategy.downlink(state, c, since_round=synced.get(c, 0))
                 for c in clients if c in reach}
    return RoundPlan(
        round=state.round + 1,
        clients=list(clients),
        downlinks=downlinks,
        # the start is the downlink minus the base update it merges: not computed twice (a
        # FlexLoRA downlink is an SVD per module)
        starts={c: Adapter(lora=d.lora, extras=d.extras) for c, d in downlinks.items()},
        unreachable=[Rejection(c, "not connected", "not connected")
                     for c in clients if c not in reach],
    )


@dataclass
class RoundResult:
    """A closed round: the new state, how the aggregation went, who is in and who is not."""

    state: GlobalState
    report: AggregationReport
    accepted: list[str]
    rejected: list[Rejection]
    facts: dict[str, Any] = field(default_factory=dict)  # what a run records besides the state

    @property
    def exact(self) -> bool:
        return bool(self.report.details.get("exact"))


def close_round(strategy: Strategy, state: GlobalState, plan: RoundPlan,
                updates: Sequence[ClientUpdate], *, policy: ValidationPolicy | None = None,
                refused: Sequence[Rejection] = ()) -> RoundResult:
    """Validate and aggregate what came back for `plan`. `refused`: clients that answered without
    an update (refusals, errors, malformed replies); a planned client that did not answer at all
    is rejected as "no reply", an update from a client that was not sent anything as invalid.
    Raises RoundFailedError, naming every rejection, when too few updates are valid."""
    answered = {r.client_id for r in refused} | {u.client_id for u in updates}
    rejected = [*refused, *(Rejection(c, "no reply (dropped or timed out)", "no reply")
                            for c in plan.downlinks if c not in answered), *plan.unreachable]
    ordered = sorted(updates, key=lambda u: client_order(u.client_id))  # reply order is noise
    try:
        result = aggregate_round(strategy, state, ordered, starts=plan.starts, policy=policy)
    except RoundFailedError as exc:
        if not rejected:
            raise
        raise RoundFailedError(f"{exc} (plus {len(rejected)} rejected before validation: "
                               + "; ".join(f"{r.client_id}: {r.reason}" for r in rejected) + ")",
                               [*rejected, *exc.rejected]) from None
    result.rejected[:0] = rejected
    return result


def failed_round(strategy: Strategy, state: GlobalState, error: RoundFailedError) -> RoundResult:
    """A round that failed, as a run records it and goes on: the adapter carries over to the
    next round unchanged, with the failure's rejections and its reason."""
    new_state = strategy.carry_over(state)
    report = AggregationReport(strategy.name, new_state.round, {}, math.nan, math.nan, {})
    return RoundResult(new_state, report, [], list(error.rejected), {"round_failed": str(error)})


def aggregate_round(
    strategy: Strategy,
    state: GlobalState,
    updates: Sequence[ClientUpdate],
    *,
    starts: Mapping[str, Adapter] | None = None,
    policy: ValidationPolicy | None = None,
) -> RoundResult:
    """Aggregate the valid updates of a round; `state` is never modified.

    `starts` maps each client to the adapter it trained from (recomputed from `state` when
    absent): the reference for the update-norm bound, for strategies that freeze A and for
    client-level clipping. Raises RoundFailedError, naming every rejection, when fewer than
    `policy.min_valid_updates` are valid (a strategy that releases every round needs none).
    """
    policy = policy or ValidationPolicy()
    accepted: list[ClientUpdate] = []
    rejected: list[Rejection] = []
    seen: set[str] = set()
    capped = 0
    for update in updates:
        kind, start = "invalid update", None
        if update.client_id in seen:
            reason, kind = "duplicate update from the same client in one round", "duplicate"
        else:
            if update.client_id in strategy.spec.ranks:
                start = (starts or {}).get(update.client_id) or strategy.starting_adapter(
                    state, update.client_id
                )
            reason = validate_update(update, strategy, start or Adapter(), policy)
        if reason:
            rejected.append(Rejection(update.client_id, reason, kind))
        else:
            weight = policy.weight_of(update.num_examples)
            capped += weight != update.num_examples
            accepted.append(replace(update, start=start, num_examples=weight))
            seen.add(update.client_id)
    needed = 0 if strategy.every_round_released else policy.min_valid_updates
    if len(accepted) < needed:
        why = "; ".join(f"{r.client_id}: {r.reason}" for r in rejected) or "no updates arrived"
        raise RoundFailedError(
            f"round {state.round + 1}: {len(accepted)} valid update(s), at least "
            f"{needed} needed; the global state is unchanged ({why})", rejected
        )
    if not accepted:  # allowed by the policy: the adapter carries over
        new_state = strategy.carry_over(state)
        report = AggregationReport(strategy.name, new_state.round, {}, math.nan, math.nan, {})
        return RoundResult(new_state, report, [], rejected)
    new_state, report = strategy.aggregate(state, accepted)
    checked_state(new_state, strategy, rejected)
    facts = {"examples_capped": capped} if capped else {}
    return RoundResult(new_state, report, [u.client_id for u in accepted], rejected, facts)


def checked_state(state: GlobalState, strategy: Strategy, rejected: Sequence[Rejection]
                  ) -> GlobalState:
    """`state`, unless it is not finite: then the round fails (the adapter carries over), since
    a checkpointed non-finite adapter is one no resume recovers."""
    problem = state_problem(state, strategy.spec.dtype)
    if problem:
        raise RoundFailedError(f"round {state.round}: {problem}; the global state is unchanged",
                               list(rejected))
    return state
