"""`fedlr audit`: every epsilon recomputed from the recorded mechanism, cross-checked by a second
library, and flagged when the run's own figures or budget do not hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import dp_accounting
import pytest
from dp_accounting import rdp
from rundirs import client_ids_in

from fedlr.client.app import app as client_app
from fedlr.errors import ConfigError
from fedlr.privacy.audit import write_audit
from fedlr.privacy.client_level import ClientDPConfig, client_level_epsilon
from fedlr.server.simulation import simulate
from fedlr.settings.schema import SimulationConfig


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


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_fedlr_audit_empirical_audits_both_levels_of_a_run(dp_run):
    done = subprocess.run([sys.executable, "-m", "fedlr.cli", "audit", str(dp_run),
                           "--empirical", "--canaries", "200"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((dp_run / "audit.json").read_text())
    sample, client = report["empirical"], report["empirical_client_level"]
    assert sample["canaries"] == client["canaries"] == 200
    assert 0 <= sample["epsilon_lower_bound"] <= sample["epsilon_claimed"]
    assert sample["steps"] == 6 and sample["noise_multiplier"] == 0.9
    # the canaries audit the mechanism with a secret Poisson sample over every round, and are
    # held to its claim (this run published its sample, which it accounts per client instead)
    secret = client_level_epsilon(ClientDPConfig(1.2, 0.5), num_clients=3, per_round=2, rounds=2)
    assert client["epsilon_claimed"] == pytest.approx(secret)
    assert 0 <= client["epsilon_lower_bound"] <= client["epsilon_claimed"]
    assert report["flags"] == []
    text = (dp_run / "audit.md").read_text()
    assert "Empirical lower bound, sample level" in text
    assert "Empirical lower bound, client level" in text


BROKEN_PRIVACY = {
    "empty": ("{}", "holds no privacy facts"),
    "invalid JSON": ("{not json", "is not valid JSON"),
    "mistyped delta": ('{"delta": "abc", "accountant": "prv", "clients": {}}',
                       "is malformed (ValueError: delta 'abc'"),
    "clients not a mapping": ('{"delta": 1e-5, "accountant": "prv", "privacy_unit": "x", '
                              '"sampling": "x", "clients": 5}', "is malformed"),
    "a field missing": ('{"clients": {"0": {"history": [[1.0, 0.1, 3]]}}}',
                        "is malformed (KeyError: missing 'delta')"),
}


@pytest.mark.parametrize("case", list(BROKEN_PRIVACY))
def test_an_audit_of_an_unreadable_privacy_json_is_one_error_and_touches_nothing(
        tmp_path, case, monkeypatch, capsys):
    from fedlr.cli import main

    content, message = BROKEN_PRIVACY[case]
    (tmp_path / "privacy.json").write_text(content)
    (tmp_path / "audit.md").write_text("the previous audit\n")
    monkeypatch.setattr(sys, "argv", ["fedlr", "audit", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert message in " ".join(err.split()) and "privacy.json" in err
    assert (tmp_path / "audit.md").read_text() == "the previous audit\n"
    assert not (tmp_path / "audit.json").exists()


def test_an_audit_of_a_directory_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        write_audit(tmp_path / "nowhere")


@pytest.mark.e2e
def test_a_clean_audit_says_which_accountants_it_compared(dp_run):
    write_audit(dp_run)
    text = (dp_run / "audit.md").read_text()
    assert "No flags:" in text and "PRV with PLD" in text and "looser" in text


@pytest.mark.e2e
def test_published_client_ids_are_accounted_without_amplification(dp_run):
    """The opt-in names each round's clients, so each client's epsilon is the Gaussian mechanism
    composed over the rounds its update was in (dp-accounting's, within 1 %)."""
    records = [json.loads(line) for line in (dp_run / "metrics.jsonl").read_text().splitlines()]
    joined = Counter(c for r in records for c in r["accepted"])
    assert client_ids_in(dp_run)  # the opt-in names them
    privacy = json.loads((dp_run / "privacy.json").read_text())["client_level"]
    assert privacy["client_ids_published"] is True
    assert set(privacy["clients"]) == set(joined)
    for client, rounds in joined.items():
        accountant = rdp.RdpAccountant()
        accountant.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(1.2), rounds))
        assert privacy["clients"][client]["rounds"] == rounds
        assert privacy["clients"][client]["epsilon"] == pytest.approx(
            accountant.get_epsilon(1e-5), rel=0.01)
    assert privacy["epsilon"] == max(c["epsilon"] for c in privacy["clients"].values())
    assert records[-1]["client_epsilon"] == privacy["epsilon"]
