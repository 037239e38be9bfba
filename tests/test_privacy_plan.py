"""Sizing a private run: golden values forward, minimal noise in reverse, one-line errors."""

from __future__ import annotations

import json
import math

import pytest

from fedlr.errors import ConfigError
from fedlr.privacy.client_level import ClientDPConfig, client_level_epsilon
from fedlr.privacy.plan import PRV_CEILING, PrivacyPlan
from fedlr.privacy.planners import plan_client_level, plan_sample_level
from fedlr.privacy.sample_level import noise_for_target, opacus_epsilon
from fedlr.privacy.solve import MAX_NOISE, MIN_NOISE, REL_TOL, Unreachable, smallest_noise

# ../shared/reference/privacy.md, "Golden values"


def test_sample_level_forward_reproduces_opacus_prv_golden_value():
    plan = plan_sample_level(
        delta=1e-5, rounds=2249, local_steps=1, sample_rate=0.04, noise_multiplier=1.5
    )
    assert plan.steps == 2249 and plan.accountant == "opacus prv" and not plan.solved
    assert plan.epsilon == pytest.approx(6.777395712150674, abs=1e-6)
    # the spread: PLD (tight) next to PRV, RDP above both
    pld, rdp = plan.cross_checks["dp-accounting pld"], plan.cross_checks["dp-accounting rdp"]
    assert pld == pytest.approx(plan.epsilon, rel=0.01)
    assert rdp > plan.epsilon and rdp == pytest.approx(7.329, abs=0.01)
    assert plan.spread == (pld, rdp)


def test_sample_level_forward_rdp_counts_rounds_times_local_steps():
    plan = plan_sample_level(
        delta=1e-5,
        rounds=225,
        local_steps=10,
        sample_rate=0.04,
        noise_multiplier=1.5,
        accountant="rdp",
        cross_check=False,
    )
    assert plan.steps == 2250 and plan.cross_checks == {}
    assert plan.epsilon == pytest.approx(7.32911117143, abs=1e-8)


def test_sample_level_sample_rate_from_batch_and_examples_tf_privacy_golden():
    # TF-Privacy: N=60000, B=150, sigma=1.3, 15 epochs (400 steps each), delta=1e-5
    plan = plan_sample_level(
        delta=1e-5,
        rounds=15,
        local_steps=400,
        batch_size=150,
        examples_per_client=60000,
        noise_multiplier=1.3,
        accountant="rdp",
    )
    assert plan.sample_rate == pytest.approx(0.0025)
    assert plan.cross_checks["dp-accounting rdp"] == pytest.approx(0.7242234026, abs=1e-8)
    assert ("sample rate q", "0.0025 (batch 150 / 60000 examples)") in plan.rows()


@pytest.mark.parametrize(
    ("q", "z", "rounds", "delta", "rdp", "prv", "pld"),
    [
        (0.01, 1.0, 1000, 1e-5, 2.1014, 1.8384, 1.8282),
        (0.1, 1.0, 100, 1e-4, 6.8216, 5.9764, 5.9659),
    ],
)
def test_client_level_forward_reproduces_dp_fedavg_golden_values(
    q, z, rounds, delta, rdp, prv, pld
):
    n = 1000
    plan = plan_client_level(
        delta=delta,
        rounds=rounds,
        num_clients=n,
        clients_per_round=round(q * n),
        noise_multiplier=z,
    )
    assert plan.accountant == "dp-accounting rdp" and plan.epsilon == pytest.approx(rdp, abs=1e-4)
    assert plan.cross_checks["opacus prv"] == pytest.approx(prv, abs=1e-4)
    assert plan.cross_checks["dp-accounting pld"] == pytest.approx(pld, abs=1e-4)
    assert plan.privacy_unit.startswith("one client's whole contribution")
    assert plan.adjacency == "add or remove one client"


def test_client_level_forward_with_pld_as_the_accountant():
    plan = plan_client_level(
        delta=1e-5,
        rounds=1000,
        num_clients=1000,
        clients_per_round=10,
        noise_multiplier=1.0,
        accountant="pld",
    )
    assert plan.epsilon == pytest.approx(1.8282, abs=1e-4)
    assert plan.cross_checks["dp-accounting rdp"] == pytest.approx(2.1014, abs=1e-4)


# -- reverse: the solved noise meets the target, and is the smallest that does -----------------


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_sample_level_reverse_meets_target_with_minimal_noise(accountant):
    target, delta, q, rounds, local = 2.0, 1e-5, 0.04, 100, 20
    plan = plan_sample_level(
        delta=delta,
        rounds=rounds,
        local_steps=local,
        sample_rate=q,
        target_epsilon=target,
        accountant=accountant,
        cross_check=False,
    )
    sigma = plan.noise_multiplier
    assert plan.solved and plan.target_epsilon == target
    assert 0.98 * target <= plan.epsilon <= target
    if accountant == "rdp":  # (the same call for PRV, 1.5 s more)
        # the sigma a client solves for itself from the same target: the plan predicts the run
        assert sigma == noise_for_target(target, delta, q, rounds * local, accountant)
    assert opacus_epsilon([(0.98 * sigma, q, rounds * local)], delta, accountant) > target


