"""FedIT: plain FedAvg of A and B, the baseline (Zhang et al. 2024).

A = sum p_k A_k, B = sum p_k B_k, so s B A misses the cross terms B_i A_j: the reported residual
says by how much. Heterogeneous ranks: HetLoRA zero-padding, or FlexLoRA (the exact sum_k p_k dW_k,
re-factorised by a low-rank SVD and truncated to the federation's max rank).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlr.lowrank import svd
from fedlr.strategies.base import (
    AggregationReport,
    ClientUpdate,
    GlobalState,
    IdealUpdate,
    Strategy,
    client_weights,
    weighted_padded_sum,
)


class FedIT(Strategy):
    name = "fedit"

    def aggregate(
        self, state: GlobalState, updates: Sequence[ClientUpdate]
    ) -> tuple[GlobalState, AggregationReport]:
        weights = client_weights(updates)
        effective = [u.effective() for u in updates]
        rank = self.spec.max_rank
        new_lora, energy, terms = {}, {}, {}
        for name in self.spec.modules:  # one module at a time keeps peak memory to one module
            ideal = IdealUpdate.of(effective, weights, name)
            if self.hetero == "flexlora":
                factored = svd(ideal.stacked)
                new_lora[name] = factored.top(rank)
                energy[name] = factored.energy(rank)
            else:
                new_lora[name] = weighted_padded_sum([e[name] for e in effective], weights, rank)
            terms[name] = (ideal.distance(new_lora[name]), ideal.norm)
        new_state = GlobalState(
            round=state.round + 1,
            lora=new_lora,
            extras=self.aggregate_extras(state, updates, weights),
        )
        details = {"energy_kept_min": min(energy.values())} if energy else {}
        return new_state, self.report(new_state.round, updates, weights, terms, **details)
