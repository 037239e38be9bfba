"""A comparison's results, read back from its runs' directories: one summary per run, the
cells (a method at a privacy level, over its seeds), and the proof that every run of a seed
saw the same federation."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlr.atomic import write_json
from fedlr.comparison.plan import ComparisonSettings, Level, PlannedRun
from fedlr.run_metrics import METRICS_FILE, read_metrics

LOCAL_RESULTS = "local.json"  # the local-only reference's results (client/local_only.py)
WALL_TIMES = "compare-timings.json"  # each run's wall time, as `fedlr compare` measured it


def add_wall_time(out: Path, key: str, seconds: float) -> None:
    """A run's own wall time (start-up included), summed over the invocations it took."""
    times = wall_times(out)
    times[key] = times.get(key, 0.0) + seconds
    write_json(out / WALL_TIMES, times)


def wall_times(out: Path) -> dict[str, float]:
    path = out / WALL_TIMES
    return json.loads(path.read_text()) if path.exists() else {}


def run_complete(run: PlannedRun) -> bool:
    """Whether a run finished: its last round recorded and its adapter exported (local-only:
    every client trained)."""
    assert run.settings is not None
    root = Path(str(run.settings.out))
    if run.method == "local-only":
        path = root / LOCAL_RESULTS
        return path.exists() and json.loads(path.read_text())["complete"]
    records = read_metrics(root / METRICS_FILE)
    return (root / "adapter").is_dir() and bool(records) and (
        records[-1]["round"] == run.settings.rounds)


def quality_key(task: str) -> tuple[str, bool]:
    """The held-out metric a comparison ranks by, and whether higher is better."""
    return ("accuracy", True) if task == "classification" else ("perplexity", False)


def summarise_run(run: PlannedRun) -> dict[str, Any]:
    """What the comparison keeps of one finished run."""
    assert run.settings is not None
    root, task = Path(str(run.settings.out)), run.settings.task
    metric, _ = quality_key(task)
    if run.method == "local-only":
        local = json.loads((root / LOCAL_RESULTS).read_text())
        return {"final": local[f"mean_{metric}"], "best": local[f"mean_{metric}"], "curve": [],
                "bytes_up": 0, "bytes_down": 0, "residual": None, "seconds": None,
                "epsilon": local["epsilon_max"], "clients": len(local["clients"])}
    records = read_metrics(root / METRICS_FILE)
    facts = json.loads((root / "run.json").read_text())
    start = facts.get("evaluation", {}).get("round_0", {}).get(metric)
    curve = [(0, start)] if start is not None else []
    curve += [(r["round"], r[f"eval_{metric}"]) for r in records
              if r.get(f"eval_{metric}") is not None]
    values = [v for _, v in curve[1:]]
    residuals = [r["aggregation_residual"] for r in records
                 if r.get("aggregation_residual") is not None]
    return {
        "final": curve[-1][1] if len(curve) > 1 else None,
        "best": (max if quality_key(task)[1] else min)(values) if values else None,
        "curve": curve,
        "bytes_up": sum(r["bytes_up"] for r in records),
        "bytes_down": sum(r["bytes_down"] for r in records),
        "residual": statistics.fmean(residuals) if residuals else None,
        "exact": all(r.get("aggregation_exact", False) for r in records),
        "seconds": sum(r["seconds"] for r in records),
        "epsilon": run_epsilon(root, records),
    }


def run_epsilon(root: Path, records: list[dict[str, Any]]) -> float | None:
    """The largest per-client epsilon (sample level, from privacy.json) or the federation's
    (client level): what the run spent by the end."""
    path = root / "privacy.json"
    if path.exists():
        privacy = json.loads(path.read_text())
        client = privacy.get("client_level", {}).get("epsilon")
        if client is not None:
            return client
        spent = [c["epsilon"] for c in privacy.get("clients", {}).values()]
        if spent:
            return max(spent)
    return records[-1].get("epsilon_max") if records else None


