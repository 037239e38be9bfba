"""Settings, validated before any work starts: model, data, training, DP-SGD and client-level DP,
and the names every front end checks against.

Nothing here imports torch or transformers, so a command line checks its arguments in well under
a second, before any heavy import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedlr.errors import ConfigError
from fedlr.privacy.accountants import SAMPLING_MODES, check_accountant

HETERO_METHODS = ("hetlora", "hetlora-fedavg", "flexlora")
ENGINES = ("auto", "batched", "per-client")
HEAD_MODES = ("train", "freeze")
TASKS = ("classification", "causal-lm")
GRAD_SAMPLE_MODES = ("auto", "hooks", "ghost", "fused")
OPTIMIZERS = ("adamw", "sgd")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")


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
        check_accountant("sample", self.accountant)
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
    lr: float = 3e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_length: int = 64
    eval_batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"
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
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")


@dataclass(frozen=True)
class ModelSpec:
    """Which model, for which task; `targets=None` picks the architecture's default."""

    name: str = "minilm"
    task: str = "classification"
    num_labels: int = 2
    targets: tuple[str, ...] | None = None
    max_length: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {TASKS}")
        if self.task == "classification" and self.num_labels < 2:
            raise ConfigError(f"classification needs at least 2 labels, got {self.num_labels}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2 tokens, got {self.max_length}")


@dataclass(frozen=True)
class DataSpec:
    """How every process loads and partitions a run's data (the server, each client)."""

    source: str
    task: str
    num_clients: int
    partition: str
    seed: int
    max_length: int
    eval_examples: int


# -- client-level DP (DP-FedAvg, fedlr.privacy.client_level) ---------------------------------


@dataclass(frozen=True)
class ClientDPConfig:
    """z (noise multiplier), S (clip norm), client sampling, delta and accountant."""

    noise_multiplier: float
    clip_norm: float
    sampling: str = "poisson"
    delta: float = 1e-5
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        """Raise ConfigError naming the first bad setting and its fix."""
        z, s = self.noise_multiplier, self.clip_norm
        if not (math.isfinite(z) and z >= 0):
            raise ConfigError(f"client-DP noise multiplier must be a number >= 0, got {z!r}")
        if not (math.isfinite(s) and s > 0):
            raise ConfigError(f"client-DP clip norm must be a finite number > 0, got {s!r}")
        if self.sampling not in SAMPLING_MODES:
            raise ConfigError(
                f"unknown client sampling {self.sampling!r}; choose one of {SAMPLING_MODES}"
            )
        if not (0 < self.delta < 1):
            raise ConfigError(f"client-DP delta must be in (0, 1), got {self.delta!r}")
        check_accountant("client", self.accountant)
        if self.accountant == "pld" and self.sampling == "fixed":
            raise ConfigError(
                "accountant 'pld' cannot account fixed-size client sampling (dp-accounting's PLD "
                "has no sampling-without-replacement event); use accountant 'rdp' or sampling "
                "'poisson'"
            )
