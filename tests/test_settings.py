"""Every setting is declared once (`fedlr.simconfig.SimulationConfig`), and every front end (the
`fedlr simulate` options, a TOML scenario, the `flwr run` config) accepts the same settings with the
same defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlr.simconfig import SimulationConfig

ROOT = Path(__file__).resolve().parents[1]


def test_the_flwr_run_config_shipped_in_pyproject_is_a_valid_run():
    import tomllib

    from fedlr.server.app import config_from_run_config

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flwr = pyproject["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "fedlr.server.app:app",
                                  "clientapp": "fedlr.client.app:app"}
    config, resume = config_from_run_config(flwr["config"])
    assert not resume
    assert config.ranks == [4, 8, 16] and config.clients_per_round is None
    assert config.out.startswith("runs/ffa-")
    assert config.sampled_per_round == config.num_clients == 8


@pytest.mark.parametrize(
    "scenario", sorted((ROOT / "simulations").glob("*.toml")),
    ids=lambda p: p.name,
)
def test_every_shipped_scenario_is_a_valid_configuration(scenario):
    config = SimulationConfig.load(scenario, {})
    assert config.rounds >= 1 and config.num_clients >= config.sampled_per_round


