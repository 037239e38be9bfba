"""`fedlr simulate --ray-address`: the simulated clients run on an existing Ray cluster, here two
Ray nodes on loopback (a head and a worker node, one CPU each). Both nodes serve clients, the
workers get the environment the ClientApp needs from the job (not from the node that started
them) and read their clients' shards from the run directory, and the run ends with the adapter
a local Ray gives."""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import pytest
from flwr.clientapp import ClientApp
from safetensors.torch import load_file

from fedlr.client.app import app as client_app
from fedlr.data.packed import SHARDS_ENV
from fedlr.privacy.node import SIMULATED_NODES_ENV
from fedlr.server.rundir import RunDir
from fedlr.server.simulation import simulate
from fedlr.settings.schema import SimulationConfig

pytestmark = pytest.mark.e2e


def small_config(out: Path, **overrides) -> SimulationConfig:
    settings = dict(strategy="ffa", model="tiny", num_clients=4, rounds=2, ranks=[2, 4],
                    local_steps=2, batch_size=4, lr=1e-2, eval_examples=32, out=str(out))
    return SimulationConfig.load(None, {**settings, **overrides})


def recording(folder: Path) -> ClientApp:
    """fedlr's ClientApp, noting for each message the Ray node and process that served it, what
    that process's environment says, and whether serving it loaded the `datasets` stack (one
    file per message: workers write in parallel)."""
    recorder = ClientApp()

    def serve(message, context):
        import ray

        reply = client_app(message, context)
        note = {"type": message.metadata.message_type,
                "client": int(context.node_config["partition-id"]),
                "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "nodes_env": os.environ.get(SIMULATED_NODES_ENV),
                "shards_env": os.environ.get(SHARDS_ENV),
                "threads": os.environ.get("OMP_NUM_THREADS"),
                "datasets": [m for m in ("datasets", "flwr_datasets", "pandas")
                             if m in sys.modules]}
        (folder / f"{uuid.uuid4().hex}.json").write_text(json.dumps(note))
        return reply

    recorder.train()(serve)
    recorder.query()(serve)
    return recorder


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node, one CPU each. It is not recorded as this machine's current
    cluster (Ray's /tmp/ray/ray_current_cluster, which it neither writes nor removes), so no
    other `ray.init` on this machine joins it."""
    import ray
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    ray.shutdown()  # a driver left connected by an earlier test
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
        nodes = Cluster(initialize_head=True,
                        head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        yield nodes
    finally:
        ray.shutdown()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ray._common.utils, "reset_ray_address", lambda *args, **kwargs: None)
            nodes.shutdown()


@pytest.fixture(scope="module")
def cluster_run(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    notes = root / "notes"
    notes.mkdir()
    config = small_config(root / "run", ray_address=cluster.address)
    simulate(config, recording(notes))
    return config, [json.loads(p.read_text()) for p in notes.iterdir()]


def test_the_run_completes_with_every_client_on_both_ray_nodes(cluster, cluster_run):
    config, notes = cluster_run
    records = RunDir(config.out).read_metrics()
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert r["num_clients"] == r["num_accepted"] == 4 and r["rejected"] == []
        assert sorted(r["accepted"]) == ["0", "1", "2", "3"]
    # one train message per client, or per group of clients under the batched engine
    trained = [n for n in notes if n["type"].startswith("train")]
    assert len(trained) >= 2 * 2
    nodes = {node.node_id for node in cluster.list_all_nodes()}
    assert len(nodes) == 2
    assert {n["node"] for n in trained} == nodes  # each Ray node trained clients
    # the job's environment reached the workers of the node the driver did not start from
    run = Path(config.out).resolve()
    assert {(n["nodes_env"], n["shards_env"], n["threads"]) for n in notes} == {
        (str(run / "nodes"), str(run / "data" / "shards.safetensors"), "1")}
    # the workers read their clients' shards from the run's file, without the datasets stack
    # (Ray itself loads pyarrow)
    assert not any(n["datasets"] for n in notes)


def test_the_cluster_changes_nothing_in_the_result(cluster_run, tmp_path):
    config, _ = cluster_run
    local = small_config(tmp_path / "run")
    simulate(local, client_app)
    for round_ in (1, 2):
        name = Path("rounds") / f"{round_:04d}" / "global.safetensors"
        there, here = load_file(Path(config.out) / name), load_file(Path(local.out) / name)
        assert there.keys() == here.keys()
        for key in there:
            assert float((there[key] - here[key]).abs().max()) <= 1e-6, (round_, key)
