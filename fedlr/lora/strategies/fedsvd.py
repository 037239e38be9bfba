"""FedSVD: re-orthogonalise A every round by an SVD (Lee et al., NeurIPS 2025).

Clients train only B against the broadcast A. The server averages B_bar = sum p_k B_k and factors
B_bar A_prev = U S V^T through QR of the thin factors (never a dense d_out x d_in SVD):
A_new = V^T (orthonormal rows), B_new = U S, so B_new A_new = B_bar A_prev exactly and the next
round's A adapts to what the clients learnt. The state is SVD-ordered, so a lower-rank client's
truncation is its best approximation (HetLoRA and FlexLoRA coincide here). The paper freezes the
classification head at its random init; that is the default here (`head="train"` averages it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlr.lora.lowrank import LowRank, svd
from fedlr.lora.strategies.averaging import IdealUpdate, client_weights, weighted_padded_b
from fedlr.lora.strategies.base import AggregationReport, ClientUpdate, GlobalState, Strategy
from fedlr.lora.strategies.ffa import FFALoRA
from fedlr.lora.strategies.traits import TRAITS
from fedlr.lora.sums import SecureSum


class FedSVD(Strategy):
    traits = TRAITS["fedsvd"]

    def after_noise(self, x: LowRank) -> LowRank:
        """The SVD of a privatised module too: post-processing, free under client-level DP."""
        return svd(x).top(x.rank)

    def audited_form(self) -> Strategy:
        """FFA-LoRA's release, of which FedSVD's SVD is post-processing."""
        return FFALoRA(self.spec, hetero=self.hetero, head=self.head, seed=self.seed)

    def aggregate(
        self, state: GlobalState, updates: Sequence[ClientUpdate]
    ) -> tuple[GlobalState, AggregationReport]:
        weights = client_weights(updates)
        effective = [u.effective() for u in updates]
        new_lora, terms, orth_err = {}, {}, 0.0
        for name, current in state.lora.items():
            b_bar = weighted_padded_b([e[name] for e in effective], weights, current.rank)
            averaged = LowRank(b_bar, current.A)
            new_lora[name] = svd(averaged).top(current.rank)
            ideal = IdealUpdate.over_shared_a(effective, weights, name, averaged)
            terms[name] = (ideal.distance(new_lora[name]), ideal.norm)
            a = new_lora[name].A
            eye = torch.eye(a.shape[0], dtype=a.dtype)
            orth_err = max(orth_err, float((a @ a.T - eye).abs().max()))
        new_state = GlobalState(
            round=state.round + 1,
            lora=new_lora,
            extras=self.aggregate_extras(state, updates, weights),
        )
        return new_state, self.report(
            new_state.round, updates, weights, terms, orthogonality_error=orth_err
        )

    def aggregate_sum(self, state: GlobalState, total: SecureSum
                      ) -> tuple[GlobalState, AggregationReport]:
        """The SVD of (sum_k w_k pad(B_k) / sum_k w_k) A_prev, on the unmasked sum."""
        new_lora = {
            name: svd(LowRank(total.tensors[f"lora_B::{name}"] / total.weight, current.A)
                      ).top(current.rank)
            for name, current in state.lora.items()
        }
        new_state = GlobalState(round=state.round + 1, lora=new_lora,
                                extras=self.mean_extras(state, total))
        return new_state, self.sum_report(new_state.round, total, total.weight)
