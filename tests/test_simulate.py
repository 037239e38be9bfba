"""`fedlr simulate` end to end on the tiny preset: the run-directory contract, exactness of each
round against the saved client updates, the PEFT export, resume after SIGKILL, and bad input."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
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
from fedlr.federation import Federation
from fedlr.server.coordinator import Coordinator
from fedlr.server.rundir import RunDir
from fedlr.server.simulation import simulate
from fedlr.server.timeline import PHASES
from fedlr.settings.schema import SimulationConfig

pytestmark = pytest.mark.e2e  # simulations, subprocesses and deployments

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
    spans = json.loads((run / "timeline.json").read_text())["spans"]
    assert set(spans) == set(PHASES)
    ready = max(spans[name]["end"] for name in ("federation", "nodes", "ray", "flower"))
    assert ready <= spans["rounds"]["start"] + 1e-6  # every start-up phase ended before round 1
    assert spans["rounds"]["seconds"] >= sum(r["seconds"] for r in records)
    assert spans["start-up"]["end"] <= spans["federation"]["start"] < spans["nodes"]["start"]
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


def test_flexlora_with_two_of_three_ranks_per_round_runs_to_the_end(tmp_path):
    """Rounds whose clients hold less total rank than the largest client: the global adapter
    keeps its rank, every client gets its own, and the run finishes."""
    from fedlr.lora.strategies import GlobalState

    config = tiny_config(tmp_path / "run", "fedit", hetero="flexlora", ranks=[4, 8, 16],
                         num_clients=3, clients_per_round=2, rounds=5, local_steps=2,
                         save_client_updates=False)
    simulate(config, client_app)
    assert [r["round"] for r in RunDir(config.out).read_metrics()] == [1, 2, 3, 4, 5]
    federation = Federation.build(config)
    tensors, info = RunDir(config.out).load_checkpoint()
    state = GlobalState.from_tensors(tensors, info["state"])
    assert all(x.rank == 16 for x in state.lora.values())
    for client, rank in federation.strategy.spec.ranks.items():
        down = federation.strategy.downlink(state, client)
        assert all(f.rank == rank for f in down.lora.values())


@pytest.mark.parametrize("strategy", ["fedit", "flora"])
def test_the_batched_engine_gives_the_per_client_engines_run(runs, strategy, tmp_path):
    """The shared runs train with the default engine, batched (mixed ranks 2/4 in groups);
    the same run client by client ends with the same client updates and global adapters, round
    after round (float32: within 1e-5), and the same metrics."""
    batched = runs[strategy]
    assert batched.training_engine == "batched"
    single = tiny_config(tmp_path / "run", strategy, engine="per-client")
    simulate(single, client_app)
    for round_ in (1, 2):
        folders = [Path(c.out) / "rounds" / f"{round_:04d}" for c in (batched, single)]
        files = [sorted(f.rglob("*.safetensors")) for f in folders]
        assert [p.relative_to(folders[0]) for p in files[0]] == [
            p.relative_to(folders[1]) for p in files[1]]
        assert len(files[0]) == 4  # the global adapter and 3 clients' updates
        for a, b in zip(*files, strict=True):
            mine, theirs = load_file(a), load_file(b)
            for key, t in theirs.items():
                torch.testing.assert_close(mine[key], t, rtol=0, atol=1e-5)
    records = [RunDir(c.out).read_metrics() for c in (batched, single)]
    for a, b in zip(*records, strict=True):
        assert a["accepted"] == b["accepted"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-5)


def test_the_reported_accuracy_is_the_full_held_out_splits_within_sampling_error(runs):
    """The held-out split of the built-in task is in label order; the evaluated subset is
    stratified, so its accuracy estimates the whole split's, and run.json says what it covers."""
    from dataclasses import replace

    from fedlr.evaluation import evaluate
    from fedlr.lora.strategies import GlobalState

    config = runs["fedit"]
    recorded = json.loads((Path(config.out) / "run.json").read_text())["evaluation"]
    federation = Federation.build(config)
    labels = federation.data.data.label_names
    assert recorded["labels"] == list(labels) and recorded["classes"] == len(labels) == 14
    assert recorded["classes_evaluated"] == 14 and recorded["examples"] == 64
    assert 0 < recorded["chance_accuracy"] < 0.2 and "accuracy" in recorded["round_0"]
    full = Federation.build(replace(config, eval_examples=10_000))
    n = recorded["heldout_examples"]
    assert len(full.data.heldout) == n > 64
    tensors, info = RunDir(config.out).load_checkpoint()
    state = GlobalState.from_tensors(tensors, info["state"])
    model = Coordinator(full, RunDir(config.out)).eval_model(state)
    whole = evaluate(model, full.data.heldout, "classification")["accuracy"]
    reported = RunDir(config.out).read_metrics()[-1]["eval_accuracy"]
    stderr = math.sqrt(max(whole * (1 - whole), 0.01) / 64 * (1 - 64 / n))
    assert abs(reported - whole) < 3 * stderr


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

    from fedlr.models.hosts import load_base_model, load_tokenizer

    config = runs[strategy]
    federation = Federation.build(config)
    coordinator = Coordinator(federation, RunDir(config.out))
    tensors, info = coordinator.run.load_checkpoint()
    from fedlr.lora.strategies import GlobalState

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


