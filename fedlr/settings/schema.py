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

from fedlr.data.sources import BUILTIN, PartitionScheme, names_a_file
from fedlr.errors import ConfigError
from fedlr.lora.strategies.traits import STRATEGY_NAMES
from fedlr.models.sources import resolve_source
from fedlr.privacy.secagg.settings import SecAggSettings
from fedlr.settings.checks import check_client_dp, check_placement, check_secure_aggregation
from fedlr.settings.specs import (
    HEAD_MODES,
    HETERO_METHODS,
    TASKS,
    ClientDPConfig,
    DataSpec,
    DPConfig,
    ModelSpec,
    TrainConfig,
)

SECTIONS = {  # a TOML file may group settings in these tables; --help shows these titles
    "federation": "Federation",
    "model": "Model",
    "data": "Data",
    "training": "Local training",
    "sample_dp": "Sample-level DP (DP-SGD on each client)",
    "client_dp": "Client-level DP (DP-FedAvg on the server)",
    "secure_aggregation": "Secure aggregation (SecAgg+: the server sees only sums)",
    "run": "Run",
    "compare": "Comparison (fedlr compare)",  # `ComparisonSettings`, in its own [compare] table
}
_TRAIN = TrainConfig()  # the training defaults are TrainConfig's, declared there once
# Where and how `fedlr simulate` trains the simulated clients (which Ray, what each worker
# reserves, the engine): not part of a run's result, so a resumed run may change them; `flwr
# run` places clients by its federation's options, and its nodes train themselves.
PLACEMENT_SETTINGS = ("ray_address", "worker_cpus", "worker_gpus", "engine", "group_size")