@pytest.mark.parametrize(
    ("sampling", "accountant", "num_clients", "per_round", "rounds", "target"),
    [
        ("poisson", "rdp", 1000, 10, 1000, 3.0),
        ("poisson", "pld", 200, 10, 100, 2.0),
        ("fixed", "rdp", 100, 10, 200, 3.0),
        ("poisson", "rdp", 50, 50, 20, 1.0),  # q = 1: every client every round
    ],
)
def test_client_level_reverse_meets_target_with_minimal_noise(
    sampling, accountant, num_clients, per_round, rounds, target
):
    delta = 1e-5
    plan = plan_client_level(
        delta=delta,
        rounds=rounds,
        num_clients=num_clients,
        clients_per_round=per_round,
        target_epsilon=target,
        sampling=sampling,
        accountant=accountant,
        cross_check=False,
    )
    z = plan.noise_multiplier

    def eps(noise: float) -> float:
        config = ClientDPConfig(noise, 1.0, sampling=sampling, delta=delta, accountant=accountant)
        return client_level_epsilon(
            config, num_clients=num_clients, per_round=per_round, rounds=rounds
        )

    assert plan.solved and plan.epsilon == eps(z)
    assert 0.98 * target <= plan.epsilon <= target
    assert eps(0.98 * z) > target
    assert eps(z / (1 + REL_TOL)) > target  # minimal to the stated tolerance


@pytest.mark.parametrize(
    "epsilon",
    [
        lambda z: 3.0 / z**2,
        lambda z: 40.0 / z + 0.5,
        lambda z: math.inf if z < 0.2 else 10.0 / math.sqrt(z),
        lambda z: 8.0 - math.floor(4 * z),  # steps: secant guesses are useless, bisection is not
        lambda z: 1.0 + 1e-6 / z**4,  # nearly flat: secant slopes overflow
    ],
)
@pytest.mark.parametrize("target", [0.05, 1.0, 1.05, 2.5, 7.5])
def test_smallest_noise_is_minimal_and_never_overshoots(epsilon, target):
    calls = []

    def counted(z: float) -> float:
        calls.append(z)
        return epsilon(z)

    if epsilon(MAX_NOISE) > target:  # out of reach: said so, not a wrong answer
        with pytest.raises(Unreachable):
            smallest_noise(counted, target)
        return
    z = smallest_noise(counted, target)
    assert epsilon(z) <= target
    assert z == MIN_NOISE or epsilon(z / (1 + REL_TOL)) > target
    assert len(calls) <= 60


# -- what a plan says -------------------------------------------------------------------------


def test_rows_are_label_value_strings_and_the_plan_serialises():
    plan = plan_client_level(
        delta=1e-5,
        rounds=200,
        num_clients=100,
        clients_per_round=10,
        noise_multiplier=8.0,
        sampling="fixed",
    )
    rows = plan.rows()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in rows)
    labels = dict(rows)
    assert labels["privacy unit"] == plan.privacy_unit
    assert labels["adjacency"] == "replace one client"
    assert "target epsilon" not in labels
    assert labels["client noise multiplier z"] == "8 (given)"
    assert labels["epsilon (dp-accounting rdp)"] == f"{plan.epsilon:.4f}"
    assert plan.cross_checks == {}  # only RDP accounts fixed-size sampling
    assert any("no cross-check" in v for k, v in rows if k == "note")
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["noise_multiplier"] == plan.noise_multiplier
    assert PrivacyPlan(**{**data, "notes": tuple(data["notes"])}) == plan


def test_batch_as_large_as_the_data_means_q_one():
    plan = plan_sample_level(
        delta=1e-5,
        rounds=2,
        local_steps=5,
        batch_size=64,
        examples_per_client=50,
        noise_multiplier=5.0,
        accountant="rdp",
        cross_check=False,
    )
    assert plan.sample_rate == 1.0 and any("q = 1" in n for n in plan.notes)


def test_no_noise_means_no_guarantee():
    sample = plan_sample_level(
        delta=1e-5, rounds=1, local_steps=1, sample_rate=0.1, noise_multiplier=0.0
    )
    client = plan_client_level(
        delta=1e-5, rounds=1, num_clients=10, clients_per_round=1, noise_multiplier=0
    )
    for plan in (sample, client):
        assert plan.epsilon == math.inf and plan.cross_checks == {}
        assert "inf" in dict(plan.rows())[f"epsilon ({plan.accountant})"]


def test_huge_epsilon_is_bounded_by_rdp_without_running_prv():
    plan = plan_sample_level(
        delta=1e-5, rounds=100, local_steps=10, sample_rate=1.0, noise_multiplier=0.3
    )
    assert plan.accountant == "opacus rdp" and 1000 < plan.epsilon < math.inf
    assert list(plan.cross_checks) == ["dp-accounting rdp"]


