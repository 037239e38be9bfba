"""Secure aggregation through Flower's simulation engine: the same adapter as the plain run
within the encoding error, the error recorded per round, and client-level DP on top."""

from __future__ import annotations

import json

import pytest
import torch

from fedlr.adapters import load_delta_weights
from fedlr.client.app import app as client_app
from fedlr.server.simulation import simulate
from fedlr.settings.schema import SimulationConfig

pytestmark = pytest.mark.e2e  # simulations, subprocesses and deployments

SETTINGS = dict(model="tiny", num_clients=4, rounds=2, ranks=[2, 4, 8], local_steps=2,
                batch_size=8, eval_examples=32, seed=5)


def run(folder, **settings):
    config = SimulationConfig.load(None, {**SETTINGS, **settings, "out": str(folder)})
    simulate(config, client_app)
    return folder


def test_a_secure_run_gives_the_plain_runs_adapter_within_the_encoding_error(tmp_path):
    """FedIT with mixed ranks 2/4/8 (each rank component's mean over its holders, and A and B
    both summed); the other strategies' sums are checked without Flower (test_secagg.py)."""
    settings = dict(strategy="fedit", hetero="hetlora-fedavg")
    plain = run(tmp_path / "plain", **settings)
    secure = run(tmp_path / "secure", **settings, secure_aggregation=True)
    records = [json.loads(line) for line in (secure / "metrics.jsonl").read_text().splitlines()]
    assert [r["num_accepted"] for r in records] == [4, 4]
    assert all(0 < r["secagg_quantization_error"] < 1e-6 for r in records)
    assert all(r["secagg_clipped_values"] == 0 for r in records)
    for round_ in ("0001", "0002"):
        a = load_delta_weights(secure / "rounds" / round_ / "global.safetensors")
        b = load_delta_weights(plain / "rounds" / round_ / "global.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)


def test_client_level_dp_under_secure_aggregation_says_who_adds_the_noise(tmp_path):
    out = run(tmp_path / "dp", strategy="ffa", secure_aggregation=True,
              client_noise_multiplier=1.0, client_clip_norm=0.5, clients_per_round=3,
              client_sampling="fixed")
    privacy = json.loads((out / "privacy.json").read_text())["client_level"]
    assert privacy["clipping"] == "by each client, before it masks its part"
    assert privacy["noise_added_by"].startswith("the server, to the unmasked sum")
    assert privacy["epsilon"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "clients" not in records[0]  # the sample stays secret