def setting(default: Any, help: str, section: str, *, flags: tuple[str, ...] = ()) -> Any:
    """A setting: its default, its help text, its section, and extra command-line spellings.
    Every front end (`fedlr simulate`, a TOML file, `flwr run` config) is derived from these."""
    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r}")
    meta = {"help": help, "section": section, "flags": flags}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SimulationConfig:
    """Every setting of a run, each declared once: name, type, default, help and section."""

    strategy: str = setting("ffa", f"Aggregation strategy: {', '.join(STRATEGY_NAMES)}.",
                            "federation")
    num_clients: int = setting(8, "Clients in the federation.", "federation")
    clients_per_round: int | None = setting(
        None, "Clients sampled each round (unset: all; the expected number under Poisson "
        "client-level DP).", "federation")
    rounds: int = setting(3, "Federated rounds.", "federation")
    ranks: list[int] = setting([4, 8, 16], "LoRA ranks, cycled over clients.", "federation",
                               flags=("--rank",))
    hetero: str = setting("hetlora", f"Heterogeneous-rank method: {', '.join(HETERO_METHODS)}.",
                          "federation", flags=("--hetero-method",))
    head: str | None = setting(None, "Classification head: train or freeze (unset: the "
                               "strategy's own default).", "federation")
    alpha: float = setting(16.0, "LoRA alpha (scaling alpha / r).", "federation")
    min_valid_updates: int = setting(1, "Fewest valid updates a round needs, else it fails "
                                     "and the adapter is unchanged.", "federation")
    max_update_norm: float | None = setting(
        None, "Reject an update whose ||dW - dW_start||_F exceeds this (unset: no bound).",
        "federation")
    max_examples_per_client: int = setting(
        10_000, "Example count at which a client's FedAvg weight stops growing: a larger count "
        "a client reports weighs as this much (set it to the largest honest client's count; "
        "secure aggregation caps at secagg_max_weight).", "federation")
    round_timeout: float | None = setting(
        None, "Seconds a round waits for replies (unset: until every node answers or goes "
        "offline).", "federation")
    connect_timeout: float = setting(120.0, "Seconds to wait for the clients before round 1.",
                                     "federation")
    model: str = setting("minilm", "minilm, tiny, a directory or a hub id.", "model")
    task: str = setting("classification", f"Task: {', '.join(TASKS)}.", "model")
    targets: list[str] | None = setting(
        None, "LoRA target modules (unset: the model's attention query and value).", "model")
    dataset: str = setting(BUILTIN, "stdlib-docs, a .jsonl/.csv/.txt file or a hub dataset.",
                           "data")
    partition: str = setting("iid", "iid, dirichlet:ALPHA or pathological:K.", "data")
    max_length: int = setting(_TRAIN.max_length, "Tokens per example.", "data")
    eval_examples: int = setting(400, "Held-out examples the server evaluates on each round "
                                 "(a stratified subset).", "data")
    eval_every: int = setting(1, "Evaluate the global adapter every this many rounds (the "
                              "last round always; others record no held-out metrics).", "data")
    local_steps: int = setting(_TRAIN.local_steps, "Local optimiser steps per round.",
                               "training")
    batch_size: int = setting(_TRAIN.batch_size, "Local (expected) batch size.", "training")
    lr: float = setting(_TRAIN.lr, "Local learning rate.", "training")
    optimizer: str = setting(_TRAIN.optimizer, "Local optimiser: adamw or sgd.", "training")
    precision: str = setting(
        _TRAIN.precision, "Compute precision of local training and of held-out evaluation: bf16 "
        "(the frozen base's products in bf16 autocast; the adapter, its optimizer state and "
        "DP-SGD's clipping stay fp32), "
        "fp32, or auto (bf16 where the device computes it natively, CUDA with bf16 or CPUs with "
        "AVX512-BF16 or AMX, for models at least 256 wide; else fp32). Ghost clipping always "
        "runs in fp32.", "training")
    engine: str = setting(
        "auto", "How a simulation's workers train their clients: batched (a group of the "
        "round's clients per pass of the frozen base, each with its own adapter, optimizer, "
        "sampler and noise), per-client (one after another), or auto (batched, except under "
        "secure aggregation). Deployed nodes always train themselves alone.", "training")
    group_size: int | None = setting(
        None, "Batched engine: the most clients per group (unset: the round's clients spread "
        "over the workers, as many as memory allows).", "training")
    noise_multiplier: float | None = setting(None, "DP-SGD noise sigma (sample-level DP).",
                                             "sample_dp")
    max_grad_norm: float = setting(1.0, "DP-SGD clipping bound C.", "sample_dp")
    target_epsilon: float | None = setting(
        None, "Solve sigma for this epsilon over the planned run.", "sample_dp")
    max_epsilon: float | None = setting(
        None, "Where a client stops training (unset: the target epsilon).", "sample_dp")
    delta: float = setting(1e-5, "DP delta (both levels).", "sample_dp")
    accountant: str = setting("prv", "Sample-level accountant: prv or rdp.", "sample_dp")
    grad_sample_mode: str = setting("auto", "Per-sample gradients: auto, hooks, ghost or fused.",
                                    "sample_dp")
    client_noise_multiplier: float | None = setting(
        None, "Client-level DP (DP-FedAvg): noise multiplier z.", "client_dp",
        flags=("--client-noise",))
    client_clip_norm: float | None = setting(
        None, "Client-level DP: L2 bound S on each client's update.", "client_dp",
        flags=("--client-clip",))
    client_sampling: str = setting("poisson", "Client-level DP: poisson or fixed client "
                                   "sampling.", "client_dp")
    client_accountant: str = setting("rdp", "Client-level accountant: rdp or pld.",
                                     "client_dp")
    publish_client_ids: bool = setting(
        False, "Client-level DP: name each round's clients in the run directory; epsilon is "
        "then accounted without amplification by sampling.", "client_dp")
    secure_aggregation: bool = setting(
        False, "Secure aggregation (SecAgg+): the server learns only each round's weighted sum "
        "of updates, never one client's (fedit with hetlora-fedavg, ffa, fedsvd; with or "
        "without client-level DP).", "secure_aggregation")
    secagg_neighbours: int = setting(
        0, "Clients each client shares masks and secrets with (0: all others up to 16 clients, "
        "above that 3 log2 n, SecAgg+'s random regular graph).", "secure_aggregation")
    secagg_threshold: float = setting(
        0.5, "A client's secrets are rebuilt from more than this fraction of its share holders "
        "(in [0.5, 1)); fewer survivors fail the round.", "secure_aggregation")
    secagg_clip: float = setting(
        1.0, "Encoding range: each value a client sends is clipped to [-c, c] (clipped values "
        "are counted per round); client-level DP uses its clip norm instead.",
        "secure_aggregation")
    secagg_bits: int = setting(32, "Encoding width: values are summed modulo 2^bits (32 or 64).",
                               "secure_aggregation")
    secagg_max_weight: int = setting(
        1000, "Example count at which a client's FedAvg weight stops growing (weights are "
        "min(n, this) / this).", "secure_aggregation")
    export_rank: int | None = setting(None, "flora: compress the exported adapter to this rank.",
                                      "run")
    seed: int = setting(0, "Seed of everything random (not of DP's draws).", "run")
    out: str | None = setting(None, "Run directory, must not exist (unset: runs/NAME-TIME).",
                              "run")
    save_client_updates: bool = setting(False, "Keep every client's update of every round.",
                                        "run")
    ray_address: str | None = setting(
        None, "Address of an existing Ray cluster to run the simulated clients on (auto, or "
        "HEAD_IP:6379); each machine needs the same fedlr install and the run directory on a "
        "shared filesystem (unset: a local Ray started for this run).", "run")
    worker_cpus: float = setting(
        1.0, "CPUs each Ray worker reserves and trains with, one thread each (a worker is one "
        "process that trains the simulated clients sent to it).", "run")
    worker_gpus: float | None = setting(
        None, "GPUs each Ray worker reserves, a fraction to share one (unset: an equal share of "
        "this machine's GPU per CPU, none without a GPU; on a cluster, set it).", "run")

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
        if config.out is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            config.out = f"runs/{config.strategy}-{stamp}"
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # -- checks --------------------------------------------------------------------------------

    def __post_init__(self) -> None:
        """Every check that can fail, before any work: names, counts, paths, privacy."""
        if self.strategy not in STRATEGY_NAMES:
            raise ConfigError(
                f"unknown strategy {self.strategy!r}; choose from {sorted(STRATEGY_NAMES)}"
            )
        for name in ("num_clients", "rounds", "local_steps", "batch_size", "max_length",
                     "min_valid_updates", "eval_examples", "eval_every",
                     "max_examples_per_client"):
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
        check_placement(self)
        self.train_config()  # TrainConfig and DPConfig validate themselves
        check_client_dp(self)
        check_secure_aggregation(self)

    @property
    def training_engine(self) -> str:
        """The engine a simulation uses: `engine`, with auto resolved."""
        if self.engine != "auto":
            return self.engine
        return "per-client" if self.secure_aggregation else "batched"

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

    def client_seed(self, round_: int, client: str) -> int:
        """The seed of a client's non-private draws in a round (data order, dropout, fresh
        factors): distinct per run seed, round and client."""
        return self.seed * 1_000_003 + round_ * 10_007 + int(client)

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

    def secagg_settings(self) -> SecAggSettings:
        return SecAggSettings(self.secagg_neighbours, self.secagg_threshold, self.secagg_clip,
                              self.secagg_max_weight, self.secagg_bits)

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            local_steps=self.local_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            optimizer=self.optimizer,
            max_length=self.max_length,
            precision=self.precision,
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
    """A run's settings from TOML: top-level keys, a [simulate] table, or tables named by the
    settings' sections ([federation], [training], [sample_dp], ...), each holding its own."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    data = data.get("simulate", data)
    data.pop("compare", None)  # `fedlr compare`'s own settings (fedlr.comparison.plan)
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            sections = {f.name: f.metadata["section"] for f in fields(SimulationConfig)}
            for name, item in value.items():
                name = name.replace("-", "_")
                if sections.get(name, key) != key:
                    raise ConfigError(f"{path}: {name} belongs in [{sections[name]}], not [{key}]")
                flat[name] = item
        else:
            flat[key.replace("-", "_")] = value
    return flat
