"""`fedlr certs`, `fedlr server`, `fedlr client`: a real deployment (TLS, node keys)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedlr.cli.common import app, console
from fedlr.errors import FedlrError


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
    host: Annotated[str, typer.Option(help="Address the nodes connect to.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port of the Fleet API, the nodes' only one.")] = 8000,
    control_port: Annotated[
        int, typer.Option(help="Loopback port of the SuperLink: `flwr run`, `ls`, `stop` and "
                               "`supernode register` on this machine (or an SSH tunnel).")
    ] = 9093,
    database: Annotated[Path, typer.Option(help="SuperLink state, kept across restarts.")] = Path(
        "superlink.db"
    ),
    insecure: Annotated[bool, typer.Option(help="Plain text, no node auth: tests only.")] = False,
) -> None:
    """Start the coordinator: Flower's SuperLink on loopback, and on the public address a front
    that serves the nodes' Fleet API alone (TLS and node authentication unless --insecure)."""
    from fedlr.server.launch import INSECURE_WARNING, ServerPlan, serve

    plan = ServerPlan(certs, host, port, control_port, database, insecure)
    if insecure:
        Console(stderr=True).print(f"[bold red]{INSECURE_WARNING}[/]")
    table = Table(title="fedlr server")
    for column in ("address", "serves", "who can reach it"):
        table.add_column(column)
    for row in plan.rows():
        table.add_row(*row)
    console.print(table)
    serve(plan)


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
    allow_data: Annotated[
        list[str] | None, typer.Option(help="A data source (file or hub dataset) a job may "
                                            "name, beyond --data and the built-in task; "
                                            "repeatable.")
    ] = None,
    allow_model: Annotated[
        list[str] | None, typer.Option(help="A model (folder or hub name) a job may name, "
                                            "beyond the presets; repeatable.")
    ] = None,
    max_rank: Annotated[int, typer.Option(help="Refuse a job with a larger LoRA rank.")] = 64,
    max_labels: Annotated[int, typer.Option(help="Refuse a job with more labels.")] = 1000,
    max_length: Annotated[int, typer.Option(help="Refuse a job with longer sequences.")] = 2048,
    max_local_steps: Annotated[
        int, typer.Option(help="Refuse a job with more local steps a round.")
    ] = 10_000,
    max_batch_size: Annotated[int, typer.Option(help="Refuse a job with larger batches.")] = 256,
    warm: Annotated[
        bool, typer.Option(help="Keep the model and data loaded between rounds in a trainer "
                                "process beside the SuperNode (--no-warm: load them in every "
                                "round's own process, as Flower runs each message).")
    ] = True,
    insecure: Annotated[bool, typer.Option(help="Plain text: tests only.")] = False,
) -> None:
    """Start a Flower SuperNode for this machine; it trains on CUDA when present. Its privacy
    ledger, its limits and what it may read and load are its own: whatever the server sends,
    it refuses a job past them."""
    import shutil

    from fedlr.client import app_runner
    from fedlr.client.launch import node_config_text, supernode_argv
    from fedlr.client.node_trainer import start
    from fedlr.node_policy import NodePolicy
    from fedlr.privacy.node import NodeLimits, default_state_dir

    limits = NodeLimits(max_epsilon=max_epsilon, delta=budget_delta,
                        min_noise_multiplier=min_noise_multiplier, max_clip_norm=max_clip_norm)
    policy = NodePolicy(data=tuple(allow_data or ()), models=tuple(allow_model or ()),
                        max_rank=max_rank, max_labels=max_labels, max_length=max_length,
                        max_local_steps=max_local_steps, max_batch_size=max_batch_size)
    state_dir = state_dir or default_state_dir(partition_id)
    trainer = (start(node_config_text(partition_id, num_partitions, state_dir, limits, data,
                                      policy)) if warm else None)
    runner = app_runner.prepare()  # the only process that runs messages, after its app check
    try:
        argv = supernode_argv(superlink, ca=ca, key=key, partition_id=partition_id,
                              num_partitions=num_partitions, port=port, insecure=insecure,
                              state_dir=state_dir, limits=limits, give_up_after=give_up_after,
                              data=data, trainer=trainer, runner=runner, policy=policy)
    except BaseException:
        shutil.rmtree(runner, ignore_errors=True)
        raise
    app_runner.start(runner, f"127.0.0.1:{port}")
    _exec(argv)


SUPEREXEC_POLL_SECONDS = 0.1


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
    # Flower's SuperExec looks for work every second by default; each message a node trains (or
    # a run the server starts) waited half of that on average before its process was launched
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(SUPEREXEC_POLL_SECONDS))
    # Flower starts its own helpers (flower-superexec) by name: find them in this environment
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.execv(program, [program, *argv[1:]])
