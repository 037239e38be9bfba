"""Every strategy by name, and `make_strategy`, the one way to build one."""

from __future__ import annotations

from typing import Any

from fedlr.errors import ConfigError
from fedlr.strategies.base import FederationSpec, Strategy
from fedlr.strategies.fair import LoRAFAIR
from fedlr.strategies.fedit import FedIT
from fedlr.strategies.fedsvd import FedSVD
from fedlr.strategies.ffa import FFALoRA
from fedlr.strategies.flora import FLoRA
from fedlr.strategies.traits import STRATEGY_NAMES

STRATEGIES: dict[str, type[Strategy]] = {
    cls.traits.name: cls for cls in (FedIT, FLoRA, FFALoRA, FedSVD, LoRAFAIR)
}
if tuple(STRATEGIES) != STRATEGY_NAMES:  # the settings check names without importing torch
    raise ImportError(f"fedlr.strategies.traits names {STRATEGY_NAMES}, not {tuple(STRATEGIES)}")


def make_strategy(name: str, spec: FederationSpec, **options: Any) -> Strategy:
    """Build a strategy by name; unknown names and options fail here, before any round runs."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    try:
        return STRATEGIES[name](spec, **options)
    except TypeError as exc:
        raise ConfigError(f"strategy {name!r}: {exc}") from exc
