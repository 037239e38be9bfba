"""Low-rank matrices dW = B @ A kept in factored form.

Every strategy reasons about products of thin factors. Forming a dense d_out x d_in matrix is what
makes naive LoRA aggregation slow and memory hungry, so the operations here (norms, SVD, sums) work
on the factors and fall back to a dense product only when that is the cheaper route.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LowRank:
    """dW = B @ A with any LoRA scaling already folded into B."""

    B: Tensor  # (d_out, r)
    A: Tensor  # (r, d_in)

    def __post_init__(self) -> None:
        if self.B.ndim != 2 or self.A.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"LowRank needs B (d_out x r) and A (r x d_in); got B {tuple(self.B.shape)}, "
                f"A {tuple(self.A.shape)}"
            )

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]

    def dense(self) -> Tensor:
        return self.B @ self.A

    def truncated(self, rank: int) -> LowRank:
        """Leading `rank` components (meaningful when the factors are SVD-ordered)."""
        return LowRank(self.B[:, :rank], self.A[:rank])


def concat(terms: Iterable[LowRank]) -> LowRank:
    """The exact sum of low-rank terms as one stacked factorisation (rank = sum of ranks)."""
    terms = list(terms)
    return LowRank(torch.cat([t.B for t in terms], dim=1), torch.cat([t.A for t in terms], dim=0))


def dense_is_cheaper(d_out: int, d_in: int, rank: int) -> bool:
    # QR route costs about 2 (d_out + d_in) r^2 + r^3 flops; the dense product d_out d_in r.
    return d_out * d_in * rank <= 2 * (d_out + d_in) * rank * rank + rank**3


def _core(x: LowRank) -> tuple[Tensor, Tensor, Tensor]:
    """Q_b, core C, Q_a with B A = Q_b C Q_a^T, Q_b and Q_a with orthonormal columns."""
    q_b, r_b = torch.linalg.qr(x.B)
    q_a, r_a = torch.linalg.qr(x.A.T)
    return q_b, r_b @ r_a.T, q_a


def frobenius_norm(x: LowRank) -> float:
    """||B A||_F without squaring (a Gram-matrix trace would lose half the digits)."""
    if x.rank == 0:
        return 0.0
    d_out, d_in = x.shape
    if dense_is_cheaper(d_out, d_in, x.rank):
        return float(torch.linalg.matrix_norm(x.dense()))
    _, core, _ = _core(x)
    return float(torch.linalg.matrix_norm(core))


def difference_norm(x: LowRank, y: LowRank) -> float:
    """||x - y||_F, exact to rounding even when x and y agree to 1e-15."""
    return frobenius_norm(LowRank(torch.cat([x.B, -y.B], 1), torch.cat([x.A, y.A], 0)))


@dataclass(frozen=True)
class FactoredSVD:
    """B A = U diag(S) Vh with U (d_out x k), Vh (k x d_in) orthonormal, S descending."""

    U: Tensor
    S: Tensor
    Vh: Tensor

    def top(self, rank: int) -> LowRank:
        """Best rank-`rank` approximation; B carries the singular values, A orthonormal rows."""
        return LowRank(self.U[:, :rank] * self.S[:rank], self.Vh[:rank])

    def energy(self, rank: int) -> float:
        """Fraction of ||B A||_F^2 kept by the leading `rank` components (1.0 for a zero matrix)."""
        total = float((self.S**2).sum())
        return 1.0 if total == 0.0 else float((self.S[:rank] ** 2).sum()) / total


def svd(x: LowRank) -> FactoredSVD:
    """SVD of B A through QR of the thin factors; never forms the d_out x d_in product.

    Singular vectors get a deterministic sign (largest |entry| of each right vector positive) so
    that every process computing the same SVD agrees, including the arbitrary directions of a
    rank-deficient product.
    """
    q_b, core, q_a = _core(x)
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)
    pivot = vh_c.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(vh_c.gather(1, pivot)).squeeze(1)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return FactoredSVD(q_b @ (u_c * sign), s, (vh_c * sign[:, None]) @ q_a.T)


def kaiming_uniform_a(
    rank: int, d_in: int, generator: torch.Generator, dtype: torch.dtype
) -> Tensor:
    """PEFT's default LoRA A init, kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(d_in), 1/sqrt(d_in))."""
    bound = 1.0 / math.sqrt(d_in)
    return (
        (torch.rand(rank, d_in, generator=generator, dtype=torch.float64) * 2 - 1)
        .mul_(bound)
        .to(dtype)
    )
