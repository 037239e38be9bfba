"""The `fedlr` command line. Errors a user can fix print as one line (exit 2), never a traceback."""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

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


def _default(name: str) -> str:
    """A setting's default as `fedlr simulate --help` shows it (the options themselves default
    to None, so that a --config file can set them)."""
    from dataclasses import MISSING, fields

    from fedlr.simconfig import SimulationConfig

    field = next(f for f in fields(SimulationConfig) if f.name == name)
    value = field.default_factory() if field.default is MISSING else field.default
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "unset" if value is None else str(value)


def _opt(name: str, help: str) -> Any:
    """A `fedlr simulate` option for setting `name`, its default shown in --help."""
    return typer.Option(show_default=_default(name), help=help)


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
    hetero: Annotated[str, typer.Option(
        help="Heterogeneous-rank method: hetlora, hetlora-fedavg or flexlora.")] = "hetlora",
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Path, typer.Option(help="Where metrics.jsonl and demo.png go.")] = Path(
        "runs/demo"
    ),
) -> None:
    """Compare the five aggregation strategies on a synthetic federation shaped like the default
    model (all-MiniLM-L6-v2), with mixed ranks, partial participation and one corrupted upload."""
    from fedlr.config import HETERO_METHODS
    from fedlr.strategies.traits import STRATEGY_NAMES

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
    chosen_ranks = _split_ints(ranks, "--ranks")
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


@app.command()
def simulate(
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML file with any of these settings.")
    ] = None,
    strategy: Annotated[str | None, _opt("strategy", "fedit, flora, ffa, fedsvd or fair.")] = None,
    num_clients: Annotated[int | None, _opt("num_clients", "Clients in the federation.")] = None,
    clients_per_round: Annotated[
        int | None, _opt("clients_per_round", "Clients sampled each round (unset: all).")
    ] = None,
    rounds: Annotated[int | None, _opt("rounds", "Federated rounds.")] = None,
    rank: Annotated[int | None, typer.Option(help="One LoRA rank for every client.")] = None,
    ranks: Annotated[str | None, _opt("ranks", "LoRA ranks cycled over clients.")] = None,
    hetero_method: Annotated[
        str | None, _opt("hetero", "hetlora, hetlora-fedavg or flexlora.")] = None,
    model: Annotated[str | None, _opt("model", "minilm, tiny, a directory or a hub id.")] = None,
    task: Annotated[str | None, _opt("task", "classification or causal-lm.")] = None,
    dataset: Annotated[
        str | None, _opt("dataset", "stdlib-docs, a .jsonl/.csv/.txt file or a hub dataset.")
    ] = None,
    partition: Annotated[
        str | None, _opt("partition", "iid, dirichlet:ALPHA or pathological:K.")] = None,
    local_steps: Annotated[
        int | None, _opt("local_steps", "Local optimiser steps per round.")] = None,
    batch_size: Annotated[int | None, _opt("batch_size", "Local (expected) batch size.")] = None,
    lr: Annotated[float | None, _opt("lr", "Local learning rate.")] = None,
    noise_multiplier: Annotated[
        float | None, _opt("noise_multiplier", "DP-SGD noise sigma.")] = None,
    max_grad_norm: Annotated[
        float | None, _opt("max_grad_norm", "DP-SGD clipping bound C.")] = None,
    target_epsilon: Annotated[
        float | None, _opt("target_epsilon", "Solve sigma for this epsilon over the planned run.")
    ] = None,
    delta: Annotated[float | None, _opt("delta", "DP delta.")] = None,
    client_noise: Annotated[
        float | None,
        _opt("client_noise_multiplier", "Client-level DP (DP-FedAvg): noise multiplier z."),
    ] = None,
    client_clip: Annotated[
        float | None,
        _opt("client_clip_norm", "Client-level DP: L2 bound S on each client's update."),
    ] = None,
    client_sampling: Annotated[
        str | None, _opt("client_sampling", "Client-level DP: poisson or fixed client sampling.")
    ] = None,
    publish_client_ids: Annotated[
        bool | None,
        _opt("publish_client_ids", "Client-level DP: name each round's clients in the run "
                                   "directory; epsilon is then accounted without amplification "
                                   "by sampling."),
    ] = None,
    export_rank: Annotated[
        int | None, _opt("export_rank", "flora: compress the exported adapter to this rank.")
    ] = None,
    seed: Annotated[int | None, _opt("seed", "Seed of everything random (not of DP's draws).")
                    ] = None,
    out: Annotated[
        str | None, typer.Option(help="Run directory, must not exist (default: runs/NAME-TIME).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    save_client_updates: Annotated[
        bool | None, _opt("save_client_updates", "Keep every client's update of every round.")
    ] = None,
) -> None:
    """Simulate a federation on this machine (Flower simulation engine). With no options: the
    default model (all-MiniLM-L6-v2) on the built-in stdlib-docs task, ffa, 8 clients. Ctrl-C
    stops it within seconds; --resume continues it."""
    from fedlr.simconfig import SimulationConfig

    if rank is not None and ranks is not None:
        raise FedlrError("give --rank or --ranks, not both")
    if resume and out is None and config is None:
        raise FedlrError("--resume needs the --out of the run to continue")
    overrides = {
        "strategy": strategy, "num_clients": num_clients, "clients_per_round": clients_per_round,
        "rounds": rounds, "hetero": hetero_method, "model": model, "task": task,
        "dataset": dataset, "partition": partition, "local_steps": local_steps,
        "batch_size": batch_size, "lr": lr, "noise_multiplier": noise_multiplier,
        "max_grad_norm": max_grad_norm, "target_epsilon": target_epsilon, "delta": delta,
        "client_noise_multiplier": client_noise, "client_clip_norm": client_clip,
        "client_sampling": client_sampling, "publish_client_ids": publish_client_ids,
        "export_rank": export_rank, "seed": seed, "out": out,
        "save_client_updates": save_client_updates,
        "ranks": [rank] if rank is not None else (
            _split_ints(ranks, "--ranks") if ranks is not None else None
        ),
    }
    try:
        settings = SimulationConfig.load(config, overrides)
    except FedlrError as exc:  # name the flags the user typed, not the settings' TOML names
        raise FedlrError(_as_flags(str(exc), [k for k, v in overrides.items() if v is not None])
                         ) from None
    _stop_on_signals(Path(str(settings.out)))
    from fedlr.client.app import app as client_app
    from fedlr.server.simulation import simulate as run

    run(settings, client_app, resume=resume, console=console)


