"""LoRA linear layer as one autograd function, with per-sample gradients for DP-SGD.

y = x W^T + b + s (x A^T) B^T with W, b frozen and A (r x d_in), B (d_out x r) trained. This
plain-torch version defines the meaning of the fused kernels and is the CPU production path:

- Only x, W, A, B are saved; h = x A^T (N x r) is recomputed in backward (RunLoRA): an N x r
  activation per layer is more memory than one rank-r GEMM is time.
- The scale s is folded into a rank-r operand (s A or s B, r (d_in + d_out) values), never applied
  to a full-size tensor, and the adapter is accumulated into the base output in place (addmm_).
- The computation order is chosen per shape by FLOP count (`merge_is_cheaper`): through the N x r
  intermediate, or through the merged weight W + s B A when N is large against the layer; merging
  only in fp32/fp64, where it cannot round a small update away.
- With `per_sample=True` the backward also instantiates every example's dA_i and dB_i (batched
  GEMMs over its tokens, the FLOPs of the summed gradients) and attaches them as `grad_sample`
  to the A and B tensors, exactly as Opacus's hooks do. Opacus's DPOptimizer then consumes them
  unchanged (no hooks, no second backward), or `clip_and_noise` does the same step itself.
  Their norms are taken from `grad_sample` when clipping (`per_sample_norms`), not kept beside
  them: a second copy would go stale when a caller edits `grad_sample` (client/canaries.py
  appends rows), and recomputing reads only batch * r * (d_in + d_out) values.
- Under autocast (bf16 on CUDA or CPU) the products run in the autocast dtype and the adapter's
  gradients come back in its own dtype; per-sample gradients too, so that DP-SGD's norms and
  clipped sums are taken in fp32 on the very values it sums (exact clipping, whatever precision
  computed them).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

LOSS_REDUCTIONS = ("sum", "mean")
KERNELS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Merging W + s B A in half precision rounds a small update away (it is ~1e-3 of W).
_MERGE_DTYPES = (torch.float32, torch.float64)


def merge_is_cheaper(lowrank_flops: int, d_in: int, d_out: int, r: int, dtype: torch.dtype) -> bool:
    """Whether forming W + s B A (r d_in d_out multiply-adds) beats the rank-r route's
    `lowrank_flops`; never in half precision."""
    return dtype in _MERGE_DTYPES and r * d_in * d_out < lowrank_flops


def _merged_weight(weight: Tensor, A: Tensor, B_s: Tensor) -> Tensor:
    """W + s B A, the scale already folded into B_s."""
    return torch.addmm(weight, B_s, A)


def _attach_grad_sample(param: Tensor, grad_sample: Tensor) -> None:
    """Opacus's convention: a tensor after one backward, a list (one entry per batch) after
    several before the step, which DPOptimizer concatenates."""
    previous = getattr(param, "grad_sample", None)
    if previous is None:
        param.grad_sample = grad_sample
    elif isinstance(previous, list):
        previous.append(grad_sample)
    else:
        param.grad_sample = [previous, grad_sample]


def _per_sample_grads(
    x: Tensor, grad_out: Tensor, h_s: Tensor | None, u_s: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """dA_i = u_i^T x_i and dB_i = g_i^T h_i per example (first dim), scale already in h_s, u_s:
    one batched GEMM over each example's tokens."""
    batch = x.shape[0]
    x3 = x.reshape(batch, -1, x.shape[-1])
    g3 = grad_out.reshape(batch, -1, grad_out.shape[-1])
    dA = None if u_s is None else torch.bmm(u_s.view(batch, -1, u_s.shape[-1]).mT, x3)
    dB = None if h_s is None else torch.bmm(g3.mT, h_s.view(batch, -1, h_s.shape[-1]))
    return dA, dB


