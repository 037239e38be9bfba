"""What the coordinator records per round: held-out metrics at the `eval_every` cadence (null in
the other rounds, which every reader of metrics.jsonl copes with) and where the round's time
went, the server's parts and the sums of the clients' own."""

from __future__ import annotations

import pytest
from rich.console import Console

from fedlr.federation import Federation
from fedlr.server.coordinator import Coordinator
from fedlr.server.records import client_times, evaluates
from fedlr.server.report import plot, summary_table
from fedlr.server.rundir import RunDir
from fedlr.settings.schema import SimulationConfig

TIMES = ("exchange_seconds", "aggregate_seconds", "eval_seconds", "accountant_seconds",
         "checkpoint_seconds")


@pytest.mark.parametrize(("every", "rounds", "expected"), [
    (1, 3, [1, 2, 3]), (2, 3, [2, 3]), (2, 4, [2, 4]), (5, 3, [3]), (3, 7, [3, 6, 7])])
def test_the_server_evaluates_every_nth_round_and_always_the_last(every, rounds, expected):
    assert [r for r in range(1, rounds + 1) if evaluates(r, rounds, every)] == expected


class NoNodes:
    """A grid with no node connected: every round fails and carries the adapter over, which is
    all these records need (the e2e tests run real rounds)."""

    def push_messages(self, messages):
        assert not list(messages)
        return []

    def pull_messages(self, message_ids):
        raise AssertionError("nothing was sent")


def test_rounds_not_evaluated_record_null_metrics_and_no_evaluation_time(tmp_path):
    config = SimulationConfig.load(None, dict(strategy="fedit", model="tiny", num_clients=2,
                                              rounds=3, eval_every=2, ranks=[4],
                                              eval_examples=16, out=str(tmp_path / "run")))
    fed = Federation.build(config)
    coordinator = Coordinator(fed, RunDir(config.out))
    state = coordinator.initial(resume=False)
    for round_ in (1, 2, 3):
        state = coordinator.round(NoNodes(), {}, state, round_)
    records = coordinator.run.read_metrics()
    assert [r["round_failed"] is not None for r in records] == [True] * 3
    assert [r["eval_loss"] is not None for r in records] == [False, True, True]
    assert [r["eval_accuracy"] is not None for r in records] == [False, True, True]
    assert records[0]["eval_seconds"] == 0 < records[1]["eval_seconds"]
    for r in records:
        assert all(r[t] >= 0 for t in TIMES)
        assert sum(r[t] for t in TIMES) <= r["seconds"]
        assert not any(k.startswith("client_") for k in r)  # no client reported a time

    console = Console(width=120, record=True)
    console.print(summary_table(records, "t"))
    rows = [line.split() for line in console.export_text().splitlines() if line.strip()]
    first = next(row for row in rows if row[0] == "1")
    assert first[3:5] == ["-", "-"]  # the eval and acc columns of the round not evaluated
    plot(records, tmp_path / "metrics.png", "t", {"round_0": {"loss": 2.0, "accuracy": 0.1}})
    assert (tmp_path / "metrics.png").stat().st_size > 0


def test_client_times_are_summed_over_the_clients_that_report_them():
    metrics = [{"seconds": 2.0, "step_seconds": 1.5, "train_loss": 0.3},
               {"seconds": 3.0, "setup_seconds": 0.5},
               {"num-examples": 10.0}]
    assert client_times(metrics) == {"client_seconds": 5.0, "client_step_seconds": 1.5,
                                     "client_setup_seconds": 0.5}
    assert client_times([]) == {}


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "is not valid JSON"), ('{"loss": 1.0}', "is not a round record"),
    ("[1, 2]", "is not a round record")])
def test_a_foreign_metrics_line_is_one_error_naming_the_file_and_line(tmp_path, line, message):
    """Resume, compare and audit read metrics.jsonl back through one reader: what RunDir
    appends round-trips, and a line it could not have written is refused, never skipped."""
    from fedlr.errors import ConfigError
    from fedlr.run_metrics import read_metrics

    run = RunDir(tmp_path)
    for round_ in (1, 2):
        run.append_metrics({"round": round_, "eval_accuracy": None})
    assert run.read_metrics() == [{"round": 1, "eval_accuracy": None},
                                  {"round": 2, "eval_accuracy": None}]
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(ConfigError, match=f"metrics.jsonl:3 {message}"):
        read_metrics(path)