FLAG_NAMES = {"client_noise_multiplier": "--client-noise", "client_clip_norm": "--client-clip"}


def _as_flags(message: str, given: list[str]) -> str:
    """An error about settings, with each setting given on the command line named by its flag
    (names of several words only: a one-word name is the same word in prose)."""
    import re

    for name in (n for n in given if "_" in n):
        flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        message = re.sub(rf"(?<![-\w]){name}(?![-\w])", flag, message)
    return message


def _stop_on_signals(out: Path) -> None:
    """Ctrl-C (or SIGTERM) ends the process within seconds: every process it started (Flower's
    and Ray's) is killed, one line says how to resume, and it exits with 130 (143). Every file
    of a run directory is written atomically, so --resume continues from wherever it stopped."""
    import os
    import signal

    import psutil

    def stop(signum: int, frame: object) -> None:
        how = (f"continue with the same settings and --out {out} --resume" if out.exists()
               else "nothing was written")
        Console(stderr=True).print(f"\ninterrupted: {how}", highlight=False, soft_wrap=True)
        quiet = os.open(os.devnull, os.O_WRONLY)  # Flower's threads would report the kills
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        children = psutil.Process().children(recursive=True)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(children, timeout=5)
        os._exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)


@app.command()
def predict(
    adapter: Annotated[Path, typer.Argument(help="A run's adapter/ folder.")],
    texts: Annotated[
        list[str] | None, typer.Argument(help="Texts to classify or continue.")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="One text per line.")] = None,
    top: Annotated[int, typer.Option(min=1, help="Classes shown per text.")] = 3,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Causal LM: tokens to add.")] = 32,
) -> None:
    """Label names with scores for each text (or a continuation, for a causal LM), from the
    base and the exported adapter."""
    given = list(texts or [])
    if file is not None:
        if not file.is_file():
            raise FedlrError(f"--file not found: {file}")
        given += [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not given:
        raise FedlrError("no text to predict: give texts as arguments or --file FILE")
    if not adapter.is_dir():
        raise FedlrError(f"{adapter} is not a directory; give a run's adapter/ folder")
    from fedlr.predict import classify, generate, load_exported

    exported = load_exported(adapter)
    table = Table(title=f"{adapter} on {exported.spec.name}")
    table.add_column("text", overflow="fold", max_width=60)
    if exported.spec.task == "classification":
        table.add_column("prediction")
        table.add_column("score", justify="right")
        table.add_column("next", overflow="fold")
        for text, ranked in zip(given, classify(exported, given, top), strict=True):
            label, score = ranked[0]
            rest = ", ".join(f"{name} {p:.3f}" for name, p in ranked[1:])
            table.add_row(text, label, f"{score:.3f}", rest)
    else:
        table.add_column("continuation", overflow="fold")
        for text, more in zip(given, generate(exported, given, max_new_tokens), strict=True):
            table.add_row(text, more)
    console.print(table)


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
    from fedlr.privacy_plan import plan_client_level, plan_sample_level

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

    from fedlr.audit import write_audit
    from fedlr.simconfig import SimulationConfig

    found = {}
    if empirical:
        from fedlr.client.empirical_audit import sample_level_audit
        from fedlr.client_dp_audit import audit_recorded_run

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


@app.command()
def certs(
    folder: Annotated[Path, typer.Argument(help="New folder for the keys and certificates.")],
    hosts: Annotated[
        str, typer.Option(help="Server names and IP addresses, comma-separated.")
    ] = "localhost,127.0.0.1",
    nodes: Annotated[int, typer.Option(min=0, help="Node key pairs: node1, node2, ...")] = 2,
    days: Annotated[int, typer.Option(min=1, help="Certificate lifetime in days.")] = 365,
) -> None:
    """Create a CA, a TLS certificate for the server and OpenSSH key pairs for the nodes."""
    from fedlr.certs import create

    names = [f"node{i}" for i in range(1, nodes + 1)]
    made = create(folder, [h.strip() for h in hosts.split(",") if h.strip()], names, days)
    table = Table(title=f"key material in {folder}")
    table.add_column("file")
    table.add_column("for")
    table.add_row(str(made.ca_cert), "every node (--root-certificates) and the server")
    table.add_row(f"{made.server_cert}, {made.server_key}", "the server only")
    for name, (key, pub) in made.node_keys.items():
        table.add_row(f"{key}, {pub}", f"{name}: private key stays on it; register the .pub")
    console.print(table)
    console.print("ca.key signs certificates: keep it offline.")


@app.command()
def server(
    certs: Annotated[Path | None, typer.Option(help="Folder made by `fedlr certs`.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port of the SuperLink's API.")] = 8000,
    database: Annotated[Path, typer.Option(help="SuperLink state, kept across restarts.")] = Path(
        "superlink.db"
    ),
    insecure: Annotated[bool, typer.Option(help="Plain text, no node auth: tests only.")] = False,
) -> None:
    """Start the coordinator's Flower SuperLink: TLS and node authentication unless --insecure."""
    from fedlr.server.launch import INSECURE_WARNING, superlink_argv

    argv = superlink_argv(certs, host=host, port=port, database=database, insecure=insecure)
    if insecure:
        Console(stderr=True).print(f"[bold red]{INSECURE_WARNING}[/]")
    _exec(argv)


@app.command()
def client(
    superlink: Annotated[str, typer.Option(help="HOST:PORT of the server.")],
    partition_id: Annotated[int, typer.Option(help="This client's share of the data.")],
    num_partitions: Annotated[int, typer.Option(help="Number of clients sharing the data.")],
    ca: Annotated[Path | None, typer.Option(help="The CA certificate (ca.crt).")] = None,
    key: Annotated[Path | None, typer.Option(help="This node's private key (nodeK).")] = None,
    port: Annotated[int, typer.Option(help="Local port of the SuperNode's API.")] = 9094,
    data: Annotated[
        Path | None, typer.Option(help="This machine's own .jsonl/.csv/.txt examples (default: "
                                       "its partition of the run's dataset).")
    ] = None,
    give_up_after: Annotated[
        float | None, typer.Option(help="Stop after this many seconds without the server "
                                        "(default: keep reconnecting).")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="Where this node keeps its privacy ledger (default: "
                                       "~/.local/share/fedlr/node-PARTITION_ID).")
    ] = None,
    max_epsilon: Annotated[
        float | None, typer.Option(help="Refuse any round that would take this node's "
                                        "sample-level epsilon past this (and any job without "
                                        "DP-SGD).")
    ] = None,
    budget_delta: Annotated[
        float, typer.Option(help="The delta at which --max-epsilon is checked.")
    ] = 1e-5,
    min_noise_multiplier: Annotated[
        float | None, typer.Option(help="Refuse DP-SGD with less noise than this (and any job "
                                        "without DP-SGD).")
    ] = None,
    max_clip_norm: Annotated[
        float | None, typer.Option(help="Refuse DP-SGD with a larger clipping bound C.")
    ] = None,
    insecure: Annotated[bool, typer.Option(help="Plain text: tests only.")] = False,
) -> None:
    """Start a Flower SuperNode for this machine; it trains on CUDA when present. Its privacy
    ledger and limits are its own: whatever the server sends, it refuses a round past them."""
    from fedlr.client.launch import supernode_argv
    from fedlr.node_privacy import NodeLimits, default_state_dir

    limits = NodeLimits(max_epsilon=max_epsilon, delta=budget_delta,
                        min_noise_multiplier=min_noise_multiplier, max_clip_norm=max_clip_norm)
    _exec(supernode_argv(superlink, ca=ca, key=key, partition_id=partition_id,
                         num_partitions=num_partitions, port=port, insecure=insecure,
                         state_dir=state_dir or default_state_dir(partition_id), limits=limits,
                         give_up_after=give_up_after, data=data))


def _exec(argv: list[str]) -> None:
    """Replace this process with Flower's, found next to this Python (or on PATH)."""
    import os
    import shutil

    local = Path(sys.executable).parent / argv[0]
    program = str(local) if local.is_file() else shutil.which(argv[0])
    if program is None:
        raise FedlrError(f"{argv[0]} not found; install flwr in this environment")
    console.print(" ".join(argv), highlight=False)
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    # Flower starts its own helpers (flower-superexec) by name: find them in this environment
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.execv(program, [program, *argv[1:]])


def main() -> None:
    """Entry point: run the app, turning fedlr's own errors into one clear line."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' notices to developers
    try:
        app()
    except FedlrError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before a command installed its own handling
        Console(stderr=True).print("interrupted", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
