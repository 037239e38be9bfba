"""What a node does with the ClientApp's messages (`fedlr.client.app` routes them here): one
round of local training per job, a simulation's batched group, a secure-aggregation stage, the
preload that comes with its identification.

Everything a client needs to train arrives in the message (see `fedlr.wire`), and the
frozen base and the tokenised data are loaded once per process (`fedlr.session`), so the same
code serves a simulation of hundreds of virtual clients, a deployed node's warm trainer
(`fedlr.client.node_trainer`) and, without one, each round's own ClientApp process. What protects
the node's data does not come from the server: its privacy ledger and limits are the node's own
(`fedlr.privacy.node`, set by `fedlr client`), and DP's random draws come from its OS entropy.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedlr.adapters import Adapter
from fedlr.client.group_training import GroupJob, GroupTrainer
from fedlr.client.node_trainer import TrainerUnavailable, ask
from fedlr.client.training import ClientOptions, LocalTrainer, TrainResult
from fedlr.errors import ConfigError, FedlrError
from fedlr.lora.strategies.base import ClientUpdate
from fedlr.models.hosts import resolve_device
from fedlr.node_policy import NodePolicy
from fedlr.privacy.node import SIMULATED_NODES_ENV, NodeLimits, NodeState
from fedlr.privacy.secagg.client import respond
from fedlr.privacy.secagg.encoding import Encoding, encode
from fedlr.session import client_shards, local_shard, model_session
from fedlr.wire import (
    Job,
    Parts,
    Preload,
    Refusal,
    TrainJob,
    TrainReply,
    bundle,
    reply_from_parts,
    unbundle,
)
from fedlr.wire_fields import GROUP_FIELD, STAGE_FIELD

log = logging.getLogger("fedlr")


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
            state: NodeState | None = None, limits: NodeLimits | None = None,
            policy: NodePolicy | None = None) -> TrainReply:
    """Train as the job says, on this node's own file if it has one (else on its shard of the
    run's data, `client_shards`), within the node's limits and `policy` (checked before anything
    is loaded or read): the trained adapter, the example count and metrics, and the node's
    ledger, persisted before the reply leaves."""
    if policy is not None:
        policy.check_job(job, local_data, job.client_id)
    model = job.model_spec()
    session = model_session(model, job.alpha, job.train["device"])
    spec = job.data_spec()
    if local_data:
        examples = local_shard(local_data, spec.task, tuple(job.labels), model, spec.max_length)
    else:
        examples = client_shards(spec, model).shard(int(job.client_id))
    config = job.train_config()
    ledger = None
    state = state or NodeState(None)
    with state.locked():  # from the ledger's load to its save: no other process's round is lost
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


def run_group(downs: dict[str, TrainJob], nodes: Path, engine: str, chunk_tokens: int = 0
              ) -> dict[str, TrainReply | Refusal]:
    """A simulation's batched group: its clients trained together in this worker
    (`GroupTrainer`), each within its own simulated node's privacy state, exactly as if each had
    trained alone. Where the model is beyond the batched engine, `auto` trains them one by one."""
    first = next(iter(downs.values())).job
    model = first.model_spec()
    session = model_session(model, first.alpha, first.train["device"])
    data = client_shards(first.data_spec(), model)
    config = first.train_config()
    out: dict[str, TrainReply | Refusal] = {}
    members: list[tuple[GroupJob, NodeState]] = []
    for client, down in downs.items():
        job, state = down.job, NodeState(nodes / client)
        try:
            if (job.model_spec(), job.data_spec(), job.train_config()) != (
                    model, first.data_spec(), config):
                raise FedlrError("a group's clients must share one model, data and training "
                                 "configuration")
            ledger = (state.ledger(job.ledger, config.dp.accountant, client)
                      if config.dp is not None else None)
            examples = data.shard(int(client))
        except FedlrError as exc:
            out[client] = Refusal(client, str(exc))
            continue
        options = ClientOptions(rank=job.rank, train_a=job.train_a, train_head=job.train_head,
                                ledger=ledger, seed=job.seed)
        members.append((GroupJob(client, down.downlink, examples, options), state))
    trainer = LocalTrainer(session.host, config)
    try:
        results = GroupTrainer(trainer, chunk_tokens or None).train([job for job, _ in members])
    except ConfigError as exc:
        if engine == "batched":
            raise
        log.info("training the group one by one: %s", exc)
        results = [_alone(trainer, job) for job, _ in members]
    for (job, state), result in zip(members, results, strict=True):
        if isinstance(result, FedlrError):
            out[job.client_id] = Refusal(job.client_id, str(result))
            continue
        if job.ledger is not None:
            state.save(job.ledger)  # before the reply: every round the server sees is counted
        numbers = {k: float(v) for k, v in result.metrics.items() if isinstance(v, int | float)}
        out[job.client_id] = TrainReply(job.client_id, result.adapter, result.num_examples,
                                        numbers, job.ledger)
    return {c: out[c] for c in downs}


def _alone(trainer: LocalTrainer, job: GroupJob) -> TrainResult | FedlrError:
    try:
        return trainer.train(job.client_id, job.start, job.data, **job.options)
    except FedlrError as exc:
        return exc


def records(parts: Parts) -> RecordDict:
    """Parts as Flower carries them (the server unwraps them the same way)."""
    return RecordDict({"arrays": ArrayRecord(torch_state_dict=parts.arrays),
                       "fields": ConfigRecord(parts.fields)})


def train_here_config(node_config: dict[str, Any]
                      ) -> tuple[str | None, NodeState, NodeLimits, NodePolicy | None]:
    """`run_job`'s node arguments from the node's own configuration: its data file, state,
    limits and job policy."""
    state, limits = node_privacy(node_config)
    data = node_config.get("data-path")
    return (str(data) if data else None), state, limits, NodePolicy.from_node_config(node_config)


def train_remotely(trainer: Path, down: TrainJob) -> TrainReply:
    """The job trained by the node's warm trainer: its reply, or its refusal raised as
    FedlrError (TrainerUnavailable where it cannot be reached)."""
    parts = down.to_parts()
    fields, arrays = ask(trainer, parts.fields, {k: t.numpy() for k, t in parts.arrays.items()})
    tensors = {k: torch.from_numpy(a.copy()) for k, a in arrays.items()}
    reply = reply_from_parts(Parts(tensors, fields), down.downlink)
    if isinstance(reply, Refusal):
        raise FedlrError(reply.reason)
    return reply


def train_here(down: TrainJob, context: Context, trainer: Path | None = None) -> TrainReply:
    """Run the job on this node, within its own privacy state and limits: by the node's warm
    `trainer` where there is one (the model and data stay loaded between rounds), else in this
    process."""
    if trainer is not None:
        try:
            return train_remotely(trainer, down)
        except TrainerUnavailable as exc:
            log.warning("%s; training in this process", exc)
    return run_job(down.job, down.downlink, *train_here_config(dict(context.node_config)))


def answer_message(content: RecordDict, context: Context, trainer: Path | None) -> RecordDict:
    """A `train` message's answer, computed in this process (its training by the node's warm
    `trainer` where there is one)."""
    parts = Parts(content["arrays"].to_torch_state_dict(), dict(content["fields"]))
    return records(answer_train(parts, context, trainer))


def answer_train(parts: Parts, context: Context, trainer: Path | None) -> Parts:
    """The answer to a `train` message: a secure-aggregation stage, a batched group, or one
    job (its refusal, with the reason, is an answer too). `trainer`: the node's warm trainer,
    which trains where there is one."""
    if STAGE_FIELD in parts.fields:
        return secure_stage(parts, context, trainer)
    if GROUP_FIELD in parts.fields:
        return train_group(parts)
    return job_answer(parts, lambda down: train_here(down, context, trainer))


def job_answer(parts: Parts, train: Callable[[TrainJob], TrainReply]) -> Parts:
    """One job's answer, as the server gets it: the reply (B alone where A is frozen), or the
    refusal with its reason (budget, limits, bad local data), which the server logs."""
    down = TrainJob.from_parts(parts)
    try:
        return train(down).to_parts(train_a=down.job.train_a)
    except FedlrError as exc:
        return Refusal(down.job.client_id, str(exc)).to_parts()


def train_group(parts: Parts) -> Parts:
    """A batched group's message: each member's reply under its id. Only a simulated node
    trains other clients than itself; a deployed node refuses."""
    each = unbundle(parts)
    root = os.environ.get(SIMULATED_NODES_ENV)
    replies: dict[str, Parts] = {}
    downs: dict[str, TrainJob] = {}
    for client, p in each.items():
        try:
            if not root:
                raise FedlrError("a group of clients is trained in a simulation only; a deployed "
                                 "node trains itself (use engine per-client)")
            downs[client] = TrainJob.from_parts(p)
        except FedlrError as exc:
            replies[client] = Refusal(client, str(exc)).to_parts()
    if downs:
        try:
            done = run_group(downs, Path(str(root)), str(parts.fields.get("engine", "auto")),
                             int(parts.fields.get("chunk_tokens", 0)))
        except FedlrError as exc:
            done = {c: Refusal(c, str(exc)) for c in downs}
        for client, reply in done.items():
            train_a = downs[client].job.train_a
            replies[client] = (reply.to_parts(train_a=train_a) if isinstance(reply, TrainReply)
                               else reply.to_parts())
    return bundle({c: replies[c] for c in each})


def secure_stage(parts: Parts, context: Context, trainer: Path | None = None) -> Parts:
    """One secure-aggregation stage. The round's secrets stay in this node's own context
    between stages; in the `train` stage the node trains and encodes its part, and replies with
    its metrics and ledger but not its example count (summed securely)."""
    kept = dict(context.state["secagg"]) if "secagg" in context.state else {}
    client = str(context.node_config.get("partition-id", ""))
    extra: dict[str, Any] = {}

    def part(encoding: Encoding) -> np.ndarray:
        down = TrainJob.from_parts(parts)
        reply = train_here(down, context, trainer)
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


def preload(text: str, node_config: dict[str, Any]) -> None:
    """Load the run's model session now, into the cache the jobs read, if the node's policy
    allows that model. Where it cannot be loaded, the node still answers: its first job will
    refuse with the reason."""
    try:
        wanted = Preload.from_json(text)
        policy = NodePolicy.from_node_config(node_config)
        if policy is not None:
            policy.check_model(wanted.model_spec(), str(node_config.get("partition-id", "?")))
        model_session(wanted.model_spec(), wanted.alpha, wanted.device)
    except Exception as exc:  # its first job refuses with the reason
        log.warning("the model was not preloaded: %s", exc)


def device_name() -> str:
    """Where this process trains: what a node reports when it is identified."""
    return resolve_device().type
