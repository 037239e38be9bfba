"""Every setting is declared once (`fedlr.settings.schema.SimulationConfig`), and every front
end (the `fedlr simulate` options, a TOML scenario, the `flwr run` config) accepts the same
settings with the same defaults."""

from __future__ import annotations

import json
import tomllib
from dataclasses import fields, replace
from pathlib import Path

import pytest
import typer

from fedlr.cli import app
from fedlr.errors import ConfigError
from fedlr.server.app import config_from_run_config
from fedlr.settings.schema import SECTIONS, SimulationConfig
from fedlr.settings.text import default_of, shown

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = fields(SimulationConfig)


def defaults() -> SimulationConfig:
    return replace(SimulationConfig.load(None, {}), out=None)


def test_every_setting_has_help_and_a_section():
    for f in SETTINGS:
        assert f.metadata["help"].strip(), f.name
        assert f.metadata["section"] in SECTIONS, f.name


def test_fedlr_simulate_has_one_option_per_setting_with_its_default():
    command = typer.main.get_command(app).commands["simulate"]
    options = {p.name: p for p in command.params if p.name not in ("config", "resume", "help")}
    assert sorted(options) == sorted(f.name for f in SETTINGS)
    for f in SETTINGS:
        option = options[f.name]
        assert f"--{f.name.replace('_', '-')}" in option.opts, f.name
        assert option.show_default == shown(default_of(f)), f.name
        assert option.help == f.metadata["help"]


def test_the_flwr_run_config_lists_every_setting_at_its_default():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert sorted(config) == sorted([f.name.replace("_", "-") for f in SETTINGS] + ["resume"])
    loaded, resume = config_from_run_config(config)
    assert not resume
    assert replace(loaded, out=None) == defaults()


def test_a_toml_file_takes_every_setting_flat_or_in_its_section(tmp_path):
    flat, grouped = {}, {}
    for f in SETTINGS:
        value = default_of(f)
        if value is None:
            continue  # TOML has no null: an unset setting is left out
        flat[f.name] = value
        grouped.setdefault(f.metadata["section"], {})[f.name] = value
    for name, data in (("flat", flat), ("grouped", grouped)):
        path = tmp_path / f"{name}.toml"
        path.write_text(toml(data))
        assert replace(SimulationConfig.load(path, {}), out=None) == defaults(), name


def test_a_setting_in_the_wrong_section_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[training]\nrounds = 3\n")
    with pytest.raises(ConfigError, match=r"rounds belongs in \[federation\], not \[training\]"):
        SimulationConfig.load(path, {})


def toml(data: dict) -> str:
    """A small TOML writer for flat values and one level of tables."""
    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()
    top = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{n} = {value(x)}" for n, x in v.items())
              for k, v in data.items() if isinstance(v, dict)]
    return "\n".join(top + tables) + "\n"


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




@pytest.mark.parametrize("overrides,problem", [
    ({"strategy": "flora"}, "FLoRA stacks"),
    ({"strategy": "fair"}, "LoRA-FAIR"),
    ({"strategy": "fedit", "hetero": "flexlora"}, "FlexLoRA sums the products"),
    ({"strategy": "fedit", "hetero": "hetlora"}, "mixed ranks"),
    ({"save_client_updates": True}, "save_client_updates"),
    ({"secagg_bits": 16}, "secagg_bits must be one of"),
    ({"secagg_threshold": 0.4}, "secagg_threshold must be in"),
    ({"secagg_max_weight": 10**9}, "exceeds the"),
    ({"clients_per_round": 1}, "at least 2 clients per round"),
])
def test_secure_aggregation_settings_that_cannot_work_fail_before_any_work(overrides, problem):
    with pytest.raises(ConfigError, match=problem):
        SimulationConfig.load(None, {"secure_aggregation": True, **overrides})


def test_secure_aggregation_settings_without_it_are_named():
    with pytest.raises(ConfigError, match=r"secagg_neighbours.*only apply with secure_aggregation"):
        SimulationConfig.load(None, {"secagg_neighbours": 4})


@pytest.mark.parametrize("overrides", [
    {"strategy": "fedit", "hetero": "hetlora", "ranks": [8]},  # equal ranks: FedAvg
    {"strategy": "fedit", "hetero": "hetlora-fedavg"},
    {"strategy": "fedsvd"},
    # client-level DP sums clipped changes: what it allows, secure aggregation allows
    {"strategy": "fedit", "hetero": "hetlora", "client_noise_multiplier": 1.0,
     "client_clip_norm": 1.0},
])
def test_secure_aggregation_accepts_what_is_a_sum(overrides):
    assert SimulationConfig.load(None, {"secure_aggregation": True, **overrides})


@pytest.mark.parametrize("overrides,problem", [
    ({"worker_cpus": 0}, "worker_cpus must be a positive number"),
    ({"worker_cpus": -1.0}, "worker_cpus must be a positive number"),
    ({"worker_cpus": float("nan")}, "worker_cpus must be a positive number"),
    ({"worker_gpus": -0.5}, "worker_gpus must be a number of GPUs"),
    ({"worker_gpus": 1.5}, "a fraction of one GPU, or a whole number"),
    ({"ray_address": ""}, "ray_address must be a Ray cluster address"),
    ({"ray_address": "head node:6379"}, "ray_address must be a Ray cluster address"),
])
def test_ray_settings_that_cannot_work_are_named(overrides, problem):
    with pytest.raises(ConfigError, match=problem):
        SimulationConfig.load(None, overrides)


@pytest.mark.parametrize("overrides", [
    {"ray_address": "auto", "worker_cpus": 2, "worker_gpus": 1},
    {"ray_address": "10.0.0.1:6379", "worker_cpus": 0.5, "worker_gpus": 0.25},
    {"worker_gpus": 0}, {"worker_gpus": 2},
])
def test_ray_settings_accept_what_ray_accepts(overrides):
    assert SimulationConfig.load(None, overrides)


def test_ray_settings_are_refused_under_flwr_run():
    """`flwr run` places the clients by its federation's options: a Ray setting would be
    silently ignored there."""
    with pytest.raises(ConfigError, match=r"\['ray_address', 'worker_cpus'\] apply to `fedlr "
                       r"simulate` only"):
        config_from_run_config({"ray-address": "auto", "worker-cpus": 2.0})


def test_a_run_resumes_on_another_ray_but_not_with_other_settings(tmp_path):
    """Where the clients run is no part of the run: a resume may change it, nothing else."""
    from fedlr.errors import FedlrError
    from fedlr.server.rundir import RunDir
    from fedlr.server.simulation import check_resume

    started = SimulationConfig.load(None, {"out": str(tmp_path)})
    recorded = started.to_dict()
    del recorded["worker_gpus"]  # a run recorded before the setting existed
    (tmp_path / "run.json").write_text(json.dumps({"config": recorded}))
    moved = replace(started, ray_address="auto", worker_cpus=2.0, worker_gpus=0.5)
    check_resume(RunDir(tmp_path), moved)
    with pytest.raises(FedlrError, match=r"differ from the run.*\['rounds'\]"):
        check_resume(RunDir(tmp_path), replace(moved, rounds=started.rounds + 1))
