"""LoRA-aware aggregation strategies as plain torch functions (no Flower import).

`make_strategy(name, spec, **options)` is the one entry point; see each module for the algorithm.
The names and traits (`fedlr.lora.strategies.traits`) load without torch, so settings are checked
before any heavy import; everything else loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedlr.lora.strategies.traits import STRATEGY_NAMES, TRAITS, StrategyTraits, strategy_traits

if TYPE_CHECKING:
    from fedlr.lora.strategies.base import (
        AggregationReport,
        ClientUpdate,
        FederationSpec,
        GlobalState,
        ModuleShape,
        Strategy,
    )
    from fedlr.lora.strategies.registry import STRATEGIES, make_strategy

_WHERE = {
    **dict.fromkeys(("AggregationReport", "ClientUpdate", "FederationSpec", "GlobalState",
                     "ModuleShape", "Strategy"), "fedlr.lora.strategies.base"),
    **dict.fromkeys(("STRATEGIES", "make_strategy"), "fedlr.lora.strategies.registry"),
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'fedlr.lora.strategies' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


__all__ = [
    "STRATEGIES",
    "STRATEGY_NAMES",
    "TRAITS",
    "AggregationReport",
    "ClientUpdate",
    "FederationSpec",
    "GlobalState",
    "ModuleShape",
    "Strategy",
    "StrategyTraits",
    "make_strategy",
    "strategy_traits",
]
