"""Every strategy by name, and `make_strategy`, the one way to build one."""

from __future__ import annotations

from typing import Any

from fedlr.errors import ConfigError
from fedlr.lora.strategies.base import FederationSpec, Strategy
from fedlr.lora.strategies.fair import LoRAFAIR
from fedlr.lora.strategies.fedit import FedIT
from fedlr.lora.strategies.fedsvd import FedSVD
from fedlr.lora.strategies.ffa import FFALoRA
from fedlr.lora.strategies.flora import FLoRA
from fedlr.lora.strategies.traits import STRATEGY_NAMES

STRATEGIES: dict[str, type[Strategy]] = {
    cls.traits.name: cls for cls in (FedIT, FLoRA, FFALoRA, FedSVD, LoRAFAIR)
}
if tuple(STRATEGIES) != STRATEGY_NAMES:  # the settings check names without importing torch
    raise ImportError(f"strategies.traits names {STRATEGY_NAMES}, not {tuple(STRATEGIES)}")


def make_strategy(name: str, spec: FederationSpec, **options: Any) -> Strategy:
    """Build a strategy by name; unknown names and options fail here, before any round runs."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    try:
        return STRATEGIES[name](spec, **options)
    except TypeError as exc:
        raise ConfigError(f"strategy {name!r}: {exc}") from exc
