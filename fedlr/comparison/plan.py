"""What a comparison runs: one run per (privacy level, strategy, seed), plus the references,
each a full set of `fedlr simulate` settings checked before the first run starts."""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fedlr.errors import ConfigError
from fedlr.lora.strategies.traits import STRATEGY_NAMES
from fedlr.settings.schema import SimulationConfig, setting

DP_LEVELS = ("sample", "client")
REFERENCES = ("centralized", "local-only")
CLIENT_LEVEL_REFERENCES = {
    "centralized": "client-level DP protects clients; one party holding all the data has none "
                   "to protect",
    "local-only": "shares nothing, so client-level DP adds nothing: see its non-private row",
}
# Settings a comparison sets itself for every run: the privacy of a run is its level's.
PRIVACY_SETTINGS = ("noise_multiplier", "target_epsilon", "max_epsilon",
                    "client_noise_multiplier", "client_clip_norm")


@dataclass
class ComparisonSettings:
    """What `fedlr compare` adds to `fedlr simulate`'s settings, each declared once."""

    strategies: list[str] = setting(
        list(STRATEGY_NAMES), "Strategies to compare, comma-separated.", "compare")
    epsilons: list[float] = setting(
        [math.inf, 6.0, 3.0], "Privacy levels: epsilon per client (sample level) or of the "
        "federation (client level) at the run's delta; inf is non-private.", "compare")
    dp_level: str = setting("sample", "sample (DP-SGD on each client, every strategy) or client "
                            "(DP-FedAvg, where the strategy allows it).", "compare")
    seeds: list[int] | None = setting(
        None, "Seeds; every cell runs once per seed and shows the spread (unset: the run's "
        "seed).", "compare")
    target_accuracy: float | None = setting(
        None, "Accuracy for the rounds-to-target column (unset: 90% of the best final accuracy "
        "at that privacy level).", "compare")
    references: bool = setting(
        True, "Also run centralized LoRA on the union of the clients' data (same examples "
        "seen) and local-only training (each client alone).", "compare")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.strategies) - set(STRATEGY_NAMES))
        if not self.strategies or unknown:
            raise ConfigError(f"strategies must name some of {list(STRATEGY_NAMES)}; unknown: "
                              f"{unknown}")
        if len(set(self.strategies)) != len(self.strategies):
            raise ConfigError(f"strategies lists one twice: {self.strategies}")
        if not self.epsilons or any(not (isinstance(e, int | float) and e > 0)
                                    for e in self.epsilons):
            raise ConfigError(f"epsilons must be positive numbers or inf, got {self.epsilons}")
        if len(set(self.epsilons)) != len(self.epsilons):
            raise ConfigError(f"epsilons lists one twice: {self.epsilons}")
        if self.dp_level not in DP_LEVELS:
            raise ConfigError(f"unknown dp_level {self.dp_level!r}; choose one of {DP_LEVELS}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ConfigError(f"seeds must be distinct integers, got {self.seeds}")
        target = self.target_accuracy
        if target is not None and not 0 < target <= 1:
            raise ConfigError(f"target_accuracy must be in (0, 1], got {target}")

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any]) -> ComparisonSettings:
        """Defaults, then the [compare] table of the TOML file, then the command line."""
        values: dict[str, Any] = {}
        if path is not None:
            table = tomllib.loads(Path(path).read_text(encoding="utf-8")).get("compare", {})
            values.update({k.replace("-", "_"): v for k, v in table.items()})
            values["epsilons"] = [float(e) for e in values.get("epsilons", cls().epsilons)]
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown [compare] settings {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class Level:
    """A privacy level of the comparison: non-private, or a target epsilon at one DP level."""

    epsilon: float
    dp: str

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)

    @property
    def name(self) -> str:
        return f"{self.dp}-eps-{self.epsilon:g}" if self.private else "non-private"

    @property
    def label(self) -> str:
        return f"epsilon {self.epsilon:g} ({self.dp})" if self.private else "non-private"


