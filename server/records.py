"""A round's line in metrics.jsonl: what the round released (who took part, the losses, the
held-out metrics in the rounds the server evaluates, epsilon) and where the clients' time went.
The coordinator adds the server's own times and the core's facts."""

from __future__ import annotations

import math
from typing import Any

from fedlr.lora.rounds import Rejection
from fedlr.settings.schema import SimulationConfig

CLIENT_TIMES = {"seconds": "client_seconds", "setup_seconds": "client_setup_seconds",
                "accountant_seconds": "client_accountant_seconds",
                "step_seconds": "client_step_seconds"}


def evaluates(round_: int, rounds: int, every: int) -> bool:
    """Whether the server evaluates the global adapter after `round_`: every `every`-th round
    and the last, whose adapter is the run's result (round 0 is evaluated as the run opens)."""
    return round_ % every == 0 or round_ == rounds


def client_times(metrics: list[dict[str, float]]) -> dict[str, float]:
    """The round's client times, each summed over the clients that report it (a time no client
    reports is left out): where the clients' share of a round goes."""
    return {name: sum(m[key] for m in metrics if key in m) for key, name in CLIENT_TIMES.items()
            if any(key in m for m in metrics)}


def round_record(config: SimulationConfig, round_: int, clients: list[str], accepted: list[str],
                 rejected: list[Rejection], metrics: list[dict[str, float]],
                 evaluation: dict[str, float] | None, epsilons: dict[str, float],
                 residual: float, residual_max: float, bytes_up: int, bytes_down: int,
                 seconds: float) -> dict[str, Any]:
    """The round's record; `evaluation` None (a round `eval_every` skips) records null
    held-out metrics, so every line has the same keys."""
    weights = [m.get("num-examples", 1.0) for m in metrics]  # equal under secure agg.
    losses = [m.get("train_loss", math.nan) for m in metrics]
    total = sum(weights)
    record: dict[str, Any] = {
        "round": round_,
        "num_clients": len(clients),
        "num_accepted": len(accepted),
        "train_loss": sum(w * v for w, v in zip(weights, losses, strict=True)) / total
        if total else None,
        "eval_loss": evaluation["loss"] if evaluation else None,
        "aggregation_residual": None if math.isnan(residual) else residual,
        "aggregation_residual_max": None if math.isnan(residual_max) else residual_max,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "seconds": seconds,
        **client_times(metrics),
    }
    if config.client_ids_public:
        record.update(clients=clients, accepted=accepted,
                      rejected=[{"client": r.client_id, "reason": r.reason} for r in rejected])
    else:  # client-level DP: the sample stays secret, so counts and kinds only
        record["rejected"] = [{"reason": r.kind} for r in rejected]
    quality = "accuracy" if config.task == "classification" else "perplexity"
    record[f"eval_{quality}"] = evaluation[quality] if evaluation else None
    if epsilons:
        record["epsilon_max"] = max(epsilons.values())
    return record
