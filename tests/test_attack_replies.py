"""Every reply is untrusted input (issue 36, findings 4, 5 and two items of 8).

Each test plays one hostile party with only what it has: a client that answers the server's
real messages with a crafted Flower Message (an identity that is not one, arrays that are not an
ArrayRecord, a ledger no accountant counts, metrics that are not an object, a float64 B, a LoRA
scaling of 1e39, factors whose product overflows, a count of 2^62), a server that asks SecAgg+
clients for a threshold of 1, and a crash in the middle of an export. The server's side runs
for real: `Coordinator.run_rounds` / `Coordinator.round` over a Grid stand-in that carries each
message to the node's handler, honest nodes answering through the wire format and the SecAgg+
client code a node runs (their training replaced by a small seeded change, which the server
cannot tell apart). After each attack the round completes with the honest clients, the
attacker's rejection (or the node's being ignored) has its reason, and the checkpoint is finite.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedlr.adapters import Adapter, LoraFactors
from fedlr.client.jobs import records, secure_stage
from fedlr.federation import Federation
from fedlr.lora.strategies import FederationSpec, make_strategy
from fedlr.lora.strategies.base import ClientUpdate
from fedlr.lora.sums import SumSpec
from fedlr.privacy.secagg.client import ProtocolError, respond
from fedlr.privacy.secagg.encoding import Encoding, encode
from fedlr.server.coordinator import Coordinator
from fedlr.server.export import export_peft
from fedlr.server.nodes import NodeDirectory
from fedlr.server.rundir import RunDir
from fedlr.settings.schema import SimulationConfig
from fedlr.wire import Parts, TrainJob, TrainReply
from fedlr.wire_fields import STAGE_FIELD

BASE = dict(model="tiny", num_clients=3, rounds=1, ranks=[4], local_steps=1, batch_size=4,
            eval_examples=16, seed=3, connect_timeout=0.1)
ATTACKER = "2"  # the last client: ids 0 and 1 are honest
Handler = Callable[[Message], Message]


# -- the federation, the nodes and the grid ------------------------------------------------------


@pytest.fixture(autouse=True)
def in_a_run(monkeypatch):
    """Flower stamps every Message with the run it belongs to, as the ServerApp's process is."""
    for name, value in (("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Federation:
    """The tiny model and data once; each test derives its federation's settings from it."""
    out = tmp_path_factory.mktemp("base") / "run"
    return Federation.build(SimulationConfig.load(None, {**BASE, "out": str(out)}))


def federation(base: Federation, tmp_path: Path, **changes) -> Federation:
    """`base` under other settings (strategy, ranks, secure aggregation, DP), as
    `Federation.build` would make it: the same model and data, its own strategy."""
    config = SimulationConfig.load(None, {**BASE, **changes, "out": str(tmp_path / "run")})
    host = base.model.host
    spec = FederationSpec(modules=host.shapes, ranks=config.client_ranks(), alpha=config.alpha,
                          extras=host.head_shapes)
    strategy = make_strategy(config.strategy, spec, hetero=config.hetero, head=config.head,
                             seed=config.seed)
    return dataclasses.replace(base, config=config, strategy=strategy)


def identity(partition: object, num_partitions: object = 3) -> RecordDict:
    return RecordDict({"identity": ConfigRecord({"partition-id": partition,
                                                 "num-partitions": num_partitions,
                                                 "device": "cpu", "data": "its partition"})})


def trained(down: TrainJob, client: str) -> Adapter:
    """What an honest node sends back: its downlink moved a little (seeded per client), A
    kept where the job freezes it."""
    gen = torch.Generator().manual_seed(100 + int(client))

    def moved(t: torch.Tensor) -> torch.Tensor:
        return t + 0.01 * torch.randn(t.shape, generator=gen, dtype=t.dtype)

    job = down.job
    lora = {name: LoraFactors(moved(f.A) if job.train_a else f.A, moved(f.B), f.scaling)
            for name, f in down.downlink.lora.items()}
    extras = {name: moved(t) if job.train_head else t for name, t in down.downlink.extras.items()}
    return Adapter(lora=lora, extras=extras)


def parts_of(msg: Message) -> Parts:
    return Parts(msg.content["arrays"].to_torch_state_dict(), dict(msg.content["fields"]))


class Node:
    """One node: it answers the identity query with its partition id, and each train message
    as an honest node does (a reply in the wire format, or its SecAgg+ stage), unless the test
    gives it a hostile `train` handler."""

    def __init__(self, partition: object, query: RecordDict | None = None,
                 train: Callable[[Message, Node], RecordDict] | None = None) -> None:
        self.partition, self.kept = partition, {}
        self.query_reply = query if query is not None else identity(partition)
        self.hostile = train

    def __call__(self, msg: Message) -> Message:
        if msg.metadata.message_type == "query":
            return Message(content=self.query_reply, reply_to=msg)
        content = self.hostile(msg, self) if self.hostile else self.honest(msg)
        return Message(content=content, reply_to=msg)

    def honest(self, msg: Message) -> RecordDict:
        parts = parts_of(msg)
        if STAGE_FIELD in parts.fields:
            return records(self.secure(parts))
        return records(self.reply(parts).to_parts(train_a=TrainJob.from_parts(parts).job.train_a))

    def reply(self, parts: Parts, **changes) -> TrainReply:
        down = TrainJob.from_parts(parts)
        client = str(self.partition)
        reply = TrainReply(client, trained(down, client), 50, {"train_loss": 1.0})
        return dataclasses.replace(reply, **changes)

    def secure(self, parts: Parts, metrics: str = '{"train_loss": 1.0}') -> Parts:
        """A SecAgg+ stage, answered by the client's own protocol code (`respond`)."""
        def part(encoding):
            down = TrainJob.from_parts(parts)
            update = ClientUpdate(down.job.client_id, trained(down, down.job.client_id), 50)
            return encode(encoding, update, down.downlink, np.random.default_rng())

        fields, self.kept = respond(parts.fields, self.kept, part)
        extra = {"metrics": metrics, "ledger": ""} if parts.fields[STAGE_FIELD] == "train" else {}
        return Parts({}, {**fields, **extra, "kind": "secagg"})


class Grid:
    """Flower's Grid as the coordinator uses it: node ids, push (each message gets its id),
    pull (each node answers when first pulled)."""

    def __init__(self, nodes: dict[int, Handler]) -> None:
        self.nodes, self.pending = nodes, {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        replies = []
        for message_id in list(ids):
            msg = self.pending.pop(message_id, None)
            if msg is not None:
                replies.append(self.nodes[msg.metadata.dst_node_id](msg))
        return replies


def run(fed: Federation, attacker: Node | None = None) -> Coordinator:
    """The run as a ServerApp runs it, with nodes 0 and 1 honest and `attacker` the third."""
    nodes: dict[int, Handler] = {10: Node(0), 11: Node(1)}
    if attacker is not None:
        nodes[12] = attacker
    coordinator = Coordinator(fed, RunDir(fed.config.out))
    coordinator.run_rounds(Grid(nodes), resume=False)
    return coordinator


def contained(coordinator: Coordinator, reason: str, attacker: str | None = ATTACKER) -> dict:
    """The run's last record: the honest clients in, the attacker out with `reason`, and a
    finite checkpoint (factors and their products)."""
    record = coordinator.run.read_metrics()[-1]
    assert record.get("round_failed") is None, record.get("round_failed")
    assert record["accepted"] == ["0", "1"]
    if attacker is not None:
        reasons = {r["client"]: r["reason"] for r in record["rejected"]}
        assert reason in reasons[attacker], reasons
    tensors, _ = coordinator.run.load_checkpoint()
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    for key, a in tensors.items():
        if key.startswith("lora_A::"):
            b = tensors[key.replace("lora_A::", "lora_B::")]
            assert bool(torch.isfinite(b @ a).all()), key
    return record


# -- finding 4: one client can crash the server's run ------------------------------------------


@pytest.mark.parametrize("query", [
    identity("zero"), identity(1.5), identity(True), identity(2, "three"),
    RecordDict({"identity": ConfigRecord({"num-partitions": 3})}),
    RecordDict({"identity": ArrayRecord()}), RecordDict({})],
    ids=["text", "float", "bool", "text-count", "missing", "not-a-config", "no-identity"])
def test_a_malformed_identity_reply_ignores_that_node_and_the_run_goes_on(base, tmp_path,
                                                                          query, caplog):
    fed = federation(base, tmp_path)
    coordinator = run(fed, Node(int(ATTACKER), query=query))
    record = contained(coordinator, "not connected")  # client 2 never became the attacker's
    assert "its identity reply is malformed" in caplog.text and "ignoring node 12" in caplog.text
    directory = NodeDirectory(3)  # and the next round's refresh asks it no more: it stays out
    grid = Grid({12: Node(int(ATTACKER), query=query)})
    directory.refresh(grid)
    directory.refresh(grid)
    assert list(directory.ignored) == [12] and directory.clients == {}
    assert record["num_accepted"] == 2


def test_a_reply_whose_arrays_are_not_an_array_record_is_that_clients_rejection(base, tmp_path):
    def config_arrays(msg: Message, node: Node) -> RecordDict:
        honest = records(node.reply(parts_of(msg)).to_parts(train_a=False))
        return RecordDict({"arrays": ConfigRecord({"lora_B": 1.0}), "fields": honest["fields"]})

    coordinator = run(federation(base, tmp_path), Node(int(ATTACKER), train=config_arrays))
    contained(coordinator, "malformed reply (AttributeError")


@pytest.mark.parametrize(("ledger", "reason"), [
    ({"accountant": "gdp", "history": [[1.0, 0.01, 10]], "rounds": 1}, "accountant"),
    ({"accountant": "prv", "history": [[1.0 + i / 1e4, 0.01, 1] for i in range(5000)],
      "rounds": 1}, "ledger"),
], ids=["unknown-accountant", "thousands-of-segments"])
def test_a_reported_ledger_no_accountant_can_count_is_that_clients_rejection(
        base, tmp_path, ledger, reason):
    def hostile_ledger(msg: Message, node: Node) -> RecordDict:
        parts = node.reply(parts_of(msg)).to_parts(train_a=False)
        return records(Parts(parts.arrays, {**parts.fields, "ledger": json.dumps(ledger)}))

    fed = federation(base, tmp_path, noise_multiplier=1.0)
    coordinator = run(fed, Node(int(ATTACKER), train=hostile_ledger))
    contained(coordinator, reason)
    assert ATTACKER not in coordinator.privacy.ledgers
    assert ATTACKER not in json.loads((coordinator.run.root / "privacy.json").read_text()).get(
        "clients", {})


@pytest.mark.parametrize(("metrics", "reason"), [
    ("[]", "metrics must be a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "RecursionError")], ids=["list", "deep"])
def test_secure_aggregation_metrics_that_are_not_an_object_are_that_clients_rejection(
        base, tmp_path, metrics, reason):
    def hostile_metrics(msg: Message, node: Node) -> RecordDict:
        return records(node.secure(parts_of(msg), metrics=metrics))

    fed = federation(base, tmp_path, secure_aggregation=True)
    record = contained(run(fed, Node(int(ATTACKER), train=hostile_metrics)), reason)
    assert record["secagg_threshold"] == 2


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_a_metric_that_is_not_a_finite_number_is_that_clients_rejection(base, tmp_path, value):
    """metrics.jsonl holds JSON numbers only: a NaN train loss would make it unreadable."""
    def non_finite(msg: Message, node: Node) -> RecordDict:
        parts = parts_of(msg)
        reply = node.reply(parts, metrics={"train_loss": value})
        return records(reply.to_parts(train_a=TrainJob.from_parts(parts).job.train_a))

    record = contained(run(federation(base, tmp_path), Node(int(ATTACKER), train=non_finite)),
                       "is not a finite number")
    assert math.isfinite(record["train_loss"])


def test_a_float64_update_under_lora_fair_is_that_clients_rejection(base, tmp_path):
    def float64(msg: Message, node: Node) -> RecordDict:
        reply = node.reply(parts_of(msg))
        lora = {n: LoraFactors(f.A.double(), f.B.double(), f.scaling)
                for n, f in reply.adapter.lora.items()}
        adapter = dataclasses.replace(reply.adapter, lora=lora)
        return records(dataclasses.replace(reply, adapter=adapter).to_parts())

    fed = federation(base, tmp_path, strategy="fair")
    contained(run(fed, Node(int(ATTACKER), train=float64)), "has dtype torch.float64")


# -- finding 5: one client can poison or take over the global adapter --------------------------


def scaled(scaling: float | None = None, b: float | None = None):
    """A hostile train handler: the honest reply with every module's scaling and/or B set."""
    def handler(msg: Message, node: Node) -> RecordDict:
        parts = parts_of(msg)
        reply = node.reply(parts)
        lora = {n: LoraFactors(f.A, torch.full_like(f.B, b) if b is not None else f.B,
                               scaling if scaling is not None else f.scaling)
                for n, f in reply.adapter.lora.items()}
        adapter = dataclasses.replace(reply.adapter, lora=lora)
        train_a = TrainJob.from_parts(parts).job.train_a
        return records(dataclasses.replace(reply, adapter=adapter).to_parts(train_a=train_a))
    return handler


@pytest.mark.parametrize("strategy", ["fedit", "ffa"])
def test_a_lora_scaling_of_1e39_is_rejected_and_the_checkpoint_stays_finite(
        base, tmp_path, strategy):
    fed = federation(base, tmp_path, strategy=strategy)
    contained(run(fed, Node(int(ATTACKER), train=scaled(scaling=1e39))), "LoRA scaling 1e+39")


@pytest.mark.parametrize("strategy", ["fedit", "ffa"])
def test_factors_whose_effective_update_overflows_are_rejected(base, tmp_path, strategy):
    """The federation's own scaling (4), but B = 1e38: finite as sent, infinite once scaled."""
    fed = federation(base, tmp_path, strategy=strategy)
    contained(run(fed, Node(int(ATTACKER), train=scaled(b=1e38))), "effective update")


def test_an_aggregate_that_overflows_fails_the_round_and_is_never_checkpointed(base, tmp_path):
    """Each of the attacker's updates is finite (two rank components that cancel: B A = 0),
    but FedIT averages B and A apart, the cancelling component only over the clients that hold
    it: the new global B A overflows float32. The round fails, the adapter carries over."""
    def cancelling(msg: Message, node: Node) -> RecordDict:
        parts = parts_of(msg)
        reply = node.reply(parts)
        lora = {}
        for name, f in reply.adapter.lora.items():
            A, B = torch.zeros_like(f.A), torch.zeros_like(f.B)
            A[0], A[4] = 1e20, 1e20
            B[:, 0], B[:, 4] = 1e20 / f.scaling, -1e20 / f.scaling
            lora[name] = LoraFactors(A, B, f.scaling)
        adapter = dataclasses.replace(reply.adapter, lora=lora)
        return records(dataclasses.replace(reply, adapter=adapter).to_parts())

    fed = federation(base, tmp_path, strategy="fedit", ranks=[4, 4, 8])
    coordinator = run(fed, Node(int(ATTACKER), train=cancelling))
    record = coordinator.run.read_metrics()[-1]
    assert "the new global update" in record["round_failed"]
    # its factors or their product past float32, as the float rounding of the average has it
    assert re.search("non-finite factors|not finite in torch.float32", record["round_failed"])
    tensors, info = coordinator.run.load_checkpoint()
    initial, _ = fed.strategy.init_state(fed.model.host.initial_head).to_tensors()
    assert info["round"] == 1 and tensors.keys() == initial.keys()
    assert all(torch.equal(tensors[k], initial[k]) for k in initial)  # carried over


def test_an_example_count_of_2_62_weighs_only_as_much_as_the_cap(base, tmp_path):
    """FFA with one rank: the global B is sum_k p_k B_k exactly, so the weights can be read
    back. Honest clients report 50 examples, the attacker 2^62 with the cap at 100: its weight
    is 100 / 200, not 1 - 1e-17."""
    sent_b: dict[str, dict[str, torch.Tensor]] = {}

    def record_b(handler):
        def wrapped(msg: Message, node: Node) -> RecordDict:
            content = handler(msg, node)
            state = content["arrays"].to_torch_state_dict()
            sent_b[str(node.partition)] = {k: v for k, v in state.items()
                                           if k.startswith("lora_B::")}
            return content
        return wrapped

    def huge_count(msg: Message, node: Node) -> RecordDict:
        return records(node.reply(parts_of(msg), num_examples=2**62).to_parts(train_a=False))

    def honest(msg: Message, node: Node) -> RecordDict:
        return node.honest(msg)

    fed = federation(base, tmp_path, max_examples_per_client=100)
    nodes = {10: Node(0, train=record_b(honest)), 11: Node(1, train=record_b(honest)),
             12: Node(int(ATTACKER), train=record_b(huge_count))}
    coordinator = Coordinator(fed, RunDir(fed.config.out))
    coordinator.run_rounds(Grid(nodes), resume=False)
    record = coordinator.run.read_metrics()[-1]
    assert record["accepted"] == ["0", "1", "2"] and record["examples_capped"] == 1
    tensors, _ = coordinator.run.load_checkpoint()
    scaling = fed.strategy.spec.scaling(4)
    weights = {"0": 0.25, "1": 0.25, ATTACKER: 0.5}
    for key in sent_b["0"]:
        expected = sum(w * scaling * sent_b[c][key] for c, w in weights.items())
        assert torch.allclose(tensors[key], expected, atol=1e-6), key


# -- finding 8: the export's replace and the SecAgg+ threshold -----------------------------------


def test_a_crash_while_an_export_replaces_the_old_one_leaves_the_old_one_whole(
        base, tmp_path, monkeypatch):
    host = base.model.host
    folder = tmp_path / "adapter"

    def exported(value: float) -> None:
        lora = {name: LoraFactors(f.A + value, f.B + value, f.scaling)
                for name, f in host.fresh_lora(4, seed=0).items()}
        export_peft(folder, Adapter(lora=lora), "tiny", "classification", {"v": value})

    exported(1.0)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_rename = Path.rename

    def crash_on_the_new_one(self: Path, target):
        if Path(target) == folder and self.name != ".adapter.old":  # the staged one's rename
            raise OSError("disk gone")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_the_new_one)
    with pytest.raises(OSError, match="disk gone"):
        exported(2.0)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # nothing left over

    # a process killed between the two renames leaves the old export aside: the next export
    # puts it back first, so a crash of that one too still leaves it whole
    real_rename(folder, tmp_path / ".adapter.old")
    with pytest.raises(OSError, match="disk gone"):
        exported(2.0)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    monkeypatch.undo()
    exported(3.0)  # and a later export replaces it
    assert json.loads((folder / "fedlr_export.json").read_text()) == {"v": 3.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def secagg_setup(threshold: int, neighbours: list[str]) -> dict:
    encoding = Encoding(SumSpec({"x": (3,)}, rank=1), value_range=2.0, max_weight=10, bits=32,
                        clients=len(neighbours) + 1)
    return {STAGE_FIELD: "train", "round": 1, "secagg": json.dumps(
        {"round": 1, "client": "0", "neighbours": neighbours, "threshold": threshold,
         "encoding": encoding.to_json()})}


@pytest.mark.parametrize(("threshold", "neighbours"), [
    (1, ["1", "2"]), (2, ["1", "2", "3"]), (0, ["1", "2"]), (4, ["1", "2"])])
def test_a_secagg_client_refuses_a_threshold_the_protocol_does_not_hold_under(threshold,
                                                                              neighbours):
    """A server that sets t = 1 (or t = half of the holders) could rebuild a client's self-mask
    seed from one neighbour and its mask key from another, and unmask its update. The client
    refuses before it trains (no budget spent) and the node answers with the refusal."""
    trained_parts = []
    message = secagg_setup(threshold, neighbours)
    with pytest.raises(ProtocolError, match=f"threshold {threshold} for"):
        respond(message, {}, lambda encoding: trained_parts.append(encoding) or np.zeros(
            encoding.size, encoding.dtype))
    assert trained_parts == []
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    refusal = secure_stage(Parts({}, message), context)
    assert refusal.fields["kind"] == "refusal" and "SecAgg+ needs" in refusal.fields["reason"]


def test_a_secagg_client_refuses_to_split_its_secrets_below_half_of_its_holders():
    """The same check where the secrets are split: a threshold kept from an earlier stage
    that is at most half of the holders it is now asked to split among is refused."""
    kept = {"round": 1, "client": "0", "neighbours": json.dumps(["1", "2", "3"]),
            "threshold": 1, "encoding": "{}", "c_sk": b"", "s_sk": b"", "part": b""}
    message = {STAGE_FIELD: "share", "round": 1, "peers": json.dumps(["1", "2"]),
               "keys": b"\0" * 128}
    with pytest.raises(ProtocolError, match="threshold 1 for 3 share holders"):
        respond(message, kept, lambda encoding: None)


def test_every_attack_above_is_a_real_client_input_the_honest_run_accepts(base, tmp_path):
    """The reference: with only honest nodes the same round accepts every client, and the
    crafted replies differ from theirs only where each test says."""
    fed = federation(base, tmp_path)
    coordinator = run(fed, Node(int(ATTACKER)))
    record = coordinator.run.read_metrics()[-1]
    assert record["accepted"] == ["0", "1", "2"] and record["rejected"] == []
    assert math.isfinite(record["train_loss"])
