"""FFA-LoRA: A frozen (Sun et al., ICLR 2024).

A is drawn once from the run's seed (Kaiming-uniform, identical everywhere) and never trained; the
server averages B alone, which is exact: sum_k p_k s_k B_k A = (sum_k p_k s_k B_k) A. Half the
upload of FedIT. A client of rank r_k trains against the first r_k rows of the shared A; its
downlink B is truncated (hetlora) or the least-squares fit of the global dW onto those rows
(flexlora).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlr.lora.lowrank import LowRank
from fedlr.lora.strategies.averaging import IdealUpdate, client_weights, weighted_padded_b
from fedlr.lora.strategies.base import AggregationReport, ClientUpdate, GlobalState, Strategy
from fedlr.lora.strategies.traits import TRAITS
from fedlr.lora.sums import SecureSum


def fit_b_to_rows(global_update: LowRank, rank: int) -> LowRank:
    """argmin_{B_k} ||B A - B_k A[:rank]||_F: the projection of B A onto the client's rows of A."""
    a_k = global_update.A[:rank]
    gram = a_k @ a_k.T
    cross = global_update.B @ (global_update.A @ a_k.T)
    return LowRank(torch.linalg.solve(gram, cross.T).T, a_k)


class FFALoRA(Strategy):
    traits = TRAITS["ffa"]

    def fit_to_rank(self, global_update: LowRank, rank: int) -> LowRank:
        if self.hetero == "flexlora":
            return fit_b_to_rows(global_update, rank)
        return global_update.truncated(rank)

    def aggregate(
        self, state: GlobalState, updates: Sequence[ClientUpdate]
    ) -> tuple[GlobalState, AggregationReport]:
        weights = client_weights(updates)
        effective = [u.effective() for u in updates]
        new_lora, terms, exact = {}, {}, True
        for name, current in state.lora.items():
            b_bar = weighted_padded_b([e[name] for e in effective], weights, current.rank)
            new_lora[name] = LowRank(b_bar, current.A)
            ideal = IdealUpdate.over_shared_a(effective, weights, name, new_lora[name])
            terms[name] = (ideal.distance(new_lora[name]), ideal.norm)
            exact &= ideal.shared
        new_state = GlobalState(
            round=state.round + 1,
            lora=new_lora,
            extras=self.aggregate_extras(state, updates, weights),
        )
        return new_state, self.report(new_state.round, updates, weights, terms, exact=exact)

    def aggregate_sum(self, state: GlobalState, total: SecureSum
                      ) -> tuple[GlobalState, AggregationReport]:
        """B = (sum_k w_k pad(B_k)) / sum_k w_k over the frozen A: the same mean as `aggregate`."""
        new_lora = {name: LowRank(total.tensors[f"lora_B::{name}"] / total.weight, current.A)
                    for name, current in state.lora.items()}
        new_state = GlobalState(round=state.round + 1, lora=new_lora,
                                extras=self.mean_extras(state, total))
        return new_state, self.sum_report(new_state.round, total, total.weight)
