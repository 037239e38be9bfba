"""`fedlr simulate` (every setting of the schema as an option) and `fedlr demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fedlr.cli.common import app, console, split_ints, stop_on_signals
from fedlr.cli.settings_options import as_flags, check_resume, with_settings
from fedlr.errors import FedlrError


@app.command()
@with_settings()
def simulate(config: Path | None, resume: bool, overrides: dict[str, Any]) -> None:
    """Simulate a federation on this machine, or on a Ray cluster with --ray-address (Flower
    simulation engine). With no options: the default model (all-MiniLM-L6-v2) on the built-in
    stdlib-docs task, ffa, 8 clients. Ctrl-C stops it within seconds; --resume continues it."""
    from fedlr.settings.schema import SimulationConfig

    check_resume(config, resume, overrides)
    try:
        settings = SimulationConfig.load(config, overrides)
    except FedlrError as exc:  # name the flags the user typed, not the settings' TOML names
        raise FedlrError(as_flags(str(exc), [k for k, v in overrides.items() if v is not None])
                         ) from None
    out = Path(str(settings.out))
    stop_on_signals(out, f"continue with the same settings and --out {out} --resume")
    from fedlr.client.app import app as client_app
    from fedlr.server.simulation import simulate as run

    run(settings, client_app, resume=resume, console=console)


@app.command()
def demo(
    strategies: Annotated[str, typer.Option(help="Comma-separated strategies to compare.")] = (
        "fedit,flora,ffa,fedsvd,fair"
    ),
    num_clients: Annotated[int, typer.Option(min=1, help="Clients in the federation.")] = 10,
    clients_per_round: Annotated[int, typer.Option(min=1, help="Clients sampled each round.")] = 6,
    ranks: Annotated[str, typer.Option(help="LoRA ranks, cycled over clients.")] = "4,8,16",
    rounds: Annotated[int, typer.Option(min=1)] = 6,
    local_steps: Annotated[int, typer.Option(min=1, help="Local optimiser steps per round.")] = 20,
    hetero: Annotated[str, typer.Option(
        help="Heterogeneous-rank method: hetlora, hetlora-fedavg or flexlora.")] = "hetlora",
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Path, typer.Option(help="Where metrics.jsonl and demo.png go.")] = Path(
        "runs/demo"
    ),
) -> None:
    """Compare the five aggregation strategies on a synthetic federation shaped like the default
    model (all-MiniLM-L6-v2), with mixed ranks, partial participation and one corrupted upload."""
    from fedlr.lora.strategies.traits import STRATEGY_NAMES
    from fedlr.settings.specs import HETERO_METHODS

    names = [s.strip() for s in strategies.split(",") if s.strip()]
    unknown = sorted(set(names) - set(STRATEGY_NAMES))
    if unknown:
        raise FedlrError(f"unknown strategies {unknown}; choose from {sorted(STRATEGY_NAMES)}")
    if clients_per_round > num_clients:
        raise FedlrError(
            f"--clients-per-round {clients_per_round} exceeds --num-clients {num_clients}"
        )
    if hetero not in HETERO_METHODS:
        raise FedlrError(f"unknown --hetero {hetero!r}; choose one of {HETERO_METHODS}")
    chosen_ranks = split_ints(ranks, "--ranks")
    from rich.progress import Progress

    from fedlr.demo import DemoConfig, SyntheticFederation, run_strategy, write_results

    config = DemoConfig(
        strategies=names,
        num_clients=num_clients,
        clients_per_round=clients_per_round,
        ranks=chosen_ranks,
        rounds=rounds,
        local_steps=local_steps,
        hetero=hetero,
        seed=seed,
    )
    import torch

    # small tensors: a second thread buys nothing and, on a many-core machine, many threads would
    # spin for minutes of CPU time
    torch.set_num_threads(1)
    fed = SyntheticFederation(config)
    records = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("aggregating", total=len(names) * rounds)
        for name in names:
            progress.update(task, description=f"{name}")
            records += run_strategy(fed, name, lambda: progress.advance(task))
    write_results(records, config, out)

    table = Table(title=f"{num_clients} clients, ranks {config.ranks}, {rounds} rounds ({hetero})")
    for col in (
        "strategy",
        "residual (last)",
        "gap to optimum",
        "MB up",
        "MB down",
        "s",
        "rejected",
    ):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for name in names:
        rows = [r for r in records if r.strategy == name]
        table.add_row(
            name,
            "exact" if rows[-1].exact else f"{rows[-1].residual:.2e}",
            f"{rows[-1].gap_to_optimum:.3f}",
            f"{sum(r.bytes_up for r in rows) / 1e6:.1f}",
            f"{sum(r.bytes_down for r in rows) / 1e6:.1f}",
            f"{sum(r.seconds for r in rows):.1f}",
            str(sum(len(r.rejected) for r in rows)),
        )
    console.print(table)
    reasons = {r["reason"] for rec in records for r in rec.rejected}
    for reason in sorted(reasons):
        console.print(f"rejected: {reason}")
    console.print(f"results: {out / 'metrics.jsonl'}, plot: {out / 'demo.png'}")
