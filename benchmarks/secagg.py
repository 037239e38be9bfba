"""The price of secure aggregation: the same `fedlr simulate` round on the tiny preset with and
without SecAgg+, at 10, 50 and 100 clients (rank 8), and at 50 with ranks 4 and 8.

For each size, from the run's own metrics.jsonl: the time of a round after start-up (rounds 2
and 3 averaged), with the secure round's time per stage, and the bytes each client sends and
receives per round; plus the graph's degree k and the threshold t. Targets at 50 clients: time
<= 1.5x and bytes up per client <= 1.3x the plain round's. Writes benchmarks/results/secagg.json
and secagg.png, and prints a table.

Run: python benchmarks/secagg.py [--clients 10 50 100 --local-steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean

from rich.console import Console
from rich.table import Table

from fedlr.run_metrics import METRICS_FILE, read_metrics

RESULTS = Path(__file__).parent / "results" / "secagg.json"
ROUNDS = 3  # round 1 pays start-up; rounds 2 and 3 are averaged
RUN = """
import json, sys
from fedlr.client.app import app
from fedlr.server.simulation import simulate
from fedlr.settings.schema import SimulationConfig
simulate(SimulationConfig.load(None, json.loads(sys.argv[1])), app)
"""


def settings(clients: int, local_steps: int, secure: bool, ranks: list[int], out: Path) -> dict:
    """Both rounds client by client: secure aggregation trains each client in its own job, and
    the plain round the same way, so the ratio is what the protocol adds (the batched engine
    would make the plain round faster for reasons of its own, `benchmarks/simulation.py`)."""
    return {"model": "tiny", "strategy": "ffa", "num_clients": clients, "rounds": ROUNDS,
            "ranks": ranks, "local_steps": local_steps, "batch_size": 8, "eval_examples": 64,
            "seed": 0, "secure_aggregation": secure, "engine": "per-client", "out": str(out)}


def measure(clients: int, local_steps: int, secure: bool, ranks: list[int], folder: Path
            ) -> dict:
    out = folder / f"{clients}-{'secure' if secure else 'plain'}-{len(ranks)}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    config = settings(clients, local_steps, secure, ranks, out)
    subprocess.run([sys.executable, "-c", RUN, json.dumps(config)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = read_metrics(out / METRICS_FILE)
    warm = records[1:]
    last = warm[-1]
    row = {"round_seconds": mean(r["seconds"] for r in warm),
           "bytes_up_per_client": last["bytes_up"] / last["num_accepted"],
           "bytes_down_per_client": last["bytes_down"] / last["num_clients"]}
    if secure:
        stages = last["secagg_seconds"]
        row.update(neighbours=last["secagg_neighbours"], threshold=last["secagg_threshold"],
                   quantization_error=last["secagg_quantization_error"],
                   stage_seconds={s: mean(r["secagg_seconds"][s] for r in warm) for s in stages})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--mixed-at", type=int, default=50,
                        help="One more size with ranks 4 and 8: the cost of padding to rank 8.")
    args = parser.parse_args()
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, ranks in [*((n, [8]) for n in args.clients), (args.mixed_at, [4, 8])]:
            plain = measure(n, args.local_steps, False, ranks, Path(tmp))
            secure = measure(n, args.local_steps, True, ranks, Path(tmp))
            rows.append({"clients": n, "ranks": ranks, "plain": plain, "secure": secure,
                         "time_ratio": secure["round_seconds"] / plain["round_seconds"],
                         "bytes_up_ratio": secure["bytes_up_per_client"]
                         / plain["bytes_up_per_client"]})
            console.print(f"{n} clients, ranks {ranks}: time x{rows[-1]['time_ratio']:.2f}, "
                          f"bytes up x{rows[-1]['bytes_up_ratio']:.2f}")
    at_50 = next((r for r in rows if r["clients"] == 50 and r["ranks"] == [8]), None)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "work": "tiny preset, ffa, rank 8 (one row with ranks 4 and 8), batch 8, "
                f"{args.local_steps} local steps, every client every round; rounds 2-3 averaged",
        "rows": rows,
        "targets": {"time_ratio_at_50": 1.5, "bytes_up_ratio_at_50": 1.3},
        "met": None if at_50 is None else {"time": at_50["time_ratio"] <= 1.5,
                                           "bytes_up": at_50["bytes_up_ratio"] <= 1.3},
        "growth": "per client: the masked part is the plain update in 32-bit words plus "
                  "k + 2 words, and shares grow with the degree k (k = n - 1 up to 16 clients, "
                  "then about 3 log2 n); the server's unmasking grows with n parts plus k "
                  "pairwise masks per client that dropped after its neighbours masked. With "
                  "mixed ranks every part is padded to the largest rank, so a rank-r client "
                  "sends R / r times its plain B",
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title="secure aggregation: a round after start-up, per client")
    for column in ("clients", "ranks", "k / t", "s plain", "s secure", "x time", "KB up plain",
                   "KB up secure", "x bytes up"):
        table.add_column(column, justify="right")
    for r in rows:
        graph = f"{r['secure']['neighbours']} / {r['secure']['threshold']}"
        table.add_row(str(r["clients"]), "/".join(map(str, r["ranks"])), graph,
                      f"{r['plain']['round_seconds']:.2f}", f"{r['secure']['round_seconds']:.2f}",
                      f"{r['time_ratio']:.2f}", f"{r['plain']['bytes_up_per_client'] / 1e3:.1f}",
                      f"{r['secure']['bytes_up_per_client'] / 1e3:.1f}",
                      f"{r['bytes_up_ratio']:.2f}")
    console.print(table)
    plot([r for r in rows if r["ranks"] == [8]], RESULTS.with_suffix(".png"))
    console.print(f"wrote {RESULTS} and {RESULTS.with_suffix('.png')}")


def plot(rows: list[dict], path: Path) -> None:
    """Round time (secure split by stage) and bytes up per client against the client count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [r["clients"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.35
    xs = range(len(rows))
    left.bar([x - width / 2 for x in xs], [r["plain"]["round_seconds"] for r in rows], width,
             label="plain")
    bottom = [0.0] * len(rows)
    for stage in ("train", "share", "mask", "unmask", "unmasking"):
        heights = [r["secure"]["stage_seconds"].get(stage, 0.0) for r in rows]
        left.bar([x + width / 2 for x in xs], heights, width, bottom=bottom,
                 label=f"secure: {stage}")
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    left.set_xticks(list(xs), [str(c) for c in clients])
    left.set_xlabel("clients")
    left.set_ylabel("seconds per round")
    left.legend(fontsize=7)
    right.plot(clients, [r["plain"]["bytes_up_per_client"] / 1e3 for r in rows], "o-",
               label="plain")
    right.plot(clients, [r["secure"]["bytes_up_per_client"] / 1e3 for r in rows], "o-",
               label="secure")
    right.set_xlabel("clients")
    right.set_ylabel("KB up per client per round")
    right.set_ylim(bottom=0)
    right.legend()
    fig.suptitle("secure aggregation (SecAgg+) on the tiny preset")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
