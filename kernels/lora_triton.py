"""Triton kernels for `lora_linear` on CUDA: the fused split of the LoRA layer.

Same meaning as the plain-torch function in `fedlr.kernels.lora` (the reference the tests hold
these kernels to), fewer passes over full-size activations:

- forward: S = s x A^T (N x r, one rank-r GEMM), then y = x W^T + b + S B^T in one kernel, the
  adapter term added in the base GEMM's epilogue (no full-size temporary, no separate add);
- backward, one pass over dY (`_dy_kernel`): u = s dY B (N x r) and dB = dY^T S, both from the
  same dY tile;
- dX = dY W + u A in one kernel, u A added in the dX GEMM's epilogue; the epilogue also reads the
  x tile under it for dA = u^T x, so dA costs one read of x and no kernel of its own.

Per-sample gradients for DP-SGD come from the same kernels: row blocks never straddle two
examples, and each block adds its dA, dB share into its own example's slot instead of the
batch's. S is kept from the forward rather than recomputed as the CPU path does: it is r/d_in of
the x saved anyway, and recomputing it would be a fourth full pass over x.

`TRITON_INTERPRET=1` (set before this module is imported) runs the kernels on CPU tensors, one
small tile config, operands upcast to fp32 before `tl.dot` (the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from fedlr.kernels.lora import store_per_sample

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) tiles; the interpreter gets one tiny tile, so
    small test shapes still cross every block boundary and nothing is benchmarked."""
    if INTERPRETING:
        shapes = [(16, 16, 16, 1, 1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                      num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


# Hopper/Ampere bf16 GEMM tiles (as in Triton's matmul tutorial); autotuned per shape.
_GEMM_CONFIGS = _configs([
    (128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 32, 4, 4),
    (64, 256, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
])
# The dY pass: rows x d_out chunk; BLOCK_K unused.
_DY_CONFIGS = _configs([
    (128, 128, 16, 8, 3), (64, 128, 16, 4, 3), (128, 64, 16, 4, 3), (64, 64, 16, 4, 4),
])


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Tile (m, n) of program `pid`, GROUP_M row blocks sweeping the columns together so the
    weight tiles they share stay in L2."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _segment_rows(pid_m, seg_len, BLOCK_M: tl.constexpr):
    """Row block `pid_m` of a matrix cut into segments (examples) of seg_len rows, blocks never
    straddling two: (segment, row indices, which rows are real)."""
    blocks_per_seg = tl.cdiv(seg_len, BLOCK_M)
    seg = pid_m // blocks_per_seg
    local = (pid_m % blocks_per_seg) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = seg.to(tl.int64) * seg_len + local
    return seg, rows, local < seg_len


@triton.autotune(configs=_GEMM_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, y_ptr, M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = x W^T + b + S B^T: the base GEMM with the adapter in its epilogue."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N),
                                 GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    m_ok, n_ok, r_ok = rm < M, rn < N, rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(x, w, acc, UPCAST, PRECISION)
    s = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
                mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    b = tl.load(b_ptr + rr[:, None] * stride_br + rn[None, :] * stride_bn,
                mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    acc = _dot(s, b, acc, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=_DY_CONFIGS, key=["seg_len", "N"], reset_to_zero=["db_ptr"])
@triton.jit
def _dy_kernel(
    g_ptr, b_ptr, s_ptr, u_ptr, db_ptr, seg_len, N, R, scale,
    stride_gm, stride_gn, stride_bn, stride_br, stride_sm, stride_sr, stride_um, stride_ur,
    stride_dbs, stride_dbn, stride_dbr,
    NEED_U: tl.constexpr, NEED_DB: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One pass over a row block of dY: u = s dY B for those rows, and their share of
    dB = dY^T S added into their segment's slot."""
    seg, rows, m_ok = _segment_rows(tl.program_id(0), seg_len, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if NEED_DB:
        s = tl.load(s_ptr + rows[:, None] * stride_sm + rr[None, :] * stride_sr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        g = tl.load(g_ptr + rows[:, None] * stride_gm + rn[None, :] * stride_gn,
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if NEED_U:
            b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                        mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            u = _dot(g, b, u, UPCAST, PRECISION)
        if NEED_DB:
            db = _dot(tl.trans(g), s, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32),
                      UPCAST, PRECISION)
            tl.atomic_add(db_ptr + seg * stride_dbs + rn[:, None] * stride_dbn
                          + rr[None, :] * stride_dbr, db, mask=n_ok[:, None] & r_ok[None, :])
    if NEED_U:
        tl.store(u_ptr + rows[:, None] * stride_um + rr[None, :] * stride_ur,
                 (u * scale).to(u_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.autotune(configs=_GEMM_CONFIGS, key=["seg_len", "segments", "N", "K"],
                 reset_to_zero=["da_ptr"])
@triton.jit
def _dx_kernel(
    g_ptr, w_ptr, u_ptr, a_ptr, x_ptr, dx_ptr, da_ptr, seg_len, segments, N, K, R,
    stride_gm, stride_gk, stride_wk, stride_wn, stride_um, stride_ur, stride_ar, stride_an,
    stride_xm, stride_xn, stride_dxm, stride_dxn, stride_das, stride_dar, stride_dan,
    WRITE_DX: tl.constexpr, WRITE_DA: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dX = dY W + u A (N = d_in columns, K = d_out reduction), and in the same epilogue the
    tile's share of dA = u^T x added into its segment's slot."""
    num_m = tl.cdiv(seg_len, BLOCK_M) * segments
    pid_m, pid_n = _grouped_tile(tl.program_id(0), num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    seg, rows, m_ok = _segment_rows(pid_m, seg_len, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    n_ok, r_ok = rn < N, rr < R
    u = tl.load(u_ptr + rows[:, None] * stride_um + rr[None, :] * stride_ur,
                mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    if WRITE_DX:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            g = tl.load(g_ptr + rows[:, None] * stride_gm + rk[None, :] * stride_gk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _dot(g, w, acc, UPCAST, PRECISION)
        a = tl.load(a_ptr + rr[:, None] * stride_ar + rn[None, :] * stride_an,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(u, a, acc, UPCAST, PRECISION)
        tl.store(dx_ptr + rows[:, None] * stride_dxm + rn[None, :] * stride_dxn,
                 acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    if WRITE_DA:
        x = tl.load(x_ptr + rows[:, None] * stride_xm + rn[None, :] * stride_xn,
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        da = _dot(tl.trans(u), x, tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32),
                  UPCAST, PRECISION)
        tl.atomic_add(da_ptr + seg * stride_das + rr[:, None] * stride_dar
                      + rn[None, :] * stride_dan, da, mask=r_ok[:, None] & n_ok[None, :])


def _dot_options(dtype: torch.dtype, r: int) -> dict[str, Any]:
    """Constexprs every kernel shares: the rank padded to a dot-able block, upcasting under the
    interpreter, and fp32 dots exact unless torch allows TF32 for its own matmuls (the setting
    only matters for fp32 operands; "tf32" is Triton's default)."""
    exact = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return {"BLOCK_R": max(16, triton.next_power_of_2(r)), "UPCAST": INTERPRETING,
            "PRECISION": "ieee" if exact else "tf32"}


def _new(*shape: int, like: Tensor) -> Tensor:
    """An output every element of which the kernels write (tests poison it)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def forward(x2: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
            scaling: float) -> tuple[Tensor, Tensor]:
    """y = x2 W^T + b + s (x2 A^T) B^T for x2 (N x d_in), and S = s x2 A^T for the backward."""
    n, (d_out, d_in), r = x2.shape[0], weight.shape, A.shape[0]
    s = x2 @ (A * scaling).T
    y = _new(n, d_out, like=x2)
    grid = lambda m: (triton.cdiv(n, m["BLOCK_M"]) * triton.cdiv(d_out, m["BLOCK_N"]),)  # noqa: E731
    _forward_kernel[grid](
        x2, weight, bias if bias is not None else x2, s, B, y, n, d_out, d_in, r,
        *x2.stride(), *weight.stride(), *s.stride(), *B.stride(), *y.stride(),
        HAS_BIAS=bias is not None, **_dot_options(x2.dtype, r),
    )
    return y, s


def backward(
    x2: Tensor, g2: Tensor, weight: Tensor, A: Tensor, B: Tensor, s: Tensor, scaling: float,
    segments: int, need_x: bool, need_A: bool, need_B: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """dX (N x d_in), dA (segments x r x d_in) and dB (segments x d_out x r), each only when
    needed; dA and dB summed over the rows of each of `segments` equal row segments (one per
    example for per-sample gradients, one in all otherwise), in fp32."""
    n, (d_out, d_in), r = x2.shape[0], weight.shape, A.shape[0]
    seg_len = n // segments
    options = _dot_options(x2.dtype, r)
    need_u = need_x or need_A
    u = _new(n, r, like=x2) if need_u else None
    db = torch.zeros(segments, d_out, r, dtype=torch.float32, device=x2.device) if need_B else None
    if need_u or need_B:
        blocks = lambda m: (segments * triton.cdiv(seg_len, m["BLOCK_M"]),)  # noqa: E731
        _dy_kernel[blocks](
            g2, B, s, u if need_u else g2, db if need_B else g2, seg_len, d_out, r, scaling,
            *g2.stride(), *B.stride(), *s.stride(), *(u.stride() if need_u else (0, 0)),
            *(db.stride() if need_B else (0, 0, 0)),
            NEED_U=need_u, NEED_DB=need_B, **options,
        )
    dx = _new(n, d_in, like=x2) if need_x else None
    da = torch.zeros(segments, r, d_in, dtype=torch.float32, device=x2.device) if need_A else None
    if need_u:
        tiles = lambda m: (  # noqa: E731
            segments * triton.cdiv(seg_len, m["BLOCK_M"]) * triton.cdiv(d_in, m["BLOCK_N"]),)
        _dx_kernel[tiles](
            g2, weight, u, A, x2, dx if need_x else x2, da if need_A else x2, seg_len, segments,
            d_in, d_out, r, *g2.stride(), *weight.stride(), *u.stride(), *A.stride(), *x2.stride(),
            *(dx.stride() if need_x else (0, 0)), *(da.stride() if need_A else (0, 0, 0)),
            WRITE_DX=need_x, WRITE_DA=need_A, **options,
        )
    return dx, da, db


class TritonLoRALinear(torch.autograd.Function):
    """`lora_linear` through the Triton kernels; arguments as `_LoRALinear`'s."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
        scaling: float, per_sample: bool, loss_reduction: str,
    ) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y, s = forward(x2, weight, bias, A, B, scaling)
        ctx.save_for_backward(x, weight, A, B, s)
        ctx.scaling, ctx.loss_reduction = scaling, loss_reduction
        ctx.grad_sample_targets = (A, B) if per_sample else None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, A, B, s = ctx.saved_tensors
        need_x, _, _, need_A, need_B = ctx.needs_input_grad[:5]
        per_sample = ctx.grad_sample_targets is not None
        dx, da, db = backward(
            x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1]), weight, A, B,
            s, ctx.scaling, x.shape[0] if per_sample else 1, need_x, need_A, need_B,
        )
        grad_x = None if dx is None else dx.view_as(x)
        da = None if da is None else da.to(A.dtype)
        db = None if db is None else db.to(B.dtype)
        if per_sample:
            grad_A, grad_B = store_per_sample(ctx.grad_sample_targets, (da, db),
                                              ctx.loss_reduction)
        else:
            grad_A = None if da is None else da[0]
            grad_B = None if db is None else db[0]
        return grad_x, None, None, grad_A, grad_B, None, None, None