def store_per_sample(
    params: tuple[Tensor, Tensor], grads: tuple[Tensor | None, Tensor | None], reduction: str
) -> tuple[Tensor | None, Tensor | None]:
    """Attach per-example grads to A and B and return their sums for autograd. Under a mean
    loss the per-example grads are scaled by the batch size, as Opacus does, so they are the
    gradients of each example's own loss."""
    sums = []
    for param, grad_sample in zip(params, grads, strict=True):
        if grad_sample is None:
            sums.append(None)
            continue
        sums.append(grad_sample.sum(0))
        if reduction == "mean":
            grad_sample.mul_(grad_sample.shape[0])
        _attach_grad_sample(param, grad_sample)
    return sums[0], sums[1]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a LoRA layer computes in: autocast's where it is on for x's device and x is a
    float it lowers (fp32, or already that dtype), else x's own."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        lowered = torch.get_autocast_dtype(kind)
        if x.dtype in (torch.float32, lowered):
            return lowered
    return x.dtype


class _LoRALinear(torch.autograd.Function):
    """Forward/backward of `lora_linear`; see the module docstring for the design."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
        scaling: float, per_sample: bool, loss_reduction: str,
    ) -> Tensor:
        dtype = compute_dtype(x)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x, weight, A, B)
        ctx.scaling, ctx.loss_reduction = scaling, loss_reduction
        # the tensors themselves, not saved copies: per-sample grads go on the parameters
        ctx.grad_sample_targets = (A, B) if per_sample else None
        x2 = x.reshape(-1, x.shape[-1])
        r, (d_out, d_in) = A.shape[0], weight.shape
        A_c, B_s = A.to(dtype), (B * scaling).to(dtype)
        with torch.autocast(x.device.type, enabled=False):  # operands are already in `dtype`
            if merge_is_cheaper(x2.shape[0] * r * (d_in + d_out), d_in, d_out, r, dtype):
                y = nn.functional.linear(x2, _merged_weight(weight, A_c, B_s), bias)
            else:
                y = x2 @ weight.T if bias is None else torch.addmm(bias, x2, weight.T)
                y.addmm_(x2 @ A_c.T, B_s.T)
        return y.view(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, A_param, B_param = ctx.saved_tensors
        need_x, _, _, need_A, need_B = ctx.needs_input_grad[:5]
        A, B = A_param.to(x.dtype), B_param.to(x.dtype)
        grad_out = grad_out.to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        r, (d_out, d_in) = A.shape[0], weight.shape
        n = x2.shape[0]
        B_s = B * ctx.scaling
        # u = s g B (N x r) serves dA and, on the rank-r route, dX; h = s x A^T serves dB
        lowrank_dx_flops = n * r * d_in + (0 if need_A else n * r * d_out)
        merge_dx = need_x and merge_is_cheaper(lowrank_dx_flops, d_in, d_out, r, x.dtype)
        u_s = g2 @ B_s if need_A or (need_x and not merge_dx) else None
        h_s = x2 @ (A * ctx.scaling).T if need_B else None

        grad_x = None
        if merge_dx:
            grad_x = (g2 @ _merged_weight(weight, A, B_s)).view_as(x)
        elif need_x:
            grad_x = (g2 @ weight).addmm_(u_s, A).view_as(x)

        if ctx.grad_sample_targets is not None:
            dA, dB = _per_sample_grads(x, grad_out, h_s, u_s if need_A else None)
            grads = (None if dA is None else dA.to(A_param.dtype),
                     None if dB is None else dB.to(B_param.dtype))
            grad_A, grad_B = store_per_sample(ctx.grad_sample_targets, grads,
                                              ctx.loss_reduction)
        else:
            grad_A = (u_s.T @ x2).to(A_param.dtype) if need_A else None
            grad_B = (g2.T @ h_s).to(B_param.dtype) if need_B else None
        return grad_x, None, None, grad_A, grad_B, None, None, None


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def uses_triton(kernel: str, x: Tensor, weight: Tensor, A: Tensor, B: Tensor) -> bool:
    """Whether `lora_linear` with this `kernel` choice runs the Triton kernels on these tensors;
    "triton" where they cannot run is an error. "auto" takes Triton for CUDA tensors on tensor
    cores: fp16, bf16, and fp32 only where torch allows TF32 (exact fp32 GEMMs are cuBLAS's
    strength, not Triton's)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    installed = _triton_installed()
    runnable = x.dtype in TRITON_DTYPES and len({x.dtype, weight.dtype, A.dtype, B.dtype}) == 1
    tensor_cores = x.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    if kernel == "torch" or (
        kernel == "auto" and not (x.is_cuda and installed and runnable and tensor_cores)
    ):
        return False
    if not installed:
        raise ValueError("kernel='triton' needs the triton package: pip install triton")
    if not runnable:
        raise ValueError(f"the Triton kernels take x, W, A and B all of one dtype in "
                         f"{TRITON_DTYPES}; got {x.dtype}, {weight.dtype}, {A.dtype}, {B.dtype}")
    from fedlr.kernels import lora_triton

    if not x.is_cuda and not lora_triton.INTERPRETING:
        raise ValueError("the Triton kernels run on CUDA tensors; on CPU only under Triton's "
                         "interpreter (TRITON_INTERPRET=1 set before fedlr.kernels is imported)")
    return True


def lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
    per_sample: bool = False, loss_reduction: str = "mean", kernel: str = "auto",
) -> Tensor:
    """y = x W^T + b + scaling (x A^T) B^T for x of shape (..., d_in); W and b must be frozen.

    per_sample: also attach each example's gradient to `A.grad_sample` (batch x r x d_in) and
    `B.grad_sample` (batch x d_out x r), the first dimension of x indexing examples; pass the
    parameters themselves as A and B. loss_reduction: how the loss combines examples ("mean" or
    "sum", as Opacus's); under "mean" the stored grads are those of each example's own loss.
    kernel: "torch" (this module's function), "triton" (fedlr.kernels.lora_triton) or "auto":
    Triton for CUDA tensors in fp16/bf16 (fp32 with TF32 allowed) when installed, else torch.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lora_linear trains only A and B: freeze the base weight and bias")
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
    if per_sample and x.dim() < 2:
        raise ValueError("per-sample gradients need a batch dimension: x is (batch, ..., d_in)")
    function: Any = _LoRALinear
    if uses_triton(kernel, x, weight, A, B):
        from fedlr.kernels.lora_triton import TritonLoRALinear as function
    return function.apply(x, weight, bias, A, B, float(scaling), per_sample, loss_reduction)


class FusedLoRALinear(nn.Module):
    """A frozen nn.Linear plus a LoRA adapter, computed by `lora_linear`.

    `lora_A.weight` (r x d_in) and `lora_B.weight` (d_out x r) are laid out as in peft, so a
    layer built by `from_peft` shares peft's parameters and its state dict stays peft's.
    Set `per_sample` for DP-SGD: each backward then leaves `grad_sample` on both weights.
    """

    def __init__(
        self, base_layer: nn.Linear, lora_A: nn.Linear, lora_B: nn.Linear, scaling: float,
        *, per_sample: bool = False, loss_reduction: str = "mean", kernel: str = "auto",
    ) -> None:
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.lora_A, self.lora_B = lora_A, lora_B
        self.scaling = scaling
        self.per_sample, self.loss_reduction, self.kernel = per_sample, loss_reduction, kernel

    @classmethod
    def new(cls, base_layer: nn.Linear, r: int, alpha: float, **options: Any) -> FusedLoRALinear:
        """A fresh adapter initialised as peft does (A Kaiming-uniform, B zero), scaling alpha/r."""
        kw = {"bias": False, "device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        lora_A = nn.Linear(base_layer.in_features, r, **kw)
        lora_B = nn.Linear(r, base_layer.out_features, **kw)
        nn.init.zeros_(lora_B.weight)
        return cls(base_layer, lora_A, lora_B, alpha / r, **options)

    @classmethod
    def from_peft(
        cls, layer: Any, adapter_name: str = "default", **options: Any
    ) -> FusedLoRALinear:
        """The same layer as peft's `lora.Linear` `layer` for `adapter_name`, sharing its tensors.
        Refuses what the fused function does not compute (dropout, DoRA and other variants,
        lora_bias, fan_in_fan_out, merged weights)."""
        base = layer.get_base_layer()
        dropout = layer.lora_dropout[adapter_name]
        lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        unsupported = {
            "base layer is not nn.Linear": type(base) is not nn.Linear,
            "lora_dropout > 0": not isinstance(dropout, nn.Identity),
            "a LoRA variant (DoRA, ...)": adapter_name in getattr(layer, "lora_variant", {}),
            "lora_bias": lora_B.bias is not None,
            "fan_in_fan_out": layer.fan_in_fan_out,
            "merged adapter": layer.merged,
        }
        refused = [reason for reason, hit in unsupported.items() if hit]
        if refused:
            raise ValueError(f"FusedLoRALinear cannot compute this layer: {', '.join(refused)}")
        return cls(base, lora_A, lora_B, layer.scaling[adapter_name], **options)

    def forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        return lora_linear(
            x, base.weight, base.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
            per_sample=self.per_sample, loss_reduction=self.loss_reduction, kernel=self.kernel,
        )

    def extra_repr(self) -> str:
        return f"scaling={self.scaling}, per_sample={self.per_sample}, kernel={self.kernel!r}"


def _grad_samples(param: Tensor) -> tuple[Tensor, int]:
    """A parameter's per-sample grads as one tensor, and how many batches it holds."""
    grad_sample = getattr(param, "grad_sample", None)
    if grad_sample is None:
        raise ValueError("a parameter has no grad_sample: run the backward in per-sample mode")
    if isinstance(grad_sample, list):
        return torch.cat(grad_sample), len(grad_sample)
    return grad_sample, 1