@dataclass(frozen=True)
class PlannedRun:
    """One run of the comparison: what it is, and its whole `fedlr simulate` settings (none for
    a cell that does not apply, with `skipped` saying why)."""

    level: Level
    method: str  # a strategy, or a reference
    seed: int
    settings: SimulationConfig | None
    skipped: str | None = None

    @property
    def key(self) -> str:
        return f"{self.level.name}/{self.method}/seed-{self.seed}"

    @property
    def reference(self) -> bool:
        return self.method in REFERENCES


def plan_comparison(base: SimulationConfig, settings: ComparisonSettings, out: Path,
                    client_clip: float | None = None) -> list[PlannedRun]:
    """Every run, each checked now (a bad cell fails the comparison before any work).
    `client_clip`: the clip norm S of client-level DP (the base, which is non-private, cannot
    hold it alone)."""
    given = [name for name in PRIVACY_SETTINGS if getattr(base, name) is not None]
    if given:
        raise ConfigError(f"fedlr compare sets each run's privacy from --epsilons and "
                          f"--dp-level; remove {given} from the settings")
    if settings.dp_level == "client" and client_clip is None and any(
            math.isfinite(e) for e in settings.epsilons):
        raise ConfigError("client-level DP needs the clip norm S of each client's update: set "
                          "--client-clip")
    runs = []  # seed by seed: a comparison stopped early already has every cell of a seed
    for seed in settings.seeds or [base.seed]:
        for epsilon in settings.epsilons:
            level = Level(float(epsilon), settings.dp_level)
            for method in [*settings.strategies, *(REFERENCES if settings.references else ())]:
                runs.append(_planned(base, level, method, seed, out, client_clip))
    return runs


def _planned(base: SimulationConfig, level: Level, method: str, seed: int, out: Path,
             client_clip: float | None) -> PlannedRun:
    values = asdict(base) | privacy_settings(base, level, client_clip) | {
        "seed": seed, "out": str(out / "runs" / level.name / method / f"seed-{seed}")}
    if method in REFERENCES and level.private and level.dp == "client":
        return PlannedRun(level, method, seed, None, CLIENT_LEVEL_REFERENCES[method])
    if method == "centralized":
        values |= centralized(base)
    else:  # local-only is plain LoRA, each client alone
        values["strategy"] = "fedit" if method == "local-only" else method
    try:
        return PlannedRun(level, method, seed, SimulationConfig(**values))
    except ConfigError as exc:
        if level.dp == "client" and level.private and method in STRATEGY_NAMES:
            return PlannedRun(level, method, seed, None, str(exc))  # not with client-level DP
        raise ConfigError(f"{method} at {level.label}: {exc}") from None


def privacy_settings(base: SimulationConfig, level: Level, client_clip: float | None
                     ) -> dict[str, Any]:
    """The settings of a privacy level: sample level solves sigma on each client for the
    target; client level solves z here, for the federation's sampling and rounds."""
    values: dict[str, Any] = dict.fromkeys(PRIVACY_SETTINGS)
    if not level.private:
        return values
    if level.dp == "sample":
        return values | {"target_epsilon": level.epsilon}
    from fedlr.privacy.planners import plan_client_level

    plan = plan_client_level(delta=base.delta, rounds=base.rounds, num_clients=base.num_clients,
                             clients_per_round=base.sampled_per_round,
                             target_epsilon=level.epsilon, sampling=base.client_sampling,
                             accountant=base.client_accountant, cross_check=False)
    return values | {"client_noise_multiplier": plan.noise_multiplier,
                     "client_clip_norm": client_clip}


def centralized(base: SimulationConfig) -> dict[str, Any]:
    """Plain LoRA on the union of the clients' data: one client holding all of it, at the
    largest rank, taking in each round the steps the round's clients take together (the same
    examples seen). Its optimizer restarts each round, as the clients' do."""
    return {"strategy": "fedit", "num_clients": 1, "clients_per_round": None, "partition": "iid",
            "ranks": [max(base.ranks)], "local_steps": base.local_steps * base.sampled_per_round,
            "secure_aggregation": False, "export_rank": None, "group_size": None}
