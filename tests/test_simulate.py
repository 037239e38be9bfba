"""`fedlr simulate` end to end on the tiny preset: the run-directory contract, exactness of each
round against the saved client updates, the PEFT export, resume after SIGKILL, and bad input."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlr.adapters import load_adapter, load_delta_weights
from fedlr.client.app import app as client_app
from fedlr.server.coordinator import Coordinator, Federation
from fedlr.server.rundir import RunDir
from fedlr.server.simulation import simulate
from fedlr.simconfig import SimulationConfig

METRIC_KEYS = {"round", "num_clients", "train_loss", "eval_loss", "eval_accuracy",
               "aggregation_residual", "bytes_up", "bytes_down", "seconds", "rejected"}
EXACT = ("flora", "ffa", "fedsvd")


def tiny_config(out: Path, strategy: str, **overrides) -> SimulationConfig:
    settings = dict(strategy=strategy, model="tiny", num_clients=4, clients_per_round=3,
                    rounds=2, ranks=[2, 4], local_steps=3, batch_size=8, lr=1e-2,
                    eval_examples=64, out=str(out), save_client_updates=True)
    return SimulationConfig.load(None, {**settings, **overrides})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-round run per strategy (ffa under DP), shared by the checks below."""
    out = {}
    for strategy in ("fedit", "flora", "ffa", "fedsvd", "fair"):
        dp = {"noise_multiplier": 0.8} if strategy == "ffa" else {}
        config = tiny_config(tmp_path_factory.mktemp(strategy) / "run", strategy, **dp)
        simulate(config, client_app)
        out[strategy] = config
    return out


def ideal_and_global(run: Path, round_: int):
    folder = run / "rounds" / f"{round_:04d}"
    glob = load_delta_weights(folder / "global.safetensors")
    clients = [load_adapter(p) for p in sorted((folder / "clients").glob("*.safetensors"))]
    total = sum(c.meta["num_examples"] for c in clients)
    ideal = {name: sum(c.meta["num_examples"] / total * c.delta_weights()[name] for c in clients)
             for name in glob}
    return ideal, glob


def relative(a: dict, b: dict) -> float:
    num = sum(float(torch.linalg.matrix_norm(a[k] - b[k])) ** 2 for k in a)
    den = sum(float(torch.linalg.matrix_norm(b[k])) ** 2 for k in b)
    return math.sqrt(num / den)


