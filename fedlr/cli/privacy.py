"""`fedlr privacy plan` (size a private run) and `fedlr audit` (check a finished one)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedlr.cli.common import app, console
from fedlr.errors import FedlrError

privacy_app = typer.Typer(help="Size a private run before it starts.", no_args_is_help=True)
app.add_typer(privacy_app, name="privacy")


@privacy_app.command("plan")
def privacy_plan(
    level: Annotated[str, typer.Option(help="sample (DP-SGD) or client (DP-FedAvg).")] = "sample",
    target_epsilon: Annotated[
        float | None, typer.Option(help="Solve the noise for this epsilon.")] = None,
    noise: Annotated[
        float | None, typer.Option(help="Or: the noise multiplier, to get its epsilon.")] = None,
    delta: Annotated[float, typer.Option(help="DP delta.")] = 1e-5,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 3,
    local_steps: Annotated[int, typer.Option(help="sample: local steps per round.")] = 10,
    sample_rate: Annotated[float | None, typer.Option(help="sample: q per step.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="sample: or batch size ...")] = None,
    examples: Annotated[int | None, typer.Option(help="sample: ... and examples per client.")] = (
        None),
    accountant: Annotated[
        str | None, typer.Option(help="prv or rdp (sample), rdp or pld (client).")] = None,
    num_clients: Annotated[int, typer.Option(help="client: clients in the federation.")] = 100,
    clients_per_round: Annotated[int, typer.Option(help="client: sampled per round.")] = 10,
    sampling: Annotated[str, typer.Option(help="client: poisson or fixed.")] = "poisson",
) -> None:
    """The noise a target epsilon needs, or the epsilon a noise gives, with a cross-check."""
    from fedlr.privacy.planners import plan_client_level, plan_sample_level

    if level == "sample":
        plan = plan_sample_level(
            delta=delta, rounds=rounds, local_steps=local_steps, target_epsilon=target_epsilon,
            noise_multiplier=noise, sample_rate=sample_rate, batch_size=batch_size,
            examples_per_client=examples, accountant=accountant or "prv")
    elif level == "client":
        plan = plan_client_level(
            delta=delta, rounds=rounds, num_clients=num_clients,
            clients_per_round=clients_per_round, target_epsilon=target_epsilon,
            noise_multiplier=noise, sampling=sampling, accountant=accountant or "rdp")
    else:
        raise FedlrError(f"unknown level {level!r}; choose sample or client")
    table = Table(title=f"{level}-level privacy plan", show_header=False)
    table.add_column("what")
    table.add_column("value")
    for label, value in plan.rows():
        table.add_row(label, value)
    console.print(table)


@app.command()
def audit(
    run: Annotated[Path, typer.Argument(help="A run directory with privacy.json.")],
    empirical: Annotated[
        bool, typer.Option(help="Also rerun the training with canaries for a lower bound.")
    ] = False,
    canaries: Annotated[int, typer.Option(min=2, help="Canaries for --empirical.")] = 1000,
) -> None:
    """Recompute and cross-check every epsilon of a DP run: audit.json, audit.md, audit.png;
    with --empirical, an empirical lower bound from gradient canaries next to the claim (canary
    inclusion, sampling and noise from OS entropy, so two audits differ)."""
    import json

    from fedlr.privacy.audit import write_audit
    from fedlr.settings.schema import SimulationConfig

    found = {}
    if empirical:
        from fedlr.client.empirical_audit import sample_level_audit
        from fedlr.privacy.client_audit import audit_recorded_run

        recorded = run / "run.json"
        if not recorded.is_file():
            raise FedlrError(f"{run} has no run.json: --empirical reruns the run's configuration")
        config = SimulationConfig.load(None, json.loads(recorded.read_text())["config"])
        if config.dp_config() is not None:
            with console.status(f"sample level: training with {canaries} gradient canaries"):
                found["sample_level"] = sample_level_audit(config, canaries)
        if config.client_dp_config() is not None:
            with console.status(f"client level: {canaries} canary clients"):
                found["client_level"] = audit_recorded_run(run, config, canaries)
    report = write_audit(run, found)
    table = Table(title=f"privacy audit of {run}")
    for column in ("level", "epsilon", "cross-check", "delta"):
        table.add_column(column)
    if "sample_level" in report:
        s = report["sample_level"]
        table.add_row("sample (max over clients)", f"{s['epsilon_accounted']:.4f}",
                      f"{s['epsilon_cross_check']:.4f} (PLD)", f"{s['delta']:g}")
    if "client_level" in report:
        c = report["client_level"]
        other = c["epsilon_other_accountant"]
        table.add_row("client", f"{c['epsilon']:.4f}", "-" if other is None else f"{other:.4f}",
                      f"{c['delta']:g}")
    for level, result in found.items():
        table.add_row(f"{level.replace('_', ' ')}: empirical lower bound",
                      f"{result['epsilon_lower_bound']:.4f}",
                      f"claimed {result['epsilon_claimed']:.4f}, ceiling {result['ceiling']:.2f}",
                      f"{result['delta']:g}")
    console.print(table)
    for flag in report["flags"]:
        console.print(f"[bold red]flag:[/] {flag}", highlight=False)
    console.print(f"report: {run / 'audit.md'} (audit.json, audit.png)")
