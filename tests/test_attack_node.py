"""Attacks on a node (issue 36, findings 3, 6, 7 and 8), each played by the party that would try
it: a server that sends a ledger counted another way or too long to count, or a job that names
a file, a model or sizes the node never allowed; a local process that plants a cache row; two
processes on one state dir; a path that Flower's node config would cut short."""

from __future__ import annotations

import dataclasses
import hashlib
import stat
import threading
import time
from types import SimpleNamespace

import pytest
from flwr.common.config import parse_config_args

from fedlr.client import jobs
from fedlr.client.launch import node_config_text
from fedlr.errors import ConfigError, NodeLimitError
from fedlr.federation import Federation
from fedlr.node_policy import NodePolicy
from fedlr.privacy import epsilon_cache
from fedlr.privacy.node import NodeState
from fedlr.privacy.sample_level import MAX_MECHANISMS, PrivacyLedger
from fedlr.server.coordinator import Coordinator
from fedlr.server.rundir import RunDir
from fedlr.settings.schema import SimulationConfig
from fedlr.wire import Preload, TrainReply


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


# -- finding 6: the job decides what a node reads and allocates --------------------------------


def node_policy(text: str) -> NodePolicy | None:
    """The policy a node's processes read back from the node config `fedlr client` wrote."""
    return jobs.train_here_config(parse_config_args([text]))[3]


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Fails the test if the node loads a model or reads data: a refusal comes before both."""
    def never(*args, **kwargs):
        raise AssertionError(f"the node loaded something for a refused job: {args}")

    monkeypatch.setattr(jobs, "model_session", never)
    monkeypatch.setattr(jobs, "client_shards", never)
    monkeypatch.setattr(jobs, "local_shard", never)


def a_job(federation, **changes):
    coordinator = Coordinator(federation, RunDir(federation.config.out))
    job = coordinator.job("0", 1)
    downlink = federation.strategy.downlink(
        federation.strategy.init_state(federation.model.host.initial_head), "0")
    return dataclasses.replace(job, **changes), downlink


def test_a_job_cannot_make_a_node_train_on_a_file_it_did_not_allow(federation, tmp_path,
                                                                  nothing_loaded):
    """A server names the node's private file as the run's data (a non-private job would leak
    it through the adapter): refused before it is read, unless the node's operator allowed it."""
    secret = tmp_path / "notes.txt"
    secret.write_text("the node's own secrets\n\nmore of them\n")
    job, downlink = a_job(federation, data={**federation.data_spec.__dict__,
                                            "source": str(secret)})
    policy = node_policy(node_config_text(0, 2, tmp_path / "state"))
    with pytest.raises(NodeLimitError, match=r"refuses data source .*--allow-data"):
        jobs.run_job(job, downlink, policy=policy)
    allowed = node_policy(node_config_text(0, 2, tmp_path / "state",
                                           policy=NodePolicy(data=(str(secret),))))
    allowed.check_job(job, None, "0")  # the operator's choice: no refusal
    # a node with its own --data trains on it whatever source the job names
    policy.check_job(job, str(tmp_path / "mine.jsonl"), "0")


@pytest.mark.parametrize("model", ["someone/huge-model", "/home/node/other-model"])
def test_a_job_or_preload_cannot_make_a_node_load_a_model_it_did_not_allow(
        federation, tmp_path, nothing_loaded, model, caplog):
    job, downlink = a_job(federation)
    job = dataclasses.replace(job, model={**job.model, "name": model})
    text = node_config_text(0, 2, tmp_path / "state")
    with pytest.raises(NodeLimitError, match=r"refuses model .*--allow-model"):
        jobs.run_job(job, downlink, policy=node_policy(text))
    preload = Preload(job.model, job.alpha, job.train["device"])
    jobs.preload(preload.to_json(), parse_config_args([text]))  # logged, nothing loaded
    assert "refuses model" in caplog.text
    allowed = node_policy(node_config_text(0, 2, tmp_path / "state",
                                           policy=NodePolicy(models=(model,))))
    allowed.check_job(job, None, "0")


@pytest.mark.parametrize(("change", "option"), [
    (lambda j: {"rank": 65}, "--max-rank 64"),
    (lambda j: {"labels": [f"c{k}" for k in range(1001)]}, "--max-labels 1000"),
    (lambda j: {"model": {**j.model, "num_labels": 1001}}, "--max-labels 1000"),
    (lambda j: {"model": {**j.model, "max_length": 4096}}, "--max-length 2048"),
    (lambda j: {"data": {**j.data, "max_length": 4096}}, "--max-length 2048"),
    (lambda j: {"train": {**j.train, "max_length": 4096}}, "--max-length 2048"),
    (lambda j: {"train": {**j.train, "local_steps": 10_001}}, "--max-local-steps 10000"),
    (lambda j: {"train": {**j.train, "batch_size": 257}}, "--max-batch-size 256"),
    (lambda j: {"train": {**j.train, "eval_batch_size": 257}}, "--max-batch-size 256"),
], ids=["rank", "labels", "num-labels", "model-length", "data-length", "train-length", "steps",
        "batch", "eval-batch"])
def test_a_job_past_a_nodes_size_limits_is_refused_before_any_work(federation, tmp_path,
                                                                  nothing_loaded, change,
                                                                  option):
    job, downlink = a_job(federation)
    big = dataclasses.replace(job, **change(job))
    with pytest.raises(NodeLimitError, match=f"above its {option}"):
        jobs.run_job(big, downlink, policy=node_policy(node_config_text(0, 2, tmp_path / "s")))
    node_policy(node_config_text(0, 2, tmp_path / "s")).check_job(job, None, "0")  # the run's


def test_the_node_sets_its_own_policy_and_a_simulated_node_has_none(tmp_path):
    mine = NodePolicy(data=(str(tmp_path / "a b.jsonl"), "org/dataset"), models=("org/m",),
                      max_rank=8, max_labels=4, max_length=128, max_local_steps=50,
                      max_batch_size=16)
    assert node_policy(node_config_text(0, 2, tmp_path / "s", policy=mine)) == mine
    assert node_policy("partition-id=0 num-partitions=2") is None
    with pytest.raises(ConfigError, match="--max-rank must be a positive integer"):
        NodePolicy(max_rank=0)
    with pytest.raises(ConfigError, match="--allow-data/--allow-model entry"):
        NodePolicy(data=("a:b",))


def test_a_trainer_folder_flowers_node_config_would_cut_short_is_refused(tmp_path):
    """Finding 8: the warm trainer's folder is made under TMPDIR, which the node's user sets."""
    from fedlr.client.launch import supernode_argv

    odd = tmp_path / 'tmp"dir'
    with pytest.raises(ConfigError, match="trainer's folder"):
        supernode_argv("127.0.0.1:1", ca=None, key=None, partition_id=0, num_partitions=2,
                       port=9, insecure=True, state_dir=tmp_path / "s", trainer=odd)
