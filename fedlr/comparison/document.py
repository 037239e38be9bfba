"""compare.json: the runs' summaries gathered into cells, what was checked, and what the numbers
cover (the notes compare.md repeats)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from fedlr.comparison.plan import ComparisonSettings, PlannedRun
from fedlr.comparison.results import cells, quality_key
from fedlr.settings.schema import SimulationConfig


def build_document(base: SimulationConfig, settings: ComparisonSettings,
                   runs: Sequence[PlannedRun], summaries: dict[str, dict[str, Any]],
                   same_federation: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    metric, _ = quality_key(base.task)
    levels = list(dict.fromkeys(run.level for run in runs))
    pending = [run.key for run in runs if run.skipped is None and run.key not in summaries]
    return {
        "title": f"{base.model} on {base.dataset}: {base.num_clients} clients, "
                 f"{base.sampled_per_round} per round, ranks {base.ranks}, {base.rounds} rounds",
        "federation_line": federation_line(base),
        "metric": metric,
        "complete": not pending,
        "pending_runs": pending,
        "settings": {"base": base.to_dict(), "compare": asdict(settings)},
        "levels": [{"name": level.name, "label": level.label,
                    "epsilon": None if math.isinf(level.epsilon) else level.epsilon,
                    "dp_level": level.dp if level.private else None} for level in levels],
        "cells": cells(runs, summaries, settings, base.task),
        "same_federation": same_federation,
        "wall_seconds": wall_total(summaries),
        "evaluation": evaluation,
        "notes": notes(base, settings, evaluation, runs),
    }


def wall_total(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The runs' wall time in all, over those `fedlr compare` timed (start-up included), and
    the time in rounds of those it did not (finished by a version that kept no wall time), so
    that a study's cost is stated from its own records."""
    timed = [s["wall_seconds"] for s in summaries.values() if s.get("wall_seconds") is not None]
    untimed = [s.get("seconds") for s in summaries.values() if s.get("wall_seconds") is None]
    return {"total": sum(timed), "runs_timed": len(timed), "runs_finished": len(summaries),
            "untimed_round_seconds": sum(t for t in untimed if t is not None)}


def federation_line(base: SimulationConfig) -> str:
    return (f"Partition {base.partition}, hetero-rank method {base.hetero}, {base.local_steps} "
            f"local steps of batch {base.batch_size} ({base.optimizer}, lr {base.lr:g}), "
            f"max length {base.max_length}; mean ± standard deviation over seeds.")


def notes(base: SimulationConfig, settings: ComparisonSettings, evaluation: dict[str, Any],
          runs: Sequence[PlannedRun]) -> list[str]:
    """What the numbers cover and what they do not, in plain words."""
    clip = next((r.settings.client_clip_norm for r in runs
                 if r.settings is not None and r.settings.client_clip_norm is not None), None)
    out = [
        "Every federated run of a seed has the same client ranks, partition (sha256 of every "
        "shard) and sampled clients per round; compare.json `same_federation` records what was "
        "checked.",
    ]
    if evaluation:
        out.append(f"Held-out {quality_key(base.task)[0]} on {evaluation.get('examples')} of "
                   f"{evaluation.get('heldout_examples')} held-out examples, the same subset "
                   "for every run" + (f"; always guessing the most frequent class scores "
                                      f"{evaluation['chance_accuracy']:.3f}"
                                      if "chance_accuracy" in evaluation else "") + ".")
    if any(math.isfinite(e) for e in settings.epsilons):
        if settings.dp_level == "sample":
            out.append(
                f"Sample-level DP: DP-SGD on each client, privacy unit one training example, "
                f"Poisson sampling of each batch, clip {base.max_grad_norm:g}, {base.accountant} "
                f"accountant, delta {base.delta:g}; each client solves its own noise for the "
                "target over the planned rounds (its own shard size sets q). Epsilon spent is "
                "the largest over clients. It protects a client's examples from the server and "
                "from whoever sees the model; it says nothing about a client as a whole.")
        else:
            out.append(
                f"Client-level DP: DP-FedAvg, privacy unit one client, {base.client_sampling} "
                f"client sampling kept secret, clip {clip}, "
                f"{base.client_accountant} accountant, delta {base.delta:g}; the noise is "
                "solved for the target before the run. Strategies that cannot be wrapped are "
                "marked not run.")
    if settings.references:
        out.append(
            f"*centralized*: plain LoRA (fedit with one client) at rank {max(base.ranks)} on "
            f"the union of the clients' data, {base.local_steps * base.sampled_per_round} steps "
            "per round: the examples a round's clients see together; under sample-level DP "
            "the same target epsilon, with q = batch / all examples.")
        out.append(
            f"*local-only*: each client alone on its own shard for {base.rounds} x "
            f"{base.local_steps} steps at its own rank, never sharing; the mean of the "
            "clients' held-out scores (no curve).")
    return out