# -- errors -----------------------------------------------------------------------------------

SAMPLE = {"delta": 1e-5, "rounds": 10, "local_steps": 10, "sample_rate": 0.01}
CLIENT = {"delta": 1e-5, "rounds": 10, "num_clients": 100, "clients_per_round": 10}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, "exactly one of target epsilon"),
        ({"target_epsilon": 1.0, "noise_multiplier": 1.0}, "got both"),
        ({"target_epsilon": 0.0}, "target epsilon must be a finite number > 0"),
        ({"target_epsilon": -1.0}, "target epsilon must be a finite number > 0"),
        ({"target_epsilon": math.nan}, "target epsilon must be a finite number > 0"),
        ({"noise_multiplier": -0.5}, "noise multiplier must be a finite number >= 0"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.0}, r"sample rate q must be in \(0, 1\]"),
        ({"noise_multiplier": 1.0, "sample_rate": 1.5}, r"sample rate q must be in \(0, 1\]"),
        ({"noise_multiplier": 1.0, "sample_rate": None}, "give the sample rate q"),
        ({"noise_multiplier": 1.0, "batch_size": 8, "examples_per_client": 100}, "not both"),
        (
            {"noise_multiplier": 1.0, "sample_rate": None, "batch_size": 8},
            "needs both batch size and examples",
        ),
        (
            {
                "noise_multiplier": 1.0,
                "sample_rate": None,
                "batch_size": 8,
                "examples_per_client": 0,
            },
            "examples per client must be an integer >= 1",
        ),
        ({"noise_multiplier": 1.0, "rounds": 0}, "rounds must be an integer >= 1"),
        ({"noise_multiplier": 1.0, "local_steps": True}, "local steps must be an integer"),
        ({"noise_multiplier": 1.0, "delta": 1.0}, r"delta must be in \(0, 1\)"),
        ({"noise_multiplier": 1.0, "accountant": "gdp"}, "unknown sample-level accountant"),
        (
            {"target_epsilon": 0.1, "sample_rate": 1.0, "local_steps": 1000, "accountant": "rdp"},
            "out of reach: even noise multiplier 1000 .*fewer rounds or local steps, or a "
            "smaller q",
        ),
    ],
)
def test_sample_level_errors_are_one_line(changes, message):
    with pytest.raises(ConfigError, match=message) as info:
        plan_sample_level(**{**SAMPLE, **changes})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, "exactly one of target epsilon"),
        ({"target_epsilon": 2.0, "noise_multiplier": 1.0}, "got both"),
        ({"target_epsilon": 0}, "target epsilon must be a finite number > 0"),
        ({"noise_multiplier": math.inf}, "client noise multiplier must be a finite number"),
        ({"noise_multiplier": 1.0, "num_clients": 0}, "number of clients must be an integer"),
        ({"noise_multiplier": 1.0, "clients_per_round": 0}, "clients per round must be"),
        ({"noise_multiplier": 1.0, "clients_per_round": 101}, "cannot exceed the number"),
        ({"noise_multiplier": 1.0, "rounds": 2.5}, "rounds must be an integer"),
        ({"noise_multiplier": 1.0, "sampling": "uniform"}, "unknown client sampling"),
        ({"noise_multiplier": 1.0, "accountant": "prv"}, "unknown client-level accountant"),
        (
            {"noise_multiplier": 1.0, "sampling": "fixed", "accountant": "pld"},
            "cannot account fixed-size client sampling",
        ),
        (
            {"target_epsilon": 1.0, "rounds": 100000, "num_clients": 10, "clients_per_round": 10},
            "out of reach: even client noise multiplier 1000 .*plan fewer rounds",
        ),
    ],
)
def test_client_level_errors_are_one_line(changes, message):
    with pytest.raises(ConfigError, match=message) as info:
        plan_client_level(**{**CLIENT, **changes})
    assert "\n" not in str(info.value)


def test_targets_and_values_past_the_ceiling_are_left_to_rdp():
    # PRV and PLD take minutes (PLD can exhaust memory) at such epsilons: RDP answers alone
    sample = plan_sample_level(
        delta=1e-5, rounds=10, local_steps=10, sample_rate=1.0, target_epsilon=2 * PRV_CEILING
    )
    assert sample.accountant == "opacus rdp" and sample.epsilon <= 2 * PRV_CEILING
    assert any("solved by RDP" in n for n in sample.notes)
    for changes in ({"target_epsilon": 1e4}, {"noise_multiplier": 0.05}):
        client = plan_client_level(
            delta=1e-5,
            rounds=10,
            num_clients=10,
            clients_per_round=10,
            accountant="pld",
            **changes,
        )
        assert client.accountant == "dp-accounting rdp" and client.cross_checks == {}
        assert PRV_CEILING < client.epsilon <= changes.get("target_epsilon", math.inf)
