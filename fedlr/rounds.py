"""One aggregation round: validate every update, aggregate the valid ones, or fail cleanly."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from fedlr.adapters import Adapter
from fedlr.errors import RoundFailedError
from fedlr.strategies.base import AggregationReport, ClientUpdate, GlobalState, Strategy
from fedlr.validation import ValidationPolicy, validate_update

REJECTION_KINDS = ("invalid update", "duplicate", "no reply", "not connected", "client failed",
                   "refused", "malformed reply")


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


@dataclass
class RoundResult:
    state: GlobalState
    report: AggregationReport
    accepted: list[str]
    rejected: list[Rejection]


def aggregate_round(
    strategy: Strategy,
    state: GlobalState,
    updates: Sequence[ClientUpdate],
    *,
    sent: Mapping[str, Adapter] | None = None,
    policy: ValidationPolicy | None = None,
    aggregate: Callable[[GlobalState, list[ClientUpdate]], tuple[GlobalState, AggregationReport]]
    | None = None,
) -> RoundResult:
    """Aggregate the valid updates of a round; `state` is never modified.

    `sent` maps each client to the downlink it trained from (recomputed from `state` when absent);
    it is the reference for the update-norm bound and for strategies that freeze A. `aggregate`
    replaces `strategy.aggregate` (client-level DP does, after the same validation). Raises
    RoundFailedError, naming every rejection, when fewer than `policy.min_valid_updates` are valid.
    """
    policy = policy or ValidationPolicy()
    accepted: list[ClientUpdate] = []
    rejected: list[Rejection] = []
    seen: set[str] = set()
    for update in updates:
        kind = "invalid update"
        if update.client_id in seen:
            reason, kind = "duplicate update from the same client in one round", "duplicate"
        else:
            start = None
            if update.client_id in strategy.spec.ranks:
                start = (sent or {}).get(update.client_id) or strategy.starting_adapter(
                    state, update.client_id
                )
            reason = validate_update(update, strategy, start or Adapter(), policy)
        if reason:
            rejected.append(Rejection(update.client_id, reason, kind))
        else:
            accepted.append(update)
            seen.add(update.client_id)
    if len(accepted) < policy.min_valid_updates:
        why = "; ".join(f"{r.client_id}: {r.reason}" for r in rejected) or "no updates arrived"
        raise RoundFailedError(
            f"round {state.round + 1}: {len(accepted)} valid update(s), at least "
            f"{policy.min_valid_updates} needed; the global state is unchanged ({why})"
        )
    if not accepted and aggregate is None:  # allowed by the policy: the adapter carries over
        new_state = strategy.carry_over(state)
        report = AggregationReport(strategy.name, new_state.round, {}, math.nan, math.nan, {})
        return RoundResult(new_state, report, [], rejected)
    new_state, report = (aggregate or strategy.aggregate)(state, accepted)
    return RoundResult(new_state, report, [u.client_id for u in accepted], rejected)
