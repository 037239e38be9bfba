"""FedIT: plain FedAvg of A and B, the baseline (Zhang et al. 2024).

A = sum p_k A_k, B = sum p_k B_k, so s B A misses the cross terms B_i A_j: the reported residual
says by how much (against sum_k p_k dW_k with example weights p_k). Heterogeneous ranks:

Under secure aggregation clients send n_k-weighted padded factors and the weight of each rank
component they hold; the server's per-component mean of the sums is `hetlora-fedavg` exactly.

With equal ranks FedIT is FedAvg (Flower's own, to rounding), whatever `hetero` says.

- `hetlora` (Cho et al. 2024): clients weighted by ||B_k A_k||_F per module (the paper's
  sparsity-weighted aggregation), each rank component averaged over the clients that hold it
  (`hetlora_average`: the tail is neither shrunk nor lost when only small ranks report; the paper
  zero-pads). Its optional self-pruning of client ranks is not implemented.
- `hetlora-fedavg`: the same with FedAvg's example weights (the common port).
- `flexlora` (Bai et al. 2024): the exact sum_k p_k dW_k, re-factorised by a low-rank SVD and
  truncated to the federation's max rank (padded when the clients of a round hold less).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlr.lora.lowrank import svd
from fedlr.lora.strategies.averaging import (
    IdealUpdate,
    client_weights,
    component_mean,
    hetlora_average,
    norm_weights,
)
from fedlr.lora.strategies.base import AggregationReport, ClientUpdate, GlobalState, Strategy
from fedlr.lora.strategies.traits import TRAITS
from fedlr.lora.sums import SecureSum, SumSpec


class FedIT(Strategy):
    traits = TRAITS["fedit"]

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
                factors = [e[name] for e in effective]
                hetlora = self.hetero == "hetlora" and self.spec.mixed_ranks
                mix = norm_weights(factors, weights) if hetlora else weights
                new_lora[name] = hetlora_average(state.lora[name], factors, mix)
            terms[name] = (ideal.distance(new_lora[name]), ideal.norm)
        new_state = GlobalState(
            round=state.round + 1,
            lora=new_lora,
            extras=self.aggregate_extras(state, updates, weights),
        )
        details = {"energy_kept_min": min(energy.values())} if energy else {}
        return new_state, self.report(new_state.round, updates, weights, terms, **details)

    def secure_sum(self, state: GlobalState) -> SumSpec:
        """Both factors, and each rank component's weight (a mean over the clients holding it)."""
        spec = super().secure_sum(state)
        return SumSpec(spec.shapes, spec.rank, components=True)

    def aggregate_sum(self, state: GlobalState, total: SecureSum
                      ) -> tuple[GlobalState, AggregationReport]:
        held = total.components
        assert held is not None, "FedIT sums each rank component's weight"
        new_lora = {
            name: component_mean(prev, total.tensors[f"lora_A::{name}"],
                                 total.tensors[f"lora_B::{name}"], held)
            for name, prev in state.lora.items()
        }
        new_state = GlobalState(round=state.round + 1, lora=new_lora,
                                extras=self.mean_extras(state, total))
        smallest = float(held[held > 0].min()) if bool((held > 0).any()) else 1.0
        return new_state, self.sum_report(new_state.round, total, min(smallest, total.weight))
