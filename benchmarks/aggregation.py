"""Aggregation benchmarks -> benchmarks/results/aggregation.json.

(a) FedSVD's low-rank route (QR of the thin factors + an r x r SVD) against torch.linalg.svd of the
    dense d x d product, d = 4096, r = 16: same factors, time ratio (target >= 100x).
(b) Each strategy aggregating 200 clients x 24 modules (768 x 768, r = 8) in one round: seconds and
    peak resident memory, against one pass that only reads every client tensor once (target <= 3x).

Run: python benchmarks/aggregation.py [--clients 200 --modules 24 --dim 768 --rank 8 --svd-dim 4096]
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.table import Table

from fedlr.adapters import Adapter, LoraFactors
from fedlr.lora.lowrank import LowRank, svd
from fedlr.lora.strategies import (
    STRATEGIES,
    ClientUpdate,
    FederationSpec,
    ModuleShape,
    make_strategy,
)

RESULTS = Path(__file__).parent / "results" / "aggregation.json"


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self) -> PeakRSS:
        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mb(self) -> float:
        return (self.peak - self.start) / 2**20


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def svd_benchmark(d: int, r: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = LowRank(torch.randn(d, r, generator=gen), torch.randn(r, d, generator=gen) / d**0.5)
    low = best_of(lambda: svd(x), 3)
    f = svd(x)
    tic = time.perf_counter()
    u, s, vh = torch.linalg.svd(x.dense(), full_matrices=False)
    dense = time.perf_counter() - tic
    ours = (f.U * f.S) @ f.Vh
    theirs = (u[:, :r] * s[:r]) @ vh[:r]
    return {
        "d_in": d,
        "d_out": d,
        "rank": r,
        "dtype": "float32",
        "lowrank_seconds": low,
        "dense_svd_seconds": dense,
        "speedup": dense / low,
        "target_speedup": 100.0,
        "singular_values_max_rel_diff": float(((f.S - s[:r]).abs() / s[:r]).max()),
        "product_rel_diff": float(
            torch.linalg.matrix_norm(ours - theirs) / torch.linalg.matrix_norm(theirs)
        ),
    }


def make_updates(strategy, state, clients: int, gen: torch.Generator) -> list[ClientUpdate]:
    spec = strategy.spec
    updates = []
    for k in range(clients):
        cid = f"c{k}"
        sent = strategy.starting_adapter(state, cid)
        lora = {}
        for name, s in spec.modules.items():
            rank = spec.ranks[cid]
            A = torch.randn(rank, s.d_in, generator=gen) if strategy.trains_a else sent.lora[name].A
            lora[name] = LoraFactors(
                A, torch.randn(s.d_out, rank, generator=gen), spec.scaling(rank)
            )
        updates.append(ClientUpdate(cid, Adapter(lora=lora), 100 + k))
    return updates


def read_pass(updates: list[ClientUpdate]) -> None:
    acc = torch.zeros(())
    for u in updates:
        for f in u.adapter.lora.values():
            acc += f.A.sum() + f.B.sum()


def strategy_benchmark(clients: int, modules: int, dim: int, rank: int, repeats: int) -> dict:
    shapes = {f"layer.{i // 2}.{'qv'[i % 2]}": ModuleShape(dim, dim) for i in range(modules)}
    spec = FederationSpec(shapes, {f"c{k}": rank for k in range(clients)})
    gen = torch.Generator().manual_seed(0)
    out = {"clients": clients, "modules": modules, "dim": dim, "rank": rank, "dtype": "float32"}
    rows = {}
    for name in sorted(STRATEGIES):
        strategy = make_strategy(name, spec)
        state = strategy.init_state()
        updates = make_updates(strategy, state, clients, gen)
        baseline = best_of(lambda u=updates: read_pass(u), repeats)
        with PeakRSS() as mem:
            seconds = best_of(lambda s=strategy, st=state, u=updates: s.aggregate(st, u), repeats)
        _, report = strategy.aggregate(state, updates)
        rows[name] = {
            "seconds": seconds,
            "read_pass_seconds": baseline,
            "ratio_to_read_pass": seconds / baseline,
            "peak_rss_mb": mem.mb,
            "residual": report.residual,
        }
        del updates
    out["client_bytes_mb"] = clients * modules * 2 * dim * rank * 4 / 2**20
    out["target_ratio"] = 3.0
    out["strategies"] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--modules", type=int, default=24)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--svd-dim", type=int, default=4096)
    parser.add_argument("--svd-rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    console = Console()
    with console.status("fedsvd: low-rank route vs dense SVD"):
        fedsvd = svd_benchmark(args.svd_dim, args.svd_rank)
    with console.status(f"{args.clients} clients x {args.modules} modules, every strategy"):
        per_strategy = strategy_benchmark(
            args.clients, args.modules, args.dim, args.rank, args.repeats
        )
    result = {
        "machine": {
            "cpu_count": psutil.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "fedsvd_vs_dense_svd": fedsvd,
        "aggregation_round": per_strategy,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    console.print(
        f"fedsvd low-rank {fedsvd['lowrank_seconds'] * 1e3:.1f} ms vs dense SVD "
        f"{fedsvd['dense_svd_seconds']:.1f} s: {fedsvd['speedup']:.0f}x (target >= 100x), "
        f"product difference {fedsvd['product_rel_diff']:.1e}"
    )
    table = Table(
        title=f"one round, {args.clients} clients x {args.modules} modules "
        f"({args.dim}x{args.dim}, r={args.rank})"
    )
    for col in ("strategy", "seconds", "x read pass", "peak MB", "residual"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for name, row in per_strategy["strategies"].items():
        table.add_row(
            name,
            f"{row['seconds']:.3f}",
            f"{row['ratio_to_read_pass']:.1f}",
            f"{row['peak_rss_mb']:.0f}",
            f"{row['residual']:.2e}",
        )
    console.print(table)
    console.print(f"written: {args.out}")


if __name__ == "__main__":
    main()
