"""The client-level canary audit runs the server's own DP-FedAvg: its lower bound stays under the
accounted epsilon, and the same audit of the mechanism without noise certifies far more."""

from __future__ import annotations

import pytest
import torch

from fedlr.errors import ConfigError
from fedlr.lora.strategies import FederationSpec, ModuleShape
from fedlr.privacy.client_audit import audit_state, client_level_audit
from fedlr.privacy.client_level import ClientDPConfig

SPEC = FederationSpec(modules={"q": ModuleShape(96, 128), "v": ModuleShape(128, 96)},
                      ranks={"0": 8, "1": 4}, extras={"head": (4, 32)})
POPULATION = dict(num_clients=100, per_round=20, rounds=5, canaries=1000)


def audit(strategy: str, z: float, sampling: str = "poisson", seed: int = 0,
          head: str | None = None) -> dict:
    extras = {"head": torch.zeros(4, 32)}
    strat, state = audit_state(SPEC, strategy, extras, hetero="hetlora", head=head, seed=0)
    return client_level_audit(strat, state, ClientDPConfig(z, 0.5, sampling), seed=seed,
                              **POPULATION)


@pytest.mark.parametrize("strategy", ["ffa", "fedit", "fedsvd"])
def test_the_bound_stays_under_the_claim_and_catches_the_mechanism_without_noise(strategy):
    noisy, off = audit(strategy, 4.0), audit(strategy, 0.0)
    assert 0 <= noisy["epsilon_lower_bound"] <= noisy["epsilon_claimed"]
    assert off["epsilon_lower_bound"] > 3 * noisy["epsilon_claimed"]
    assert off["epsilon_lower_bound"] <= off["ceiling"]


def test_fedsvd_releases_a_function_of_what_ffa_releases():
    """Why FedSVD is audited in FFA-LoRA's form: with the same updates and the same noise draw,
    FedSVD's private round gives the same product B A as FFA-LoRA's (B alone, head frozen),
    only refactored by the SVD, which is post-processing."""
    from federation import client_updates

    from fedlr.privacy.client_level import dp_fedavg

    config = ClientDPConfig(1.0, 0.5)
    released = {}
    for name in ("fedsvd", "ffa"):
        strategy, state = audit_state(SPEC, name, {"head": torch.zeros(4, 32)},
                                      hetero="hetlora", head="freeze", seed=0)
        updates = client_updates(strategy, state, torch.Generator().manual_seed(3))
        new, _ = dp_fedavg(strategy, state, updates, config, expected_clients=2,
                           generator=torch.Generator().manual_seed(7))
        released[name] = {m: x.dense() for m, x in new.lora.items()}
        assert torch.equal(new.extras["head"], state.extras["head"])
    for module, product in released["ffa"].items():
        torch.testing.assert_close(released["fedsvd"][module], product, rtol=1e-5, atol=1e-6)
        assert float(product.abs().max()) > 0


def test_fixed_size_sampling_is_not_audited_as_poisson():
    with pytest.raises(ConfigError, match="Poisson sampling"):
        audit("ffa", 1.0, sampling="fixed")
