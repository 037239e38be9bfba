"""`fedlr simulate`: a whole federation with Flower's simulation engine, on this machine or on an
existing Ray cluster (`ray_address`).

The ServerApp runs the coordinator in this process; virtual clients run in Ray worker processes,
one CPU each unless `worker_cpus` says otherwise, and each process loads the frozen base and the
data once for all the clients it serves. Everything that can be wrong with the settings is found
before Ray starts.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedlr.errors import FedlrError
from fedlr.federation import Federation
from fedlr.lora.strategies import GlobalState
from fedlr.models.sources import resolve_source
from fedlr.privacy.node import SIMULATED_NODES_ENV
from fedlr.server.coordinator import Coordinator
from fedlr.server.export import export_peft, final_adapter
from fedlr.server.grouping import grouping_for
from fedlr.server.report import evaluation_note, plot, summary_table
from fedlr.server.rundir import RunDir
from fedlr.settings.schema import PLACEMENT_SETTINGS, SimulationConfig

# What the ClientApp's processes need from this process's environment. Ray workers get it through
# the job's runtime_env: on a cluster they are started by each machine's own Ray, not from here.
WORKER_ENV = (SIMULATED_NODES_ENV, "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE",
              "TRANSFORMERS_OFFLINE", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO")


def gpu_share() -> float:
    """Each of the os.cpu_count() workers gets an equal slice of one GPU, when there is one."""
    import torch

    return 1.0 / (os.cpu_count() or 1) if torch.cuda.is_available() else 0.0


def worker_resources(config: SimulationConfig) -> dict[str, float]:
    """What each Ray worker (one process serving simulated clients in turn) reserves."""
    gpus = gpu_share() if config.worker_gpus is None else config.worker_gpus
    return {"num_cpus": config.worker_cpus, "num_gpus": gpus}


def ray_init_args(config: SimulationConfig) -> dict[str, Any]:
    """`ray.init`'s arguments: a local Ray with this machine's CPUs ("local": never a cluster
    that happens to run here), or the cluster at `ray_address`, whose machines declared their own
    resources. The workers get WORKER_ENV and this process's sys.path (as Flower passes it)."""
    paths = [*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {name: os.environ[name] for name in WORKER_ENV if name in os.environ}
    args: dict[str, Any] = {
        "include_dashboard": False, "logging_level": "error", "log_to_driver": False,
        "runtime_env": {"env_vars": {**env, "PYTHONPATH": os.pathsep.join(paths)}},
    }
    if config.ray_address is None:
        return {**args, "address": "local", "num_cpus": os.cpu_count() or 1}
    return {**args, "address": config.ray_address}


def check_reachable(address: str | None) -> None:
    """A HOST:PORT cluster address answers, else one line now (Ray itself retries for minutes)."""
    import socket

    host, _, port = (address or "").rpartition(":")
    if "://" in (address or "") or not host or not port.isdigit():
        return  # unset, auto, or ray://: Ray finds or refuses it at once
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise FedlrError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start "
                         "one with `ray start --head --port 6379` (see the README), or leave "
                         "ray_address unset") from None


def start_ray(config: SimulationConfig) -> None:
    """Start (or join) the Ray this run's clients run on. Flower then finds Ray initialised and
    uses it as it is (its own `ray.init` could not take a runtime_env), and shuts it down at the
    end; a Ray this process was already connected to is left first, as Flower would at the end."""
    import signal

    import ray

    ray.shutdown()
    on_term = signal.getsignal(signal.SIGTERM)  # ray.init installs its own: keep the caller's
    try:
        ray.init(**ray_init_args(config))
    except ConnectionError as exc:
        raise FedlrError(f"no Ray cluster at {config.ray_address}: {exc}; start one with `ray "
                         "start --head` (see the README), or leave ray_address unset") from None
    finally:
        signal.signal(signal.SIGTERM, on_term)
    resources = worker_resources(config)
    fits = 0
    for node in ray.nodes():
        have = (node.get("Resources") or {}) if node.get("Alive") else {}
        count = int(have.get("CPU", 0) / resources["num_cpus"])
        if resources["num_gpus"] > 0:
            count = min(count, int(have.get("GPU", 0) / resources["num_gpus"]))
        fits += count
    if not fits:
        problem = (f"no Ray node can host a worker of {resources['num_cpus']:g} CPU and "
                   f"{resources['num_gpus']:g} GPU ({ray_cluster_resources(config)}); lower "
                   "worker_cpus or worker_gpus (--worker-cpus, --worker-gpus) and --resume")
        ray.shutdown()
        raise FedlrError(problem)


def ray_cluster_resources(config: SimulationConfig) -> str:
    import ray

    where = "this machine" if config.ray_address is None else f"the cluster at {config.ray_address}"
    total = ray.cluster_resources()
    return f"{where} has {total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU"


def base_model_name(model: str) -> str:
    """What the PEFT export names as its base: the resolved directory, or the preset for `tiny`
    (random weights, rebuilt from fedlr's config and the run's seed)."""
    return model if model == "tiny" else resolve_source(model)


