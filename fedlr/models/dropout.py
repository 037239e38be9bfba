"""Dropout for CPU training from 16-bit draws.

On a CPU, torch's dropout draws one double per element from a scalar generator (MKL's vectorised
one is used on Intel CPUs only): on the AMD CPU fedlr's benchmarks run on, it was 16 % of a
MiniLM training step. Here four 16-bit draws come from each 64-bit `random_` of torch's global
generator (about six times cheaper per element), so dropout stays reproducible from torch's seed.
The drop probability is quantised to 1/65536 (p = 0.1 drops 6554/65536 = 0.1000061 of the
elements) and what is kept is scaled by the exact inverse of the keep probability, so a layer's
output is unbiased, as torch's is. Other devices keep torch's own dropout (fast there).

`use_fast_dropout` puts it into a transformers model: each `nn.Dropout` becomes a `FastDropout`
(still an `nn.Dropout`, same `p`), and the attention that drops attention probabilities (BERT's)
becomes `attention` below: what torch's CPU attention computes with dropout (its math path, in
float32 for bf16 and fp16 inputs), with this module's mask.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

STEPS = 1 << 16
ATTENTION = "fedlr_sdpa"
SDPA_ONLY = ("position_bias", "cache", "softcap", "s_aux")  # what `attention` leaves to SDPA


def drop_steps(p: float) -> int:
    """How many of the 65536 values of a 16-bit draw drop an element."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    return round(p * STEPS)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu"
              ) -> tuple[Tensor, float]:
    """A mask keeping each element with probability 1 - drop_steps(p)/65536, and the scale
    (the inverse of that probability) that makes the kept values unbiased."""
    dropped, n = drop_steps(p), math.prod(shape)
    # the full 64-bit range: with no bounds, random_ leaves an int64's sign bit at 0
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    draws = bits.view(torch.int16)[:n].view(shape)
    return draws >= dropped - STEPS // 2, STEPS / (STEPS - dropped)


def drop(x: Tensor, p: float, training: bool = True) -> Tensor:
    """`torch.nn.functional.dropout` with this module's mask on a CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or drop_steps(p) == STEPS:
        return nn.functional.dropout(x, p, True)
    mask, scale = keep_mask(x.shape, p, x.device)
    return x * scale * mask  # one rounding, as torch's; the backward keeps the boolean mask


class FastDropout(nn.Dropout):
    """An `nn.Dropout` drawing its mask as `drop` does."""

    def forward(self, x: Tensor) -> Tensor:
        return drop(x, self.p, self.training)


def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
              attention_mask: Tensor | None, dropout: float = 0.0,
              scaling: float | None = None, is_causal: bool | None = None,
              **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' SDPA attention, except that on a CPU the attention probabilities are
    dropped with this module's mask. Causal attention and anything else SDPA is given goes to
    SDPA (the decoders fedlr trains have no attention dropout)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if dropout == 0.0 or query.device.type != "cpu" or causal or any(
            kwargs.get(name) is not None for name in SDPA_ONLY):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dtype = query.dtype
    if dtype in (torch.bfloat16, torch.float16):  # as torch's math attention: in float32
        query, key, value = query.float(), key.float(), value.float()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query * scale) @ key.transpose(-2, -1)
    if attention_mask is not None:
        scores = (scores.masked_fill(~attention_mask, float("-inf"))
                  if attention_mask.dtype == torch.bool else scores + attention_mask)
    out = (drop(scores.softmax(-1), dropout) @ value).to(dtype)
    return out.transpose(1, 2).contiguous(), None


def use_fast_dropout(model: nn.Module) -> None:
    """Every `nn.Dropout` of `model` becomes a `FastDropout`, and its SDPA attention
    `attention`, which is SDPA unless the probabilities are dropped on a CPU: only in a model
    that dispatches its attention through transformers' attention interface (one with its own
    SDPA code would read the new name as "not SDPA")."""
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, FastDropout(child.p, child.inplace))
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == "sdpa" and getattr(
            model, "_supports_attention_backend", False):
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionInterface.register(ATTENTION, attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
        model.set_attn_implementation(ATTENTION)
