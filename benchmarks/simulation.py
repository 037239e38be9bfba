"""200 virtual clients x 2 rounds of `fedlr simulate` on the tiny preset, against the same local
training run back to back in one plain loop.

Reports wall time, milliseconds per client-round, the peak resident memory summed over every
process of the run (the driver, Ray's services and its workers, sampled every 0.2 s) and three
ratios to the plain loop: whole job to whole job (each in a fresh process: imports, model and data
loading, training), the rounds to the loop's training alone, and the last round (after start-up)
to one round of the loop. Targets: peak RSS <= 4 GB, ratio <= 1.5.
Writes benchmarks/results/simulation.json.

Run: python benchmarks/simulation.py [--clients 200 --rounds 2 --local-steps 5]
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
from pathlib import Path

import psutil

RESULTS = Path(__file__).parent / "results" / "simulation.json"


class TreeRSS:
    """Peak of the summed RSS of a process and all its descendants."""

    def __init__(self, pid: int) -> None:
        self.root, self.peak, self.running = psutil.Process(pid), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while self.running:
            total = 0
            try:
                for proc in [self.root, *self.root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += proc.memory_info().rss
            except psutil.Error:
                break
            self.peak = max(self.peak, total)
            time.sleep(0.2)


def settings(args: argparse.Namespace) -> dict:
    """The run both sides perform, as `fedlr.settings.schema.SimulationConfig` fields."""
    return {"model": "tiny", "strategy": "ffa", "num_clients": args.clients, "rounds": args.rounds,
            "ranks": [4, 8], "local_steps": args.local_steps, "batch_size": 8, "seed": 0}


def run_simulation(args: argparse.Namespace, out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    config = out.parent / "simulation.toml"  # JSON scalars and lists are valid TOML values
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings(args).items()))
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
    return {"wall_seconds": wall, "peak_rss_mb_all_processes": meter.peak / 2**20}


def plain_loop(args: argparse.Namespace) -> dict:
    """The same rounds (the core's plan, the clients' local training one after another, the
    core's close) in this process, no Flower."""
    from fedlr.client.training import LocalTrainer
    from fedlr.federation import Federation
    from fedlr.lora.rounds import close_round, plan_round
    from fedlr.lora.strategies import ClientUpdate
    from fedlr.settings.schema import SimulationConfig

    config = SimulationConfig.load(None, settings(args))
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
    from outside like the simulation."""
    cmd = [sys.executable, __file__, "--plain-worker", "--clients", str(args.clients),
           "--rounds", str(args.rounds), "--local-steps", str(args.local_steps)]
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return {"wall_seconds": time.perf_counter() - start,
            **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_worker:
        print(json.dumps(plain_loop(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        simulated = run_simulation(args, Path(tmp) / "run")
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl")
                   .read_text().splitlines()]
    loop = plain_loop_process(args)
    client_rounds = args.clients * args.rounds
    result = {
        "benchmark": "simulation",
        "settings": settings(args),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "memory_gb": psutil.virtual_memory().total / 2**30},
        "simulation": {**simulated,
                       "ms_per_client_round": 1000 * simulated["wall_seconds"] / client_rounds,
                       "round_seconds": [r["seconds"] for r in records],
                       "rejected": sum(len(r["rejected"]) for r in records)},
        "plain_loop": {**loop,
                       "ms_per_client_round": 1000 * loop["training_seconds"] / client_rounds},
        # whole job against whole job: both import, load the model and the data, and train
        "ratio_simulation_to_plain_loop": simulated["wall_seconds"] / loop["wall_seconds"],
        # the training alone: the simulation's rounds against the loop's training time
        "ratio_rounds_to_plain_loop_training": sum(r["seconds"] for r in records)
        / loop["training_seconds"],
        # the last round alone, once Ray's workers have started and loaded model and data
        "ratio_last_round_to_plain_loop_round": records[-1]["seconds"]
        / (loop["training_seconds"] / args.rounds),
        "targets": {"peak_rss_mb": 4096, "ratio": 1.5},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
