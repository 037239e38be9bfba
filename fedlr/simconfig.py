"""The settings of a federated run, from a TOML file and/or the command line, checked up front.

Every check that can fail runs before any work starts (no model loaded, no directory written):
unknown names, impossible counts, missing paths, contradictory privacy settings.
"""

from __future__ import annotations

import math
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fedlr.config import (
    HEAD_MODES,
    HETERO_METHODS,
    TASKS,
    ClientDPConfig,
    DataSpec,
    DPConfig,
    ModelSpec,
    TrainConfig,
)
from fedlr.data import BUILTIN, PartitionScheme, names_a_file
from fedlr.errors import ConfigError
from fedlr.model_sources import resolve_source
from fedlr.strategies.traits import STRATEGY_NAMES, strategy_traits


@dataclass
class SimulationConfig:
    strategy: str = "ffa"
    num_clients: int = 8
    clients_per_round: int | None = None
    rounds: int = 3
    ranks: list[int] = field(default_factory=lambda: [4, 8, 16])
    hetero: str = "hetlora"
    head: str | None = None
    alpha: float = 16.0
    model: str = "minilm"
    task: str = "classification"
    targets: list[str] | None = None
    dataset: str = BUILTIN
    partition: str = "iid"
    max_length: int = 64
    local_steps: int = 10
    batch_size: int = 16
    lr: float = 3e-3
    optimizer: str = "adamw"
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    target_epsilon: float | None = None
    max_epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "prv"
    grad_sample_mode: str = "auto"
    client_noise_multiplier: float | None = None  # client-level DP (DP-FedAvg) when set
    client_clip_norm: float | None = None
    client_sampling: str = "poisson"
    client_accountant: str = "rdp"
    publish_client_ids: bool = False  # client-level DP: publish who took part, unamplified
    max_update_norm: float | None = None
    min_valid_updates: int = 1
    round_timeout: float | None = None  # seconds; None: until every node answers or goes offline
    connect_timeout: float = 120.0  # seconds to wait for all clients before round 1
    eval_examples: int = 400
    export_rank: int | None = None
    seed: int = 0
    out: str | None = None  # default: runs/<strategy>-<timestamp>, never an existing run
    save_client_updates: bool = False

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any]) -> SimulationConfig:
        """Defaults, then the TOML file (if any), then command-line values that were given."""
        values: dict[str, Any] = {}
        if path is not None:
            values.update(read_toml(Path(path)))
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown settings {unknown}; known: {sorted(known)}")
        config = cls(**values)
        config.validate()
        if config.out is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            config.out = f"runs/{config.strategy}-{stamp}"
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # -- checks --------------------------------------------------------------------------------

    def validate(self) -> None:
        if self.strategy not in STRATEGY_NAMES:
            raise ConfigError(
                f"unknown strategy {self.strategy!r}; choose from {sorted(STRATEGY_NAMES)}"
            )
        for name in ("num_clients", "rounds", "local_steps", "batch_size", "max_length",
                     "min_valid_updates", "eval_examples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        per_round = self.clients_per_round
        if per_round is not None and not 1 <= per_round <= self.num_clients:
            raise ConfigError(
                f"clients_per_round {self.clients_per_round} must be between 1 and num_clients "
                f"{self.num_clients}"
            )
        if not self.ranks or any(not isinstance(r, int) or r < 1 for r in self.ranks):
            raise ConfigError(f"ranks must be positive integers, got {self.ranks!r}")
        if self.export_rank is not None and self.export_rank < 1:
            raise ConfigError(f"export_rank must be a positive integer, got {self.export_rank}")
        if self.hetero not in HETERO_METHODS:
            raise ConfigError(f"unknown hetero method {self.hetero!r}; choose {HETERO_METHODS}")
        if self.head is not None and self.head not in HEAD_MODES:
            raise ConfigError(f"unknown head mode {self.head!r}; choose {HEAD_MODES}")
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {TASKS}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        for name in ("round_timeout", "connect_timeout"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        if isinstance(self.delta, bool) or not isinstance(self.delta, int | float) or not (
                0 < self.delta < 1):
            raise ConfigError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ConfigError(f"max_update_norm must be positive, got {self.max_update_norm!r}")
        PartitionScheme.parse(self.partition)
        resolve_source(self.model)  # the loader's own rules: a missing path fails here
        if (self.dataset != BUILTIN and names_a_file(self.dataset)
                and not Path(self.dataset).expanduser().exists()):
            raise ConfigError(f"dataset path not found: {self.dataset}")
        self.train_config()  # TrainConfig and DPConfig validate themselves
        self.check_client_dp()

    def check_client_dp(self) -> None:
        dp = self.client_dp_config()
        if dp is None:
            if self.client_clip_norm is not None:
                raise ConfigError("client_clip_norm is set but client_noise_multiplier is not; "
                                  "set both for client-level DP, or neither")
            if self.publish_client_ids:
                raise ConfigError("publish_client_ids only applies to client-level DP (without "
                                  "it, who took part is always published); remove it")
            return
        if self.dp_config() is not None and not self.publish_client_ids:
            raise ConfigError(
                "sample-level DP-SGD records each client's privacy ledger (the rounds it "
                "trained) in privacy.json, which would publish the client sample that "
                "client-level DP keeps secret; use one level, or add publish_client_ids "
                "(client-level epsilon is then accounted without amplification by sampling)")
        dp.validate()
        strategy_traits(self.strategy).check_client_dp(self.hetero)
        if self.min_valid_updates != 1:
            raise ConfigError(
                "min_valid_updates does not apply under client-level DP: every round is released "
                "(noise alone if no update arrived), since stopping a round for too few clients "
                "would depend on who took part; remove it"
            )
        if self.save_client_updates:
            raise ConfigError(
                "save_client_updates would write every client's un-noised update next to the "
                "client-level DP run; turn one of them off"
            )

    # -- derived settings ------------------------------------------------------------------------

    @property
    def client_ids_public(self) -> bool:
        """Whether the run directory may name the clients of a round: always, except under
        client-level DP, whose amplification by sampling needs the sample kept secret."""
        return self.client_noise_multiplier is None or self.publish_client_ids

    @property
    def sampled_per_round(self) -> int:
        return self.clients_per_round or self.num_clients

    def client_ids(self) -> list[str]:
        return [str(i) for i in range(self.num_clients)]

    def client_ranks(self) -> dict[str, int]:
        """Ranks cycled over clients: client k gets ranks[k % len(ranks)]."""
        return {cid: self.ranks[i % len(self.ranks)] for i, cid in enumerate(self.client_ids())}

    def dp_config(self) -> DPConfig | None:
        if self.noise_multiplier is None and self.target_epsilon is None:
            return None
        return DPConfig(
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            target_epsilon=self.target_epsilon,
            delta=self.delta,
            max_epsilon=self.max_epsilon,
            accountant=self.accountant,
            grad_sample_mode=self.grad_sample_mode,
        )

    def client_dp_config(self) -> ClientDPConfig | None:
        if self.client_noise_multiplier is None:
            return None
        if self.client_clip_norm is None:
            raise ConfigError("client-level DP needs client_clip_norm (S, the L2 bound on each "
                              "client's update) next to client_noise_multiplier")
        return ClientDPConfig(
            noise_multiplier=self.client_noise_multiplier,
            clip_norm=self.client_clip_norm,
            sampling=self.client_sampling,
            delta=self.delta,
            accountant=self.client_accountant,
        )

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            local_steps=self.local_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            optimizer=self.optimizer,
            max_length=self.max_length,
            planned_rounds=self.rounds,
            dp=self.dp_config(),
        )

    def model_spec(self, num_labels: int) -> ModelSpec:
        return ModelSpec(
            name=self.model,
            task=self.task,
            num_labels=max(num_labels, 2),
            targets=tuple(self.targets) if self.targets else None,
            max_length=self.max_length,
            seed=self.seed,
        )

    def data_spec(self) -> DataSpec:
        """How every process loads and partitions this run's data (the server, each client)."""
        return DataSpec(self.dataset, self.task, self.num_clients, self.partition, self.seed,
                        self.max_length, self.eval_examples)


def read_toml(path: Path) -> dict[str, Any]:
    """A run's settings from TOML: top-level keys, or a [simulate] table."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    data = data.get("simulate", data)
    return {key.replace("-", "_"): value for key, value in data.items()}
