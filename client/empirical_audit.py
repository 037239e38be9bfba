"""`fedlr audit --empirical`: rerun a run's sample-level DP-SGD with gradient canaries and bound its
epsilon from below (one run; Steinke, Nasr, Jagielski 2023).

The rerun is one client (client 0's shard, rank and trainable tensors) training for the run's
rounds x local steps in one go, with the run's sigma, C and accountant, in hooks mode (the canaries
are per-sample gradients). The canaries are indices of its training set, drawn by the trainer's
own sampler (the batch size grows with the canaries so that q stays the run's), and the claim is
the epsilon the trainer's own ledger accounts for what it ran. Seeing every step's effect on the
client's own parameters is the strongest observer the privacy claim covers, so a lower bound above
the claim means the sampler, the noise or the accounting is broken.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fedlr.adapters import Adapter
from fedlr.client.canaries import GradientCanaries
from fedlr.client.training import LocalTrainer
from fedlr.errors import ConfigError
from fedlr.federation import Federation
from fedlr.privacy.bounds import best_one_run_bound, canary_report
from fedlr.privacy.sample_level import PrivacyLedger
from fedlr.settings.schema import SimulationConfig

THREAT_MODEL = ("white-box: the auditor chooses each canary's gradient (C at one coordinate of "
                "the trainable LoRA/head tensors), knows every real example, and sees the "
                "client's parameters after every local step of the whole run; it does not know "
                "which canaries are in the data set (OS entropy) nor the sampler's and the "
                "noise's draws (OS entropy on the client)")


def sample_level_audit(config: SimulationConfig, canaries: int, *, seed: int | None = None,
                       noise_multiplier: float | None = None,
                       significance: float = 0.05) -> dict[str, Any]:
    """The empirical lower bound next to the epsilon the same training is accounted at.
    `noise_multiplier` overrides the run's sigma (0 shows what an audit of a broken run gives);
    `seed` replaces OS entropy for tests only."""
    dp = config.dp_config()
    if dp is None:
        raise ConfigError("the run has no sample-level DP-SGD to audit empirically (set "
                          "noise_multiplier or target_epsilon)")
    if canaries < 2:
        raise ConfigError(f"an audit needs at least 2 canaries, got {canaries}")
    dp = replace(dp, grad_sample_mode="hooks", max_epsilon=None)
    if noise_multiplier is not None:
        dp = replace(dp, noise_multiplier=noise_multiplier, target_epsilon=None)
    steps = config.rounds * config.local_steps

    fed = Federation.build(config, device="cpu")
    host, data, strategy = fed.model.host, fed.data, fed.strategy
    rank = strategy.spec.ranks["0"]
    start = Adapter(lora=host.fresh_lora(rank, config.seed), extras=dict(host.initial_head))
    shard = data.shard(0)
    n = len(shard)
    run_q = min(1.0, config.batch_size / n)
    batch_size = max(1, round(run_q * (n + canaries)))  # the run's q over examples + canaries
    train = replace(config.train_config(), local_steps=steps, planned_rounds=1, dp=dp,
                    device="cpu", batch_size=batch_size)
    ledger = PrivacyLedger(accountant=dp.accountant)
    # a test's seed: batches seed, noise seed + 1 (the trainer's), canary inclusion seed + 2
    planted = GradientCanaries(canaries, dp.max_grad_norm, None if seed is None else seed + 2)
    result = LocalTrainer(host, train).train(
        "0", start, shard, rank=rank, train_a=strategy.trains_a, train_head=strategy.trains_head,
        ledger=ledger, canaries=planted, dp_seed=seed)
    bound = best_one_run_bound(planted.scores.tolist(), planted.included.tolist(), dp.delta,
                               significance)
    sigma, q, _ = ledger.history[0]
    return {
        "kind": "sample level, one run, white-box gradient canaries",
        "setup": f"client 0's {n} examples and {canaries} canary indices, rank {rank}, {steps} "
                 f"DP-SGD steps with sigma = {sigma:g}, C = {dp.max_grad_norm:g}, the trainer's "
                 f"{'Poisson' if result.metrics['poisson'] else 'NON-Poisson'} sampler at "
                 f"q = {q:.4g}, hooks mode",
        "threat_model": THREAT_MODEL,
        **canary_report(bound, planted.included.tolist(), planted.sampled.tolist()),
        "score": "the released gradient at the canary's coordinate minus the real examples' "
                 "clipped part there, summed over all steps",
        "randomness": "canary inclusion, batch sampling and noise from OS entropy"
                      if seed is None else f"seeded for a test ({seed})",
        "epsilon_claimed": ledger.epsilon(dp.delta),
        "delta": dp.delta,
        "accountant": dp.accountant,
        "noise_multiplier": sigma,
        "max_grad_norm": dp.max_grad_norm,
        "sample_rate": q,
        "steps": steps,
    }
