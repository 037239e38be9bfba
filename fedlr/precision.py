"""The compute precision of local training and of evaluation: bf16 autocast of the frozen base,
or fp32.

bf16 pays only where the hardware computes it natively: CUDA devices with bf16, and CPUs with
AVX512-BF16 or AMX (MiniLM's training steps about 2x faster on an AVX512-BF16 CPU, peer.json).
Elsewhere bf16 is emulated and slower, so `auto` keeps fp32 there, and for models too narrow for
it to pay (`AUTO_MIN_WIDTH`). Only the products run in bf16: the adapter, its gradients, the
optimizer state and DP-SGD's clipping stay in fp32. Evaluation follows the same setting on the
evaluating machine (MiniLM's 400 held-out examples 3x faster, the same accuracy, the loss 1e-6
apart, one-off), so held-out numbers are those of the precision the run trains in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from fedlr.settings.specs import PRECISIONS

# Below this width a step is many small ops, and casting to bf16 costs more than it saves: the
# tiny preset (64 wide) trained 1.7-2.1x slower in bf16 (one-off) on the CPU where MiniLM (384)
# trains about 2x faster.
AUTO_MIN_WIDTH = 256


def _cpu_probe(name: str) -> Callable[[], bool]:
    probe = getattr(torch.cpu, name, None)  # private in torch; absent means unknown: no
    return probe if callable(probe) else (lambda: False)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware."""
    if device.type == "cuda":  # emulated (before Ampere) is slower than fp32
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return _cpu_probe("_is_avx512_bf16_supported")() or _cpu_probe("_is_amx_tile_supported")()
    return False


def autocast_dtype(precision: str, device: torch.device, model_dtype: torch.dtype,
                   width: int) -> torch.dtype | None:
    """bf16 when training a fp32 model should autocast to it, else None: always under `bf16`;
    under `auto` where the device computes bf16 natively and the model's layers are `width`
    (their input features) >= AUTO_MIN_WIDTH wide. A model in another dtype is left as it is."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if model_dtype != torch.float32 or precision == "fp32":
        return None
    if precision == "bf16" or (native_bf16(device) and width >= AUTO_MIN_WIDTH):
        return torch.bfloat16
    return None


def autocast(precision: str, device: torch.device, model_dtype: torch.dtype, width: int
             ) -> contextlib.AbstractContextManager[Any]:
    """`torch.autocast` to the dtype `autocast_dtype` chooses, or nothing where it chooses none."""
    dtype = autocast_dtype(precision, device, model_dtype, width)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
