"""Attacks on a node's own accounting (issue 36, findings 3, 7 and 8), each played by the party
that would try it: a server that sends a ledger counted another way or too long to count, a
local process that plants a cache row, two processes on one state dir, a path that Flower's
node config would cut short."""

from __future__ import annotations

import hashlib
import stat
import threading
import time
from types import SimpleNamespace

import pytest
from flwr.common.config import parse_config_args

from fedlr.client import jobs
from fedlr.client.launch import node_config_text
from fedlr.errors import ConfigError
from fedlr.federation import Federation
from fedlr.privacy import epsilon_cache
from fedlr.privacy.node import NodeState
from fedlr.privacy.sample_level import MAX_MECHANISMS, PrivacyLedger
from fedlr.server.coordinator import Coordinator
from fedlr.server.rundir import RunDir
from fedlr.settings.schema import SimulationConfig
from fedlr.wire import TrainReply


def test_a_server_cannot_relabel_how_a_node_counts_its_steps(tmp_path):
    """Finding 3: the node's own history plus one step labelled with an accountant fedlr does
    not have (Opacus's `gdp`, far below PRV for these steps) is refused; a longer history the
    server sends is evidence of steps only, counted by the node's own accountant."""
    state = NodeState(tmp_path / "node")
    own = PrivacyLedger(accountant="prv", history=[(1.0, 0.01, 30)], rounds=3)
    state.save(own)
    relabelled = {**own.to_dict(), "accountant": "gdp",
                  "history": [[1.0, 0.01, 31]], "rounds": 4}
    with pytest.raises(ConfigError, match="accountant 'gdp'"):
        state.ledger(relabelled, "prv", "0")
    longer = PrivacyLedger(accountant="rdp", history=[(1.0, 0.01, 40)], rounds=4).to_dict()
    adopted = state.ledger(longer, "rdp", "0")
    assert adopted.steps == 40 and adopted.accountant == "prv"
    assert state.load().accountant == "prv"  # nothing of the server's label was persisted


def test_a_ledger_with_more_mechanisms_than_any_run_records_is_refused():
    """Finding 3/4: a sender chooses how many (noise, rate) mechanisms its ledger holds, and the
    accountant's time grows with them (a minute for 300 under PRV): more than MAX_MECHANISMS
    is refused when the ledger is read, before anything is counted."""
    history = [[1.0 + k / 1000, 0.01, 1] for k in range(MAX_MECHANISMS + 1)]
    with pytest.raises(ConfigError, match="mechanisms"):
        PrivacyLedger.from_dict({"accountant": "prv", "history": history})
    assert len(PrivacyLedger.from_dict({"history": history[:MAX_MECHANISMS]}).history) == (
        MAX_MECHANISMS)


def test_a_planted_cache_row_is_never_believed(tmp_path, monkeypatch):
    """Finding 3: a row written by someone without this user's secret (digest computed the
    only way they can: sha256 of key and value, or an HMAC under a guessed key) is a miss."""
    monkeypatch.setenv(epsilon_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    key = "a history whose true epsilon is 5.16"
    assert epsilon_cache.cached("warm-up", lambda: 1.0) == 1.0  # the file and secret exist
    path = tmp_path / "cache" / epsilon_cache.FILE
    for digest in (hashlib.sha256(f"{key}\0{0.01!r}".encode()).hexdigest(),
                   epsilon_cache._digest(b"x" * 32, key, repr(0.01))):
        with epsilon_cache._connect(path) as db:
            db.execute("INSERT OR REPLACE INTO epsilons VALUES (?, ?, ?)",
                       (key, repr(0.01), digest))
        assert epsilon_cache.cached(key, lambda: 5.16) == 5.16
    assert epsilon_cache.cached(key, lambda: pytest.fail("recomputed")) == 5.16  # own row kept


def test_the_cache_is_this_users_alone(tmp_path, monkeypatch):
    """Finding 3: its histories reveal each client's sigma and q (so its example count)."""
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o755)  # made earlier, world-readable
    monkeypatch.setenv(epsilon_cache.CACHE_DIR_ENV, str(folder))
    epsilon_cache.cached("k", lambda: 2.0)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / epsilon_cache.SECRET_FILE).stat().st_mode) == 0o600


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    config = SimulationConfig.load(None, dict(
        strategy="ffa", model="tiny", num_clients=2, rounds=2, ranks=[4], local_steps=10,
        batch_size=8, eval_examples=16, seed=7, noise_multiplier=1.0,
        out=str(tmp_path_factory.mktemp("run") / "r")))
    return Federation.build(config)


def test_two_processes_training_on_one_state_dir_lose_no_round(federation, tmp_path,
                                                               monkeypatch):
    """Finding 7: two jobs on one node's state dir at once (two runs, or the ClientApp beside
    the warm trainer) each load, train and save the ledger; each round's steps must be on disk.
    The training is a stand-in that takes a while between load and save, as real training
    does; what is tested is `run_job`'s handling of the node's ledger."""
    class SlowTrainer:
        def __init__(self, host, config):
            pass

        def train(self, client, downlink, examples, *, ledger, **_):
            time.sleep(0.3)
            ledger.record((1.0, 0.1, 10))
            return SimpleNamespace(adapter=downlink, num_examples=1, metrics={})

    monkeypatch.setattr(jobs, "LocalTrainer", SlowTrainer)
    monkeypatch.setattr(jobs, "model_session", lambda *a: SimpleNamespace(host=None))
    monkeypatch.setattr(jobs, "client_shards", lambda *a: SimpleNamespace(shard=lambda i: []))
    coordinator = Coordinator(federation, RunDir(federation.config.out))
    downlink = federation.strategy.downlink(
        federation.strategy.init_state(federation.model.host.initial_head), "0")
    job = coordinator.job("0", 1)
    state = NodeState(tmp_path / "node")
    replies: list[TrainReply] = []
    threads = [threading.Thread(target=lambda: replies.append(
        jobs.run_job(job, downlink, state=state))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(replies) == 2
    assert state.load().steps == 20  # without the lock: 10, one round lost


@pytest.mark.parametrize("bad", ['state"dir', "state\\dir", "state\ndir"])
def test_a_path_flowers_node_config_would_cut_short_is_refused(tmp_path, bad):
    """Finding 8: `"` ended the quoted value, so the node read another (fresh, empty) ledger."""
    with pytest.raises(ConfigError, match="--state-dir"):
        node_config_text(0, 2, tmp_path / bad)
    text = node_config_text(0, 2, tmp_path / "plain dir")
    assert parse_config_args([text])["state-dir"] == str((tmp_path / "plain dir").resolve())
