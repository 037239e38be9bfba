"""The client-level canary audit runs the server's own DP-FedAvg: its lower bound stays under the
accounted epsilon, and the same audit of the mechanism without noise certifies far more."""

from __future__ import annotations

import pytest
import torch

from fedlr.client_dp import ClientDPConfig
from fedlr.client_dp_audit import audit_state, client_level_audit
from fedlr.errors import ConfigError
from fedlr.strategies import FederationSpec, ModuleShape

SPEC = FederationSpec(modules={"q": ModuleShape(96, 128), "v": ModuleShape(128, 96)},
                      ranks={"0": 8, "1": 4}, extras={"head": (4, 32)})
POPULATION = dict(num_clients=100, per_round=20, rounds=5, canaries=1000)


def audit(strategy: str, z: float, sampling: str = "poisson", seed: int = 0,
          head: str | None = None) -> dict:
    extras = {"head": torch.zeros(4, 32)}
    strat, state = audit_state(SPEC, strategy, extras, hetero="hetlora", head=head, seed=0)
    return client_level_audit(strat, state, ClientDPConfig(z, 0.5, sampling), seed=seed,
                              **POPULATION)


@pytest.mark.parametrize("strategy", ["ffa", "fedit"])
def test_the_bound_stays_under_the_claim_and_catches_the_mechanism_without_noise(strategy):
    noisy, off = audit(strategy, 4.0), audit(strategy, 0.0)
    assert 0 <= noisy["epsilon_lower_bound"] <= noisy["epsilon_claimed"]
    assert off["epsilon_lower_bound"] > 3 * noisy["epsilon_claimed"]
    assert off["epsilon_lower_bound"] <= off["ceiling"]


def test_fedsvd_is_audited_in_its_pre_svd_form():
    """FedSVD's release is FFA-LoRA's (B alone, head frozen by default) followed by an SVD."""
    fedsvd = audit("fedsvd", 1.0, seed=4)
    ffa = audit("ffa", 1.0, seed=4, head="freeze")
    assert fedsvd["epsilon_lower_bound"] == ffa["epsilon_lower_bound"]
    assert fedsvd["correct"] == ffa["correct"]


def test_fixed_size_sampling_is_not_audited_as_poisson():
    with pytest.raises(ConfigError, match="Poisson sampling"):
        audit("ffa", 1.0, sampling="fixed")
