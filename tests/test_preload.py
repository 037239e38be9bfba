"""A node loads the run's model when it is identified (`Preload`), so its first job must find
that very session in its cache: the preload and the jobs carry the same key, and the one the
federation announces early is the one the coordinator's jobs carry. The start-up phases it
overlaps are recorded in `timeline.json`."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedlr.client.jobs import preload
from fedlr.federation import Federation
from fedlr.server.coordinator import Coordinator, preload_for
from fedlr.server.nodes import NodeDirectory
from fedlr.server.rundir import RunDir
from fedlr.server.timeline import Timeline
from fedlr.session import model_session
from fedlr.settings.schema import SimulationConfig
from fedlr.settings.specs import ModelSpec, TrainConfig
from fedlr.wire import Preload, WireError
from fedlr.wire_fields import PRELOAD_FIELD


@pytest.fixture(scope="module")
def announced(tmp_path_factory):
    """A tiny federation with default targets (resolved from the base) and what it announced as
    soon as its model was loaded."""
    config = SimulationConfig.load(None, dict(model="tiny", num_clients=2, ranks=[4],
                                              eval_examples=16,
                                              out=str(tmp_path_factory.mktemp("run") / "r")))
    seen: list[Preload] = []
    fed = Federation.build(config, on_model=lambda model: seen.append(preload_for(config, model)))
    return fed, seen


def test_the_early_preload_is_the_one_every_job_carries(announced):
    fed, seen = announced
    coordinator = Coordinator(fed, RunDir(fed.config.out))
    assert seen == [coordinator.preload]
    assert seen[0].model["targets"]  # resolved by the server's host, not left to the node
    for client, round_ in (("0", 1), ("1", 3)):
        job = coordinator.job(client, round_)
        assert (job.model_spec(), job.alpha, job.train["device"]) == (
            seen[0].model_spec(), seen[0].alpha, seen[0].device)


def test_a_preloaded_node_loads_nothing_for_its_first_job(announced):
    fed, seen = announced
    preload(seen[0].to_json(), {})
    misses = model_session.cache_info().misses
    job = Coordinator(fed, RunDir(fed.config.out)).job("1", 1)
    session = model_session(job.model_spec(), job.alpha, job.train["device"])
    assert model_session.cache_info().misses == misses
    assert session.host.targets == tuple(seen[0].model["targets"])


@given(st.sampled_from(["tiny", "minilm", "/models/base"]), st.integers(2, 40),
       st.one_of(st.none(), st.lists(st.sampled_from(["query", "key", "value"]), min_size=1,
                                     max_size=3, unique=True)),
       st.floats(0.5, 64.0), st.sampled_from(["auto", "cpu", "cuda"]))
def test_a_preload_survives_the_query_that_carries_it(name, labels, targets, alpha, device):
    wanted = Preload.for_run(ModelSpec(name=name, num_labels=labels), targets or ["query"],
                             alpha, TrainConfig(device=device))
    record = NodeDirectory(2, preload=wanted).query()[PRELOAD_FIELD]
    assert Preload.from_json(str(record["json"])) == wanted
    assert PRELOAD_FIELD not in NodeDirectory(2).query()


@pytest.mark.parametrize("text", ["{", "[]", json.dumps({"model": {}})])
def test_a_preload_that_does_not_decode_is_a_wire_error(text):
    with pytest.raises(WireError, match="preload"):
        Preload.from_json(text)


@pytest.mark.parametrize(("model", "labels"), [("./no/such/model", 2), ("tiny", 1)])
def test_a_node_that_cannot_preload_still_answers_and_says_why(model, labels, caplog):
    bad = json.dumps({"model": {"name": model, "num_labels": labels, "targets": None},
                      "alpha": 1.0, "device": "auto"})
    with caplog.at_level(logging.WARNING, logger="fedlr"):
        preload(bad, {})
        preload("not json", {})
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "the model was not preloaded"] * 2


def test_a_timeline_starts_when_its_process_did():
    """Measured from outside: a fresh interpreter's timeline starts within a few clock ticks of
    its launch (psutil's create_time would be up to a second off)."""
    launched = time.time()
    out = subprocess.run([sys.executable, "-c", "from fedlr.server.timeline import Timeline; "
                          "print(repr(Timeline().start))"], capture_output=True, text=True,
                         check=True)
    assert launched - 0.05 <= float(out.stdout) <= launched + 0.5


def test_a_timeline_records_overlapping_spans(tmp_path):
    timeline = Timeline()
    assert timeline.start <= time.time()
    timeline.add("start-up", timeline.start)
    with timeline.span("federation"), timeline.span("ray"):
        time.sleep(0.01)
    timeline.write(tmp_path / "timeline.json")
    spans = json.loads((tmp_path / "timeline.json").read_text())["spans"]
    assert list(spans) == ["federation", "ray", "start-up"]  # sorted keys
    assert spans["ray"]["seconds"] >= 0.01
    assert spans["federation"]["start"] <= spans["ray"]["start"] <= spans["ray"]["end"] <= (
        spans["federation"]["end"])
    assert spans["start-up"]["start"] == 0.0 and spans["start-up"]["end"] <= (
        spans["federation"]["start"])
    for span in spans.values():
        assert span["seconds"] == pytest.approx(span["end"] - span["start"]) and span["about"]
