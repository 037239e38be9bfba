"""A deployed client that trains on its own data file (`fedlr client --data`): the same
training as on the same examples taken from the run's dataset, and labels that must be the run's."""

from __future__ import annotations

import json

import pytest
import torch

from fedlr.client.jobs import run_job
from fedlr.data.sources import load_local
from fedlr.errors import ConfigError
from fedlr.federation import Federation
from fedlr.node_policy import NodePolicy
from fedlr.server.coordinator import Coordinator
from fedlr.server.rundir import RunDir
from fedlr.settings.schema import SimulationConfig


def test_training_on_a_local_file_equals_training_on_the_same_examples_of_the_run(tmp_path):
    config = SimulationConfig.load(None, dict(strategy="fedit", model="tiny", num_clients=3,
                                              ranks=[4], local_steps=3, batch_size=8, seed=5,
                                              eval_examples=16, out=str(tmp_path / "run")))
    fed = Federation.build(config)
    state = fed.strategy.init_state(fed.model.host.initial_head)
    downlink = fed.strategy.downlink(state, "1")
    job = Coordinator(fed, RunDir(tmp_path / "run")).job("1", 1)

    shard, names = fed.data.partitions[1], fed.data.data.label_names
    local = tmp_path / "mine.jsonl"
    local.write_text("".join(json.dumps({"text": t, "label": names[y]}) + "\n"
                             for t, y in zip(shard["text"], shard["label"], strict=True)))

    shared = run_job(job, downlink)
    own = run_job(job, downlink, str(local))
    assert own.num_examples == shared.num_examples == len(shard)
    ours, theirs = own.adapter.tensors(), shared.adapter.tensors()
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        torch.testing.assert_close(ours[key], tensor, rtol=0, atol=0)
    sent = downlink.tensors()
    assert any(not torch.equal(t, sent[k]) for k, t in ours.items() if k in sent)  # it trained


def test_local_labels_must_be_the_runs(tmp_path):
    local = tmp_path / "mine.jsonl"
    local.write_text('{"text": "a", "label": "cats"}\n{"text": "b", "label": "dogs"}\n')
    rows = load_local(str(local), "classification", ["dogs", "cats"])
    assert rows["label"] == [1, 0]  # the run's ids, not the file's sorted order
    with pytest.raises(ConfigError, match=r"labels \['dogs'\] are not among the run's labels"):
        load_local(str(local), "classification", ["cats", "birds"])
    with pytest.raises(ConfigError, match="data file is not found"):
        load_local(str(tmp_path / "none.jsonl"), "classification", ["cats"])


def test_the_client_launcher_hands_its_file_to_the_node(tmp_path):
    from flwr.common.config import parse_config_args

    from fedlr.client.launch import supernode_argv

    mine = tmp_path / "my data.jsonl"
    mine.write_text('{"text": "a", "label": "cats"}\n')
    argv = supernode_argv("h:1", ca=None, key=None, partition_id=2, num_partitions=3, port=9,
                          insecure=True, data=mine, state_dir=tmp_path / "state")
    node_config = parse_config_args([argv[argv.index("--node-config") + 1]])
    policy = {k: v for k, v in node_config.items() if k not in ("partition-id", "num-partitions",
                                                                 "data-path", "state-dir",
                                                                 "budget-delta")}
    assert node_config == {"partition-id": 2, "num-partitions": 3, "data-path": str(mine),
                           "state-dir": str(tmp_path / "state"), "budget-delta": 1e-5, **policy}
    assert policy == NodePolicy().node_config()  # every node bounds its jobs
    with pytest.raises(ConfigError, match="--data file not found"):
        supernode_argv("h:1", ca=None, key=None, partition_id=2, num_partitions=3, port=9,
                       insecure=True, data=tmp_path / "none.jsonl", state_dir=tmp_path)
