"""Per-client accounting: golden values, agreement with dp-accounting, budgets that persist."""

from __future__ import annotations

import math

import pytest
from training_setup import current_adapter, tiny_host

from fedlr.client.training import LocalTrainer
from fedlr.errors import ConfigError
from fedlr.privacy.sample_level import (
    BudgetExhaustedError,
    PrivacyLedger,
    dp_accounting_epsilon,
    noise_for_target,
    opacus_epsilon,
)
from fedlr.privacy.solve import REL_TOL
from fedlr.settings.specs import DPConfig, TrainConfig

# ../shared/reference/privacy.md, "Golden values"
OPACUS_GOLDEN = [
    ("rdp", [(1.5, 0.04, 2250)], 1e-5, 7.32911117143),
    ("prv", [(1.5, 0.04, 2249)], 1e-5, 6.777395712150674),
    ("prv", [(0.8, 0.001, 100)], 1e-6, 0.2704034),
    ("prv", [(1.5, 0.05, 1000)], 1e-6, 6.2099692),
    ("prv", [(2.0, 0.05, 1000)], 1e-6, 4.1727999),
    ("prv", [(1.0, 0.01, 1000)], 1e-5, 1.8384),
    ("prv", [(1.0, 0.1, 100)], 1e-4, 5.9764),
    ("prv", [(1.0, 0.01, 500), (2.0, 0.02, 500)], 1e-5, 1.6252),
]
DP_ACCOUNTING_GOLDEN = [
    # TF-Privacy: N=60000, B=150, 15 epochs -> q = 0.0025, 6000 steps
    ("rdp", [(1.3, 150 / 60000, 15 * 400)], 1e-5, 0.7242234026),
    ("rdp", [(1.0, 100 / 100000, 30 * 1000)], 1e-7, 1.4154988495),
    ("rdp", [(1.0, 0.01, 1000)], 1e-5, 2.1014),
    ("pld", [(1.0, 0.01, 1000)], 1e-5, 1.8282),
    ("rdp", [(1.0, 0.1, 100)], 1e-4, 6.8216),
    ("pld", [(1.0, 0.1, 100)], 1e-4, 5.9659),
    ("rdp", [(1.0, 0.01, 500), (2.0, 0.02, 500)], 1e-5, 1.8946),
    ("pld", [(1.0, 0.01, 500), (2.0, 0.02, 500)], 1e-5, 1.6151),
]


@pytest.mark.parametrize(("accountant", "history", "delta", "expected"), OPACUS_GOLDEN)
def test_opacus_accountant_reproduces_golden_values(accountant, history, delta, expected):
    digits = min(len(str(expected).split(".")[1]), 8)  # as many digits as the reference gives
    assert opacus_epsilon(history, delta, accountant) == pytest.approx(expected, abs=10**-digits)


@pytest.mark.parametrize(("method", "history", "delta", "expected"), DP_ACCOUNTING_GOLDEN)
def test_cross_check_reproduces_golden_values(method, history, delta, expected):
    digits = min(len(str(expected).split(".")[1]), 8)  # as many digits as the reference gives
    value = dp_accounting_epsilon(history, delta, method)
    assert value == pytest.approx(expected, abs=10**-digits)


def test_a_noiseless_step_has_infinite_epsilon():
    assert opacus_epsilon([(0.0, 0.1, 1)], 1e-5) == math.inf
    assert dp_accounting_epsilon([(0.0, 0.1, 1)], 1e-5) == math.inf


@pytest.mark.parametrize(("accountant", "method"), [("prv", "pld"), ("rdp", "rdp")])
def test_a_clients_epsilon_after_several_rounds_matches_dp_accounting(accountant, method):
    host, data = tiny_host()
    start = current_adapter(host, 4)
    ledger = PrivacyLedger(accountant=accountant)
    for round_, sigma in enumerate((1.1, 1.1, 1.6)):
        dp = DPConfig(noise_multiplier=sigma, max_grad_norm=1.0, accountant=accountant)
        config = TrainConfig(local_steps=5 + round_, batch_size=3, dp=dp)
        LocalTrainer(host, config).train("c", start, data, rank=4, ledger=ledger, seed=round_)
        ledger = PrivacyLedger.from_dict(ledger.to_dict())  # persisted between rounds
    q = 3 / len(data)
    assert ledger.history == [(1.1, q, 11), (1.6, q, 7)]
    assert ledger.rounds == 3
    expected = dp_accounting_epsilon(ledger.history, 1e-5, method)
    assert ledger.epsilon(1e-5) == pytest.approx(expected, rel=0.01)


def test_a_client_refuses_the_round_that_would_pass_its_budget():
    host, data = tiny_host()
    start = current_adapter(host, 4)
    dp = DPConfig(noise_multiplier=1.5, max_epsilon=3.5)
    trainer = LocalTrainer(host, TrainConfig(local_steps=4, batch_size=3, dp=dp))
    ledger = PrivacyLedger()
    trained = 0
    with pytest.raises(BudgetExhaustedError, match=r"past its budget 3\.5") as caught:
        for round_ in range(10):
            trainer.train("c", start, data, rank=4, ledger=ledger, seed=round_)
            trained += 1
    assert "\n" not in str(caught.value)
    assert trained == 3  # eps after 1, 2, 3, 4 rounds: 2.15, 2.82, 3.36, 3.82
    assert ledger.rounds == trained  # the refused round recorded nothing
    assert ledger.epsilon(dp.delta) <= 3.5 < ledger.epsilon_after((1.5, 0.25, 4), dp.delta)


def test_target_epsilon_solves_sigma_once_for_the_planned_run():
    host, data = tiny_host()
    start = current_adapter(host, 4)
    rounds, steps, target = 3, 4, 4.0
    dp = DPConfig(target_epsilon=target, delta=1e-5)
    config = TrainConfig(local_steps=steps, batch_size=3, planned_rounds=rounds, dp=dp)
    ledger = PrivacyLedger()
    for round_ in range(rounds):
        LocalTrainer(host, config).train("c", start, data, rank=4, ledger=ledger, seed=round_)
    assert len({s for s, _, _ in ledger.history}) == 1
    assert ledger.steps == rounds * steps
    final = ledger.epsilon(dp.delta)
    assert final <= target  # never overshoots
    assert final == pytest.approx(target, rel=0.02)  # and wastes little


def test_noise_for_target_never_overshoots_and_is_minimal():
    """The shared solve (`fedlr.privacy.solve`): at the target or under, and a factor
    1 + REL_TOL less noise would miss it."""
    for target in (0.5, 2.0, 8.0):
        sigma = noise_for_target(target, 1e-5, 0.01, 1000)
        assert opacus_epsilon([(sigma, 0.01, 1000)], 1e-5) <= target
        assert opacus_epsilon([(sigma / (1 + REL_TOL), 0.01, 1000)], 1e-5) > target


def test_an_unreachable_target_is_a_config_error():
    with pytest.raises(ConfigError, match="no noise multiplier"):
        noise_for_target(1e-5, 1e-12, 1.0, 1000)


def test_a_tampered_ledger_is_refused():
    with pytest.raises(ConfigError, match="invalid segment"):
        PrivacyLedger.from_dict({"history": [[1.0, 1.5, 10]]})
