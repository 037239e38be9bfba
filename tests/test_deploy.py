"""A real deployment on loopback: `fedlr server` (TLS + node authentication), registered
`fedlr client` SuperNodes and `flwr run`. It gives `fedlr simulate`'s adapter, refuses nodes that
cannot prove who they are or speak plain text, survives a node killed mid-round and a server
restart."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch
from deployment import Deployment, free_port, stop

from fedlr.adapters import load_delta_weights
from fedlr.certs import create
from fedlr.client.app import app as client_app
from fedlr.errors import ConfigError
from fedlr.privacy.node import NodeState
from fedlr.privacy.sample_level import opacus_epsilon
from fedlr.server.launch import superlink_argv
from fedlr.server.simulation import simulate
from fedlr.session import data_session, data_source
from fedlr.settings.schema import SimulationConfig

pytestmark = pytest.mark.e2e  # simulations, subprocesses and deployments

SETTINGS = dict(strategy="ffa", model="tiny", num_clients=3, rounds=2, ranks=[2, 4],
                local_steps=2, batch_size=8, eval_examples=32, seed=11)


@pytest.fixture
def deployment(tmp_path):
    dep = Deployment(tmp_path, num_nodes=3).start()
    yield dep
    dep.close()


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> dict:
    """`fedlr simulate`'s round-2 adapter with SETTINGS, which two tests compare against,
    trained client by client as deployed nodes train: what is compared is the deployment, not
    the batched engine's float32 rounding (its equivalence is tests/test_group_training.py's,
    within 1e-10 in float64, and tests/test_simulate.py's for whole runs)."""
    return simulated_adapter(tmp_path_factory.mktemp("simulated"),
                             {**SETTINGS, "engine": "per-client"})


def simulated_adapter(folder, settings: dict) -> dict:
    out = folder / "simulated"
    simulate(SimulationConfig.load(None, {**settings, "out": str(out)}), client_app)
    return load_delta_weights(out / "rounds" / "0002" / "global.safetensors")


def assert_same(deployed: dict, simulated: dict) -> None:
    assert deployed.keys() == simulated.keys()
    for name, dw in simulated.items():
        torch.testing.assert_close(deployed[name], dw, rtol=1e-5, atol=1e-6)


