"""Fused LoRA layers against peft's and the frozen base layer, and the DP training step they give.

1. One layer, forward + backward (gradients of x and of the adapter; the base is frozen): the
   frozen base nn.Linear alone, peft's LoRA Linear, fedlr.kernels' fused layer, and the fused
   layer with per-sample gradients (what DP-SGD needs), at each shape, median of interleaved
   repeats, side by side in one process. On CUDA the fused layer runs the Triton kernels, and
   "fused-torch" is the same layer through the plain-torch function.
2. One client's DP training step on the default model (all-MiniLM-L6-v2, LoRA r=8 on
   query/value, trained head): non-private, Opacus hooks, fused layers (hooks for the head only),
   through benchmarks/client_step.py's worker, one fresh process per run.

Writes benchmarks/results/kernels.json and prints tables. CPU always; CUDA when present.
Run: python benchmarks/kernels.py [--repeats 5] [--skip-step]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

RESULTS = Path(__file__).parent / "results" / "kernels.json"
CPU_SHAPES = [(1024, 1024, 16, 2048), (768, 768, 8, 2048)]  # d_in, d_out, r, tokens
CUDA_SHAPES = [(4096, 4096, 16, 8192)]
LAYERS = ("base", "peft", "fused", "fused-per-sample", "fused-torch")
STEP_MODES = ("non-private", "dp-hooks", "dp-fused")


def make_layer(kind: str, d_in: int, d_out: int, r: int, device: str, dtype: torch.dtype):
    """A frozen base with (or without) a LoRA adapter of rank r, B non-zero."""
    from peft import LoraConfig, get_peft_model

    from fedlr.kernels import FusedLoRALinear

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(d_in, d_out)).to(device, dtype)
    base.requires_grad_(False)
    if kind == "base":
        return base
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
    layer = model.base_model.model[0]
    nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    if kind == "peft":
        return model
    return FusedLoRALinear.from_peft(layer, "default", per_sample=kind == "fused-per-sample",
                                     kernel="torch" if kind == "fused-torch" else "auto")


def time_layer(layer, x: torch.Tensor, device: str, iters: int) -> float:
    """Seconds per forward + backward (x.grad and the adapter's grads), after warmup."""
    def once() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()
        for p in layer.parameters():
            p.grad_sample = None

    for _ in range(3):
        once()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        once()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def layer_rows(device: str, repeats: int, iters: int) -> list[dict]:
    from fedlr.kernels.lora import uses_triton

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for d_in, d_out, r, tokens in CUDA_SHAPES if device == "cuda" else CPU_SHAPES:
        batch = 16
        x = torch.randn(batch, tokens // batch, d_in, device=device, dtype=dtype,
                        requires_grad=True)
        # on CPU "fused" is the plain-torch function already
        kinds = LAYERS if device == "cuda" else LAYERS[:-1]
        layers = {kind: make_layer(kind, d_in, d_out, r, device, dtype) for kind in kinds}
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(repeats):  # interleaved, so drift hits every layer alike
            for kind, layer in layers.items():
                times[kind].append(time_layer(layer, x, device, iters))
        median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        fused = layers["fused"]  # which kernels lora_linear's "auto" ran it on
        on_triton = uses_triton("auto", x, fused.base_layer.weight, fused.lora_A.weight,
                                fused.lora_B.weight)
        rows.append({
            "device": device, "dtype": str(dtype).removeprefix("torch."), "d_in": d_in,
            "d_out": d_out, "rank": r, "tokens": tokens,
            "fused_kernel": "triton" if on_triton else "torch",
            "seconds": median, "seconds_all": times,
            "fused_vs_base": median["fused"] / median["base"],
            "peft_vs_fused": median["peft"] / median["fused"],
            "per_sample_vs_fused": median["fused-per-sample"] / median["fused"],
        })
    return rows


def step_rows(device: str, repeats: int) -> list[dict]:
    """The training step per mode, through client_step.py's worker (fresh process each run)."""
    script = Path(__file__).parent / "client_step.py"
    runs: dict[str, list[float]] = {mode: [] for mode in STEP_MODES}
    for _ in range(repeats):
        for mode in STEP_MODES:
            done = subprocess.run([sys.executable, str(script), "--worker", mode, device],
                                  check=True, capture_output=True, text=True)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1])["step_seconds"])
    median = {m: sorted(v)[len(v) // 2] for m, v in runs.items()}
    return [{"device": device, "seconds": median, "seconds_all": runs,
             "fused_vs_non_private": median["dp-fused"] / median["non-private"],
             "hooks_vs_non_private": median["dp-hooks"] / median["non-private"]}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--step-repeats", type=int, default=3)
    parser.add_argument("--skip-step", action="store_true")
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    console = Console(width=120)  # the tables are wider than a default terminal
    layers, steps = [], []
    for device in devices:
        console.print(f"[dim]{device}: layers")
        layers += layer_rows(device, args.repeats, args.iters)
        if not args.skip_step:
            console.print(f"[dim]{device}: training steps")
            steps += step_rows(device, args.step_repeats)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "layers": layers, "training_step": steps,
    }, indent=2) + "\n")

    table = Table(title="one LoRA layer, forward + backward (ms, median)")
    for column in ("device", "d_in x d_out, r, N", "kernel", "base", "peft", "fused",
                   "fused+ps", "fused-torch", "fused/base", "peft/fused"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in layers:
        ms = {k: f"{v * 1e3:.1f}" for k, v in row["seconds"].items()}
        table.add_row(row["device"], f"{row['d_in']}x{row['d_out']}, {row['rank']}, "
                      f"{row['tokens']}", row["fused_kernel"], *(ms.get(k, "-") for k in LAYERS),
                      f"{row['fused_vs_base']:.2f}", f"{row['peft_vs_fused']:.2f}")
    console.print(table)
    console.print("fused+ps: the fused layer with per-sample gradients of A and B (DP-SGD); "
                  "fused-torch: the plain-torch function on CUDA")
    if steps:
        table = Table(title="training step on the default model (s, median)")
        for column in ("device", *STEP_MODES, "fused/non-private", "hooks/non-private"):
            table.add_column(column, justify="right", no_wrap=True)
        for row in steps:
            table.add_row(row["device"], *(f"{row['seconds'][m]:.3f}" for m in STEP_MODES),
                          f"{row['fused_vs_non_private']:.2f}",
                          f"{row['hooks_vs_non_private']:.2f}")
        console.print(table)
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