def per_sample_norms(grad_samples: Sequence[Tensor]) -> Tensor:
    """Each example's gradient norm over all given tensors together (flat clipping)."""
    # sizes spelled out: a batch may hold no example (Poisson sampling), where -1 is ambiguous
    squares = [g.reshape(g.shape[0], math.prod(g.shape[1:])).pow(2).sum(1) for g in grad_samples]
    return torch.stack(squares).sum(0).sqrt()


def clip_and_noise(
    params: Sequence[Tensor], max_grad_norm: float, noise_multiplier: float,
    expected_batch_size: float, generator: torch.Generator | None = None,
) -> None:
    """One DP-SGD gradient from `grad_sample`s, written to `p.grad`: Opacus's DPOptimizer step
    (flat clipping by min(1, C / (||g_i|| + 1e-6)), one N(0, sigma^2 C^2) draw per tensor in order,
    divided by the expected batch size times the batches accumulated), so the same generator gives
    the same result and Opacus's accountant applies unchanged. Consumes the `grad_sample`s, so the
    next backward starts a new batch."""
    if not params:
        raise ValueError("clip_and_noise needs at least one parameter")
    flat = [_grad_samples(p) for p in params]
    if len({batches for _, batches in flat}) > 1:
        raise ValueError("parameters hold per-sample grads of different numbers of batches")
    samples = [g.to(p.dtype) for p, (g, _) in zip(params, flat, strict=True)]
    clip = (max_grad_norm / (per_sample_norms(samples) + 1e-6)).clamp(max=1.0)
    std = noise_multiplier * max_grad_norm
    divisor = expected_batch_size * flat[0][1]
    for p, grad_sample in zip(params, samples, strict=True):
        grad = torch.tensordot(clip.to(p.dtype), grad_sample, dims=1)
        if std > 0:
            grad += torch.normal(0.0, std, size=grad.shape, generator=generator,
                                 device=grad.device, dtype=grad.dtype)
        p.grad = (grad / divisor).view_as(p)
        p.grad_sample = None
