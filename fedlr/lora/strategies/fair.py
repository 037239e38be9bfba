"""LoRA-FAIR: server-side correction of B (Bian et al., ICCV 2025).

After FedIT's averages A_bar, B_bar, the server looks for dB so that (B_bar + dB) A_bar points the
same way as the ideal dW* = sum p_k dW_k, and every client starts the next round from
(A_bar, B_bar + dB); the base stays unchanged.

- `objective="cosine"` (the paper's): minimise 1 - cos((B_bar + dB) A_bar, dW*) + lambda ||dB||^2 by
  gradient descent with Armijo backtracking. Every accepted step lowers the objective, so the result
  is never less aligned with dW* than FedIT's. (Reimplementations use fixed-lr SGD; the line search
  makes the solution independent of the scale of dW.)
- `objective="frobenius"` (fedlr's closed form): minimise
  ||dW* - (B_bar + dB) A_bar||^2 + lambda ||dB||^2,
  dB = (dW* A_bar^T - B_bar G)(G + lambda I)^-1 with G = A_bar A_bar^T; never a larger residual
  than FedIT's.

Nothing d_out x d_in is formed: dW* A_bar^T = sum_k p_k B_k (A_k A_bar^T). lambda applies to dB in
PEFT's parameter units (B without the LoRA scaling s), as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlr.errors import ConfigError
from fedlr.lora.lowrank import LowRank, svd
from fedlr.lora.strategies.averaging import IdealUpdate, client_weights, hetlora_average
from fedlr.lora.strategies.base import (
    AggregationReport,
    ClientUpdate,
    FederationSpec,
    GlobalState,
    Strategy,
    residual_summary,
)
from fedlr.lora.strategies.traits import TRAITS

OBJECTIVES = ("cosine", "frobenius")


@dataclass(frozen=True)
class CorrectionProblem:
    """Everything the correction of one module needs, in r x r and d_out x r pieces."""

    b_bar: Tensor  # (d_out, R), effective
    gram: Tensor  # A_bar A_bar^T, (R, R)
    target_cross: Tensor  # dW* A_bar^T, (d_out, R)
    target_norm: float  # ||dW*||_F
    lam: float  # regulariser in effective units

    def cosine(self, b: Tensor) -> Tensor:
        norm_x = torch.sqrt(((b @ self.gram) * b).sum())
        return (b * self.target_cross).sum() / (norm_x * self.target_norm)

    def objective(self, d_b: Tensor) -> Tensor:
        return 1 - self.cosine(self.b_bar + d_b) + self.lam * (d_b * d_b).sum()

    def gradient(self, d_b: Tensor) -> Tensor:
        b = self.b_bar + d_b
        bg = b @ self.gram
        norm_sq = (bg * b).sum()
        norm_x = torch.sqrt(norm_sq)
        inner = (b * self.target_cross).sum()
        d_cos = self.target_cross / (norm_x * self.target_norm) - inner * bg / (
            norm_x * norm_sq * self.target_norm
        )
        return -d_cos + 2 * self.lam * d_b


def solve_cosine(
    problem: CorrectionProblem, max_steps: int, tol: float = 1e-12
) -> tuple[Tensor, int]:
    """Monotone gradient descent with backtracking; returns dB and the steps taken."""
    d_b = torch.zeros_like(problem.b_bar)
    f = problem.objective(d_b)
    step = None
    for taken in range(max_steps):
        g = problem.gradient(d_b)
        g_sq = float((g * g).sum())
        if g_sq == 0.0:
            return d_b, taken
        if step is None:  # first trial moves by 10% of ||B_bar||
            step = 0.1 * max(float(problem.b_bar.norm()), 1e-12) / g_sq**0.5
        while True:
            candidate = d_b - step * g
            f_new = problem.objective(candidate)
            if float(f_new) <= float(f) - 1e-4 * step * g_sq:
                break
            step *= 0.5
            if step < 1e-30:
                return d_b, taken
        improvement = float(f - f_new)
        d_b, f, step = candidate, f_new, step * 2
        if improvement <= tol * max(1.0, abs(float(f))):
            return d_b, taken + 1
    return d_b, max_steps


def solve_frobenius(problem: CorrectionProblem) -> Tensor:
    rhs = problem.target_cross - problem.b_bar @ problem.gram
    eye = torch.eye(problem.gram.shape[0], dtype=problem.gram.dtype)
    # (G + lam I) is symmetric, so dB = rhs (G + lam I)^-1 solves from the right.
    return torch.linalg.solve(problem.gram + problem.lam * eye, rhs.T).T


class LoRAFAIR(Strategy):
    traits = TRAITS["fair"]

    def __init__(
        self,
        spec: FederationSpec,
        *,
        objective: str = "cosine",
        lam: float = 0.01,
        max_steps: int = 500,
        **kwargs,
    ) -> None:
        super().__init__(spec, **kwargs)
        if objective not in OBJECTIVES:
            raise ConfigError(f"unknown fair objective {objective!r}; choose one of {OBJECTIVES}")
        if objective == "frobenius" and lam <= 0:
            raise ConfigError("fair's frobenius objective needs lambda > 0 (it regularises G^-1)")
        if lam < 0:
            raise ConfigError(f"fair lambda must be >= 0, got {lam}")
        if max_steps < 1:
            raise ConfigError(f"fair max_steps must be >= 1, got {max_steps}")
        self.objective, self.lam, self.max_steps = objective, lam, max_steps

    def describe(self) -> dict:
        return {**super().describe(), "objective": self.objective, "lambda": self.lam}

    def aggregate(
        self, state: GlobalState, updates: Sequence[ClientUpdate]
    ) -> tuple[GlobalState, AggregationReport]:
        weights = client_weights(updates)
        effective = [u.effective() for u in updates]
        rank = self.spec.max_rank
        lam = self.lam / self.spec.scaling(rank) ** 2
        new_lora, terms, fedit_terms, cos_fedit, cos_fair, steps = {}, {}, {}, {}, {}, 0
        for name in self.spec.modules:
            ideal = IdealUpdate.of(effective, weights, name)
            avg = hetlora_average(state.lora[name], [e[name] for e in effective], weights)
            cross = ideal.stacked.B @ (ideal.stacked.A @ avg.A.T)  # dW* A_bar^T, d_out x R
            problem = CorrectionProblem(avg.B, avg.A @ avg.A.T, cross, ideal.norm, lam)
            degenerate = ideal.norm == 0 or float(((avg.B @ problem.gram) * avg.B).sum()) == 0
            if degenerate:  # cosine undefined: nothing to align, keep FedIT's average
                d_b = torch.zeros_like(avg.B)
            elif self.objective == "cosine":
                d_b, taken = solve_cosine(problem, self.max_steps)
                steps = max(steps, taken)
                cos_fedit[name] = float(problem.cosine(avg.B))
                cos_fair[name] = float(problem.cosine(avg.B + d_b))
            else:
                d_b = solve_frobenius(problem)
            corrected = LowRank(avg.B + d_b, avg.A)
            new_lora[name] = svd(corrected).top(rank) if self.hetero == "flexlora" else corrected
            terms[name] = (ideal.distance(corrected), ideal.norm)
            fedit_terms[name] = (ideal.distance(avg), ideal.norm)
        new_state = GlobalState(
            round=state.round + 1,
            lora=new_lora,
            extras=self.aggregate_extras(state, updates, weights),
        )
        details = {"fedit_residual": residual_summary(fedit_terms)[0]}
        if cos_fair:
            details |= {
                "cosine_fedit_min": min(cos_fedit.values()),
                "cosine_fair_min": min(cos_fair.values()),
                "solver_steps_max": steps,
            }
        return new_state, self.report(new_state.round, updates, weights, terms, **details)
