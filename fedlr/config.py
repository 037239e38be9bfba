"""Settings of local training and of DP-SGD, validated before any work starts."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedlr.errors import ConfigError

GRAD_SAMPLE_MODES = ("auto", "hooks", "ghost", "fused")
ACCOUNTANTS = ("prv", "rdp")
OPTIMIZERS = ("adamw", "sgd")
DEVICES = ("auto", "cpu", "cuda")


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class DPConfig:
    """Sample-level DP-SGD: give `noise_multiplier`, or `target_epsilon` for the whole planned run.

    The privacy unit is one training example of one client; each client accounts only the steps it
    ran. `max_epsilon` (default: the target) is where a client stops training and says so.
    """

    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_epsilon: float | None = None
    accountant: str = "prv"
    grad_sample_mode: str = "auto"

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError(
                "DP needs exactly one of noise_multiplier (with max_grad_norm) or target_epsilon"
            )
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0
        ):
            raise ConfigError(
                f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}"
            )
        if self.target_epsilon is not None:
            _positive("target_epsilon", self.target_epsilon)
        if self.max_epsilon is not None:
            _positive("max_epsilon", self.max_epsilon)
        _positive("max_grad_norm", self.max_grad_norm)
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"unknown accountant {self.accountant!r}; choose one of {ACCOUNTANTS}"
            )
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ConfigError(
                f"unknown grad_sample_mode {self.grad_sample_mode!r}; choose one of "
                f"{GRAD_SAMPLE_MODES}"
            )

    @property
    def budget(self) -> float | None:
        return self.max_epsilon if self.max_epsilon is not None else self.target_epsilon


@dataclass(frozen=True)
class TrainConfig:
    """One client's local training in one round."""

    local_steps: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_length: int = 128
    eval_batch_size: int = 64
    device: str = "auto"
    mixed_precision: bool = True
    planned_rounds: int = 1
    dp: DPConfig | None = None
    per_sample_memory_budget: int = 2 << 30

    def __post_init__(self) -> None:
        counts = ("local_steps", "batch_size", "max_length", "eval_batch_size", "planned_rounds")
        for name in counts:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        _positive("lr", self.lr)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; choose one of {DEVICES}")
