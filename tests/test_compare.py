"""`fedlr compare`: the plan (one federation, privacy per level, references that see the same
examples), the results read back from run directories, and a whole comparison on the tiny
model that is killed and resumed."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from fedlr.comparison.plan import (
    PRIVACY_SETTINGS,
    ComparisonSettings,
    Level,
    PlannedRun,
    plan_comparison,
)
from fedlr.comparison.results import check_same_federation, rounds_to, spread
from fedlr.errors import ConfigError
from fedlr.privacy.planners import plan_client_level
from fedlr.settings.schema import SimulationConfig, read_toml

INF = math.inf


def base(tmp_path: Path, **overrides) -> SimulationConfig:
    values = dict(model="tiny", num_clients=6, clients_per_round=3, ranks=[2, 4], rounds=3,
                  local_steps=2, out=str(tmp_path / "cmp"))
    return SimulationConfig(**(values | overrides))


# -- the plan ----------------------------------------------------------------------------------

def test_every_run_differs_from_the_base_only_where_a_comparison_must(tmp_path):
    config = base(tmp_path)
    settings = ComparisonSettings(strategies=["fedit", "flora", "ffa"], epsilons=[INF, 4.0],
                                  seeds=[0, 7])
    runs = plan_comparison(config, settings, tmp_path / "cmp")
    assert len(runs) == 2 * 2 * (3 + 2)
    assert len({str(r.settings.out) for r in runs}) == len(runs)
    allowed = {"strategy", "seed", "out", *PRIVACY_SETTINGS}
    for run in runs:
        if run.method == "centralized":
            continue
        changed = {k for k, v in run.settings.to_dict().items() if config.to_dict()[k] != v}
        assert changed <= allowed, (run.key, changed)
        assert run.settings.seed == run.seed
        assert run.settings.target_epsilon == (None if math.isinf(run.level.epsilon)
                                               else run.level.epsilon)


def test_the_centralized_reference_sees_as_many_examples_as_a_round_of_clients(tmp_path):
    config = base(tmp_path, ranks=[2, 8, 4])
    runs = plan_comparison(config, ComparisonSettings(epsilons=[INF]), tmp_path / "cmp")
    central = next(r.settings for r in runs if r.method == "centralized")
    seen_by_clients = config.sampled_per_round * config.local_steps * config.batch_size
    assert central.num_clients == 1 and central.sampled_per_round == 1
    assert central.local_steps * central.batch_size == seen_by_clients
    assert central.rounds == config.rounds and central.ranks == [8]
    assert central.eval_examples == config.eval_examples


def test_client_level_solves_z_for_the_target_and_skips_what_cannot_be_wrapped(tmp_path):
    config = base(tmp_path)
    settings = ComparisonSettings(epsilons=[INF, 4.0], dp_level="client")
    runs = {r.key: r for r in plan_comparison(config, settings, tmp_path / "cmp", 0.5)}
    z = runs["client-eps-4/fedit/seed-0"].settings.client_noise_multiplier
    spent = plan_client_level(delta=config.delta, rounds=config.rounds, num_clients=6,
                              clients_per_round=3, noise_multiplier=z, cross_check=False).epsilon
    assert 3.9 < spent <= 4.0
    for method in ("flora", "fair", "centralized", "local-only"):
        assert runs[f"client-eps-4/{method}/seed-0"].settings is None
        assert runs[f"client-eps-4/{method}/seed-0"].skipped
    assert runs["non-private/flora/seed-0"].settings.client_clip_norm is None
    assert runs["client-eps-4/ffa/seed-0"].settings.client_clip_norm == 0.5


def test_a_base_that_sets_its_own_privacy_is_refused_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="noise_multiplier"):
        plan_comparison(base(tmp_path, noise_multiplier=1.0), ComparisonSettings(),
                        tmp_path / "cmp")
    with pytest.raises(ConfigError, match="--client-clip"):
        plan_comparison(base(tmp_path), ComparisonSettings(dp_level="client"), tmp_path / "c")


@pytest.mark.parametrize("values, problem", [
    ({"strategies": ["fedit", "nope"]}, "unknown"),
    ({"strategies": ["ffa", "ffa"]}, "twice"),
    ({"epsilons": [0.0]}, "positive"),
    ({"dp_level": "node"}, "dp_level"),
    ({"seeds": []}, "seeds"),
    ({"target_accuracy": 1.5}, "target_accuracy"),
])
def test_bad_comparison_settings_name_the_problem(values, problem):
    with pytest.raises(ConfigError, match=problem):
        ComparisonSettings(**values)


def test_a_toml_file_holds_both_the_runs_and_the_comparisons_settings(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text('[federation]\nstrategy = "fedit"\nrounds = 4\n[compare]\n'
                    'strategies = ["ffa", "fedsvd"]\nepsilons = [inf, 3]\nseeds = [0, 1, 2]\n')
    assert read_toml(path) == {"strategy": "fedit", "rounds": 4}
    settings = ComparisonSettings.load(path, {"seeds": [5]})
    assert settings.strategies == ["ffa", "fedsvd"] and settings.epsilons == [INF, 3.0]
    assert settings.seeds == [5]
    path.write_text("[compare]\nstrategy = 'ffa'\n")
    with pytest.raises(ConfigError, match="unknown"):
        ComparisonSettings.load(path, {})


@pytest.mark.parametrize("study", sorted((Path(__file__).parents[1] / "simulations" / "study")
                                         .glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_study_plans_its_runs(study, tmp_path):
    """A study file is a whole comparison: its runs plan without error, three seeds per cell,
    and the federated runs of a seed differ only in strategy and privacy."""
    config = SimulationConfig.load(study, {"out": str(tmp_path / "s")})
    settings = ComparisonSettings.load(study, {})
    runs = plan_comparison(config, settings, tmp_path / "s")
    assert len(settings.seeds) == 3 and config.rounds >= 10
    assert config.partition == "dirichlet:0.5" and config.ranks == [4, 8, 16]
    assert config.head == "train"  # the strategies differ in aggregation alone
    assert len(runs) == len(settings.epsilons) * 3 * (len(settings.strategies) + 2)


def test_a_rerun_with_other_settings_in_the_same_out_is_refused_before_any_work(tmp_path):
    from fedlr.cli.compare import record_plan

    out = tmp_path / "cmp"
    settings = ComparisonSettings(strategies=["ffa", "fedit"], epsilons=[INF, 3.0])
    record_plan(out, base(tmp_path), settings, None)
    record_plan(out, base(tmp_path), settings, None)  # the same comparison continues
    with pytest.raises(ConfigError, match=r"\['rounds'\]"):
        record_plan(out, base(tmp_path, rounds=4), settings, None)
    with pytest.raises(ConfigError, match="epsilons"):
        record_plan(out, base(tmp_path), replace(settings, epsilons=[INF]), None)
    recorded = json.loads((out / "compare-settings.json").read_text())
    assert "out" not in recorded["base"]  # where the runs live is not part of the comparison
    assert recorded["compare"]["epsilons"] == [INF, 3.0]


# -- results -----------------------------------------------------------------------------------

def test_rounds_to_target_is_the_first_evaluated_round_that_reaches_it():
    curve = [(0, 0.1), (2, 0.3), (4, 0.5), (6, 0.45)]
    assert rounds_to(curve, 0.45, higher=True) == 4
    assert rounds_to(curve, 0.6, higher=True) is None
    assert rounds_to([(0, 9.0), (1, 5.0), (2, 3.0)], 4.0, higher=False) == 2
    assert rounds_to(curve, 0.05, higher=True) == 2  # round 0 is the untrained adapter


def test_the_spread_is_the_sample_statistics_over_seeds():
    values = [0.41, 0.45, 0.38]
    s = spread([*values, None])
    assert s["n"] == 3 and s["mean"] == pytest.approx(statistics.fmean(values))
    assert s["std"] == pytest.approx(statistics.stdev(values))
    assert (s["min"], s["max"]) == (0.38, 0.45)
    assert spread([0.5])["std"] == 0.0 and spread([None])["mean"] is None


def fake_run(tmp_path: Path, strategy: str, *, seed: int = 0, ranks=None, sha="abc",
             clients=(("0", "1"), ("1", "2"))) -> PlannedRun:
    root = tmp_path / strategy / str(seed)
    root.mkdir(parents=True)
    (root / "run.json").write_text(json.dumps({
        "client_ranks": ranks or {"0": 2, "1": 4, "2": 2},
        "partition": {"client_examples": [5, 5, 5], "sha256": sha}}))
    (root / "metrics.jsonl").write_text("".join(
        json.dumps({"round": i + 1, "clients": list(c)}) + "\n" for i, c in enumerate(clients)))
    settings = replace(SimulationConfig(model="tiny", num_clients=3, strategy=strategy),
                       out=str(root))
    return PlannedRun(Level(INF, "sample"), strategy, seed, settings)


def test_runs_of_one_seed_on_different_federations_are_caught(tmp_path):
    same = [fake_run(tmp_path / "a", s) for s in ("fedit", "ffa")]
    facts = check_same_federation(same)
    assert facts["0"]["runs"] == 2 and facts["0"]["sampled_clients"] == [["0", "1"], ["1", "2"]]
    for i, changed in enumerate(({"sha": "other"}, {"ranks": {"0": 4, "1": 4, "2": 2}},
                                 {"clients": (("0", "1"), ("0", "2"))})):
        runs = [fake_run(tmp_path / f"b{i}", "fedit"),
                fake_run(tmp_path / f"c{i}", "ffa", **changed)]
        with pytest.raises(ValueError, match="seed's first run"):
            check_same_federation(runs)
    other_seed = [fake_run(tmp_path / "d", "fedit"),
                  fake_run(tmp_path / "e", "ffa", seed=1, sha="other")]
    assert set(check_same_federation(other_seed)) == {"0", "1"}


def finished_run(run: PlannedRun, accuracies: list[float]) -> None:
    """A run directory as `fedlr simulate` leaves it, with these held-out accuracies."""
    root = Path(str(run.settings.out))
    (root / "adapter").mkdir(parents=True)
    (root / "run.json").write_text(json.dumps({
        "client_ranks": run.settings.client_ranks(),
        "partition": {"client_examples": [5] * run.settings.num_clients, "sha256": "f00"},
        "evaluation": {"examples": 40, "heldout_examples": 800, "chance_accuracy": 0.1,
                       "round_0": {"accuracy": 0.1}}}))
    (root / "metrics.jsonl").write_text("".join(json.dumps({
        "round": i + 1, "eval_accuracy": a, "aggregation_residual": 0.5, "bytes_up": 2**20,
        "bytes_down": 2**21, "seconds": 3.0, "clients": ["0", "1"]}) + "\n"
        for i, a in enumerate(accuracies)))


def test_the_results_are_the_runs_own_numbers_with_their_spread_and_wall_time(tmp_path):
    from fedlr.cli.compare import write_results
    from fedlr.comparison.results import add_wall_time

    out = tmp_path / "cmp"
    config = base(tmp_path, rounds=3, out=str(out))
    settings = ComparisonSettings(strategies=["fedit", "ffa"], epsilons=[INF], seeds=[0, 1],
                                  references=False, target_accuracy=0.3)
    runs = plan_comparison(config, settings, out)
    curves = {("fedit", 0): [0.2, 0.3, 0.4], ("fedit", 1): [0.2, 0.25, 0.5],
              ("ffa", 0): [0.35, 0.3, 0.3], ("ffa", 1): [0.1, 0.2, 0.2]}
    for run in runs:
        finished_run(run, curves[run.method, run.seed])
    for run in runs[:-1]:  # the last one finished before runs were timed
        add_wall_time(out, run.key, 60.0)
    add_wall_time(out, runs[0].key, 30.0)  # a run continued by a second invocation
    document = write_results(config, settings, runs, out)
    cells = {c["method"]: c for c in document["cells"]}
    assert cells["fedit"]["final"]["mean"] == pytest.approx(0.45)
    assert cells["fedit"]["final"]["std"] == pytest.approx(statistics.stdev([0.4, 0.5]))
    assert cells["ffa"]["best"]["mean"] == pytest.approx((0.35 + 0.2) / 2)
    assert cells["fedit"]["rounds_to_target"]["mean"] == pytest.approx(2.5)  # rounds 2 and 3
    assert cells["ffa"]["reached_target"] == 1
    assert cells["fedit"]["bytes_up"]["mean"] == 3 * 2**20
    assert cells["fedit"]["wall_seconds"]["max"] == 90.0
    assert document["wall_seconds"] == {"total": 210.0, "runs_timed": 3, "runs_finished": 4,
                                        "untimed_round_seconds": 9.0}  # its 3 rounds of 3 s
    assert document["complete"] and document["same_federation"]["1"]["runs"] == 2
    markdown = (out / "compare.md").read_text()
    assert "| fedit | 0.450 ± 0.071 | 0.450 ± 0.071 |" in markdown
    assert ("0.06 hours for the 3 of 4 finished runs" in markdown
            and "1 more ran before fedlr compare timed runs, and spent 0.00 hours" in markdown)
    overview = ["| method | non-private |", "|---|---|", "| fedit | 0.450 ± 0.071 |",
                "| ffa | 0.250 ± 0.071 |"]
    assert "\n".join(overview) in markdown
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "Incomplete" not in markdown
    shutil.rmtree(Path(str(runs[-1].settings.out)) / "adapter")  # the last run is unfinished
    document = write_results(config, settings, runs, out)
    assert not document["complete"] and document["pending_runs"] == [runs[-1].key]
    assert "**Incomplete**: 1 runs" in (out / "compare.md").read_text()
    assert cells["ffa"]["final"]["n"] == 2 and document["cells"][1]["final"]["n"] == 1


# -- a whole comparison, killed and resumed ------------------------------------------------------

COMPARE = ["compare", "--model", "tiny", "--strategies", "fedit,flora", "--epsilons", "inf,6",
           "--num-clients", "4", "--clients-per-round", "2", "--ranks", "2,4", "--rounds", "2",
           "--local-steps", "2", "--batch-size", "8", "--eval-examples", "40", "--seeds", "3"]


def fedlr(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedlr.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """The comparison, SIGKILLed (process group, Ray included) once its first run has finished
    and its second has started, then rerun with the same command to the end."""
    out = tmp_path_factory.mktemp("compare") / "cmp"
    first = out / "runs" / "non-private" / "fedit" / "seed-3"
    second = out / "runs" / "non-private" / "flora" / "seed-3"
    victim = fedlr(*COMPARE, "--out", str(out))
    deadline = time.monotonic() + 600
    while not (second / "run.json").exists():
        assert victim.poll() is None, victim.communicate()[0][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    kept = (first / "metrics.jsonl").stat().st_mtime_ns
    rerun = fedlr(*COMPARE, "--out", str(out))
    log, _ = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, log[-4000:]
    return out, log, kept


@pytest.mark.e2e
def test_a_killed_comparison_resumes_and_writes_its_three_files(comparison):
    out, log, kept = comparison
    first = out / "runs" / "non-private" / "fedit" / "seed-3"
    assert "non-private/fedit/seed-3: done" in log
    assert (first / "metrics.jsonl").stat().st_mtime_ns == kept  # a finished run is kept
    for name in ("compare.json", "compare.md", "compare.png"):
        assert (out / name).stat().st_size > 0
    document = json.loads((out / "compare.json").read_text())
    assert document["complete"] and not document["pending_runs"]
    cells = {(c["level"], c["method"]): c for c in document["cells"]}
    assert set(cells) == {(level, method) for level in ("non-private", "sample-eps-6")
                          for method in ("fedit", "flora", "centralized", "local-only")}
    for (level, _), cell in cells.items():
        assert cell["final"]["n"] == 1
        if level == "sample-eps-6":
            assert 0 < cell["epsilon_spent"]["max"] <= 6.0 * 1.001
    markdown = (out / "compare.md").read_text()
    assert f"{cells['sample-eps-6', 'flora']['final']['mean']:.3f}" in markdown
    for run in out.glob("runs/*/*/seed-3/metrics.jsonl"):  # the resumed run has each round once
        assert [json.loads(line)["round"] for line in run.read_text().splitlines()] == [1, 2]


@pytest.mark.e2e
def test_every_federated_run_saw_the_same_ranks_partition_and_sampled_clients(comparison):
    out, _, _ = comparison
    seen = []
    for run in sorted(out.glob("runs/*/*/seed-3")):
        if run.parent.name in ("centralized", "local-only"):
            continue
        facts = json.loads((run / "run.json").read_text())
        rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        seen.append((json.dumps(facts["client_ranks"], sort_keys=True),
                     facts["partition"]["sha256"], facts["config"]["local_steps"],
                     [r["clients"] for r in rounds]))
    assert len(seen) == 4 and len(set(map(str, seen))) == 1
    assert len(json.loads(seen[0][0])) == 4 and all(len(c) == 2 for c in seen[0][3])
