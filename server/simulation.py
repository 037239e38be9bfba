"""`fedlr simulate`: a whole federation with Flower's simulation engine, on this machine or on an
existing Ray cluster (`ray_address`, see `fedlr.server.ray_cluster`).

The ServerApp runs the coordinator in this process; virtual clients run in Ray worker processes,
one CPU each unless `worker_cpus` says otherwise, and each process loads the frozen base once for
all the clients it serves. This process partitions and tokenises the data once and packs the
shards into the run directory, where each worker reads its clients' (`fedlr.data.packed`).

The settings and the run directory are checked before anything starts. Then the start-up
overlaps: Ray starts while this process builds the federation in the background (loads and checks
the data and the model, evaluates round 0, packs the shards); Flower starts as soon as Ray is up,
and once this process has its model, the nodes are identified and each worker loads the same
model (`Preload`) while the data are still being prepared. `timeline.json` records each phase.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedlr.data.packed import SHARDS_ENV
from fedlr.errors import FedlrError
from fedlr.federation import Federation
from fedlr.lora.strategies import GlobalState
from fedlr.models.sources import resolve_source
from fedlr.privacy.node import SIMULATED_NODES_ENV
from fedlr.server.coordinator import Coordinator, preload_for
from fedlr.server.export import export_peft, final_adapter
from fedlr.server.grouping import count_workers, grouping_for
from fedlr.server.nodes import NodeDirectory
from fedlr.server.ray_cluster import (
    RayStart,
    check_reachable,
    worker_resources,
)
from fedlr.server.report import evaluation_note, plot, summary_table
from fedlr.server.rundir import RunDir
from fedlr.server.timeline import Timeline
from fedlr.server.transport import InFlight
from fedlr.session import ModelSession, pack_shards
from fedlr.settings.schema import PLACEMENT_SETTINGS, SimulationConfig
from fedlr.wire import Preload


def base_model_name(model: str) -> str:
    """What the PEFT export names as its base: the resolved directory, or the preset for `tiny`
    (random weights, rebuilt from fedlr's config and the run's seed)."""
    return model if model == "tiny" else resolve_source(model)


def prepare_run(config: SimulationConfig, resume: bool) -> RunDir:
    """The run directory, checked before any loading: an existing run is never overwritten, a
    resumed one must have the settings it was started with."""
    run = RunDir(config.out)
    run.prepare(resume)
    if resume and run.started:
        check_resume(run, config)
    return run


def open_run(config: SimulationConfig, resume: bool, run: RunDir | None = None,
             on_model: Callable[[ModelSession], None] = lambda model: None
             ) -> tuple[RunDir, Federation]:
    """Build the federation (which validates model and data) for a prepared run directory (by
    default prepared here), then record the run. `on_model`: see `Federation.build`."""
    run = run or prepare_run(config, resume)
    fed = Federation.build(config, on_model=on_model)
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


def simulated_nodes(run: RunDir) -> dict[str, str]:
    """What the workers are told of the simulated nodes: the folder of their privacy ledgers and
    the file of their data (absolute: a worker's working directory is its own)."""
    return {SIMULATED_NODES_ENV: str(run.nodes.resolve()), SHARDS_ENV: str(run.shards.resolve())}


def simulate(config: SimulationConfig, client_app: Any, *, resume: bool = False,
             console: Console | None = None, report: bool = True) -> RunDir:
    """Run (or resume) a simulated federation; returns its run directory. `report`: print the
    table of rounds and the rejections at the end (the files are written either way)."""
    timeline = Timeline()
    timeline.add("start-up", timeline.start)
    console = console or Console()
    check_reachable(config.ray_address)
    run = prepare_run(config, resume)
    try:
        run_all(config, run, client_app, resume, console, report, timeline)
    finally:  # also what a failed run got through
        timeline.write(run.timeline)
    return run


class FederationBuild:
    """`open_run` and `pack_shards` in a background thread, while Ray, Flower and the workers
    start: `preload` resolves once the model is loaded (the nodes then load theirs), `federation`
    once everything is built."""

    def __init__(self, config: SimulationConfig, resume: bool, run: RunDir,
                 timeline: Timeline) -> None:
        self.preload: Future[Preload] = Future()
        self.federation: Future[Federation] = Future()
        self.thread = threading.Thread(target=self._build, args=(config, resume, run, timeline),
                                       daemon=True, name="fedlr-federation")
        self.thread.start()

    def _build(self, config: SimulationConfig, resume: bool, run: RunDir,
               timeline: Timeline) -> None:
        def loaded(model: ModelSession) -> None:
            self.preload.set_result(preload_for(config, model))

        try:
            with timeline.span("federation"):
                _, fed = open_run(config, resume, run, on_model=loaded)
                pack_shards(run.shards, fed.data, fed.data_spec, fed.model.spec)
        except BaseException as exc:  # raised where it is waited for
            if not self.preload.done():
                self.preload.set_exception(exc)
            self.federation.set_exception(exc)
        else:
            self.federation.set_result(fed)

    def failed(self) -> BaseException | None:
        """What the build raised, if it already ended that way."""
        return self.federation.exception() if self.federation.done() else None


def run_all(config: SimulationConfig, run: RunDir, client_app: Any, resume: bool,
            console: Console, report: bool, timeline: Timeline) -> None:
    """`simulate` from its prepared run directory on: Ray and the federation start together,
    Flower as soon as Ray is up."""
    ray_start = RayStart(config, simulated_nodes(run))
    build = FederationBuild(config, resume, run, timeline)
    try:
        with timeline.span("ray"):
            import flwr.simulation  # noqa: F401 - while Ray starts, where this thread would wait
            ray_start.ready()
        if (error := build.failed()) is not None:
            raise error
        run_flower(config, build, run, client_app, resume, console, timeline)
    finally:
        build.thread.join()  # nothing left writing into the run directory
        with timeline.span("ray shutdown"):
            ray_start.stop()  # Flower's, unless the run failed before it started
    with timeline.span("report"):
        records = run.read_metrics()
        if not records:
            raise FedlrError("the simulation ended without completing a round; see the log "
                             "above")
        evaluation = json.loads((run.root / "run.json").read_text()).get("evaluation", {})
        plot(records, run.root / "metrics.png",
             f"{config.strategy}, {config.num_clients} clients", evaluation)
        if report:
            print_report(console, config, records, evaluation)
            console.print(timeline.outside_rounds(), highlight=False)
            console.print(f"run directory: {run.root}  (metrics.jsonl, metrics.png, adapter/, "
                          "timeline.json)")


def run_flower(config: SimulationConfig, build: FederationBuild, run: RunDir, client_app: Any,
               resume: bool, console: Console, timeline: Timeline) -> None:
    """The rounds, on Flower's simulation engine over the Ray that was started for them, with a
    progress bar; the first error of the ServerApp (which Flower would only log) is raised. The
    nodes are identified (and load the model) while the federation is still being built."""
    flower_start = time.time()
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

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

        def rounds(grid: Grid) -> None:
            in_flight = InFlight(count_workers(config), config.num_clients)
            with timeline.span("nodes"):
                directory = NodeDirectory(config.num_clients, preload=build.preload.result(),
                                          in_flight=in_flight)
                directory.wait(grid, seconds=config.connect_timeout,
                               at_least=config.min_valid_updates)
            with timeline.span("federation wait"):
                fed = build.federation.result()
            coordinator = Coordinator(fed, run, on_round=on_round,
                                      grouping=grouping_for(config, fed.model.host),
                                      in_flight=in_flight)
            with timeline.span("rounds"):
                state = coordinator.run_rounds(grid, resume, directory)
            with timeline.span("export"):
                finish(coordinator, state)
            progress.update(task, completed=config.rounds)

        @server_app.main()
        def main(grid: Grid, context: Any) -> None:
            timeline.add("flower", flower_start)
            try:
                rounds(grid)
            except BaseException as exc:  # Flower would log and swallow it
                errors.append(exc)
            finally:
                flower_stop.append(time.time())

        logging.getLogger("flwr").setLevel(logging.ERROR)  # not its deprecation notice per run
        logging.getLogger("fedlr").setLevel(logging.ERROR)  # rejections are listed at the end
        flower_stop: list[float] = []
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=config.num_clients,
            # worker_cpus per virtual client; with a GPU, the workers share it
            backend_config={"client_resources": worker_resources(config)},
        )
        if flower_stop:
            timeline.add("flower shutdown", flower_stop[0])
    if errors:
        raise errors[0]


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
