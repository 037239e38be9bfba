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
    `client_dp_refused_hetero`: heterogeneous-rank methods it cannot wrap, and why."""

    name: str
    trains_a: bool = True
    default_head: str = "train"
    client_dp_refusal: str | None = None
    client_dp_refused_hetero: Mapping[str, str] = field(default_factory=dict)

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


TRAITS: dict[str, StrategyTraits] = {
    t.name: t
    for t in (
        StrategyTraits(
            "fedit",
            client_dp_refused_hetero={
                "flexlora": "FlexLoRA takes an SVD of the exact sum of client products, not a sum "
                "of clipped factor deltas; use hetero 'hetlora', or strategy 'ffa' or 'fedsvd'"
            },
        ),
        StrategyTraits(
            "flora",
            client_dp_refusal="FLoRA stacks every client's factors, so the aggregate grows with "
            "the number of clients and is a sum of products B_k A_k, not a sum of clipped "
            "vectors that noise can cover",
        ),
        StrategyTraits("ffa", trains_a=False),
        StrategyTraits("fedsvd", trains_a=False, default_head="freeze"),
        StrategyTraits(
            "fair",
            client_dp_refusal="LoRA-FAIR's server-side correction optimises on the raw client "
            "factors, which noise added to their sum does not protect",
        ),
    )
}
STRATEGY_NAMES = tuple(TRAITS)


def strategy_traits(name: str) -> StrategyTraits:
    """The traits of strategy `name`, or an error listing the names there are."""
    if name not in TRAITS:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {sorted(TRAITS)}")
    return TRAITS[name]
