"""fedlr.kernels: fused low-rank ops, each with a plain-torch reference that defines its meaning."""

from fedlr.kernels.lora import (
    FusedLoRALinear,
    clip_and_noise,
    lora_linear,
    merge_is_cheaper,
    per_sample_norms,
)

__all__ = [
    "FusedLoRALinear",
    "clip_and_noise",
    "lora_linear",
    "merge_is_cheaper",
    "per_sample_norms",
]
