"""`fedlr audit`: every epsilon recomputed from the recorded mechanism, cross-checked by a second
library, and flagged when the run's own figures or budget do not hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedlr.audit import write_audit
from fedlr.client.app import app as client_app
from fedlr.errors import ConfigError
from fedlr.server.simulation import simulate
from fedlr.simconfig import SimulationConfig


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    """Sample-level DP-SGD and client-level DP-FedAvg in one run (which needs the client sample
    published: the sample-level ledgers name who trained)."""
    out = tmp_path_factory.mktemp("audit") / "run"
    config = SimulationConfig.load(None, dict(
        strategy="ffa", model="tiny", num_clients=3, clients_per_round=2, rounds=2, ranks=[2, 4],
        local_steps=3, batch_size=8, eval_examples=16, noise_multiplier=0.9,
        client_noise_multiplier=1.2, client_clip_norm=0.5, publish_client_ids=True,
        out=str(out)))
    simulate(config, client_app)
    return out


def test_the_audit_recomputes_the_claims_and_two_libraries_agree(dp_run, tmp_path):
    report = write_audit(dp_run)
    privacy = json.loads((dp_run / "privacy.json").read_text())
    assert report["flags"] == []
    assert report["epsilon_accounted"] == pytest.approx(privacy["max_epsilon"], rel=1e-9)
    accounted, cross = report["epsilon_accounted"], report["epsilon_cross_check"]
    assert abs(accounted - cross) <= 0.01 * cross + 0.01  # 1 % plus PRV's own eps_error
    for cid, client in report["sample_level"]["clients"].items():
        assert client["epsilon"] == pytest.approx(privacy["clients"][cid]["epsilon"], rel=1e-9)
        assert client["epsilon_rdp"] >= client["epsilon_pld"]  # RDP is the looser bound
    level = report["client_level"]
    assert level["epsilon"] == pytest.approx(privacy["client_level"]["epsilon"], rel=1e-9)
    assert level["epsilon_other_accountant"] < level["epsilon"]  # PLD under RDP
    assert json.loads((dp_run / "audit.json").read_text())["epsilon_accounted"] == pytest.approx(
        report["epsilon_accounted"])
    text = (dp_run / "audit.md").read_text()
    assert f"epsilon = {report['epsilon_accounted']:.4f}" in text
    assert f"epsilon = {level['epsilon']:.4f}" in text
    assert "Released outside this guarantee" in text and "add or remove one client" in text
    assert "Client ids are published" in text and "## Trust model" in text
    assert "OS entropy" in text and "default generator" not in text
    assert (dp_run / "audit.png").stat().st_size > 0


def test_a_non_poisson_client_is_flagged(dp_run, tmp_path):
    run = tmp_path / "copy"
    run.mkdir()
    privacy = json.loads((dp_run / "privacy.json").read_text())
    first = sorted(privacy["clients"], key=int)[0]
    privacy["clients"][first]["sampling"] = "not Poisson for 3 of 6 steps"
    (run / "privacy.json").write_text(json.dumps(privacy))
    (run / "metrics.jsonl").write_text((dp_run / "metrics.jsonl").read_text())
    assert write_audit(dp_run)["flags"] == []
    flags = write_audit(run)["flags"]
    assert flags == [f"client {first}: batch sampling not Poisson for 3 of 6 steps; its epsilon "
                     "assumes Poisson sampling and is not a guarantee"]


def test_an_understated_epsilon_or_a_passed_budget_is_flagged(dp_run, tmp_path):
    run = tmp_path / "copy"
    run.mkdir()
    privacy = json.loads((dp_run / "privacy.json").read_text())
    first = sorted(privacy["clients"], key=int)[0]
    privacy["clients"][first]["epsilon"] *= 0.5  # a run that claims less than it spent
    privacy["budget"] = privacy["max_epsilon"] * 0.9
    privacy["client_level"]["epsilon"] *= 0.5
    (run / "privacy.json").write_text(json.dumps(privacy))
    (run / "metrics.jsonl").write_text((dp_run / "metrics.jsonl").read_text())
    flags = write_audit(run)["flags"]
    assert any(f.startswith(f"client {first}: privacy.json says") for f in flags)
    assert any("over its budget" in f for f in flags)
    assert any(f.startswith("client level: privacy.json says") for f in flags)


def test_a_run_without_dp_has_nothing_to_audit(tmp_path):
    with pytest.raises(ConfigError, match=r"no privacy\.json"):
        write_audit(tmp_path)


def test_fedlr_audit_empirical_audits_both_levels_of_a_run(dp_run):
    done = subprocess.run([sys.executable, "-m", "fedlr.cli", "audit", str(dp_run),
                           "--empirical", "--canaries", "200"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((dp_run / "audit.json").read_text())
    privacy = json.loads((dp_run / "privacy.json").read_text())
    sample, client = report["empirical"], report["empirical_client_level"]
    assert sample["canaries"] == client["canaries"] == 200
    assert 0 <= sample["epsilon_lower_bound"] <= sample["epsilon_claimed"]
    assert sample["steps"] == 6 and sample["noise_multiplier"] == 0.9
    # the canaries audit the secret-sample mechanism, whose claim is below this run's, which
    # published its sample and so claims no amplification
    assert client["epsilon_claimed"] < privacy["client_level"]["epsilon"]
    assert 0 <= client["epsilon_lower_bound"] <= client["epsilon_claimed"]
    assert report["flags"] == []
    text = (dp_run / "audit.md").read_text()
    assert "Empirical lower bound, sample level" in text
    assert "Empirical lower bound, client level" in text
