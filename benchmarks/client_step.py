"""One client's training step: non-private vs DP-SGD (Opacus hooks, ghost clipping, fused layers).

Measures, on the default model (all-MiniLM-L6-v2 + LoRA r=8 on query/value, trained head) and the
default task (stdlib-docs), the step time and the peak memory of each mode, each in its own
process so that peaks do not mix. Runs on CPU always and on CUDA too when one is present. Timing
uses fixed-size batches in every mode (DP without Poisson sampling) so that all modes see the same
batches; the step time is (time of warmup + N steps - time of warmup steps) / N through the real
`LocalTrainer`, the median over interleaved repeats. Writes benchmarks/results/client_step.json
and prints a table.

Run: python benchmarks/client_step.py [--batch-size 32 --max-length 64 --steps 10 --rank 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results" / "client_step.json"
MODES = ("non-private", "dp-hooks", "dp-ghost", "dp-fused")


def worker(mode: str, device: str, args: argparse.Namespace) -> dict:
    """Run in a fresh process: load, warm up, time N steps, report peaks."""
    from fedlr.client.samplers import ShuffledBatches
    from fedlr.client.training import LocalTrainer
    from fedlr.data.batches import encode
    from fedlr.data.sources import load_data
    from fedlr.lora.strategies import FederationSpec, make_strategy
    from fedlr.models.hosts import LoraHost, default_targets, load_base_model, load_tokenizer
    from fedlr.privacy.sample_level import PrivacyLedger
    from fedlr.settings.specs import DPConfig, ModelSpec, TrainConfig

    torch.set_num_threads(args.threads or torch.get_num_threads())
    data = load_data("stdlib-docs")
    spec = ModelSpec(name="minilm", num_labels=data.num_labels, max_length=args.max_length)
    tokenizer = load_tokenizer(spec)
    base = load_base_model(spec, tokenizer).to(device)
    host = LoraHost(base, spec.task, default_targets(base))
    encoded = encode(data.train, tokenizer, args.max_length)
    strategy = make_strategy(
        "fedit", FederationSpec(host.shapes, {"c": args.rank}, extras=host.head_shapes)
    )
    start = strategy.downlink(strategy.init_state(host.initial_head), "c")
    dp = None
    if mode != "non-private":
        dp = DPConfig(
            noise_multiplier=1.0, max_grad_norm=1.0,
            grad_sample_mode=mode.removeprefix("dp-"),
        )

    class FixedSizeBatches(LocalTrainer):
        """Timing only: the same fixed-size batches in every mode (not a private sampler)."""

        def batches(self, n, plan, generator):
            return ShuffledBatches(n, self.config.batch_size, self.config.local_steps, generator)

    def run(steps: int) -> float:
        config = TrainConfig(local_steps=steps, batch_size=args.batch_size, lr=1e-3,
                             max_length=args.max_length, device=device, dp=dp)
        ledger = PrivacyLedger() if dp else None
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        FixedSizeBatches(host, config).train("c", start, encoded, rank=args.rank, ledger=ledger)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm = run(args.warmup)
    full = run(args.warmup + args.steps)
    out = {
        "mode": mode,
        "device": device,
        "step_seconds": (full - warm) / args.steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mb": rss_loaded / 2**20,
    }
    if device == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode; median reported")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "DEVICE"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    console = Console()
    runs: dict[tuple[str, str], list[dict]] = {}
    for repeat in range(args.repeats):  # modes interleaved, so drift hits all of them alike
        for device in devices:
            for mode in MODES:
                console.print(f"[dim]run {repeat + 1}/{args.repeats}: {device} {mode}")
                cmd = [sys.executable, __file__, "--worker", mode, device, *sys.argv[1:]]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                runs.setdefault((device, mode), []).append(row)
    rows = []
    for samples in runs.values():
        times = sorted(s["step_seconds"] for s in samples)
        row = {**samples[0], "step_seconds": times[len(times) // 2], "step_seconds_all": times}
        for key in ("peak_rss_mb", "peak_cuda_mb"):
            if key in row:
                row[key] = max(s[key] for s in samples)
        rows.append(row)
    for row in rows:
        ref = next(r for r in rows if r["device"] == row["device"] and r["mode"] == MODES[0])
        row["time_vs_non_private"] = row["step_seconds"] / ref["step_seconds"]
        row["peak_rss_vs_non_private"] = row["peak_rss_mb"] / ref["peak_rss_mb"]

    result = {
        "benchmark": "client_step",
        "model": "minilm (all-MiniLM-L6-v2), LoRA on query/value, classification head trained",
        "task": "stdlib-docs",
        "settings": {k: getattr(args, k) for k in ("batch_size", "max_length", "rank", "steps",
                                                   "warmup", "repeats")},
        "timing": "median over repeats of (warmup + steps) - (warmup) through LocalTrainer; "
                  "fixed-size batches in every mode",
        "machine": {
            "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "versions": {"torch": torch.__version__, **_versions()},
        "results": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    table = Table(title=f"client step, batch {args.batch_size} x {args.max_length} tokens")
    columns = ("device", "mode", "step (s)", "x non-private", "peak RSS (MB)", "peak CUDA (MB)")
    for column in columns:
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r["device"], r["mode"], f"{r['step_seconds']:.3f}", f"{r['time_vs_non_private']:.2f}",
            f"{r['peak_rss_mb']:.0f}", f"{r['peak_cuda_mb']:.0f}" if "peak_cuda_mb" in r else "-",
        )
    console.print(table)
    console.print(f"wrote {RESULTS}")


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("opacus", "peft", "transformers")}


if __name__ == "__main__":
    main()
