"""The Flower ClientApp: one round of local training per `train` message.

Everything a client needs to train arrives in the message (see `fedlr.payload.Job`), and the
frozen base and the tokenised data are loaded once per process (`fedlr.session`), so one app serves
both a simulation of hundreds of virtual clients and a deployed edge machine. What protects the
node's data does not come from the server: its privacy ledger and limits are the node's own
(`fedlr.node_privacy`, set by `fedlr client`), and DP's random draws come from its OS entropy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlr.adapters import adapter_from_tensors
from fedlr.client.training import LocalTrainer
from fedlr.errors import FedlrError
from fedlr.models import resolve_device
from fedlr.node_privacy import SIMULATED_NODES_ENV, NodeLimits, NodeState
from fedlr.payload import Job, adapter_payload
from fedlr.session import data_session, local_shard, model_session

app = ClientApp()


def node_privacy(node_config: dict[str, Any]) -> tuple[NodeState, NodeLimits]:
    """This node's state directory and limits, from its own configuration: `fedlr client` sets
    them in the node config; `fedlr simulate` gives each simulated node a folder of the run."""
    folder = node_config.get("state-dir")
    root = os.environ.get(SIMULATED_NODES_ENV)
    if not folder and root:
        folder = Path(root) / str(node_config["partition-id"])
    return NodeState(Path(str(folder)) if folder else None), NodeLimits.from_node_config(
        node_config)


def run_job(job: Job, downlink: dict[str, torch.Tensor], local_data: str | None = None,
            state: NodeState | None = None, limits: NodeLimits | None = None) -> RecordDict:
    """Train as the job says, on this node's own file if it has one (else on its partition of
    the run's dataset), within the node's limits, and package the reply: the trained factors
    (B alone when A is frozen), the head, the example count and metrics, and the node's ledger,
    persisted before the reply leaves."""
    model = job.model_spec()
    session = model_session(model, job.alpha, job.train["device"])
    spec = job.data_spec()
    if local_data:
        examples = local_shard(local_data, spec.task, tuple(job.labels), model, spec.max_length)
    else:
        examples = data_session(spec, model).shard(int(job.client_id))
    start = adapter_from_tensors(downlink, job.scalings)
    config = job.train_config()
    ledger = None
    state = state or NodeState(None)
    if config.dp is not None:
        ledger = state.ledger(job.ledger, config.dp.accountant, job.client_id)
    result = LocalTrainer(session.host, config).train(
        job.client_id,
        start,
        examples,
        rank=job.rank,
        train_a=job.train_a,
        train_head=job.train_head,
        ledger=ledger,
        seed=job.seed,
        limits=limits,
    )
    if ledger is not None:
        state.save(ledger)  # before the reply: every round the server sees is counted
    trained, scalings = adapter_payload(result.adapter)
    flat = {k: t for k, t in trained.items() if job.train_a or not k.startswith("lora_A::")}
    numbers = {k: float(v) for k, v in result.metrics.items() if isinstance(v, int | float)}
    info = {
        "client_id": job.client_id,
        "scalings": json.dumps(scalings),
        "ledger": json.dumps(ledger.to_dict()) if ledger is not None else "",
        "grad_sample_mode": str(result.metrics.get("grad_sample_mode", "")),
    }
    return RecordDict(
        {
            "adapter": ArrayRecord(torch_state_dict=flat),
            "metrics": MetricRecord({"num-examples": result.num_examples, **numbers}),
            "info": ConfigRecord(info),
        }
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    job = Job.from_json(str(msg.content["config"]["job"]))
    downlink = msg.content["adapter"].to_torch_state_dict()
    try:
        state, limits = node_privacy(dict(context.node_config))
        content = run_job(job, downlink, context.node_config.get("data-path"), state, limits)
    except FedlrError as exc:  # a refusal (budget, bad local data): the server logs the reason
        content = RecordDict({"info": ConfigRecord({"client_id": job.client_id,
                                                    "refused": str(exc)})})
    return Message(content=content, reply_to=msg)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Which client this node is (its partition id, set when it was started) and its device."""
    node = context.node_config
    identity = ConfigRecord({
        "partition-id": int(node["partition-id"]),
        "num-partitions": int(node["num-partitions"]),
        "device": resolve_device().type,
        "data": str(node.get("data-path", "its partition of the run's dataset")),
    })
    return Message(content=RecordDict({"identity": identity}), reply_to=msg)
