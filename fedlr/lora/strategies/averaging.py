"""The weighted sums every strategy's aggregation is built from, and the exact reference
sum_k p_k dW_k that its residual is measured against."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedlr.lora.lowrank import LowRank, concat, dense_is_cheaper, difference_norm, frobenius_norm
from fedlr.lora.strategies.base import ClientUpdate


def client_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """p_k = n_k / sum n: FedAvg's example-count weighting."""
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def stack(
    effective: Sequence[Mapping[str, LowRank]], weights: Sequence[float], name: str
) -> LowRank:
    """[p_1 B_1 ... p_K B_K] over [A_1; ...; A_K]: sum_k p_k dW_k exactly, for any ranks."""
    terms = [e[name] for e in effective]
    stacked = concat(terms)
    ranks = torch.tensor([t.rank for t in terms])
    column_weights = torch.repeat_interleave(torch.tensor(weights, dtype=stacked.B.dtype), ranks)
    stacked.B.mul_(column_weights)  # in place on the fresh concatenation: one pass, no copies
    return stacked


class IdealUpdate:
    """dW* = sum_k p_k dW_k of one module, exact, as stacked factors.

    Distances to it are what every residual needs. The dense d_out x d_in product is formed once,
    and only where that is cheaper than the QR route on the stacked factors (many clients).
    """

    def __init__(self, stacked: LowRank, shared: bool = False) -> None:
        self.stacked = stacked
        self.shared = shared  # dW* is the aggregate itself: a zero distance by construction
        d_out, d_in = stacked.shape
        self._dense = stacked.dense() if dense_is_cheaper(d_out, d_in, stacked.rank) else None
        self.norm = (
            float(torch.linalg.matrix_norm(self._dense))
            if self._dense is not None
            else frobenius_norm(stacked)
        )

    @classmethod
    def of(
        cls, effective: Sequence[Mapping[str, LowRank]], weights: Sequence[float], name: str
    ) -> IdealUpdate:
        return cls(stack(effective, weights, name))

    @classmethod
    def over_shared_a(
        cls,
        effective: Sequence[Mapping[str, LowRank]],
        weights: Sequence[float],
        name: str,
        shared: LowRank,
    ) -> IdealUpdate:
        """dW* where clients trained B against leading rows of one A (FFA-LoRA, FedSVD), given
        `shared` = (sum_k p_k pad(B_k), A): then sum_k p_k B_k A[:r_k] = shared exactly, without
        stacking. Falls back to stacking if any client's A is not those rows."""
        if all(torch.equal(e[name].A, shared.A[: e[name].rank]) for e in effective):
            return cls(shared, shared=True)
        return cls.of(effective, weights, name)

    def distance(self, x: LowRank) -> float:
        """||x - dW*||_F."""
        if self._dense is not None:
            return float(torch.linalg.matrix_norm(x.dense() - self._dense))
        return difference_norm(x, self.stacked)


def weighted_padded_b(factors: Sequence[LowRank], weights: Sequence[float], rank: int) -> Tensor:
    """sum_k p_k pad(B_k) at `rank`, all that the strategies with a frozen A average."""
    B = factors[0].B.new_zeros(factors[0].B.shape[0], rank)
    for x, p in zip(factors, weights, strict=True):
        B[:, : x.rank].add_(x.B, alpha=p)
    return B


def norm_weights(factors: Sequence[LowRank], fallback: Sequence[float]) -> list[float]:
    """HetLoRA's sparsity-weighted aggregation (Cho et al. 2024): p_k proportional to
    ||B_k A_k||_F, so a client whose update is small (pruned, or barely trained) counts less;
    `fallback` when every update is zero."""
    norms = [frobenius_norm(x) for x in factors]
    total = sum(norms)
    return [n / total for n in norms] if total > 0 else list(fallback)


def hetlora_average(previous: LowRank, factors: Sequence[LowRank], weights: Sequence[float]
                    ) -> LowRank:
    """FedIT's average of A and B at `previous`'s rank, one rank component at a time: component
    j is the weighted mean over the clients that hold it (rank > j), weights renormalised among
    them; a component none of them holds keeps `previous`'s value. With equal ranks this is
    sum_k p_k A_k, sum_k p_k B_k. (Plain zero padding would shrink the tail by the share of
    clients that hold it, and zero it, for good, in a round where only smaller ranks report.)"""
    rank = previous.rank
    A, B = torch.zeros_like(previous.A), torch.zeros_like(previous.B)
    held = torch.zeros(rank, dtype=previous.A.dtype, device=previous.A.device)
    for x, p in zip(factors, weights, strict=True):
        A[: x.rank].add_(x.A, alpha=p)
        B[:, : x.rank].add_(x.B, alpha=p)
        held[: x.rank] += p
    return component_mean(previous, A, B, held)


def component_mean(previous: LowRank, A_sum: Tensor, B_sum: Tensor, held: Tensor) -> LowRank:
    """Rank component j of the weighted sums divided by `held[j]`, the total weight of the
    clients that hold it; `previous`'s component where none does."""
    kept = held == 0
    share = torch.where(kept, torch.ones_like(held), held)
    A, B = A_sum / share[:, None], B_sum / share
    A[kept], B[:, kept] = previous.A[kept], previous.B[:, kept]
    return LowRank(B, A)
