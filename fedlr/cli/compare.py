"""`fedlr compare`: every (privacy level, strategy, seed) on one federation, plus the
references, then compare.json, compare.md and compare.png. Rerunning with the same --out
continues: finished runs are kept, a half-finished one resumes from its checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.progress import Progress
from rich.table import Table

from fedlr.cli.common import app, console, stop_on_signals
from fedlr.cli.settings_options import as_flags, with_settings
from fedlr.comparison.plan import ComparisonSettings, PlannedRun, plan_comparison
from fedlr.errors import ConfigError, FedlrError
from fedlr.settings.schema import SimulationConfig, read_toml

PLAN_FILE = "compare-settings.json"


@app.command()
@with_settings(also=ComparisonSettings, resume=False)
def compare(config: Path | None, resume: bool, overrides: dict[str, Any],
            own: dict[str, Any]) -> None:
    """Compare strategies on one federation (same seed, partition, client ranks, sampled
    clients and local steps), at each privacy level, with centralized and local-only
    references. Takes every option of `fedlr simulate`; a TOML --config may hold them too
    (the comparison's own in a table named compare). Rerun the same command to continue a
    stopped comparison."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        values = (read_toml(config) if config is not None else {}) | given
        values.setdefault("out", f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
        clip = values.pop("client_clip_norm", None)  # a client-level level's, not the base's
        base = SimulationConfig.load(None, values)
        settings = ComparisonSettings.load(config, own)
        out = Path(str(base.out))
        runs = plan_comparison(base, settings, out, clip)
    except FedlrError as exc:
        raise FedlrError(as_flags(str(exc), [*given, *(k for k, v in own.items() if v is not None)])
                         ) from None
    record_plan(out, base, settings, clip)
    stop_on_signals(out, f"rerun the same command (--out {out}) to continue; finished runs "
                         "are kept")
    drive(base, settings, runs, out)


def record_plan(out: Path, base: SimulationConfig, settings: ComparisonSettings,
                clip: float | None) -> None:
    """The comparison's settings, written once: a rerun with other settings is refused before
    any work (its runs would not be comparable with those already finished)."""
    from dataclasses import asdict

    from fedlr.atomic import write_json

    wanted = json.loads(json.dumps({"base": {k: v for k, v in base.to_dict().items()
                                             if k != "out"},
                                    "compare": asdict(settings) | {"client_clip_norm": clip}}))
    path = out / PLAN_FILE
    if path.exists():
        recorded = json.loads(path.read_text())
        differ = sorted(k for part in ("base", "compare") for k in wanted[part]
                        if recorded[part].get(k) != wanted[part][k])
        if differ:
            raise ConfigError(f"{out} holds a comparison with other settings ({differ}); rerun "
                              "with its settings, or choose a new --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, wanted)


def drive(base: SimulationConfig, settings: ComparisonSettings, runs: list[PlannedRun],
          out: Path) -> None:
    """Each run in turn (seed by seed, so that a stopped comparison already has whole seeds),
    the results rewritten after each."""
    from fedlr.client.app import app as client_app
    from fedlr.client.local_only import train_local_only
    from fedlr.comparison.results import add_wall_time, run_complete
    from fedlr.server.simulation import simulate

    todo = [r for r in runs if r.settings is not None]
    for i, run in enumerate(todo, start=1):
        assert run.settings is not None
        where = Path(str(run.settings.out))
        if run_complete(run):
            console.print(f"[{i}/{len(todo)}] {run.key}: done", highlight=False)
            continue
        resume = where.exists()
        console.print(f"[bold][{i}/{len(todo)}] {run.key}[/]" + (" (resuming)" if resume else ""),
                      highlight=False)
        tic = time.perf_counter()
        if run.method == "local-only":
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("local-only: clients", total=run.settings.num_clients)
                train_local_only(run.settings, where, lambda _, t=task: progress.advance(t))
        else:
            simulate(run.settings, client_app, resume=resume, console=console, report=False)
        add_wall_time(out, run.key, time.perf_counter() - tic)
        write_results(base, settings, runs, out)
    document = write_results(base, settings, runs, out)
    console.print(results_table(document))
    console.print(f"comparison: {out / 'compare.md'}, {out / 'compare.png'}, "
                  f"{out / 'compare.json'}")


def write_results(base: SimulationConfig, settings: ComparisonSettings, runs: list[PlannedRun],
                  out: Path) -> dict[str, Any]:
    """compare.json, compare.md and compare.png from the runs finished so far."""
    from fedlr.atomic import atomic_write, write_json
    from fedlr.comparison.document import build_document
    from fedlr.comparison.report import markdown, plot
    from fedlr.comparison.results import (
        check_same_federation,
        run_complete,
        summarise_run,
        wall_times,
    )

    finished = [r for r in runs if r.settings is not None and run_complete(r)]
    walls = wall_times(out)
    summaries = {r.key: summarise_run(r) | {"wall_seconds": walls.get(r.key)} for r in finished}
    try:
        same = check_same_federation(finished)
    except ValueError as exc:
        raise FedlrError(f"{exc}; rerun the comparison in a new --out") from None
    federated = next((r for r in finished if not r.reference), None)
    evaluation = ({} if federated is None else json.loads(
        (Path(str(federated.settings.out)) / "run.json").read_text()).get("evaluation", {}))
    document = build_document(base, settings, runs, summaries, same, evaluation)
    write_json(out / "compare.json", document)
    atomic_write(out / "compare.md", lambda tmp: Path(tmp).write_text(markdown(document)))
    if summaries:
        atomic_write(out / "compare.png", lambda tmp: plot(document, Path(tmp)))
    return document


def results_table(document: dict[str, Any]) -> Table:
    metric = document["metric"]
    table = Table(title=document["title"])
    for column in ("level", "method", f"final {metric}", f"best {metric}", "MB up", "epsilon"):
        table.add_column(column, justify="left" if column in ("level", "method") else "right")
    for c in document["cells"]:
        if "skipped" in c:
            table.add_row(c["level_label"], c["method"], "not run", "", "", "")
            continue
        final, best, up, eps = c["final"], c["best"], c["bytes_up"], c["epsilon_spent"]
        table.add_row(c["level_label"], c["method"],
                      "-" if final["mean"] is None else f"{final['mean']:.3f} ± {final['std']:.3f}",
                      "-" if best["mean"] is None else f"{best['mean']:.3f}",
                      "-" if up["mean"] is None else f"{up['mean'] / 2**20:.1f}",
                      "-" if eps["mean"] is None else f"{eps['mean']:.2f}")
    return table
