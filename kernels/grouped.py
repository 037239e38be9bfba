"""Many clients' adapters over one batch: each example goes through its own client's LoRA (and
its own copy of a trained head), so that a group of clients shares one pass of the frozen base.

This is the gathered multi-adapter product of S-LoRA/Punica, here for training: each example's
factors are gathered by its owner (ranks may differ; smaller ones are zero-padded, which changes
no value and no gradient), and the backward gives every client the gradient of its own
examples only. With `per_sample` it instead attaches each example's gradient to its client's
tensors as `grad_sample` (Opacus's convention, as `fedlr.kernels.lora` does), which is what
per-client DP-SGD clips; no summed gradient is formed then.

`reference_grouped_lora` and `reference_grouped_linear` (one client at a time, plain torch)
define the meaning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fedlr.kernels.lora import _attach_grad_sample, compute_dtype


def _counts(owner: Tensor, clients: int) -> list[int]:
    """Examples per client; examples must come grouped by client, in client order."""
    if owner.numel() and bool((owner[1:] < owner[:-1]).any()):
        raise ValueError("owner must be sorted: examples grouped by client, in client order")
    return torch.bincount(owner, minlength=clients).tolist()


def _stack(tensors: Sequence[Tensor], shape: tuple[int, ...], scales: Sequence[float] | None,
           like: Tensor) -> Tensor:
    """The clients' tensors, zero-padded to `shape`, stacked (scaled when `scales`): one copy
    per distinct shape (a group has few ranks), not one per client."""
    out = like.new_zeros((len(tensors), *shape))
    by_shape: dict[torch.Size, list[int]] = {}
    for c, t in enumerate(tensors):
        by_shape.setdefault(t.shape, []).append(c)
    with torch.no_grad():
        for size, clients in by_shape.items():
            block = torch.stack([tensors[c] for c in clients])
            if scales is not None:
                factor = block.new_tensor([scales[c] for c in clients])
                block = block * factor.view(-1, *(1 for _ in size))
            where = torch.tensor(clients, device=like.device)
            out[(where, *(slice(0, n) for n in size))] = block.to(like.dtype)
    return out


def _hand_out(per_example: Tensor, counts: list[int], tensors: Sequence[Tensor],
              owner: Tensor, per_sample: bool) -> list[Tensor | None]:
    """Each client's share of per-example gradients, cut to its tensor's shape: attached as
    `grad_sample` (per_sample), else summed and returned for autograd."""
    if per_sample:
        for t, rows in zip(tensors, torch.split(per_example, counts), strict=True):
            if t.requires_grad:
                cut = rows[(slice(None), *(slice(0, n) for n in t.shape))]
                _attach_grad_sample(t, cut.to(t.dtype).contiguous())
        return [None] * len(tensors)
    # summed in the tensors' own dtype: many examples' low-precision grads lose less so
    sums = per_example.new_zeros((len(tensors), *per_example.shape[1:]), dtype=tensors[0].dtype)
    sums.index_add_(0, owner, per_example.to(sums.dtype))
    return [sums[(c, *(slice(0, n) for n in t.shape))].to(t.dtype) if t.requires_grad else None
            for c, t in enumerate(tensors)]


class _GroupedLoRA(torch.autograd.Function):
    """Under autocast (any device) the products run in its dtype, the gradients come back in
    the clients' tensors' own dtype (`_hand_out`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, owner: Tensor, scales: tuple[float, ...], per_sample: bool,
                *factors: Tensor) -> Tensor:
        x = x.to(compute_dtype(x))
        clients = len(scales)
        A, B = factors[:clients], factors[clients:]
        rank = max(a.shape[0] for a in A)
        d_in, d_out = A[0].shape[1], B[0].shape[0]
        A_stack = _stack(A, (rank, d_in), None, x)
        B_stack = _stack(B, (d_out, rank), scales, x)  # s B
        ctx.save_for_backward(x, owner, A_stack, B_stack)
        ctx.meta = (scales, per_sample, _counts(owner, clients), A, B)
        x3 = x.reshape(x.shape[0], -1, d_in)
        with torch.autocast(x.device.type, enabled=False):
            h = torch.bmm(x3, A_stack[owner].mT)
            return torch.bmm(h, B_stack[owner].mT).view(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, owner, A_stack, B_stack = ctx.saved_tensors
        grad = grad.to(x.dtype)
        scales, per_sample, counts, A, B = ctx.meta
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        g3 = grad.reshape(grad.shape[0], -1, grad.shape[-1])
        A_pe = A_stack[owner]
        u = torch.bmm(g3, B_stack[owner])  # s g B, per token
        grad_x = torch.bmm(u, A_pe).view_as(x) if ctx.needs_input_grad[0] else None
        grads_A: list[Tensor | None] = [None] * len(A)
        grads_B: list[Tensor | None] = [None] * len(B)
        if any(a.requires_grad for a in A):
            grads_A = _hand_out(torch.bmm(u.mT, x3), counts, A, owner, per_sample)
        if any(b.requires_grad for b in B):
            s = x.new_tensor(scales, dtype=B[0].dtype)[owner].view(-1, 1, 1)  # scale unrounded
            dB = torch.bmm(g3.mT, torch.bmm(x3, A_pe.mT)) * s
            grads_B = _hand_out(dB, counts, B, owner, per_sample)
        return (grad_x, None, None, None, *grads_A, *grads_B)


class _GroupedLinear(torch.autograd.Function):
    """Autocast as in `_GroupedLoRA`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, owner: Tensor, clients: int, per_sample: bool,
                *params: Tensor) -> Tensor:
        x = x.to(compute_dtype(x))
        W, b = params[:clients], params[clients:]
        W_stack = torch.stack([w.detach() for w in W]).to(x.dtype)
        ctx.save_for_backward(x, owner, W_stack)
        ctx.meta = (per_sample, _counts(owner, clients), W, b)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            y = torch.bmm(x3, W_stack[owner].mT)
        if b:
            y = y + torch.stack([t.detach() for t in b]).to(x.dtype)[owner].unsqueeze(1)
        return y.view(*x.shape[:-1], W_stack.shape[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, owner, W_stack = ctx.saved_tensors
        grad = grad.to(x.dtype)
        per_sample, counts, W, b = ctx.meta
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        g3 = grad.reshape(grad.shape[0], -1, grad.shape[-1])
        grad_x = torch.bmm(g3, W_stack[owner]).view_as(x) if ctx.needs_input_grad[0] else None
        grads_W: list[Tensor | None] = [None] * len(W)
        grads_b: list[Tensor | None] = [None] * len(b)
        if any(w.requires_grad for w in W):
            grads_W = _hand_out(torch.bmm(g3.mT, x3), counts, W, owner, per_sample)
        if any(t.requires_grad for t in b):
            grads_b = _hand_out(g3.sum(1), counts, b, owner, per_sample)
        return (grad_x, None, None, None, *grads_W, *grads_b)


def grouped_lora(x: Tensor, owner: Tensor, A: Sequence[Tensor], B: Sequence[Tensor],
                 scales: Sequence[float], per_sample: bool = False) -> Tensor:
    """delta_i = s_c (x_i A_c^T) B_c^T for every example i (first dim of x) of client
    c = owner[i]: the LoRA part of each example's own adapter. `owner` is sorted (examples grouped
    by client); A_c is r_c x d_in, B_c is d_out x r_c, ranks may differ. Without `per_sample`,
    A_c and B_c receive the sum of their examples' gradients; with it, each example's gradient as
    `grad_sample` (n_c x shape), in example order."""
    if not len(A) == len(B) == len(scales):
        raise ValueError("grouped_lora needs one A, one B and one scale per client")
    return _GroupedLoRA.apply(x, owner, tuple(float(s) for s in scales), per_sample, *A, *B)


def grouped_linear(x: Tensor, owner: Tensor, W: Sequence[Tensor], b: Sequence[Tensor] = (),
                   per_sample: bool = False) -> Tensor:
    """y_i = x_i W_c^T + b_c for example i of client c = owner[i]: a layer every client trains
    its own copy of (a classification head). `b` is empty for a layer without bias; gradients as
    in `grouped_lora`."""
    if b and len(b) != len(W):
        raise ValueError("grouped_linear needs one bias per client, or none")
    return _GroupedLinear.apply(x, owner, len(W), per_sample, *W, *b)


def reference_grouped_lora(x: Tensor, owner: Tensor, A: Sequence[Tensor], B: Sequence[Tensor],
                           scales: Sequence[float]) -> Tensor:
    """`grouped_lora`'s meaning: each client's examples through its own adapter, one by one."""
    out = x.new_zeros((*x.shape[:-1], B[0].shape[0]))
    for c, (a, b, s) in enumerate(zip(A, B, scales, strict=True)):
        rows = owner == c
        out[rows] = (x[rows] @ a.T) @ b.T * s
    return out


def reference_grouped_linear(x: Tensor, owner: Tensor, W: Sequence[Tensor],
                             b: Sequence[Tensor] = ()) -> Tensor:
    """`grouped_linear`'s meaning, one client at a time."""
    out = x.new_zeros((*x.shape[:-1], W[0].shape[0]))
    for c, w in enumerate(W):
        rows = owner == c
        out[rows] = torch.nn.functional.linear(x[rows], w, b[c] if b else None)
    return out
