"""The checks of a run's settings that span several of them, run by `SimulationConfig` before
any work starts: each names the problem and the fix."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from fedlr.errors import ConfigError
from fedlr.lora.strategies.traits import strategy_traits
from fedlr.privacy.secagg.graph import threshold
from fedlr.privacy.secagg.settings import check_budget
from fedlr.settings.specs import ENGINES

if TYPE_CHECKING:
    from fedlr.settings.schema import SimulationConfig


def is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def check_placement(config: SimulationConfig) -> None:
    """Where and how the simulated clients train: the Ray cluster, each worker's share, the
    engine."""
    address = config.ray_address
    if address is not None and (not isinstance(address, str) or not address.strip()
                                or any(c.isspace() for c in address)):
        raise ConfigError(f"ray_address must be a Ray cluster address such as auto or "
                          f"HEAD_IP:6379 (or unset for a local Ray), got {address!r}")
    cpus, gpus = config.worker_cpus, config.worker_gpus
    if not (is_number(cpus) and cpus > 0):
        raise ConfigError(f"worker_cpus must be a positive number of CPUs per Ray worker "
                          f"(e.g. 1 or 0.5), got {cpus!r}")
    if gpus is not None and not (is_number(gpus) and gpus >= 0
                                 and (gpus <= 1 or float(gpus).is_integer())):
        raise ConfigError(f"worker_gpus must be a number of GPUs per Ray worker: 0, a "
                          f"fraction of one GPU, or a whole number, got {gpus!r}")
    if config.engine not in ENGINES:
        raise ConfigError(f"unknown engine {config.engine!r}; choose one of {ENGINES}")
    size = config.group_size
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ConfigError(f"group_size must be a positive integer, got {size!r}")
    if config.engine == "batched" and config.secure_aggregation:
        raise ConfigError("secure aggregation runs its stages client by client; use engine "
                          "per-client (or auto, which does so)")
    if size is not None and config.training_engine == "per-client":
        raise ConfigError("group_size applies to the batched engine only; remove it")


def check_client_dp(config: SimulationConfig) -> None:
    dp = config.client_dp_config()
    if dp is None:
        if config.client_clip_norm is not None:
            raise ConfigError("client_clip_norm is set but client_noise_multiplier is not; "
                              "set both for client-level DP, or neither")
        if config.publish_client_ids:
            raise ConfigError("publish_client_ids only applies to client-level DP (without "
                              "it, who took part is always published); remove it")
        return
    if config.dp_config() is not None and not config.publish_client_ids:
        raise ConfigError(
            "sample-level DP-SGD records each client's privacy ledger (the rounds it "
            "trained) in privacy.json, which would publish the client sample that "
            "client-level DP keeps secret; use one level, or add publish_client_ids "
            "(client-level epsilon is then accounted without amplification by sampling)")
    strategy_traits(config.strategy).check_client_dp(config.hetero)
    if config.min_valid_updates != 1:
        raise ConfigError(
            "min_valid_updates does not apply under client-level DP: every round is released "
            "(noise alone if no update arrived), since stopping a round for too few clients "
            "would depend on who took part; remove it"
        )
    if config.save_client_updates:
        raise ConfigError(
            "save_client_updates would write every client's un-noised update next to the "
            "client-level DP run; turn one of them off"
        )

def check_secure_aggregation(config: SimulationConfig) -> None:
    if not config.secure_aggregation:
        changed = [f.name for f in fields(config) if f.name.startswith("secagg_")
                   and getattr(config, f.name) != f.default]
        if changed:
            raise ConfigError(f"{changed} only apply with secure_aggregation; turn it on or "
                              "remove them")
        return
    if config.client_dp_config() is None:
        mixed = len(set(config.client_ranks().values())) > 1
        strategy_traits(config.strategy).check_secure_aggregation(config.hetero, mixed)
    if config.save_client_updates:
        raise ConfigError("save_client_updates needs every client's update, which secure "
                          "aggregation hides from the server; turn one of them off")
    if config.client_dp_config() is None and config.sampled_per_round < 2:
        raise ConfigError("secure aggregation needs at least 2 clients per round: the sum "
                          "over one client is its update; sample more clients")
    if not (isinstance(config.secagg_neighbours, int) and config.secagg_neighbours >= 0):
        raise ConfigError(f"secagg_neighbours must be an integer >= 0, got "
                          f"{config.secagg_neighbours!r}")
    threshold(2, config.secagg_threshold)  # its range check
    if not (math.isfinite(config.secagg_clip) and config.secagg_clip > 0):
        raise ConfigError(f"secagg_clip must be a positive number, got {config.secagg_clip!r}")
    check_budget(config.secagg_bits, config.num_clients, config.secagg_max_weight)
