"""Client-level DP (DP-FedAvg) in a whole simulated run: the clipping bound on what the server
releases, the accounted epsilon against dp-accounting, a client sample that stays secret (or is
published and then accounted without amplification), and settings that cannot compose."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
import torch
from dp_accounting import rdp
from rundirs import client_ids_in

from fedlr.adapters import load_adapter
from fedlr.client.app import app as client_app
from fedlr.errors import ConfigError
from fedlr.lora.rounds import REJECTION_KINDS, sample_clients
from fedlr.server.simulation import simulate
from fedlr.settings.schema import SimulationConfig

TINY = dict(strategy="ffa", model="tiny", num_clients=4, rounds=2, ranks=[2, 4], local_steps=3,
            batch_size=8, lr=1e-2, eval_examples=32)


def release_norm(before, after) -> float:
    """||B_r - B_{r-1}||, head included: the change of everything the round released (ffa)."""
    squares = sum(float((after.lora[n].B - before.lora[n].B).square().sum()) for n in after.lora)
    squares += sum(float((after.extras[n] - before.extras[n]).square().sum())
                   for n in after.extras)
    return math.sqrt(squares)


@pytest.mark.e2e
def test_without_noise_each_round_moves_the_global_adapter_by_at_most_the_clip_norm(tmp_path):
    clip = 1e-4  # far below what local training moves: every update is clipped
    config = SimulationConfig.load(None, {**TINY, "client_noise_multiplier": 0.0,
                                          "client_clip_norm": clip, "client_sampling": "fixed",
                                          "out": str(tmp_path / "run")})
    run = simulate(config, client_app)
    records = run.read_metrics()
    assert all(r["num_accepted"] == 4 for r in records)
    rounds = [load_adapter(run.root / "rounds" / f"{r:04d}" / "global.safetensors")
              for r in (1, 2)]
    change = release_norm(rounds[0], rounds[1])
    # the mean of four deltas of norm <= S each, over m = 4
    assert 0 < change <= clip * (1 + 1e-5)


@pytest.mark.e2e
def test_client_level_epsilon_is_dp_accountings_and_no_file_names_a_client(tmp_path):
    """The accounted epsilon, and a client sample that stays secret: no file of the run names a
    client; counts and kinds of rejection only (every update is rejected here: far too large)."""
    z, per_round = 1.1, 2
    config = SimulationConfig.load(None, {**TINY, "clients_per_round": per_round, "rounds": 3,
                                          "client_noise_multiplier": z, "client_clip_norm": 0.5,
                                          "max_update_norm": 1e-3, "out": str(tmp_path / "run")})
    run = simulate(config, client_app)
    assert client_ids_in(run.root) == []
    records = run.read_metrics()
    kinds = [x["reason"] for r in records for x in r["rejected"]]
    assert set(kinds) <= set(REJECTION_KINDS) and "invalid update" in kinds
    assert all(r["num_accepted"] + len(r["rejected"]) == r["num_clients"] for r in records)
    q = per_round / TINY["num_clients"]
    for record in records:
        accountant = rdp.RdpAccountant()
        accountant.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
            record["round"]))
        assert record["client_epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        assert record["aggregation_residual"] is None  # no exactness claim under noise
    privacy = json.loads((run.root / "privacy.json").read_text())["client_level"]
    assert privacy["epsilon"] == records[-1]["client_epsilon"]
    assert privacy["sampling"] == {"method": "poisson", "q": q, "num_clients": 4, "per_round": 2}
    assert privacy["adjacency"] == "add or remove one client"
    assert privacy["rounds"] == 3 and privacy["clip_norm"] == 0.5
    assert privacy["client_ids_published"] is False


@pytest.mark.parametrize(("overrides", "message"), [
    ({"strategy": "flora"}, "does not compose with strategy 'flora'"),
    ({"strategy": "fair"}, "does not compose with strategy 'fair'"),
    ({"strategy": "fedit", "hetero": "flexlora"}, "hetero 'flexlora'"),
    ({"save_client_updates": True}, "un-noised update"),
    ({"min_valid_updates": 2}, "min_valid_updates does not apply"),
    ({"client_clip_norm": None}, "needs client_clip_norm"),
    ({"client_sampling": "fixed", "client_accountant": "pld"}, "cannot account fixed-size"),
])
def test_settings_that_cannot_give_client_level_dp_fail_before_any_work(tmp_path, overrides,
                                                                        message):
    settings = {**TINY, "client_noise_multiplier": 1.0, "client_clip_norm": 1.0,
                "out": str(tmp_path / "run"), **overrides}
    with pytest.raises(ConfigError, match=message):
        SimulationConfig.load(None, {k: v for k, v in settings.items() if v is not None})
    assert not (tmp_path / "run").exists()


def test_a_clip_norm_without_noise_is_refused():
    with pytest.raises(ConfigError, match="client_noise_multiplier is not"):
        SimulationConfig.load(None, {**TINY, "client_clip_norm": 1.0})


def test_poisson_sampling_under_client_dp_draws_each_client_with_probability_q(tmp_path):
    """The round's draw as the coordinator calls it: inclusion frequency q for every client,
    sizes that vary."""
    config = SimulationConfig.load(None, {**TINY, "num_clients": 10, "clients_per_round": 3,
                                          "client_noise_multiplier": 1.0, "client_clip_norm": 1.0,
                                          "out": str(tmp_path / "run")})
    dp = config.client_dp_config()
    draws = [sample_clients(config.client_ids(), config.sampled_per_round, r, seed=config.seed,
                            private_sampling=dp.sampling) for r in range(4000)]
    counts = torch.tensor([[str(c) in d for c in range(10)] for d in draws], dtype=torch.float64)
    frequency = counts.mean(0)
    stderr = math.sqrt(0.3 * 0.7 / len(draws))
    assert float((frequency - 0.3).abs().max()) < 5 * stderr
    assert len({len(d) for d in draws}) > 3  # Poisson: the round size varies


SECRET = {**TINY, "rounds": 3, "clients_per_round": 2, "client_noise_multiplier": 1.0,
          "client_clip_norm": 0.5, "max_update_norm": 1e-3}  # some updates are rejected


@pytest.mark.parametrize(("overrides", "message"), [
    ({"noise_multiplier": 1.0}, "would publish the client sample"),
    ({"client_noise_multiplier": None, "client_clip_norm": None}, "publish_client_ids only"),
])
def test_publishing_rules_fail_before_any_work(overrides, message):
    settings = {**SECRET, "publish_client_ids": "noise_multiplier" not in overrides,
                **overrides}
    with pytest.raises(ConfigError, match=message):
        SimulationConfig.load(None, {k: v for k, v in settings.items() if v is not None})
