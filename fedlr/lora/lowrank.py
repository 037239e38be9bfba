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
        """Best rank-`rank` approximation with exactly `rank` components; B carries the singular
        values, A orthonormal rows. When B A has fewer components (a stack of few small ranks),
        the rest have singular value 0 (zero columns of B) and directions that complete A's rows
        to an orthonormal set (zero rows only past d_in), so every client still gets its rank
        and a component that can learn (a zero row of A and column of B never would)."""
        kept = min(rank, self.S.numel())
        B, A = self.U[:, :kept] * self.S[:kept], self.Vh[:kept]
        missing = rank - kept
        if missing == 0:
            return LowRank(B, A)
        return LowRank(torch.cat([B, B.new_zeros(B.shape[0], missing)], dim=1),
                       torch.cat([A, orthonormal_completion(A, missing)]))

    def energy(self, rank: int) -> float:
        """Fraction of ||B A||_F^2 kept by the leading `rank` components (1.0 for a zero matrix)."""
        total = float((self.S**2).sum())
        return 1.0 if total == 0.0 else float((self.S[:rank] ** 2).sum()) / total


def orthonormal_completion(rows: Tensor, count: int) -> Tensor:
    """`count` unit rows orthogonal to the orthonormal `rows` and to each other (deterministic:
    the Householder QR of [rows^T | I]); zero rows for any beyond the dimension."""
    d = rows.shape[1]
    basis, _ = torch.linalg.qr(torch.cat([rows.T, torch.eye(d, dtype=rows.dtype,
                                                            device=rows.device)], dim=1))
    extra = basis[:, rows.shape[0]: rows.shape[0] + count].T
    return torch.cat([extra, rows.new_zeros(count - extra.shape[0], d)])


def svd(x: LowRank) -> FactoredSVD:
    """SVD of B A through QR of the thin factors; never forms the d_out x d_in product.

    Singular vectors get a deterministic sign: the largest |entry| of each final right vector
    (row of Vh) is positive, U's columns flipped with them. So the result depends on B A alone,
    not on how it was factored, wherever the singular values are distinct and non-zero.
    """
    q_b, core, q_a = _core(x)
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)
    U, Vh = q_b @ u_c, vh_c @ q_a.T
    pivot = Vh.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(Vh.gather(1, pivot)).squeeze(1)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return FactoredSVD(U * sign, s, Vh * sign[:, None])


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
