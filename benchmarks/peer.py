"""fedlr against a plain Flower app doing the same federated job, side by side.

The job: MiniLM with LoRA r=8 on query and value (alpha 16, the classifier trained), fedlr's
built-in task split iid over 20 clients, every client in each of 2 rounds, 5 local steps of
batch 16 (AdamW, lr 3e-3), the global weights evaluated on the same 400 held-out examples after
every round; with DP-SGD (sigma 1, C 1, Poisson sampling, PRV accountant) and without. The peer
(`benchmarks/peer_app.py`) is written the way Flower's examples are: each train() call rebuilds
the model, the data loader and Opacus's engine and computes its round's epsilon. fedlr runs as
`fedlr simulate` with an empty epsilon cache, three times: client by client (`--engine
per-client`, as the peer trains) in fp32, the peer's arithmetic; client by client at its default
precision (bf16 autocast where the CPU computes bf16 natively, see fedlr.precision); and with its
batched engine at its default precision. Both are `flwr.simulation.run_simulation` with one
supernode per client and one CPU per client, each timed from outside as a fresh process.

Each side runs `--repeats` times (3), interleaved: repeat k runs the sides in an order rotated by
k, so a slow spell of the machine falls on different sides. Reports per side and DP mode the
median and range of the wall time and of the seconds per client-round (the whole job over
clients x rounds); the ratio peer / side of each repeat (its runs ran within one pass over the
sides), its median and range: against fedlr in fp32 at equal precision, and default against
default; and, from the median run, where the time goes: fedlr's metrics.jsonl fields
(the server's parts of each round, the clients' own times summed over clients), the time outside
the rounds and its phases from fedlr's timeline.json (`phase ...`; they overlap, see
fedlr.server.timeline), and the peer's client times, each summed over the rounds, per
client-round and as a fraction of the job's wall time. Client times are worker-seconds: the
workers run in parallel, so their fractions can add up to more than 1. For each fedlr run also
the CPU seconds its processes (driver, Ray's services, workers) spent before round 1 began
(`start_up_cpu`): spread over the machine's cores, the least time any start-up of that work can
take (`floor`). Writes benchmarks/results/peer.json and peer.png, and prints a table.

Run: python benchmarks/peer.py [--clients 20 --rounds 2] [--dp | --no-dp] (default: both)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import peer_app as peer
import psutil
import torch
from rich.console import Console
from rich.table import Table
from simulation import role, tree_rows

from fedlr.precision import native_bf16
from fedlr.run_metrics import METRICS_FILE, read_metrics

RESULTS = Path(__file__).parent / "results"
# side: (engine, precision); fedlr client by client (as the peer trains) in the peer's fp32,
# then at its default precision, then with its batched engine
SIDES = {"peer": None, "fedlr_fp32": ("per-client", "fp32"), "fedlr": ("per-client", "auto"),
         "fedlr_batched": ("batched", "auto")}
LABELS = {"peer": "peer (fp32)", "fedlr_fp32": "fedlr fp32 (equal precision)",
          "fedlr": "fedlr default", "fedlr_batched": "fedlr batched default"}
SERVER_TIMES = ("exchange_seconds", "aggregate_seconds", "eval_seconds", "accountant_seconds",
                "checkpoint_seconds")
CLIENT_TIMES = ("client_seconds", "client_setup_seconds", "client_step_seconds",
                "client_accountant_seconds")


def fedlr_settings(clients: int, rounds: int, dp: bool, engine: str = "per-client",
                   precision: str = "auto") -> dict:
    """The peer's job as `fedlr.settings.schema.SimulationConfig` fields."""
    settings = {"engine": engine, "precision": precision, "model": peer.MODEL,
                "strategy": "fedit", "ranks": [peer.RANK],
                "alpha": float(peer.ALPHA), "targets": peer.TARGETS, "head": "train",
                "num_clients": clients, "rounds": rounds, "local_steps": peer.LOCAL_STEPS,
                "batch_size": peer.BATCH_SIZE, "lr": peer.LR, "optimizer": "adamw",
                "max_length": peer.MAX_LENGTH, "eval_examples": peer.EVAL_EXAMPLES,
                "eval_every": 1, "partition": "iid", "seed": peer.SEED}
    if dp:
        settings.update(noise_multiplier=peer.NOISE_MULTIPLIER,
                        max_grad_norm=peer.MAX_GRAD_NORM, delta=peer.DELTA, accountant="prv")
    return settings


