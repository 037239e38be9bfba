"""fedit with equal ranks equals Flower's own FedAvg on the same replies (Flower as reference)."""

from __future__ import annotations

import numpy as np
import torch
from federation import client_updates, random_spec
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedlr.adapters import to_peft_state_dict
from fedlr.lora.strategies import make_strategy


def reply(update) -> Message:
    request = Message(RecordDict(), dst_node_id=1, message_type="train")
    content = RecordDict(
        {
            "arrays": ArrayRecord(to_peft_state_dict(update.adapter)),
            "metrics": MetricRecord({"num-examples": update.num_examples}),
        }
    )
    return Message(content, reply_to=request)


def test_fedit_equals_flower_fedavg(monkeypatch):
    # Messages are stamped with the run of the process creating them, as in a ServerApp.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    gen = torch.Generator().manual_seed(11)
    spec = random_spec(gen, [8] * 5, extras=True)
    strategy = make_strategy("fedit", spec)
    state = strategy.init_state({"classifier.weight": torch.zeros(3, 8, dtype=torch.float64)})
    updates = client_updates(strategy, state, gen)

    arrays, _ = FedAvg().aggregate_train(1, [reply(u) for u in updates])
    flower = {k: v.numpy() for k, v in arrays.items()}

    new_state, _ = strategy.aggregate(state, updates)
    ours = to_peft_state_dict(strategy.downlink(new_state, "c0"))
    assert ours.keys() == flower.keys()
    for key, value in ours.items():
        np.testing.assert_allclose(value.numpy(), flower[key], rtol=1e-12, atol=1e-12)
