"""The `fedlr` command line. Errors a user can fix print as one line (exit 2), never a traceback."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedlr import __version__
from fedlr.errors import FedlrError

app = typer.Typer(
    help="Federated fine-tuning of language models with LoRA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def _split_ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FedlrError(f"{what} must be comma-separated integers, got {text!r}") from None


def _version(value: bool) -> None:
    if value:
        console.print(f"fedlr {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Federated fine-tuning of language models with LoRA."""


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
    hetero: Annotated[str, typer.Option(help="Heterogeneous-rank method: hetlora or flexlora.")] = (
        "hetlora"
    ),
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Path, typer.Option(help="Where metrics.jsonl and demo.png go.")] = Path(
        "runs/demo"
    ),
) -> None:
    """Compare the five aggregation strategies on a synthetic federation shaped like the default
    model (all-MiniLM-L6-v2), with mixed ranks, partial participation and one corrupted upload."""
    from rich.progress import Progress

    from fedlr.demo import DemoConfig, SyntheticFederation, run_strategy, write_results
    from fedlr.strategies import STRATEGIES

    names = [s.strip() for s in strategies.split(",") if s.strip()]
    unknown = sorted(set(names) - set(STRATEGIES))
    if unknown:
        raise FedlrError(f"unknown strategies {unknown}; choose from {sorted(STRATEGIES)}")
    if clients_per_round > num_clients:
        raise FedlrError(
            f"--clients-per-round {clients_per_round} exceeds --num-clients {num_clients}"
        )
    if hetero not in ("hetlora", "flexlora"):
        raise FedlrError(f"unknown --hetero {hetero!r}; choose hetlora or flexlora")
    config = DemoConfig(
        strategies=names,
        num_clients=num_clients,
        clients_per_round=clients_per_round,
        ranks=_split_ints(ranks, "--ranks"),
        rounds=rounds,
        local_steps=local_steps,
        hetero=hetero,
        seed=seed,
    )
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
            f"{rows[-1].residual:.2e}",
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


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A fedlr adapter file or a PEFT adapter directory.")],
) -> None:
    """Show an adapter's modules, ranks, scalings, ||dW|| and metadata."""
    from fedlr.adapters import load_adapter

    adapter = load_adapter(path)
    table = Table(title=str(path))
    for col in ("module", "kind", "rank", "scaling", "||dW||_F"):
        table.add_column(col)
    deltas = adapter.delta_weights()
    for name in sorted(deltas):
        f = adapter.lora.get(name)
        kind = "lora" + ("+base" if name in adapter.base else "") if f else "base"
        table.add_row(
            name,
            kind,
            str(f.rank) if f else "-",
            f"{f.scaling:g}" if f else "-",
            f"{float(deltas[name].norm()):.4g}",
        )
    console.print(table)
    for name, t in sorted(adapter.extras.items()):
        console.print(f"extra {name}: {tuple(t.shape)}")
    if adapter.meta:
        console.print(f"meta: {adapter.meta}")


def main() -> None:
    """Entry point: run the app, turning fedlr's own errors into one clear line."""
    try:
        app()
    except FedlrError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
