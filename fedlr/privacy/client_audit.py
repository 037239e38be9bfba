"""Empirical client-level audit: canary clients through the server's own round (`fedlr.lora.rounds`)
and DP-FedAvg (`DPFedAvg`).

Each of M canary clients is in the population with probability 1/2; in each of the run's rounds
the server's own client sampler (`draw_clients`, Poisson at the run's q) draws from all M, and a
drawn canary that is in the population sends an update whose change is a random direction u_i of
norm 2S (so clipping is exercised). Inclusion, sampling and noise come from OS entropy. The real
clients' updates are known to the auditor and left out (zero), which the guarantee allows: it
holds for any fixed contribution of the others. The score of canary i is the released noisy sum
of every round projected on u_i (Andrew et al. 2023 use the cosine; with equal norms this is the
same ranking). FedSVD is audited in its pre-SVD form (FFA-LoRA's release), since its SVD is
post-processing of that release.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedlr.adapters import Adapter, LoraFactors, load_adapter
from fedlr.errors import ConfigError
from fedlr.lora.lowrank import LowRank
from fedlr.lora.rounds import close_round, plan_round
from fedlr.lora.strategies import FederationSpec, GlobalState, ModuleShape, Strategy, make_strategy
from fedlr.lora.strategies.base import ClientUpdate
from fedlr.privacy.bounds import best_one_run_bound, canary_report
from fedlr.privacy.client_level import (
    ClientDPConfig,
    DPFedAvg,
    client_level_epsilon,
    draw_clients,
    l2_norm,
)
from fedlr.privacy.sample_level import private_generator
from fedlr.settings.schema import SimulationConfig


def _flat(space: dict[str, Tensor]) -> Tensor:
    return torch.cat([space[k].reshape(-1).double() for k in sorted(space)])


def _canary_update(cid: str, start: Adapter, strategy: Strategy, state: GlobalState,
                   direction: dict[str, Tensor]) -> ClientUpdate:
    """A client whose change from its start is `direction` in the effective space."""
    lora = {}
    for name, factors in start.lora.items():
        x = factors.effective()
        B = x.B + direction[f"lora_B::{name}"]
        A = x.A + direction[f"lora_A::{name}"] if strategy.trains_a else x.A
        lora[name] = LoraFactors.from_effective(LowRank(B, A), factors.scaling)
    extras = {n: t + direction.get(f"extra::{n}", 0) for n, t in state.extras.items()}
    return ClientUpdate(cid, Adapter(lora=lora, extras=extras), 1)


def client_level_audit(strategy: Strategy, state: GlobalState, config: ClientDPConfig, *,
                       num_clients: int, per_round: int, rounds: int, canaries: int,
                       seed: int | None = None, significance: float = 0.05) -> dict[str, Any]:
    """The one-run lower bound for client-level DP next to the accounted epsilon. `seed`
    replaces OS entropy for tests only."""
    if config.sampling != "poisson":
        raise ConfigError("the client-level canary audit draws canaries by Poisson sampling; "
                          "audit a run with client_sampling poisson")
    strategy = strategy.audited_form()
    rank = strategy.spec.max_rank  # every canary client trains at the largest rank
    canary_spec = replace(strategy.spec, ranks={str(i): rank for i in range(canaries)})
    private = DPFedAvg(
        make_strategy(strategy.name, canary_spec, hetero=strategy.hetero, head=strategy.head,
                      seed=strategy.seed),
        config, expected_clients=per_round,
        generator=private_generator("cpu", None if seed is None else seed + 1))
    gen = private_generator("cpu", seed)
    sampler = random.SystemRandom() if seed is None else random.Random(seed + 2)
    q = per_round / num_clients
    base = strategy.trained_tensors(state)
    keys = sorted(base)
    directions = []
    for _ in range(canaries):
        raw = {k: torch.randn(base[k].shape, generator=gen, dtype=base[k].dtype) for k in keys}
        norm = l2_norm(raw)
        directions.append({k: t * (2 * config.clip_norm / norm) for k, t in raw.items()})
    units = torch.stack([_flat(d) for d in directions])
    units /= units.norm(dim=1, keepdim=True)
    included = torch.rand(canaries, generator=gen) < 0.5
    sampled = torch.zeros(canaries, dtype=torch.long)
    scores = torch.zeros(canaries, dtype=torch.float64)
    before = _flat(base)
    population = [str(i) for i in range(canaries)]
    for _ in range(rounds):
        ids = [i for i in draw_clients(population, q * canaries, "poisson", sampler)
               if included[int(i)]]
        sampled[[int(i) for i in ids]] += 1
        plan = plan_round(private, state, ids)
        updates = [_canary_update(i, plan.starts[i], strategy, state, directions[int(i)])
                   for i in ids]
        released_state = close_round(private, state, plan, updates).state
        noisy_sum = (_flat(strategy.trained_tensors(released_state)) - before) * per_round
        scores += units @ noisy_sum
    bound = best_one_run_bound(scores.tolist(), included.tolist(), config.delta, significance)
    return {
        "kind": "client level, one run, canary clients",
        "setup": f"{rounds} rounds of the server's DP-FedAvg ({strategy.name}) with z = "
                 f"{config.noise_multiplier:g}, S = {config.clip_norm:g}, Poisson q = {q:.4g}, "
                 f"canaries at rank {rank}, drawn by the server's "
                 "client sampler",
        "threat_model": "the auditor chooses the canary clients' updates (random directions of "
                        "norm 2S), knows every other client's update, and sees each round's "
                        "released global adapter",
        **canary_report(bound, included.tolist(), sampled.tolist()),
        "score": "the released noisy sum of all rounds projected on the canary's direction",
        "epsilon_claimed": client_level_epsilon(config, num_clients=num_clients,
                                                per_round=per_round, rounds=rounds),
        "delta": config.delta,
        "accountant": config.accountant,
        "noise_multiplier": config.noise_multiplier,
        "clip_norm": config.clip_norm,
        "sample_rate": q,
        "rounds": rounds,
        "randomness": "canary inclusion, client sampling and noise from OS entropy"
                      if seed is None else f"seeded for a test ({seed})",
    }


def audit_state(spec: FederationSpec, strategy_name: str, extras: dict[str, Tensor], *,
                hetero: str, head: str | None, seed: int) -> tuple[Strategy, GlobalState]:
    """The strategy and round-0 state of a run, rebuilt from its shapes (no model needed)."""
    strategy = make_strategy(strategy_name, spec, hetero=hetero, head=head, seed=seed)
    return strategy, strategy.init_state(extras)


def audit_recorded_run(run: Path, config: SimulationConfig, canaries: int,
                       seed: int | None = None) -> dict[str, Any]:
    """The client-level canary audit of a run directory: its strategy, ranks and module shapes
    (from its first global adapter) and its recorded z, S, sampling and rounds."""
    dp = config.client_dp_config()
    if dp is None:
        raise ConfigError(f"{run} has no client-level DP to audit")
    first = run / "rounds" / "0001" / "global.safetensors"
    if not first.is_file():
        raise ConfigError(f"{run} has no completed round ({first} is missing)")
    adapter = load_adapter(first)
    modules = {name: ModuleShape(f.B.shape[0], f.A.shape[1]) for name, f in adapter.lora.items()}
    spec = FederationSpec(modules=modules, ranks=config.client_ranks(), alpha=config.alpha,
                          extras={n: tuple(t.shape) for n, t in adapter.extras.items()})
    strategy, state = audit_state(spec, config.strategy, dict(adapter.extras),
                                  hetero=config.hetero, head=config.head, seed=config.seed)
    return client_level_audit(strategy, state, dp, num_clients=config.num_clients,
                              per_round=config.sampled_per_round, rounds=config.rounds,
                              canaries=canaries, seed=seed)
