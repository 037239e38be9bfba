"""The Flower ClientApp: one round of local training per `train` message.

Everything a client needs to train arrives in the message (see `fedlr.wire`), and the
frozen base and the tokenised data are loaded once per process (`fedlr.session`), so one app serves
both a simulation of hundreds of virtual clients and a deployed edge machine. What protects the
node's data does not come from the server: its privacy ledger and limits are the node's own
(`fedlr.privacy.node`, set by `fedlr client`), and DP's random draws come from its OS entropy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlr.adapters import Adapter
from fedlr.client.training import LocalTrainer
from fedlr.errors import FedlrError
from fedlr.lora.strategies.base import ClientUpdate
from fedlr.models.hosts import resolve_device
from fedlr.privacy.node import SIMULATED_NODES_ENV, NodeLimits, NodeState
from fedlr.privacy.secagg.client import respond
from fedlr.privacy.secagg.encoding import Encoding, encode
from fedlr.session import data_session, local_shard, model_session
from fedlr.wire import Job, Parts, Refusal, TrainJob, TrainReply

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


def run_job(job: Job, downlink: Adapter, local_data: str | None = None,
            state: NodeState | None = None, limits: NodeLimits | None = None) -> TrainReply:
    """Train as the job says, on this node's own file if it has one (else on its partition of
    the run's dataset), within the node's limits: the trained adapter, the example count and
    metrics, and the node's ledger, persisted before the reply leaves."""
    model = job.model_spec()
    session = model_session(model, job.alpha, job.train["device"])
    spec = job.data_spec()
    if local_data:
        examples = local_shard(local_data, spec.task, tuple(job.labels), model, spec.max_length)
    else:
        examples = data_session(spec, model).shard(int(job.client_id))
    config = job.train_config()
    ledger = None
    state = state or NodeState(None)
    if config.dp is not None:
        ledger = state.ledger(job.ledger, config.dp.accountant, job.client_id)
    result = LocalTrainer(session.host, config).train(
        job.client_id,
        downlink,
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
    numbers = {k: float(v) for k, v in result.metrics.items() if isinstance(v, int | float)}
    return TrainReply(job.client_id, result.adapter, result.num_examples, numbers, ledger)


def records(parts: Parts) -> RecordDict:
    """Parts as Flower carries them (the server unwraps them the same way)."""
    return RecordDict({"arrays": ArrayRecord(torch_state_dict=parts.arrays),
                       "fields": ConfigRecord(parts.fields)})


def train_here(down: TrainJob, context: Context) -> TrainReply:
    """Run the job on this node, within its own privacy state and limits."""
    state, limits = node_privacy(dict(context.node_config))
    return run_job(down.job, down.downlink, context.node_config.get("data-path"), state, limits)


@app.train()
def train(msg: Message, context: Context) -> Message:
    parts = Parts(msg.content["arrays"].to_torch_state_dict(), dict(msg.content["fields"]))
    if "stage" in parts.fields:
        return Message(content=records(secure_stage(parts, context)), reply_to=msg)
    down = TrainJob.from_parts(parts)
    try:
        reply = train_here(down, context).to_parts(train_a=down.job.train_a)
    except FedlrError as exc:  # a refusal (budget, bad local data): the server logs the reason
        reply = Refusal(down.job.client_id, str(exc)).to_parts()
    return Message(content=records(reply), reply_to=msg)


def secure_stage(parts: Parts, context: Context) -> Parts:
    """One secure-aggregation stage. The round's secrets stay in this node's own context
    between stages; in the `train` stage the node trains and encodes its part, and replies with
    its metrics and ledger but not its example count (summed securely)."""
    kept = dict(context.state["secagg"]) if "secagg" in context.state else {}
    client = str(context.node_config.get("partition-id", ""))
    extra: dict[str, Any] = {}

    def part(encoding: Encoding) -> np.ndarray:
        down = TrainJob.from_parts(parts)
        reply = train_here(down, context)
        update = ClientUpdate(down.job.client_id, reply.adapter, reply.num_examples)
        extra.update(metrics=json.dumps(reply.metrics), ledger=json.dumps(
            reply.ledger.to_dict()) if reply.ledger is not None else "")
        return encode(encoding, update, down.downlink, np.random.default_rng())

    try:
        fields, kept = respond(parts.fields, kept, part)
    except (FedlrError, ValueError) as exc:  # a refusal, an unfit update, a protocol breach
        return Refusal(client, str(exc)).to_parts()
    if kept:
        context.state["secagg"] = ConfigRecord(kept)
    elif "secagg" in context.state:
        del context.state["secagg"]  # the round is over: its secrets go
    return Parts({}, {**fields, **extra, "kind": "secagg"})


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