PREDICT_TEXTS = ["open a socket and connect to the server", "parse a json document",
                 "a thread pool runs tasks concurrently"]


def server_predictions(config, texts) -> list[str]:
    """What the run's own evaluation model predicts for `texts`, as label names."""
    from fedlr.lora.strategies import GlobalState

    federation = Federation.build(config)
    tensors, info = RunDir(config.out).load_checkpoint()
    model = Coordinator(federation, RunDir(config.out)).eval_model(GlobalState.from_tensors(
        tensors, info["state"]))
    batch = federation.model.tokenizer(texts, padding=True, truncation=True,
                                       max_length=config.max_length, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    names = federation.data.data.label_names
    return [names[int(i)] for i in logits.argmax(-1)]


def test_the_export_names_its_classes_and_fedlr_predict_prints_them(runs):
    from transformers import AutoConfig

    from fedlr.predict import classify, load_exported

    config = runs["ffa"]
    folder = Path(config.out) / "adapter"
    labels = list(Federation.build(config).data.data.label_names)
    saved = AutoConfig.from_pretrained(folder)
    assert saved.num_labels == len(labels) == 14
    assert [saved.id2label[i] for i in range(14)] == labels
    assert saved.label2id == {name: i for i, name in enumerate(labels)}
    expected = server_predictions(config, PREDICT_TEXTS)
    ranked = classify(load_exported(folder), PREDICT_TEXTS)
    assert [r[0][0] for r in ranked] == expected
    assert all(sum(p for _, p in r) <= 1 + 1e-6 for r in ranked)
    proc = fedlr("predict", str(folder), PREDICT_TEXTS[0], "--top", "2")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert expected[0] in out


def test_an_adapter_loads_as_the_readme_shows_without_a_label_count(tmp_path):
    """A base from a directory, loaded with the export's config: nothing guessed."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from fedlr.models.hosts import load_base_model, load_tokenizer
    from fedlr.settings.specs import ModelSpec

    spec = ModelSpec(name="tiny", num_labels=14)
    tokenizer = load_tokenizer(spec)
    load_base_model(spec, tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    config = tiny_config(tmp_path / "run", "fedit", model=str(tmp_path / "base"), rounds=1,
                         clients_per_round=2, save_client_updates=False)
    simulate(config, client_app)
    adapter = Path(config.out) / "adapter"
    base = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "base", config=AutoConfig.from_pretrained(adapter))
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    batch = tokenizer(PREDICT_TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        names = [model.config.id2label[int(i)] for i in model(**batch).logits.argmax(-1)]
    assert names == server_predictions(config, PREDICT_TEXTS)


def fedlr(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedlr.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


RESUME_ARGS = ["simulate", "--model", "tiny", "--strategy", "fedit", "--num-clients", "3",
               "--ranks", "2,4", "--rounds", "3", "--local-steps", "2", "--batch-size", "8",
               "--seed", "5"]


def checkpointed_round(run: Path) -> int:
    checkpoint = run / "checkpoint" / "checkpoint.json"
    return json.loads(checkpoint.read_text())["round"] if checkpoint.exists() else 0


def wait_for(condition, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def sigkill_after_round_1(victim: subprocess.Popen, run: Path) -> None:
    """SIGKILL a `fedlr simulate` process group, Ray workers included, once round 1 is
    checkpointed."""
    wait_for(lambda: checkpointed_round(run) >= 1 or victim.poll() is not None)
    assert victim.poll() is None, victim.communicate()
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()


def test_sigkill_then_resume_ends_with_the_uninterrupted_adapter(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = fedlr(*RESUME_ARGS, "--out", str(whole))
    sigkill_after_round_1(fedlr(*RESUME_ARGS, "--out", str(killed)), killed)
    assert checkpointed_round(killed) < 3
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


def test_a_dp_run_killed_before_its_checkpoint_counts_every_step_once(runs, tmp_path):
    """A node saves its ledger before it replies, so a kill leaves the nodes ahead of the
    server's checkpoint. Here the whole 2-round DP run, its checkpoint gone: resuming trains both
    rounds again (the same clients: sampling is seeded), and every node's ledger ends with its
    earlier rounds and the new ones, each counted once, as privacy.json reports."""
    from fedlr.privacy.node import NodeState

    run = tmp_path / "run"
    shutil.copytree(runs["ffa"].out, run)
    shutil.rmtree(run / "checkpoint")
    before = {p.name: NodeState(p).load() for p in (run / "nodes").iterdir()}
    assert before and all(b.rounds >= 1 for b in before.values())
    simulate(tiny_config(run, "ffa", noise_multiplier=0.8), client_app, resume=True)
    privacy = json.loads((run / "privacy.json").read_text())
    for client, earlier in before.items():
        final = NodeState(run / "nodes" / client).load()
        assert final.extends(earlier) and final.rounds == 2 * earlier.rounds
        assert final.steps == 3 * final.rounds  # local_steps 3 in every round, none lost
        assert privacy["clients"][client]["history"] == [list(x) for x in final.history]
        assert privacy["clients"][client]["sampling"] == "poisson"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("whole") / "run", "fedit",
                         save_client_updates=False)
    simulate(config, client_app)
    return Path(config.out)


def keep_only(run: Path, kept: list[str], metrics_lines: int = 0) -> None:
    """The run directory as a kill left it: every write is atomic, so a kill leaves a prefix of
    the run's writes (run.json; per round: the global adapter, metrics, checkpoint; adapter/)."""
    for path in sorted(run.rglob("*"), reverse=True):
        relative = str(path.relative_to(run))
        if path.is_file() and relative not in kept:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    if metrics_lines:
        lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)[:metrics_lines]
        (run / "metrics.jsonl").write_text("".join(lines))