class TreeCPU:
    """CPU seconds of a process and its descendants, sampled every 0.2 s (a process that ends
    between two samples is missed: Ray's short-lived helpers)."""

    def __init__(self, pid: int) -> None:
        self.root, self.running = psutil.Process(pid), True
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            try:
                row = dict(tree_rows(self.root, _cpu_row))
            except psutil.Error:
                break
            self.samples.append((time.time(), row))
            time.sleep(0.2)

    def by_role_before(self, moment: float) -> dict[str, float]:
        """CPU seconds per role in the last sample before `moment` (epoch seconds)."""
        row = max((s for s in self.samples if s[0] <= moment), key=lambda s: s[0],
                  default=(0.0, {}))[1]
        out: dict[str, float] = {}
        for name, seconds in row.values():
            out[name] = out.get(name, 0.0) + seconds
        return out


def _cpu_row(proc: psutil.Process) -> tuple[int, tuple[str, float]]:
    cpu = proc.cpu_times()
    return proc.pid, (role(proc), cpu.user + cpu.system)


def timed(cmd: list[str], env: dict[str, str], meter: bool = False
          ) -> tuple[float, str, TreeCPU | None]:
    """Wall seconds of a fresh process, its stdout, and (`meter`) its tree's CPU samples."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    cpu = TreeCPU(proc.pid) if meter else None
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    if cpu is not None:
        cpu.running = False
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{stderr[-4000:]}")
    return wall, stdout, cpu


def breakdown(totals: dict[str, float], wall: float, client_rounds: int) -> dict:
    return {k: {"seconds_per_client_round": v / client_rounds, "fraction_of_wall": v / wall}
            for k, v in totals.items()}


def run_fedlr(clients: int, rounds: int, dp: bool, env: dict[str, str], folder: Path,
              engine: str, precision: str) -> dict:
    name = f"fedlr-{engine}-{precision}-{'dp' if dp else 'no-dp'}"
    out = folder / name
    config = folder / f"{name}.toml"  # JSON values are valid TOML
    config.write_text("".join(f"{k} = {json.dumps(v)}\n"
                              for k, v in fedlr_settings(clients, rounds, dp, engine,
                                                         precision).items()))
    cache = folder / f"epsilon-cache-{name}"  # empty: no earlier run's values
    wall, _, cpu = timed([sys.executable, "-m", "fedlr.cli", "simulate", "--config",
                          str(config), "--out", str(out)], {**env, "FEDLR_CACHE_DIR": str(cache)},
                         meter=True)
    records = read_metrics(out / METRICS_FILE)
    totals = {k: sum(r.get(k, 0.0) for r in records) for k in ("seconds", *SERVER_TIMES,
                                                                 *CLIENT_TIMES)}
    totals["outside_rounds"] = wall - totals.pop("seconds")  # start-up, round 0, export
    totals.update(outside_phases(out, wall))
    assert cpu is not None
    return {"wall_seconds": wall, "seconds_per_client_round": wall / (clients * rounds),
            "eval_accuracy": records[-1]["eval_accuracy"],
            "epsilon_max": records[-1].get("epsilon_max"),
            "breakdown": breakdown(totals, wall, clients * rounds),
            "start_up_cpu": start_up_cpu(out, cpu, wall, clients * rounds)}


def start_up_cpu(out: Path, cpu: TreeCPU, wall: float, client_rounds: int) -> dict:
    """The CPU seconds every process of the run spent before round 1 began, by role. With
    `os.cpu_count()` cores no schedule begins round 1 sooner than their sum over the cores:
    that floor is a cost of every run however its start-up is arranged (per client-round of
    this job and as a fraction of its wall time, like the breakdown's parts)."""
    timeline = json.loads((out / "timeline.json").read_text())
    began = timeline["spans"]["rounds"]["start"]
    seconds = cpu.by_role_before(timeline["process_start"] + began)
    floor = sum(seconds.values()) / (os.cpu_count() or 1)
    return {"cpu_seconds_by_process": seconds, "cpu_seconds": sum(seconds.values()),
            "round_1_began_seconds": began, "floor_seconds": floor,
            "floor": {"seconds_per_client_round": floor / client_rounds,
                      "fraction_of_wall": floor / wall}}


def outside_phases(out: Path, wall: float) -> dict[str, float]:
    """The phases outside the rounds from the run's timeline.json (they overlap: Ray, the
    federation and the nodes start together), and the process's exit after its last phase."""
    spans = json.loads((out / "timeline.json").read_text())["spans"]
    phases = {f"phase {name}": span["seconds"] for name, span in spans.items()
              if name != "rounds"}
    phases["phase exit"] = wall - max(span["end"] for span in spans.values())
    return phases


def run_peer(clients: int, rounds: int, dp: bool, env: dict[str, str]) -> dict:
    wall, stdout, _ = timed([sys.executable, peer.__file__, "--clients", str(clients),
                          "--rounds", str(rounds), "--dp" if dp else "--no-dp"], env)
    result = json.loads(stdout.strip().splitlines()[-1])
    train, evaluate = result["train"], result["evaluate"]
    last = str(max(int(r) for r in train))
    totals = {k: sum(m[k] for m in train.values()) for k in CLIENT_TIMES}
    totals["eval_seconds"] = sum(m["eval_seconds"] for r, m in evaluate.items() if int(r) > 0)
    return {"wall_seconds": wall, "seconds_per_client_round": wall / (clients * rounds),
            "eval_accuracy": evaluate[last]["eval_accuracy"],
            "epsilon_max": train[last].get("epsilon_max"),
            "breakdown": breakdown(totals, wall, clients * rounds)}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": values}


def summarise(repeats: dict[str, list[dict]]) -> dict:
    """Each side as its median run (by wall time; its breakdown is that run's), with the wall
    times of all its runs; each ratio peer / side per repeat (the runs of one repeat ran in one
    pass over the sides), with its median and range: against `fedlr_fp32` at equal precision (both
    fp32), against `fedlr` default against default, both client by client."""
    sides = {}
    for side, done in repeats.items():
        walls = [r["wall_seconds"] for r in done]
        median_run = sorted(done, key=lambda r: r["wall_seconds"])[len(done) // 2]
        sides[side] = {**median_run, "wall_seconds": spread(walls),
                       "seconds_per_client_round": spread(
                           [r["seconds_per_client_round"] for r in done])}
    ratios = {side: spread([p["wall_seconds"] / s["wall_seconds"]
                            for p, s in zip(repeats["peer"], repeats[side], strict=True)])
              for side in SIDES if side != "peer"}
    return {**sides, "ratio_peer_to": ratios}


def ranged(value: dict) -> str:
    return f"{value['median']:.2f} ({value['min']:.2f}-{value['max']:.2f})"


def table(runs: dict) -> Table:
    out = Table(title="peer (plain Flower app) vs fedlr: seconds per client-round, median (range)"
                " of the repeats; the breakdown is the median run's")
    for column in ("", *(f"{mode} {LABELS[side]}" for mode in runs for side in SIDES)):
        out.add_column(column, justify="right")
    rows = ["wall", *dict.fromkeys(k for run in runs.values() for side in SIDES
                                   for k in run[side]["breakdown"])]
    for row in rows:
        cells = []
        for run in runs.values():
            for side in SIDES:
                if row == "wall":
                    cells.append(ranged(run[side]["seconds_per_client_round"]))
                    continue
                part = run[side]["breakdown"].get(row)
                cells.append("-" if part is None else f"{part['seconds_per_client_round']:.2f} "
                             f"({100 * part['fraction_of_wall']:.0f}%)")
        out.add_row(row, *cells)
    floors = []
    for run in runs.values():
        for side in SIDES:
            cpu = run[side].get("start_up_cpu")
            floors.append("-" if cpu is None else
                          f"{cpu['floor']['seconds_per_client_round']:.2f} "
                          f"({100 * cpu['floor']['fraction_of_wall']:.0f}%)")
    out.add_row("start-up CPU / cores", *floors)
    out.add_row("ratio peer/side", *("" if side == "peer" else ranged(run["ratio_peer_to"][side])
                                     for run in runs.values() for side in SIDES))
    return out


def markdown_table(result: dict) -> str:
    """The README's tables of this benchmark: seconds per client-round and the ratio peer / side,
    each the median (range) of the repeats, then the median runs' accuracy and epsilon
    (`tests/test_benchmark_pages.py` holds the README to them)."""
    names = {"dp": "DP-SGD", "no_dp": "no DP"}

    def header(title: str) -> list[str]:
        first = f"| {title}" if title else "|"
        return [" | ".join([first, *(LABELS[side] for side in SIDES)]) + " |",
                "|---|" + "---|" * len(SIDES)]

    lines = header("")
    for mode, run in result["runs"].items():
        cells = [ranged(run["peer"]["seconds_per_client_round"])]
        cells += [f"{ranged(run[side]['seconds_per_client_round'])}, "
                  f"{ranged(run['ratio_peer_to'][side])}x" for side in SIDES if side != "peer"]
        lines.append(f"| {names[mode]} | " + " | ".join(cells) + " |")
    lines += ["", *header("held-out accuracy after the last round, and ε reported (median run)")]
    for mode, run in result["runs"].items():
        cells = [f"{run[side]['eval_accuracy']:.4f}" + (
            "" if run[side]["epsilon_max"] is None else f", ε {run[side]['epsilon_max']:.2f}")
            for side in SIDES]
        lines.append(f"| {names[mode]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(runs: dict, path: Path) -> None:
    """Seconds per client-round of each side, and fedlr's parts (client parts: worker-seconds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    modes = list(runs)
    bar = 0.8 / len(SIDES)
    for i, side in enumerate(SIDES):
        left.bar([m + i * bar for m in range(len(modes))],
                 [runs[mode][side]["seconds_per_client_round"]["median"] for mode in modes], bar,
                 label=side)
    left.set_xticks([m + 0.4 - bar / 2 for m in range(len(modes))], modes)
    left.set_ylabel("wall seconds per client-round")
    left.legend()
    parts = list(dict.fromkeys(k for run in runs.values() for k in run["fedlr"]["breakdown"]))
    for i, mode in enumerate(modes):
        width = 0.8 / len(modes)
        right.barh([p + i * width for p in range(len(parts))],
                   [runs[mode]["fedlr"]["breakdown"].get(k, {}).get("seconds_per_client_round", 0)
                    for k in parts], width, label=mode)
    right.set_yticks([p + 0.4 - 0.4 / len(modes) for p in range(len(parts))], parts)
    right.set_xlabel("fedlr: seconds per client-round")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    dp = parser.add_mutually_exclusive_group()
    dp.add_argument("--dp", dest="modes", action="store_const", const=[True],
                    help="only with DP-SGD")
    dp.add_argument("--no-dp", dest="modes", action="store_const", const=[False],
                    help="only without DP")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each side, interleaved (median and range are reported)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder for peer.json and peer.png (a smoke run: elsewhere)")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for with_dp in args.modes or [True, False]:
            repeats: dict[str, list[dict]] = {side: [] for side in SIDES}
            for k in range(args.repeats):  # interleaved, each repeat in a rotated order
                order = list(SIDES)[k % len(SIDES):] + list(SIDES)[:k % len(SIDES)]
                folder = Path(tmp) / f"repeat-{k}"
                folder.mkdir(exist_ok=True)
                for side in order:
                    how = SIDES[side]
                    repeats[side].append(
                        run_fedlr(args.clients, args.rounds, with_dp, env, folder, *how)
                        if how else run_peer(args.clients, args.rounds, with_dp, env))
            runs["dp" if with_dp else "no_dp"] = summarise(repeats)
    result = {
        "benchmark": "peer",
        "settings": {"clients": args.clients, "rounds": args.rounds, "repeats": args.repeats,
                     "fedlr": {mode: fedlr_settings(args.clients, args.rounds, mode == "dp")
                               for mode in runs},
                     "sides": {side: {"engine": how[0], "precision": how[1]}
                               for side, how in SIDES.items() if how}},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "memory_gb": psutil.virtual_memory().total / 2**30,
                    "native_bf16": native_bf16(torch.device("cpu"))},
        "runs": runs,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "peer.json").write_text(json.dumps(result, indent=2) + "\n")
    chart(runs, args.results / "peer.png")
    Console().print(table(runs))
    print(markdown_table(result))


if __name__ == "__main__":
    main()