def open_run(config: SimulationConfig, resume: bool) -> tuple[RunDir, Federation]:
    """Check the run directory before any loading (an existing run is never overwritten), build
    the federation (which validates model and data), then record the run."""
    run = RunDir(config.out)
    run.prepare(resume)
    if resume and run.started:
        check_resume(run, config)
    fed = Federation.build(config)
    if not run.started:  # a new run, or one killed before it wrote anything
        initial = Coordinator(fed, run).evaluate(fed.strategy.init_state(
            fed.model.host.initial_head))
        evaluation = {**fed.data.evaluation_facts(), "round_0": initial}
        run.write_run_json(config.to_dict(), {"strategy": fed.strategy.describe(),
                                              "client_ranks": config.client_ranks(),
                                              "partition": fed.data.partition_facts(),
                                              "evaluation": evaluation})
    return run, fed


def finish(coordinator: Coordinator, state: GlobalState) -> None:
    """After the last round: the final adapter in PEFT format under adapter/, with the base's
    config naming the classes and, in fedlr_export.json, how `fedlr predict` rebuilds the base."""
    fed = coordinator.fed
    adapter, info = final_adapter(fed.strategy, state, fed.config.export_rank)
    labels = list(fed.data.data.label_names) if fed.config.task == "classification" else []
    info.update(model=asdict(fed.model.spec) | {"targets": list(fed.model.host.targets)},
                labels=labels)
    export_peft(coordinator.run.root / "adapter", adapter, base_model_name(fed.config.model),
                fed.config.task, info, fed.model.host.base_config(labels))


def check_resume(run: RunDir, config: SimulationConfig) -> None:
    """A resumed run must have the same settings as the run it continues."""
    recorded = json.loads((run.root / "run.json").read_text())["config"]
    current = config.to_dict()
    ignored = {"out", *PLACEMENT_SETTINGS}  # where the clients run does not change the run
    differ = sorted(k for k in current if k not in ignored and recorded.get(k) != current[k])
    if differ:
        raise FedlrError(
            f"--resume with settings that differ from the run in {run.root}: {differ}; resume "
            "with the original settings"
        )


def simulate(config: SimulationConfig, client_app: Any, *, resume: bool = False,
             console: Console | None = None, report: bool = True) -> RunDir:
    """Run (or resume) a simulated federation; returns its run directory. `report`: print the
    table of rounds and the rejections at the end (the files are written either way)."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    console = console or Console()
    check_reachable(config.ray_address)
    run, fed = open_run(config, resume)
    errors: list[BaseException] = []
    server_app = ServerApp()

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task(f"{config.strategy}: rounds", total=config.rounds)

        def on_round(record: dict[str, Any]) -> None:
            quality = record.get("eval_accuracy", record.get("eval_perplexity"))
            shown = "not evaluated" if quality is None else f"eval {quality:.3f}"
            progress.update(task, completed=record["round"],
                            description=f"{config.strategy}: round {record['round']} {shown}")

        grouping = grouping_for(config, fed.model.host)
        coordinator = Coordinator(fed, run, on_round=on_round, grouping=grouping)

        @server_app.main()
        def main(grid: Grid, context: Any) -> None:
            try:
                finish(coordinator, coordinator.run_rounds(grid, resume))
                progress.update(task, completed=config.rounds)
            except BaseException as exc:  # Flower would log and swallow it
                errors.append(exc)

        logging.getLogger("flwr").setLevel(logging.ERROR)  # not its deprecation notice per run
        logging.getLogger("fedlr").setLevel(logging.ERROR)  # rejections are listed at the end
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        # Ray workers get these (WORKER_ENV): as many threads as the CPUs a worker reserves
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(config.worker_cpus))))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # each simulated node keeps its own privacy ledger, as a deployed one does (resume
        # then continues every ledger exactly, with the rounds the nodes trained before a kill);
        # on a cluster, this folder must be on a filesystem every machine shares at this path
        os.environ[SIMULATED_NODES_ENV] = str((run.root / "nodes").resolve())
        try:
            start_ray(config)
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=config.num_clients,
                # worker_cpus per virtual client; with a GPU, the workers share it
                backend_config={"client_resources": worker_resources(config)},
            )
        finally:
            import ray

            ray.shutdown()  # Flower's, unless the run failed before it started
            del os.environ[SIMULATED_NODES_ENV]
    if errors:
        raise errors[0]
    records = run.read_metrics()
    if not records:
        raise FedlrError("the simulation ended without completing a round; see the log above")
    evaluation = json.loads((run.root / "run.json").read_text()).get("evaluation", {})
    plot(records, run.root / "metrics.png", f"{config.strategy}, {config.num_clients} clients",
         evaluation)
    if report:
        print_report(console, config, records, evaluation)
        console.print(f"run directory: {run.root}  (metrics.jsonl, metrics.png, adapter/)")
    return run


def print_report(console: Console, config: SimulationConfig, records: list[dict[str, Any]],
                 evaluation: dict[str, Any]) -> None:
    """The table of rounds, what the held-out numbers cover, failed rounds and rejections."""
    console.print(summary_table(records, f"{config.strategy} on {config.model} / {config.dataset}"))
    if evaluation:
        console.print(evaluation_note(evaluation), highlight=False)
    for record in records:
        if "round_failed" in record:
            console.print(f"round {record['round']} failed, the adapter carried over: "
                          f"{record['round_failed']}", highlight=False)
        for rejection in record["rejected"]:
            who = f"client {rejection['client']}" if "client" in rejection else "a client"
            console.print(f"round {record['round']}: rejected {who}: {rejection['reason']}",
                          highlight=False)