KILL_POINTS = {
    "before anything was written": ([], 0),
    "after round 1's adapter file": (["run.json", "rounds/0001/global.safetensors"], 0),
    "after round 1's metrics": (["run.json", "rounds/0001/global.safetensors",
                                 "metrics.jsonl"], 1),
    "after the last checkpoint": (None, 0),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_run_killed_at_any_write_resumes_to_the_uninterrupted_adapter(uninterrupted,
                                                                       tmp_path, point):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    kept, lines = KILL_POINTS[point]
    if kept is None:  # everything but the export, written after the last round
        shutil.rmtree(run / "adapter")
    else:
        keep_only(run, kept, lines)
    config = tiny_config(run, "fedit", save_client_updates=False)
    simulate(config, client_app, resume=True)
    a = load_file(str(uninterrupted / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)
    assert [r["round"] for r in RunDir(run).read_metrics()] == [1, 2]


def flower_and_ray_processes() -> set[int]:
    import psutil

    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if any(k in line for k in ("raylet", "gcs_server", "ray::", "default_worker.py")):
            found.add(proc.pid)
    return found


def test_ctrl_c_stops_the_run_within_seconds_and_resume_finishes_it(tmp_path):
    """SIGINT before round 1, during a round and between rounds: each time the process ends
    within 15 s with exit code 130, one line and no traceback, and no Flower or Ray process is
    left; --resume then continues."""
    out = tmp_path / "run"
    # rounds of a second or more (60 steps), so that "a second into the next" is inside a round
    # and some rounds are always left after it, however fast the machine
    args = ["simulate", "--model", "tiny", "--strategy", "fedit", "--num-clients", "3",
            "--ranks", "2,4", "--rounds", "5", "--local-steps", "60", "--out", str(out)]
    # a point in this process's life: run.json written, or one more round checkpointed (then,
    # for "during a round", a second into the next)
    points = [("before round 1", None, 0.0), ("during a round", 1, 1.0), ("between rounds", 1, 0.0)]
    before = flower_and_ray_processes()
    for i, (point, rounds_more, delay) in enumerate(points):
        start = checkpointed_round(out)
        proc = fedlr(*args, *(["--resume"] if i else []))

        def ready(start=start, rounds_more=rounds_more) -> bool:
            if rounds_more is None:
                return (out / "run.json").exists()
            return checkpointed_round(out) >= start + rounds_more

        wait_for(lambda: ready() or proc.poll() is not None)  # noqa: B023
        time.sleep(delay)
        assert proc.poll() is None, f"{point}: the run ended before the signal"
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - sent < 15, point
        assert proc.returncode == 130, (point, err)
        assert "Traceback" not in err and f"--out {out} --resume" in err, (point, err)
        wait_for(lambda: not flower_and_ray_processes() - before, 10)
    done = fedlr(*args, "--resume")
    _, err = done.communicate(timeout=600)
    assert done.returncode == 0, err
    assert [r["round"] for r in RunDir(out).read_metrics()] == [1, 2, 3, 4, 5]


def test_sigterm_during_a_round_stops_the_run_as_ctrl_c_does(tmp_path):
    """SIGTERM (what a scheduler or `kill` sends) ends a run mid-round with exit code 143 and
    the line to resume with, Ray's processes included: Ray's own SIGTERM handler, installed as
    Ray starts, does not replace fedlr's."""
    out = tmp_path / "run"
    before = flower_and_ray_processes()
    proc = fedlr("simulate", "--model", "tiny", "--strategy", "fedit", "--num-clients", "3",
                 "--ranks", "2,4", "--rounds", "5", "--local-steps", "60", "--out", str(out))
    wait_for(lambda: checkpointed_round(out) >= 1 or proc.poll() is not None)
    time.sleep(1.0)
    assert proc.poll() is None, "the run ended before the signal"
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 15
    assert proc.returncode == 143, err
    assert "Traceback" not in err and f"--out {out} --resume" in err, err
    wait_for(lambda: not flower_and_ray_processes() - before, 10)


BAD = [
    (["--strategy", "fedprox"], "unknown strategy"),
    (["--rank", "0"], "ranks must be positive"),
    (["--num-clients", "3", "--clients-per-round", "5"], "--clients-per-round 5"),
    (["--dataset", "./no/such/data.jsonl"], "dataset path not found"),
    (["--model", "./no/such/model"], "model path not found"),
    (["--noise-multiplier", "-1"], "--noise-multiplier"),
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
    from fedlr.lora.strategies import GlobalState
    from fedlr.server.export import final_adapter

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


def test_a_failed_round_is_recorded_and_the_run_goes_on(tmp_path):
    """Every update above max_update_norm: both rounds fail with their reasons, the adapter
    carries over unchanged, and the run still ends with its export."""
    config = tiny_config(tmp_path / "run", "ffa", max_update_norm=1e-12, save_client_updates=False)
    simulate(config, client_app)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert "0 valid update(s)" in record["round_failed"]
        assert record["num_accepted"] == 0
        assert all("exceeds max_update_norm" in r["reason"] for r in record["rejected"])
    initial = load_delta_weights(tmp_path / "run" / "rounds" / "0001" / "global.safetensors")
    final = load_delta_weights(tmp_path / "run" / "rounds" / "0002" / "global.safetensors")
    assert all(torch.equal(initial[n], final[n]) for n in initial)
    assert all(float(dw.abs().max()) == 0 for dw in final.values())  # B starts at zero
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
