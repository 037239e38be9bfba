"""LoRA-aware aggregation strategies as plain torch functions (no Flower import).

`make_strategy(name, spec, **options)` is the one entry point; see each module for the algorithm.
"""

from __future__ import annotations

from typing import Any

from fedlr.config import STRATEGY_NAMES
from fedlr.errors import ConfigError
from fedlr.strategies.base import (
    AggregationReport,
    ClientUpdate,
    FederationSpec,
    GlobalState,
    ModuleShape,
    Strategy,
)
from fedlr.strategies.fair import LoRAFAIR
from fedlr.strategies.fedit import FedIT
from fedlr.strategies.fedsvd import FedSVD
from fedlr.strategies.ffa import FFALoRA
from fedlr.strategies.flora import FLoRA

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedIT, FLoRA, FFALoRA, FedSVD, LoRAFAIR)
}
if tuple(STRATEGIES) != STRATEGY_NAMES:  # the settings check names without importing torch
    raise ImportError(f"fedlr.config.STRATEGY_NAMES {STRATEGY_NAMES} must list {tuple(STRATEGIES)}")


def make_strategy(name: str, spec: FederationSpec, **options: Any) -> Strategy:
    """Build a strategy by name; unknown names and options fail here, before any round runs."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    try:
        return STRATEGIES[name](spec, **options)
    except TypeError as exc:
        raise ConfigError(f"strategy {name!r}: {exc}") from exc


__all__ = [
    "STRATEGIES",
    "AggregationReport",
    "ClientUpdate",
    "FederationSpec",
    "GlobalState",
    "ModuleShape",
    "Strategy",
    "make_strategy",
]
