"""`fedlr simulate` with its two engines side by side: client-rounds per second, per-client and
batched, on the tiny preset (200 clients) and on the default model (32 clients, batch 16), each
with and without DP-SGD, 5 local steps, 3 rounds, with the peak resident memory summed over every
process of the run (the driver, Ray's services and its workers, sampled every 0.2 s). The tiny
non-private job is also run as one plain loop in one process (no Flower, no Ray), the floor of
what a simulation costs.

Throughput is reported over all rounds (the first includes starting the workers, which load the
model and data) and over the rounds after the first (steady state), with where a steady round's
time goes (waiting for the workers, the server's own work, evaluation, and the training steps
summed over the workers). The engines take turns, twice on tiny and once on MiniLM (`--repeats`),
and each engine's best run counts: this machine is shared, and a single run can be a third slower
than the next. Targets on a 2-core CPU: batched >= 3x per-client on tiny and >= 1.5x
on the default model; 200 tiny clients within 1.5 GB.
Writes benchmarks/results/simulation.json and simulation.png.

Run: python benchmarks/simulation.py [--models tiny,minilm --rounds 3 --local-steps 5]
     [--precision auto|bf16|fp32]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil
import torch

from fedlr.precision import native_bf16
from fedlr.run_metrics import METRICS_FILE, read_metrics

T = TypeVar("T")
RESULTS = Path(__file__).parent / "results" / "simulation.json"
ENGINES = ("per-client", "batched")
MODELS = {  # the job of each model, as `fedlr.settings.schema.SimulationConfig` fields
    "tiny": {"model": "tiny", "strategy": "ffa", "num_clients": 200, "ranks": [4, 8],
             "batch_size": 8},
    "minilm": {"model": "minilm", "strategy": "ffa", "num_clients": 32, "ranks": [8],
               "batch_size": 16},
}
TARGETS = {"tiny": {"speedup": 3.0, "peak_rss_mb": 1536}, "minilm": {"speedup": 1.5}}


class TreeRSS:
    """Peak of the summed RSS of a process and all its descendants, with each process's RSS and
    PSS at that moment (PSS splits shared pages between the processes that map them, so it sums
    to the memory the run really holds; summed RSS counts the shared libraries once per
    process)."""

    def __init__(self, pid: int) -> None:
        self.root, self.peak, self.running = psutil.Process(pid), 0, True
        self.at_peak: list[dict] = []
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while self.running:
            try:
                rows = tree_rows(self.root, _memory_row)
            except psutil.Error:
                break
            total = sum(row["rss_mb"] for row in rows)
            if total > self.peak:
                self.peak, self.at_peak = total, rows
            time.sleep(0.2)

    def summary(self) -> dict:
        by_role: dict[str, dict[str, float]] = {}
        for row in self.at_peak:
            entry = by_role.setdefault(row["process"], {"count": 0, "rss_mb": 0.0, "pss_mb": 0.0})
            entry["count"] += 1
            entry["rss_mb"] += row["rss_mb"]
            entry["pss_mb"] += row["pss_mb"]
        return {"peak_rss_mb_all_processes": self.peak,
                "pss_mb_at_peak": sum(row["pss_mb"] for row in self.at_peak),
                "processes_at_peak": by_role}


def tree_rows(root: psutil.Process, read: Callable[[psutil.Process], T]) -> list[T]:
    """`read` of a process and of each of its descendants that is still there (a process that
    ends meanwhile is left out; psutil.Error if `root` itself is gone)."""
    rows = []
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            rows.append(read(proc))
    return rows


def _memory_row(proc: psutil.Process) -> dict:
    memory = proc.memory_full_info()
    return {"process": role(proc), "rss_mb": memory.rss / 2**20, "pss_mb": memory.pss / 2**20}


def role(proc: psutil.Process) -> str:
    """What a process of the run is: the driver, a Ray worker training clients, or one of
    Ray's own services."""
    command = " ".join(proc.cmdline())
    if "fedlr.cli" in command:
        return "driver (fedlr simulate)"
    if "ClientAppActor" in command:
        return "Ray worker (clients)"
    return "Ray services"