@pytest.mark.parametrize("strategy", ["fedit", "flora", "ffa", "fedsvd", "fair"])
def test_run_directory_follows_the_contract(runs, strategy):
    config = runs[strategy]
    run = Path(config.out)
    recorded = json.loads((run / "run.json").read_text())
    assert recorded["config"]["strategy"] == strategy and recorded["seed"] == 0
    assert {"torch", "flwr", "opacus", "peft"} <= set(recorded["versions"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert set(r) >= METRIC_KEYS
        assert r["num_clients"] == 3 and r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert 0.0 <= r["eval_accuracy"] <= 1.0
    for round_ in (1, 2):
        clients = list((run / "rounds" / f"{round_:04d}" / "clients").glob("*.safetensors"))
        assert len(clients) == 3
        assert all(load_adapter(c).meta["num_examples"] > 0 for c in clients)
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "metrics.png").stat().st_size > 0
    privacy = run / "privacy.json"
    if strategy == "ffa":
        data = json.loads(privacy.read_text())
        assert {"delta", "accountant", "max_epsilon", "clients"} <= set(data)
        for entry in data["clients"].values():
            assert {"noise_multiplier", "max_grad_norm", "sample_rate", "steps", "rounds",
                    "epsilon"} <= set(entry)
            assert entry["noise_multiplier"] == 0.8 and entry["epsilon"] > 0
        assert data["max_epsilon"] == max(e["epsilon"] for e in data["clients"].values())
    else:
        assert not privacy.exists()


@pytest.mark.parametrize("strategy", EXACT)
def test_each_round_of_an_exact_strategy_is_the_weighted_sum_of_its_client_updates(runs, strategy):
    run = Path(runs[strategy].out)
    for round_ in (1, 2):
        ideal, glob = ideal_and_global(run, round_)
        assert relative(glob, ideal) < 1e-4


@pytest.mark.parametrize("strategy", ["fedit", "fair"])
def test_the_reported_residual_is_the_one_recomputed_from_the_files(runs, strategy):
    run = Path(runs[strategy].out)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        ideal, glob = ideal_and_global(run, record["round"])
        recomputed = relative(glob, ideal)
        assert recomputed > 1e-6  # inexact strategies really miss the cross terms
        assert record["aggregation_residual"] == pytest.approx(recomputed, rel=1e-3)


@pytest.mark.parametrize("strategy", ["ffa", "flora"])
def test_the_exported_adapter_loads_with_peft_and_reproduces_the_final_eval(runs, strategy):
    from peft import PeftModel

    from fedlr.models import load_base_model, load_tokenizer

    config = runs[strategy]
    federation = Federation.build(config)
    coordinator = Coordinator(federation, RunDir(config.out))
    tensors, info = coordinator.run.load_checkpoint()
    from fedlr.strategies import GlobalState

    state = GlobalState.from_tensors(tensors, info["state"])
    batch = federation.data.heldout.batch(range(16))
    with torch.no_grad():
        expected = coordinator.eval_model(state)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).logits
        spec = federation.model.spec
        base = load_base_model(spec, load_tokenizer(spec))
        peft_model = PeftModel.from_pretrained(base, str(Path(config.out) / "adapter")).eval()
        logits = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def fedlr(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedlr.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


RESUME_ARGS = ["simulate", "--model", "tiny", "--strategy", "fedit", "--num-clients", "3",
               "--ranks", "2,4", "--rounds", "3", "--local-steps", "2", "--batch-size", "8",
               "--seed", "5"]


def test_sigkill_then_resume_ends_with_the_uninterrupted_adapter(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = fedlr(*RESUME_ARGS, "--out", str(whole))
    victim = fedlr(*RESUME_ARGS, "--out", str(killed))
    checkpoint = killed / "checkpoint" / "checkpoint.json"
    deadline = time.monotonic() + 300
    while not (checkpoint.exists() and json.loads(checkpoint.read_text())["round"] >= 1):
        assert victim.poll() is None, victim.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)  # the whole process group, Ray workers included
    victim.wait()
    assert json.loads(checkpoint.read_text())["round"] < 3
    _, err = done.communicate(timeout=600)
    assert done.returncode == 0, err
    resumed = fedlr(*RESUME_ARGS, "--out", str(killed), "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)
    rounds = [json.loads(line)["round"] for line in (killed / "metrics.jsonl").read_text()
              .splitlines()]
    assert rounds == [1, 2, 3]


def test_a_killed_dp_run_resumes_with_every_nodes_ledger_exact(tmp_path):
    """Each step a node ran is counted once: what it had recorded when the run was killed (maybe
    a round the server never checkpointed) plus one round per round left after the checkpoint;
    the server's privacy.json reports each node's own ledger."""
    from fedlr.node_privacy import NodeState

    out, args = tmp_path / "killed", [*RESUME_ARGS, "--noise-multiplier", "1.0"]
    victim = fedlr(*args, "--out", str(out))
    checkpoint = out / "checkpoint" / "checkpoint.json"
    deadline = time.monotonic() + 300
    while not (checkpoint.exists() and json.loads(checkpoint.read_text())["round"] >= 1):
        assert victim.poll() is None, victim.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    done_rounds = json.loads(checkpoint.read_text())["round"]
    at_kill = {c: NodeState(out / "nodes" / c).load() for c in ("0", "1", "2")}
    resumed = fedlr(*args, "--out", str(out), "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    privacy = json.loads((out / "privacy.json").read_text())
    for client, before in at_kill.items():
        final = NodeState(out / "nodes" / client).load()
        assert final.extends(before)
        assert final.rounds == before.rounds + 3 - done_rounds
        assert final.steps == 2 * final.rounds
        assert privacy["clients"][client]["history"] == [list(x) for x in final.history]
        assert privacy["clients"][client]["sampling"] == "poisson"


BAD = [
    (["--strategy", "fedprox"], "unknown strategy"),
    (["--rank", "0"], "ranks must be positive"),
    (["--num-clients", "3", "--clients-per-round", "5"], "clients_per_round 5"),
    (["--dataset", "./no/such/data.jsonl"], "dataset path not found"),
    (["--model", "./no/such/model"], "model path not found"),
    (["--noise-multiplier", "-1"], "noise_multiplier"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_and_touches_nothing(tmp_path, args, message):
    out = tmp_path / "run"
    proc = fedlr("simulate", "--model", "tiny", "--out", str(out), *args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_an_existing_run_directory_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    proc = fedlr("simulate", "--model", "tiny", "--out", str(out))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "already exists" in err and "Traceback" not in err
    assert (out / "metrics.jsonl").read_text() == "precious\n"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


def test_the_flwr_run_config_shipped_in_pyproject_is_a_valid_run():
    import tomllib

    from fedlr.server.app import config_from_run_config

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    flwr = pyproject["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "fedlr.server.app:app",
                                  "clientapp": "fedlr.client.app:app"}
    config, resume = config_from_run_config(flwr["config"])
    assert not resume
    assert config.ranks == [4, 8, 16] and config.clients_per_round is None
    assert config.out.startswith("runs/ffa-")
    assert config.sampled_per_round == config.num_clients == 8


@pytest.mark.parametrize(
    "scenario", sorted((Path(__file__).parents[1] / "simulations").glob("*.toml")),
    ids=lambda p: p.name,
)
def test_every_shipped_scenario_is_a_valid_configuration(scenario):
    config = SimulationConfig.load(scenario, {})
    assert config.rounds >= 1 and config.num_clients >= config.sampled_per_round


def test_flwr_run_serves_the_same_apps_and_run_directory(tmp_path):
    """`flwr run .` with the project's [tool.flwr.app] config, on Flower's managed local
    simulation SuperLink."""
    import psutil

    home, out = tmp_path / "flwr-home", tmp_path / "run"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local-in-memory:"\n'
        "options.num-supernodes = 3\n"
    )
    env = {**os.environ, "FLWR_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    settings = (f"model='tiny' num-clients=3 rounds=2 ranks='2,4' local-steps=2 "
                f"eval-examples=32 out='{out}'")
    flwr = str(Path(sys.executable).parent / "flwr")
    try:
        done = subprocess.run(
            [flwr, "run", str(Path(__file__).parents[1]), "local", "--run-config", settings,
             "--stream"], env=env, capture_output=True, text=True, timeout=600,
        )
    finally:  # the managed SuperLink outlives `flwr run`: stop everything started for this home
        for proc in psutil.process_iter(["cmdline"]):
            if str(home) in " ".join(proc.info["cmdline"] or []):
                for p in [*proc.children(recursive=True), proc]:
                    with contextlib.suppress(psutil.Error):
                        p.kill()
    assert done.returncode == 0, done.stdout + done.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(set(r) >= METRIC_KEYS for r in records)
    recorded = json.loads((out / "run.json").read_text())["config"]
    assert recorded["strategy"] == "ffa" and recorded["ranks"] == [2, 4]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_compressed_flora_export_loses_exactly_the_energy_it_reports(runs):
    """||dW - dW_r||^2 = (1 - energy) ||dW||^2 per module (Eckart-Young), and rank <= r."""
    from fedlr.server.export import final_adapter
    from fedlr.strategies import GlobalState

    config = runs["flora"]
    federation = Federation.build(config)
    tensors, info = RunDir(config.out).load_checkpoint()
    state = GlobalState.from_tensors(tensors, info["state"])
    exact, _ = final_adapter(federation.strategy, state, None)
    compressed, facts = final_adapter(federation.strategy, state, 2)
    assert facts["ranks"] == [2]
    full, cut = exact.delta_weights(), compressed.delta_weights()
    for name, energy in facts["energy_kept"].items():
        lost = float(torch.linalg.matrix_norm(full[name] - cut[name])) ** 2
        total = float(torch.linalg.matrix_norm(full[name])) ** 2
        assert 0.0 < energy <= 1.0
        assert lost == pytest.approx((1 - energy) * total, rel=1e-3, abs=1e-12)
