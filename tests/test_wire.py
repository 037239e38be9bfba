"""The wire format: every message survives its round trip exactly, a B-only upload gets its A
back from the downlink, and a reply that does not decode is a WireError, never a crash."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedlr.adapters import Adapter, LoraFactors
from fedlr.privacy.sample_level import PrivacyLedger
from fedlr.wire import Job, Parts, Refusal, TrainJob, TrainReply, WireError, reply_from_parts


def adapter(seed: int, rank: int = 4) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    lora = {name: LoraFactors(torch.randn(rank, 12, generator=gen),
                              torch.randn(10, rank, generator=gen), 16 / rank)
            for name in ("layer.0.query", "layer.0.value")}
    return Adapter(lora=lora, extras={"classifier.weight": torch.randn(3, 12, generator=gen)})


def same_adapter(a: Adapter, b: Adapter) -> bool:
    ta, tb = a.tensors(), b.tensors()
    scalings = {n: f.scaling for n, f in a.lora.items()}
    return (ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
            and scalings == {n: f.scaling for n, f in b.lora.items()})


def job() -> Job:
    return Job(client_id="3", round=2, rank=4, train_a=False, train_head=True, seed=7, alpha=16.0,
               model={"name": "tiny", "targets": ["query"]}, data={"source": "x"},
               train={"local_steps": 2}, dp={"noise_multiplier": 1.0},
               ledger=PrivacyLedger(history=[(1.0, 0.1, 5)], rounds=1).to_dict(),
               labels=["a", "b", "c"])


def test_a_train_job_round_trips():
    down = adapter(0)
    message = TrainJob(job(), down)
    back = TrainJob.from_parts(message.to_parts())
    assert back.job == message.job
    assert same_adapter(back.downlink, down)


def test_a_reply_round_trips_and_a_b_only_upload_takes_a_from_the_downlink():
    down, trained = adapter(0), adapter(1)
    trained = dataclasses.replace(trained, lora={  # A frozen: only B moved
        n: LoraFactors(down.lora[n].A, f.B, f.scaling) for n, f in trained.lora.items()})
    ledger = PrivacyLedger(history=[(1.0, 0.1, 5), (1.2, 0.1, 5)], rounds=2)
    reply = TrainReply("3", trained, 40, {"train_loss": 0.5}, ledger)
    parts = reply.to_parts(train_a=False)
    assert not any(k.startswith("lora_A::") for k in parts.arrays)  # B travels alone
    back = reply_from_parts(parts, start=down)
    assert isinstance(back, TrainReply)
    assert same_adapter(back.adapter, trained)
    assert (back.client_id, back.num_examples, back.metrics) == ("3", 40, {"train_loss": 0.5})
    assert back.ledger is not None and back.ledger.to_dict() == ledger.to_dict()


def test_a_refusal_round_trips():
    assert reply_from_parts(Refusal("2", "past its --max-epsilon").to_parts()) == Refusal(
        "2", "past its --max-epsilon")


@pytest.mark.parametrize("spoil", [
    lambda p: Parts(p.arrays, {k: v for k, v in p.fields.items() if k != "num_examples"}),
    lambda p: Parts(p.arrays, {**p.fields, "kind": "gossip"}),
    lambda p: Parts(p.arrays, {**p.fields, "scalings": "{not json"}),
    lambda p: Parts(p.arrays, {**p.fields, "ledger": '{"history": [[-1, 2, 0]]}'}),
    lambda p: Parts({k: t for k, t in p.arrays.items() if not k.startswith("lora_B::")},
                    p.fields),
    lambda p: Parts(p.arrays, {**p.fields, "num_examples": "many"}),
], ids=["no count", "unknown kind", "bad scalings", "impossible ledger", "no B", "bad count"])
def test_a_reply_that_does_not_decode_is_a_wire_error(spoil):
    parts = TrainReply("1", adapter(2), 10, {}, None).to_parts()
    with pytest.raises(WireError, match="malformed reply"):
        reply_from_parts(spoil(parts))
