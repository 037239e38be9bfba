"""FLoRA: stacking (Wang et al., NeurIPS 2024), exact for any mix of ranks.

A round's update is [p_1 A_1; ...; p_K A_K] stacked under [s_1 B_1 ... s_K B_K], which equals
sum_k p_k dW_k exactly. It is merged into the frozen base, and every client starts the next round
from a fresh LoRA of its own rank. The state keeps each round's stacked update so that a client that
skipped rounds receives the exact cumulative update since it last synced, in the cheaper of two
exact forms: the stacked factors or one dense dW.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedlr.adapters import Adapter, BaseDelta, LoraFactors
from fedlr.lora.lowrank import LowRank, concat, svd
from fedlr.lora.strategies.averaging import client_weights, stack
from fedlr.lora.strategies.base import AggregationReport, ClientUpdate, GlobalState, Strategy
from fedlr.lora.strategies.traits import TRAITS


def cheapest_exact(x: LowRank) -> BaseDelta:
    """Stacked factors when they hold fewer numbers than the dense matrix, else the dense dW."""
    d_out, d_in = x.shape
    return x.dense() if x.rank * (d_out + d_in) >= d_out * d_in else x


class FLoRA(Strategy):
    traits = TRAITS["flora"]

    def init_state(self, extras=None) -> GlobalState:
        """Nothing merged yet: clients initialise their own fresh LoRA each round."""
        return GlobalState(extras={k: v.clone() for k, v in (extras or {}).items()})

    def describe(self) -> dict:
        return {**super().describe(), "hetero": "native (stacking)"}

    def carry_over(self, state: GlobalState) -> GlobalState:
        """A round without updates merges nothing: an empty (rank-0) update in the history."""
        empty = {name: LowRank(torch.zeros(shape.d_out, 0, dtype=self.spec.dtype),
                               torch.zeros(0, shape.d_in, dtype=self.spec.dtype))
                 for name, shape in self.spec.modules.items()}
        return GlobalState(round=state.round + 1, extras=dict(state.extras),
                           history=[*state.history, empty])

    def cumulative(self, state: GlobalState, since_round: int = 0) -> dict[str, LowRank]:
        """The exact sum of the stacked updates of rounds since_round+1 .. state.round."""
        rounds = state.history[since_round:]
        if not rounds:
            return {}
        return {name: concat(r[name] for r in rounds) for name in rounds[0]}

    def compressed(
        self, state: GlobalState, rank: int
    ) -> tuple[dict[str, LowRank], dict[str, float]]:
        """The cumulative update truncated to `rank` by a low-rank SVD (lossy), and the fraction
        of each module's ||dW||^2 it keeps: what exporting at a fixed rank would cost."""
        out, energy = {}, {}
        for name, x in self.cumulative(state).items():
            factored = svd(x)
            out[name], energy[name] = factored.top(rank), factored.energy(rank)
        return out, energy

    def round_release(self, state: GlobalState) -> dict[str, LowRank]:
        """The round's exact stacked update (what was merged into the base)."""
        return dict(state.history[-1])

    def global_update(self, state: GlobalState) -> dict[str, LowRank]:
        return self.cumulative(state)

    def export_lora(self, state: GlobalState, export_rank: int | None
                    ) -> tuple[dict[str, LoraFactors], dict[str, Any]]:
        """The exact cumulative update of all rounds as one LoRA of the stacked rank (scaling 1),
        re-factored exactly by an SVD where that rank exceeds min(d_out, d_in) (no exact LoRA
        needs more); or, with `export_rank`, its best rank-`export_rank` approximation and the
        energy each module keeps."""
        info: dict[str, Any] = {}
        if export_rank is not None:
            source, info["energy_kept"] = self.compressed(state, export_rank)
        else:
            source = self.cumulative(state)
            capped = {name: min(x.shape) for name, x in source.items() if x.rank > min(x.shape)}
            source = {name: svd(x).top(capped[name]) if name in capped else x
                      for name, x in source.items()}
            info["refactored_exactly"] = sorted(capped)
        return {name: LoraFactors(x.A, x.B, 1.0) for name, x in source.items()}, info

    def downlink(self, state: GlobalState, client_id: str, since_round: int = 0) -> Adapter:
        """The update to merge into the client's base since it last synced (round `since_round`)."""
        if not 0 <= since_round <= state.round:
            raise ValueError(f"since_round must be in [0, {state.round}], got {since_round}")
        base = {name: cheapest_exact(x) for name, x in self.cumulative(state, since_round).items()}
        meta = {
            "round": state.round,
            "client_id": client_id,
            "rank": self.spec.ranks[client_id],
            "base_since_round": since_round,
        }
        return Adapter(base=base, extras=dict(state.extras), meta=meta)

    def starting_adapter(self, state: GlobalState, client_id: str) -> Adapter:
        """A fresh LoRA (dW = 0) on the merged base, with the current extras."""
        return Adapter(extras=dict(state.extras))

    def aggregate(
        self, state: GlobalState, updates: Sequence[ClientUpdate]
    ) -> tuple[GlobalState, AggregationReport]:
        weights = client_weights(updates)
        effective = [u.effective() for u in updates]
        stacked = {name: stack(effective, weights, name) for name in self.spec.modules}
        new_state = GlobalState(
            round=state.round + 1,
            extras=self.aggregate_extras(state, updates, weights),
            history=[*state.history, stacked],
        )
        # The round's update *is* the stacked sum_k p_k dW_k: zero residual by construction.
        terms = dict.fromkeys(stacked, (0.0, 0.0))
        return new_state, self.report(
            new_state.round,
            updates,
            weights,
            terms,
            exact=True,
            stacked_rank_max=max(x.rank for x in stacked.values()),
        )
