"""The default model on the default task learns: federated rounds raise held-out accuracy."""

from __future__ import annotations

import pytest

from fedlr.client.training import LocalTrainer
from fedlr.data.batches import encode
from fedlr.data.sources import load_data, partition
from fedlr.evaluation import evaluate
from fedlr.lora.rounds import close_round, plan_round
from fedlr.lora.strategies import ClientUpdate, FederationSpec, make_strategy
from fedlr.models.hosts import LoraHost, default_targets, load_base_model, load_tokenizer
from fedlr.peft_layout import load_into_peft_model
from fedlr.settings.specs import ModelSpec, TrainConfig


@pytest.mark.e2e  # the real default model, trained for two rounds: minutes on a CPU
def test_minilm_on_stdlib_docs_beats_chance_and_the_untrained_adapter():
    data = load_data("stdlib-docs")
    spec = ModelSpec(name="minilm", num_labels=data.num_labels, max_length=64)
    tokenizer = load_tokenizer(spec)
    base = load_base_model(spec, tokenizer)
    host = LoraHost(base, spec.task, default_targets(base))
    ranks = {"0": 4, "1": 8, "2": 8}
    shards = [encode(s, tokenizer, 64) for s in partition(data.train, 3, "iid", seed=0)]
    heldout = encode(data.heldout.select(range(400)), tokenizer, 64)
    federation = FederationSpec(modules=host.shapes, ranks=ranks, extras=host.head_shapes)
    strategy = make_strategy("fedit", federation, seed=0)
    state = strategy.init_state(host.initial_head)

    def heldout_accuracy() -> float:
        model = host.model(federation.max_rank)
        load_into_peft_model(model, strategy.downlink(state, "1"), host.adapter_name(8))
        return evaluate(model, heldout, spec.task)["accuracy"]

    untrained = heldout_accuracy()
    trainer = LocalTrainer(host, TrainConfig(local_steps=12, batch_size=16, lr=3e-3))
    for round_ in range(1, 3):
        plan = plan_round(strategy, state, list(ranks))
        updates = []
        for client, downlink in plan.downlinks.items():
            result = trainer.train(client, downlink, shards[int(client)], rank=ranks[client],
                                   seed=100 * round_ + int(client))
            updates.append(ClientUpdate(client, result.adapter, result.num_examples))
        state = close_round(strategy, state, plan, updates).state
    trained = heldout_accuracy()
    chance = 1 / data.num_labels
    assert trained > 3 * chance, (untrained, trained)
    assert trained > untrained + 0.15, (untrained, trained)