def check_same_federation(runs: Sequence[PlannedRun]) -> dict[str, Any]:
    """Every federated run of one seed (each strategy, each privacy level) has the same client
    ranks, the same partition and the same sampled clients per round; raises if one differs.
    Client-level DP draws its sample from OS entropy and keeps it secret: there, ranks and
    partition only."""
    checked: dict[int, dict[str, Any]] = {}
    for run in runs:
        if run.reference or run.settings is None:
            continue
        root = Path(str(run.settings.out))
        facts = json.loads((root / "run.json").read_text())
        seen = {"client_ranks": facts["client_ranks"], "partition": facts["partition"]}
        sampled = [r.get("clients") for r in read_metrics(root / METRICS_FILE)]
        first = checked.setdefault(run.seed, {**seen, "clients": None, "runs": 0})
        for name, value in seen.items():
            if value != first[name]:
                raise ValueError(f"{run.key} has other {name.replace('_', ' ')} than the "
                                 f"seed's first run: the comparison is not on one federation")
        if all(c is not None for c in sampled):
            if first["clients"] is None:
                first["clients"] = sampled
            elif sampled != first["clients"]:
                raise ValueError(f"{run.key} sampled other clients than the seed's first run")
        first["runs"] += 1
    return {str(seed): {"runs": c["runs"], "client_ranks": c["client_ranks"],
                        "partition_sha256": c["partition"]["sha256"],
                        "sampled_clients": c["clients"]} for seed, c in checked.items()}


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation, min and max over seeds (None where a seed has none)."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    if not kept:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    std = statistics.stdev(kept) if len(kept) > 1 else 0.0
    return {"mean": statistics.fmean(kept), "std": std, "min": min(kept), "max": max(kept),
            "n": len(kept)}


def rounds_to(curve: Sequence[tuple[int, float]], target: float, higher: bool) -> int | None:
    """The first evaluated round whose held-out metric reaches the target."""
    for round_, value in curve[1:] if curve and curve[0][0] == 0 else curve:
        if (value >= target) if higher else (value <= target):
            return round_
    return None


def cells(runs: Sequence[PlannedRun], summaries: dict[str, dict[str, Any]],
          settings: ComparisonSettings, task: str) -> list[dict[str, Any]]:
    """One cell per (privacy level, method): its seeds' summaries and their spread."""
    _, higher = quality_key(task)
    out: list[dict[str, Any]] = []
    levels: list[Level] = list(dict.fromkeys(run.level for run in runs))
    for level in levels:
        here = [r for r in runs if r.level == level]
        finals = [summaries[r.key]["final"] for r in here
                  if r.key in summaries and not r.reference]
        finals = [f for f in finals if f is not None]
        target = settings.target_accuracy if higher else None
        if target is None and finals:
            best = max(finals) if higher else min(finals)
            target = 0.9 * best if higher else 1.1 * best
        for method in dict.fromkeys(r.method for r in here):
            mine = [r for r in here if r.method == method]
            if mine[0].skipped:
                out.append({"level": level.name, "level_label": level.label, "method": method,
                            "reference": mine[0].reference, "skipped": mine[0].skipped})
                continue
            done = {str(r.seed): summaries[r.key] for r in mine if r.key in summaries}
            reached = [rounds_to(s["curve"], target, higher) if target is not None else None
                       for s in done.values()]
            out.append({
                "level": level.name, "level_label": level.label, "epsilon": level.epsilon,
                "method": method, "reference": mine[0].reference,
                "seeds": done,
                "final": spread([s["final"] for s in done.values()]),
                "best": spread([s["best"] for s in done.values()]),
                "target": target,
                "rounds_to_target": spread([float(r) for r in reached if r is not None]),
                "reached_target": sum(r is not None for r in reached),
                "bytes_up": spread([s["bytes_up"] for s in done.values()]),
                "bytes_down": spread([s["bytes_down"] for s in done.values()]),
                "residual": spread([s["residual"] for s in done.values()]),
                "exact": all(s.get("exact", False) for s in done.values()),
                "epsilon_spent": spread([s["epsilon"] for s in done.values()]),
                "seconds": spread([s["seconds"] for s in done.values()]),
                "wall_seconds": spread([s.get("wall_seconds") for s in done.values()]),
            })
    return out