def wait_for_round(out, round_: int, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= round_:
            return
        time.sleep(0.5)
    raise TimeoutError(f"round {round_} did not finish in {seconds} s")


def test_a_tls_deployment_gives_the_same_adapter_as_the_simulation(deployment, tmp_path,
                                                                     simulated):
    """Nodes 0 and 1 train in their warm trainers (the default), node 2 in each round's own
    ClientApp process (`--no-warm`): the same adapter as the simulation either way."""
    deployment.kill_node(2)
    deployment.node_extra[2] = ["--no-warm"]
    deployment.start_node(2)
    out = tmp_path / "deployed"
    deployment.run({**SETTINGS, "out": str(out)})
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    deployed = load_delta_weights(out / "rounds" / "0002" / "global.safetensors")
    assert_same(deployed, simulated)
    for k in range(3):
        trained = [f"warm trainer: client {k}, round {r} trained" in deployment.log(
            f"client{k}.log") for r in (1, 2)]
        assert trained == [k != 2] * 2, k


def test_nodes_that_cannot_prove_who_they_are_or_speak_plain_text_are_refused(deployment,
                                                                              tmp_path):
    # a key the server never registered
    stranger = create(tmp_path / "stranger", ["localhost"], ["node9"])
    rogue = deployment.spawn(*deployment.node_args(0, key=stranger.node_keys["node9"][0]),
                             log="unregistered.log")
    assert rogue.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in deployment.log("unregistered.log")

    # a node that trusts another CA cannot verify the server, so it never connects
    wrong_ca = deployment.spawn(*deployment.node_args(0, ca=stranger.ca_cert),
                                "--give-up-after", "10", log="wrong-ca.log")
    assert wrong_ca.wait(timeout=120) != 0

    # plain text: a SuperNode without TLS never connects, and the port answers TLS only
    plain = deployment.spawn("client", "--superlink", f"127.0.0.1:{deployment.port}",
                             "--partition-id", "0", "--num-partitions", "3", "--port",
                             str(free_port()), "--insecure", "--give-up-after", "10",
                             log="plain.log")
    assert plain.wait(timeout=120) != 0
    with socket.create_connection(("127.0.0.1", deployment.port), 5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = sock.recv(64)
    assert not answer.startswith(b"HTTP/")  # a TLS alert or a closed socket, never a reply

    # none of them became a client: the federation still runs with the three registered nodes
    out = tmp_path / "run"
    deployment.run({**SETTINGS, "rounds": 1, "out": str(out)})
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["accepted"] == ["0", "1", "2"]


def test_a_node_killed_during_round_two_leaves_the_round_to_the_others(deployment, tmp_path):
    out = tmp_path / "run"
    # no round timeout: the round ends on Flower's own "node unavailable" reply for the killed
    # node, which comes from the SuperLink, not from the node
    run = deployment.submit({**SETTINGS, "local_steps": 30, "round_timeout": 300.0,
                             "out": str(out)})
    wait_for_round(out, 1)
    deployment.kill_node(2)
    assert run.wait(timeout=300) == 0, deployment.log("run.log")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["accepted"] == ["0", "1", "2"], (records, deployment.log("run.log"))
    assert records[1]["accepted"] == ["0", "1"]
    assert [r["client"] for r in records[1]["rejected"]] == ["2"]
    assert records[1]["rejected"][0]["reason"].startswith("client failed")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_restarted_server_resumes_the_run_from_its_checkpoint(deployment, tmp_path):
    settings = {**SETTINGS, "local_steps": 30}
    out = tmp_path / "run"
    run = deployment.submit({**settings, "out": str(out)})
    wait_for_round(out, 1)
    deployment.kill_server()  # the SuperLink, its SuperExec and the running ServerApp
    stop(run)
    deployment.start_server()  # same database: the registered nodes sign in again
    deployment.run({**settings, "out": str(out), "resume": True})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    # all three in the resumed round (else the adapter differs); the logs say why one was not
    assert records[1]["accepted"] == ["0", "1", "2"], (
        records[1]["rejected"], deployment.log("run.log")[-3000:],
        *(deployment.log(f"client{k}.log")[-2000:] for k in range(3)))
    deployed = load_delta_weights(out / "rounds" / "0002" / "global.safetensors")
    assert_same(deployed, simulated_adapter(tmp_path, settings))


def test_a_node_holds_its_own_privacy_budget_whatever_the_server_asks(tmp_path):
    """Node 2 allows itself one round of this run's DP-SGD (its own --max-epsilon), the run asks
    for two and sets no budget: the node refuses round 2 with its reason in metrics.jsonl, and
    its ledger on its own disk shows the round it trained."""
    settings = {**SETTINGS, "noise_multiplier": 1.0, "local_steps": 2}
    config = SimulationConfig.load(None, {**settings, "out": str(tmp_path / "unused")})
    spec = config.model_spec(data_source(config.dataset, config.task).num_labels)
    shard = data_session(config.data_spec(), spec).partitions[2]
    q = settings["batch_size"] / len(shard)
    one, two = (opacus_epsilon([(1.0, q, 2 * k)], 1e-5) for k in (1, 2))
    dep = Deployment(tmp_path, num_nodes=3,
                     node_extra={2: ["--max-epsilon", str((one + two) / 2)]}).start()
    try:
        out = tmp_path / "run"
        dep.run({**settings, "out": str(out)})
    finally:
        dep.close()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["accepted"] == ["0", "1", "2"], (records, deployment.log("run.log"))
    assert records[1]["accepted"] == ["0", "1"]
    (refusal,) = records[1]["rejected"]
    assert refusal["client"] == "2"
    assert refusal["reason"].startswith("refused: node 2 refuses another round of 2 steps")
    ledgers = {k: NodeState(dep.state_dir(k)).load() for k in range(3)}
    assert [led.steps for led in ledgers.values()] == [4, 4, 2]
    privacy = json.loads((out / "privacy.json").read_text())
    for k, ledger in ledgers.items():  # the server records what each node reports
        assert privacy["clients"][str(k)]["history"] == [list(s) for s in ledger.history]


def test_the_server_refuses_to_start_without_tls_files_unless_insecure(tmp_path):
    with pytest.raises(ConfigError, match="--certs"):
        superlink_argv(None, host="127.0.0.1", port=1, database=tmp_path / "db", insecure=False)
    with pytest.raises(ConfigError, match="missing TLS files"):
        superlink_argv(tmp_path, host="127.0.0.1", port=1, database=tmp_path / "db",
                       insecure=False)
    argv = superlink_argv(None, host="h", port=1, database=tmp_path / "db", insecure=True)
    assert "--insecure" in argv and "--enable-supernode-auth" not in argv


def test_secure_aggregation_over_tls_gives_the_plain_simulations_adapter(deployment, tmp_path,
                                                                          simulated):
    """Three nodes over TLS run SecAgg+'s four stages; the server gets only sums, and its adapter
    is the plain simulation's within the encoding error."""
    out = tmp_path / "deployed-secure"
    deployment.run({**SETTINGS, "secure_aggregation": True, "out": str(out)})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["secagg_quantization_error"] < 1e-6 for r in records)
    deployed = load_delta_weights(out / "rounds" / "0002" / "global.safetensors")
    for name, dw in simulated.items():
        torch.testing.assert_close(deployed[name], dw, rtol=0, atol=1e-5)
