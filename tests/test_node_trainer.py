"""A deployed node's warm trainer (`fedlr.client.node_trainer`): a job it trains is the job the
ClientApp would train in its own process, under the node's own configuration, ledger and limits
(never the request's), and the ClientApp relays its answer without importing torch; only this
node's processes (the folder's key) can ask it anything; the ClientApp trains itself when the
trainer is gone; the trainer leaves with its SuperNode."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import AuthenticationError, Client
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedlr.client import node_trainer
from fedlr.client.app import relayed
from fedlr.client.jobs import run_job, train_here, train_remotely
from fedlr.client.node_trainer import KEY, READY, SOCKET, ask, preload_remotely, serve
from fedlr.errors import FedlrError
from fedlr.federation import Federation
from fedlr.privacy.node import NodeLimits, NodeState
from fedlr.server.coordinator import Coordinator
from fedlr.server.rundir import RunDir
from fedlr.settings.schema import SimulationConfig
from fedlr.wire import TrainJob, reply_from_parts

TINY = dict(strategy="ffa", model="tiny", num_clients=3, rounds=2, ranks=[4], local_steps=2,
            batch_size=8, eval_examples=16, seed=5)


def federation(folder: Path, **dp) -> Federation:
    return Federation.build(SimulationConfig.load(None, {**TINY, **dp, "out": str(folder)}))


def job(fed: Federation, client: str = "0") -> TrainJob:
    """What the server sends `client` in round 1, as the coordinator builds it."""
    coordinator = Coordinator(fed, RunDir(fed.config.out))
    state = fed.strategy.init_state(fed.model.host.initial_head)
    return TrainJob(coordinator.job(client, 1), fed.strategy.downlink(state, client))


class Trainer:
    """`serve` in a thread of this process, in a private folder with its key."""

    def __init__(self, folder: Path, node_config: dict) -> None:
        folder.mkdir(mode=0o700)
        (folder / KEY).write_bytes(os.urandom(32))
        self.folder, self.stop = folder, threading.Event()
        self.thread = threading.Thread(target=serve, args=(folder, node_config, self.stop),
                                       daemon=True)
        self.thread.start()
        while not (folder / READY).exists():
            time.sleep(0.01)

    def close(self) -> None:
        self.stop.set()  # seen after the request being answered, or once a connection wakes
        with contextlib.suppress(OSError):  # the accept; refused where the loop saw it already
            Client(str(self.folder / SOCKET), family="AF_UNIX",
                   authkey=(self.folder / KEY).read_bytes()).close()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


def trained_alike(a, b) -> bool:
    ta, tb = a.adapter.tensors(), b.adapter.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture
def trainer(tmp_path):
    node = {"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path / "node")}
    served = Trainer(tmp_path / "trainer", node)
    yield served
    served.close()


def test_the_trainer_trains_a_job_exactly_as_the_clientapp_would(trainer, tmp_path):
    fed = federation(tmp_path / "run")
    down = job(fed)
    assert preload_remotely(trainer.folder, "not even json") == "cpu"  # logged, not fatal
    remote = train_remotely(trainer.folder, down)
    local = run_job(down.job, down.downlink)
    assert remote.num_examples == local.num_examples
    assert trained_alike(remote, local)
    assert remote.metrics["train_loss"] == local.metrics["train_loss"]
    # what the ClientApp relays is what it would have answered itself (B alone: A is frozen)
    parts = down.to_parts()
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=parts.arrays),
                          "fields": ConfigRecord(parts.fields)})
    answer = relayed(content, trainer.folder)
    own = local.to_parts(train_a=down.job.train_a)
    assert set(answer["arrays"]) == set(own.arrays) and not down.job.train_a
    carried = reply_from_parts(
        type(own)(answer["arrays"].to_torch_state_dict(), dict(answer["fields"])), down.downlink)
    assert trained_alike(carried, local)


def test_the_nodes_own_limits_and_ledger_hold_whatever_the_request_says(tmp_path):
    """The trainer reads the node's configuration from `fedlr client`, not from the job: its
    limits refuse, and its ledger is the one written before the reply leaves."""
    node = {"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path / "node"),
            **NodeLimits(min_noise_multiplier=0.8).node_config()}
    served = Trainer(tmp_path / "trainer", node)
    try:
        weak = job(federation(tmp_path / "weak", noise_multiplier=0.3, max_grad_norm=1.0))
        with pytest.raises(FedlrError, match=r"noise multiplier 0\.3"):
            train_remotely(served.folder, weak)
        assert NodeState(tmp_path / "node").load() is None  # refused before training
        ok = job(federation(tmp_path / "ok", noise_multiplier=1.0, max_grad_norm=1.0))
        reply = train_remotely(served.folder, ok)
        kept = NodeState(tmp_path / "node").load()
        assert reply.ledger is not None and kept is not None
        assert kept.to_dict() == reply.ledger.to_dict() and kept.steps > 0
    finally:
        served.close()


def test_only_a_process_with_the_folders_key_is_heard(trainer, tmp_path):
    with pytest.raises(AuthenticationError):
        Client(str(trainer.folder / SOCKET), family="AF_UNIX", authkey=b"x" * 32)
    with pytest.raises(RuntimeError, match="malformed job"):  # answered, not fatal
        ask(trainer.folder, {"job": "{}"}, {})
    down = job(federation(tmp_path / "run"))
    assert train_remotely(trainer.folder, down).num_examples > 0  # still serving


def test_without_its_trainer_the_clientapp_trains_in_its_own_process(tmp_path, caplog):
    down = job(federation(tmp_path / "run"))
    empty = tmp_path / "gone"
    empty.mkdir()
    context = SimpleNamespace(node_config={"partition-id": 0, "num-partitions": 3})
    reply = train_here(down, context, empty)
    assert "training in this process" in caplog.text
    assert trained_alike(reply, run_job(down.job, down.downlink))


@pytest.mark.e2e
def test_the_clientapp_that_relays_to_its_trainer_never_imports_torch():
    """What a deployed node's per-round process loads before it hands the job over."""
    code = ("import sys\nimport fedlr.client.app\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'opacus')"
            " if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.e2e
def test_the_trainer_leaves_and_cleans_up_when_its_supernode_is_gone(tmp_path):
    """`fedlr client` starts the trainer, then becomes the SuperNode: when that process ends,
    however it ends, the trainer removes its folder and exits."""
    code = ("import sys, time\n"
            "from fedlr.client.node_trainer import start\n"
            "print(start(sys.argv[1]), flush=True)\n"
            "time.sleep(600)\n")
    node = f'partition-id=0 num-partitions=1 state-dir="{tmp_path / "node"}"'
    parent = subprocess.Popen([sys.executable, "-c", code, node], stdout=subprocess.PIPE,
                              text=True)
    folder = Path(parent.stdout.readline().strip())
    assert (folder / SOCKET).exists() and folder.stat().st_mode & 0o077 == 0  # private
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not folder.exists()


def test_a_local_peer_that_connects_and_says_nothing_cannot_wedge_the_trainer(trainer,
                                                                            monkeypatch):
    """Finding 8 of issue 36: the handshake had no deadline, so one silent connection held the
    trainer (and every later round of the node) forever."""
    monkeypatch.setattr(node_trainer, "REQUEST_SECONDS", 0.5)
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(str(trainer.folder / SOCKET))
    answers: list[str] = []

    def honest() -> None:
        try:
            ask(trainer.folder, {"job": "{}"}, {})
        except RuntimeError as exc:  # answered: a malformed job is refused
            answers.append(str(exc))

    asker = threading.Thread(target=honest, daemon=True)
    asker.start()
    asker.join(timeout=20)
    silent.close()
    assert not asker.is_alive(), "the silent peer held the trainer"
    assert "malformed job" in answers[0]