def settings(model: str, args: argparse.Namespace, engine: str = "per-client",
             dp: bool = False) -> dict:
    job = {**MODELS[model], "rounds": args.rounds, "local_steps": args.local_steps, "seed": 0,
           "engine": engine, "precision": args.precision}
    if dp:
        job.update(noise_multiplier=1.0, max_grad_norm=1.0)
    return job


def run_simulation(job: dict, out: Path) -> dict:
    """One `fedlr simulate` in a fresh process, timed from outside, its memory sampled."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FEDLR_CACHE_DIR": str(out.parent / "epsilon-cache")}
    config = out.parent / "simulation.toml"  # JSON scalars and lists are valid TOML values
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in job.items()))
    cmd = [sys.executable, "-m", "fedlr.cli", "simulate", "--config", str(config),
           "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    meter = TreeRSS(proc.pid)
    meter.thread.start()
    _, err = proc.communicate()
    meter.running = False
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"simulation failed:\n{err}")
    records = read_metrics(out / METRICS_FILE)
    clients = job["num_clients"]
    rounds = [r["seconds"] for r in records]
    steady = records[1:] or records
    return {"wall_seconds": wall, **meter.summary(),
            "round_seconds": rounds,
            "client_rounds_per_second": clients * len(rounds) / sum(rounds),
            "steady_client_rounds_per_second": clients * len(steady)
            / sum(r["seconds"] for r in steady),
            "steady_round_parts": {
                part: sum(r.get(part, 0.0) for r in steady) / len(steady)
                for part in ("seconds", "exchange_seconds", "aggregate_seconds", "eval_seconds",
                             "client_step_seconds")},
            "client_step_seconds": sum(r.get("client_step_seconds", 0.0) for r in records),
            "client_seconds": sum(r.get("client_seconds", 0.0) for r in records),
            "exchange_seconds": sum(r.get("exchange_seconds", 0.0) for r in records),
            "eval_accuracy": records[-1].get("eval_accuracy"),
            "rejected": sum(len(r["rejected"]) for r in records),
            "rejected_reasons": dict(Counter(x["reason"] for r in records for x in r["rejected"]))}


def plain_loop(args: argparse.Namespace) -> dict:
    """The tiny non-private job (the core's plan, the clients' local training one after
    another, the core's close) in this process, no Flower."""
    from fedlr.client.training import LocalTrainer
    from fedlr.federation import Federation
    from fedlr.lora.rounds import close_round, plan_round
    from fedlr.lora.strategies import ClientUpdate
    from fedlr.settings.schema import SimulationConfig

    config = SimulationConfig.load(None, settings("tiny", args))
    fed = Federation.build(config)
    trainer = LocalTrainer(fed.model.host, config.train_config())
    strategy = fed.strategy
    state = strategy.init_state(fed.model.host.initial_head)
    start = time.perf_counter()
    for round_ in range(1, config.rounds + 1):
        plan = plan_round(strategy, state, config.client_ids())
        updates = []
        for client, downlink in plan.downlinks.items():
            result = trainer.train(client, downlink, fed.data.shard(int(client)),
                                   rank=strategy.spec.ranks[client], train_a=strategy.trains_a,
                                   seed=round_ * 10_007 + int(client))
            updates.append(ClientUpdate(client, result.adapter, result.num_examples))
        state = close_round(strategy, state, plan, updates).state
    return {"training_seconds": time.perf_counter() - start}


def plain_loop_process(args: argparse.Namespace) -> dict:
    """The plain loop as a whole job in a fresh process (imports, loading, training), timed
    from outside like the simulation, its memory sampled the same way."""
    cmd = [sys.executable, __file__, "--plain-worker", "--rounds", str(args.rounds),
           "--local-steps", str(args.local_steps), "--precision", args.precision]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    meter = TreeRSS(proc.pid)
    meter.thread.start()
    out, err = proc.communicate()
    meter.running = False
    if proc.returncode != 0:
        raise SystemExit(f"plain loop failed:\n{err}")
    return {"wall_seconds": time.perf_counter() - start,
            "peak_rss_mb": meter.peak, "pss_mb_at_peak": meter.summary()["pss_mb_at_peak"],
            **json.loads(out.strip().splitlines()[-1])}


IMPORTS = ("torch", "transformers", "peft", "opacus", "flwr.clientapp", "ray", "fedlr.client.jobs")
IMPORT_PROBE = """
import importlib, json, psutil
me, out = psutil.Process(), {}
for name in %r:
    importlib.import_module(name)
    out[name] = me.memory_full_info().uss / 2**20
print(json.dumps(out))
"""


def import_costs() -> dict[str, float]:
    """What every process of a run holds before it loads a model: the unique memory (MB) of a
    fresh Python after importing each of the stack's packages in turn (cumulative)."""
    done = subprocess.run([sys.executable, "-c", IMPORT_PROBE % (IMPORTS,)], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_runs(model: str, args: argparse.Namespace, dp: bool, repeats: int) -> dict:
    """Each engine run `repeats` times, the engines taking turns (so a slow spell of this shared
    machine hits both alike); each engine's best run by steady throughput counts, every run's
    throughput and the load average when it started are kept."""
    runs: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
    for _ in range(repeats):
        for engine in ENGINES:
            load = os.getloadavg()[0]
            with tempfile.TemporaryDirectory() as tmp:
                run = run_simulation(settings(model, args, engine, dp), Path(tmp) / "run")
            runs[engine].append({**run, "load_average_at_start": load})
            print(model, "dp" if dp else "no dp", engine, json.dumps(run), flush=True)
    case = {}
    for engine, done in runs.items():
        best = max(done, key=lambda run: run["steady_client_rounds_per_second"])
        case[engine] = {**best, "steady_client_rounds_per_second_all_runs": [
            run["steady_client_rounds_per_second"] for run in done],
            "load_average_at_start_all_runs": [run["load_average_at_start"] for run in done]}
    return case


def chart(results: dict, path: Path) -> None:
    """Steady-state client-rounds per second of each engine, per model and DP mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [(m, mode) for m in results for mode in results[m]]
    fig, axes = plt.subplots(1, len(cases), figsize=(3.2 * len(cases), 3.6), squeeze=False)
    for ax, (model, mode) in zip(axes[0], cases, strict=True):
        case = results[model][mode]
        ax.bar(ENGINES, [case[e]["steady_client_rounds_per_second"] for e in ENGINES],
               color=["tab:gray", "tab:blue"])
        ax.set_title(f"{model}, {mode.replace('_', ' ')}\n{case['speedup_steady']:.2f}x")
        ax.set_ylabel("client-rounds / s (rounds after the first)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,minilm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--precision", default="auto",
                        help="fedlr's precision setting, for every run")
    parser.add_argument("--repeats", default="tiny=2,minilm=1",
                        help="runs of each engine per model, interleaved; the best one counts")
    parser.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_worker:
        print(json.dumps(plain_loop(args)))
        return
    repeats = {m: int(n) for m, n in (pair.split("=") for pair in args.repeats.split(","))}
    results: dict = {}
    for model in args.models.split(","):
        results[model] = {}
        for dp in (False, True):
            case = best_runs(model, args, dp, repeats.get(model, 1))
            case["speedup"] = (case["batched"]["client_rounds_per_second"]
                               / case["per-client"]["client_rounds_per_second"])
            case["speedup_steady"] = (case["batched"]["steady_client_rounds_per_second"]
                                      / case["per-client"]["steady_client_rounds_per_second"])
            results[model]["dp" if dp else "no_dp"] = case
    result = {
        "benchmark": "simulation",
        "settings": {m: settings(m, args) for m in results},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "memory_gb": psutil.virtual_memory().total / 2**30,
                    "native_bf16": native_bf16(torch.device("cpu"))},
        "results": results,
        "import_uss_mb_cumulative": import_costs(),
        "targets": {m: TARGETS[m] for m in results},
    }
    if "tiny" in results:
        loop = plain_loop_process(args)
        per_client = results["tiny"]["no_dp"]["per-client"]
        result["plain_loop_tiny_no_dp"] = {
            **loop, "client_rounds_per_second": MODELS["tiny"]["num_clients"] * args.rounds
            / loop["training_seconds"]}
        result["ratio_per_client_rounds_to_plain_loop_training"] = (
            sum(per_client["round_seconds"]) / loop["training_seconds"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    chart(results, RESULTS.with_suffix(".png"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
