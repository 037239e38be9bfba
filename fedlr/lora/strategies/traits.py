"""What each strategy is, in facts a settings check needs before torch is imported.

Each `Strategy` class takes its name, what it trains and what composes with it from its entry
here (`Strategy.traits`), so a front end that checks a setting and the strategy that runs it read
the same fact; no code outside `fedlr.lora.strategies` tests a strategy's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fedlr.errors import ConfigError


@dataclass(frozen=True)
class StrategyTraits:
    """`client_dp_refusal`: why client-level DP-FedAvg cannot wrap the strategy (None: it can);
    `client_dp_refused_hetero`: heterogeneous-rank methods it cannot wrap, and why.
    `secure_refusal`, `secure_refused_hetero`: the same for secure aggregation, where the server
    only ever gets a weighted sum of the clients' tensors; `secure_refused_mixed`: methods it
    refuses only when clients have different ranks."""

    name: str
    trains_a: bool = True
    default_head: str = "train"
    client_dp_refusal: str | None = None
    client_dp_refused_hetero: Mapping[str, str] = field(default_factory=dict)
    secure_refusal: str | None = None
    secure_refused_hetero: Mapping[str, str] = field(default_factory=dict)
    secure_refused_mixed: Mapping[str, str] = field(default_factory=dict)

    def check_client_dp(self, hetero: str) -> None:
        """Refuse client-level DP where the aggregate is not a noised sum of clipped vectors."""
        supported = tuple(t.name for t in TRAITS.values() if t.client_dp_refusal is None)
        if self.client_dp_refusal is not None:
            raise ConfigError(
                f"client-level DP does not compose with strategy {self.name!r}: "
                f"{self.client_dp_refusal}; use one of {supported}"
            )
        if hetero in self.client_dp_refused_hetero:
            raise ConfigError(
                f"client-level DP does not compose with strategy {self.name!r} and hetero "
                f"{hetero!r}: {self.client_dp_refused_hetero[hetero]}"
            )

    def check_secure_aggregation(self, hetero: str, mixed_ranks: bool) -> None:
        """Refuse secure aggregation where the aggregate is not a weighted sum of client tensors."""
        supported = tuple(t.name for t in TRAITS.values() if t.secure_refusal is None)
        if self.secure_refusal is not None:
            raise ConfigError(
                f"secure aggregation does not compose with strategy {self.name!r}: "
                f"{self.secure_refusal}; use one of {supported}"
            )
        refused = {**self.secure_refused_hetero,
                   **(self.secure_refused_mixed if mixed_ranks else {})}
        if hetero in refused:
            ranks = " and mixed ranks" if hetero in self.secure_refused_mixed else ""
            raise ConfigError(
                f"secure aggregation does not compose with strategy {self.name!r}, hetero "
                f"{hetero!r}{ranks}: {refused[hetero]}"
            )


TRAITS: dict[str, StrategyTraits] = {
    t.name: t
    for t in (
        StrategyTraits(
            "fedit",
            client_dp_refused_hetero={
                "flexlora": "FlexLoRA takes an SVD of the exact sum of client products, not a sum "
                "of clipped factor deltas; use hetero 'hetlora', or strategy 'ffa' or 'fedsvd'"
            },
            secure_refused_hetero={
                "flexlora": "FlexLoRA sums the products B_k A_k, which a sum of the clients' "
                "factors does not give; use hetero 'hetlora-fedavg', or strategy 'ffa' or 'fedsvd'",
            },
            secure_refused_mixed={
                "hetlora": "HetLoRA weighs each client by the norm of its own update, which the "
                "server cannot see and which has no bound to encode it with; use hetero "
                "'hetlora-fedavg' (example weights), or strategy 'ffa' or 'fedsvd'",
            },
        ),
        StrategyTraits(
            "flora",
            client_dp_refusal="FLoRA stacks every client's factors, so the aggregate grows with "
            "the number of clients and is a sum of products B_k A_k, not a sum of clipped "
            "vectors that noise can cover",
            secure_refusal="FLoRA stacks every client's own factors side by side, so the "
            "server needs each client's update, not their sum",
        ),
        StrategyTraits("ffa", trains_a=False),
        StrategyTraits("fedsvd", trains_a=False, default_head="freeze"),
        StrategyTraits(
            "fair",
            client_dp_refusal="LoRA-FAIR's server-side correction optimises on the raw client "
            "factors, which noise added to their sum does not protect",
            secure_refusal="LoRA-FAIR's server-side correction fits the product of the "
            "clients' individual factors, which their sum does not give",
        ),
    )
}
STRATEGY_NAMES = tuple(TRAITS)


def strategy_traits(name: str) -> StrategyTraits:
    """The traits of strategy `name`, or an error listing the names there are."""
    if name not in TRAITS:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {sorted(TRAITS)}")
    return TRAITS[name]
