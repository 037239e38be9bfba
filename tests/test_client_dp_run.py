"""Client-level DP (DP-FedAvg) in a whole simulated run: the clipping bound on what the server
releases, the accounted epsilon against dp-accounting, a client sample that stays secret (or is
published and then accounted without amplification), and settings that cannot compose."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting import rdp

from fedlr.adapters import load_adapter
from fedlr.client.app import app as client_app
from fedlr.errors import ConfigError
from fedlr.server.coordinator import sample_clients
from fedlr.server.simulation import simulate
from fedlr.simconfig import SimulationConfig

TINY = dict(strategy="ffa", model="tiny", num_clients=4, rounds=2, ranks=[2, 4], local_steps=3,
            batch_size=8, lr=1e-2, eval_examples=32)


def release_norm(before, after) -> float:
    """||B_r - B_{r-1}||, head included: the change of everything the round released (ffa)."""
    squares = sum(float((after.lora[n].B - before.lora[n].B).square().sum()) for n in after.lora)
    squares += sum(float((after.extras[n] - before.extras[n]).square().sum())
                   for n in after.extras)
    return math.sqrt(squares)


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


def test_client_level_epsilon_is_dp_accountings_for_the_configured_sampling(tmp_path):
    z, per_round = 1.1, 2
    config = SimulationConfig.load(None, {**TINY, "clients_per_round": per_round,
                                          "client_noise_multiplier": z, "client_clip_norm": 0.5,
                                          "out": str(tmp_path / "run")})
    run = simulate(config, client_app)
    records = run.read_metrics()
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
    assert privacy["rounds"] == 2 and privacy["clip_norm"] == 0.5


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
    """The coordinator's draw: inclusion frequency q for every client, sizes that vary."""
    config = SimulationConfig.load(None, {**TINY, "num_clients": 10, "clients_per_round": 3,
                                          "client_noise_multiplier": 1.0, "client_clip_norm": 1.0,
                                          "out": str(tmp_path / "run")})
    draws = [sample_clients(config, r) for r in range(4000)]
    counts = torch.tensor([[str(c) in d for c in range(10)] for d in draws], dtype=torch.float64)
    frequency = counts.mean(0)
    stderr = math.sqrt(0.3 * 0.7 / len(draws))
    assert float((frequency - 0.3).abs().max()) < 5 * stderr
    assert len({len(d) for d in draws}) > 3  # Poisson: the round size varies


ID_KEYS = {"clients", "accepted", "client", "client_rounds", "ledgers", "client_id"}


def client_ids_in(run: Path) -> list[str]:
    """Every place of the run directory that names which clients took part: id-valued keys in
    its JSON files (the population's ranks in run.json excepted), and per-client files."""
    found = [str(p.relative_to(run)) for p in run.rglob("*")
             if p.parent.name in ("clients", "nodes")]

    def walk(value, where):
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ID_KEYS and item not in ([], {}, None):
                    found.append(f"{where}: {key}")
                walk(item, where)
        elif isinstance(value, list):
            for item in value:
                walk(item, where)

    for path in [*run.rglob("*.json"), *run.rglob("*.jsonl")]:
        lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
        for line in lines:
            document = json.loads(line)
            if path.name == "run.json":
                document.pop("client_ranks")
                document["config"].pop("ranks")
            walk(document, str(path.relative_to(run)))
    return found


SECRET = {**TINY, "rounds": 3, "clients_per_round": 2, "client_noise_multiplier": 1.0,
          "client_clip_norm": 0.5, "max_update_norm": 1e-3}  # some updates are rejected


def test_under_client_level_dp_no_file_of_the_run_names_a_client(tmp_path):
    run = simulate(SimulationConfig.load(None, {**SECRET, "out": str(tmp_path / "run")}),
                   client_app)
    assert client_ids_in(run.root) == []
    records = run.read_metrics()
    assert sum(r["num_clients"] for r in records) > 0  # counts are there, and reasons by kind
    assert {x["reason"] for r in records for x in r["rejected"]} <= {"invalid update"}
    assert any(r["rejected"] for r in records)
    assert all(r["num_accepted"] + len(r["rejected"]) == r["num_clients"] for r in records)
    privacy = json.loads((run.root / "privacy.json").read_text())["client_level"]
    assert privacy["client_ids_published"] is False


def test_published_client_ids_are_accounted_without_amplification(tmp_path):
    z = 1.0
    run = simulate(SimulationConfig.load(None, {**SECRET, "max_update_norm": None,
                                                "publish_client_ids": True,
                                                "out": str(tmp_path / "run")}), client_app)
    records = run.read_metrics()
    joined = Counter(c for r in records for c in r["accepted"])
    assert client_ids_in(run.root)  # the opt-in names them
    privacy = json.loads((run.root / "privacy.json").read_text())["client_level"]
    assert privacy["client_ids_published"] is True
    assert set(privacy["clients"]) == set(joined)
    for client, rounds in joined.items():
        accountant = rdp.RdpAccountant()
        accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z),
                                                             rounds))
        expected = accountant.get_epsilon(1e-5)
        assert privacy["clients"][client]["rounds"] == rounds
        assert privacy["clients"][client]["epsilon"] == pytest.approx(expected, rel=0.01)
    assert privacy["epsilon"] == max(c["epsilon"] for c in privacy["clients"].values())
    assert records[-1]["client_epsilon"] == privacy["epsilon"]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"noise_multiplier": 1.0}, "would publish the client sample"),
    ({"client_noise_multiplier": None, "client_clip_norm": None}, "publish_client_ids only"),
])
def test_publishing_rules_fail_before_any_work(overrides, message):
    settings = {**SECRET, "publish_client_ids": "noise_multiplier" not in overrides,
                **overrides}
    with pytest.raises(ConfigError, match=message):
        SimulationConfig.load(None, {k: v for k, v in settings.items() if v is not None})
