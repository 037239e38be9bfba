"""Held-out evaluation: length-sorted batches give what evaluating each example alone gives."""

from __future__ import annotations

import math

import pytest
import torch
from training_setup import randomize_adapter, tiny_host

from fedlr.data.batches import Encoded, sequence_token_losses, token_counts
from fedlr.evaluation import evaluate


def one_by_one(model: torch.nn.Module, data: Encoded, task: str) -> dict[str, float]:
    """The metrics from each example in a batch of its own, no padding anywhere (the loss in
    float32, as `evaluate` computes it)."""
    losses, hits, tokens = [], 0, 0
    with torch.no_grad():
        for i in range(len(data)):
            batch = data.batch([i])
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            if task == "classification":
                losses.append(float(torch.nn.functional.cross_entropy(
                    logits.float(), batch.labels, reduction="sum")))
                hits += int(logits.argmax(-1).item() == batch.labels.item())
            else:
                losses.append(float(sequence_token_losses(logits, batch).sum()))
                tokens += int(token_counts(batch).sum())
    if task == "classification":
        return {"loss": sum(losses) / len(data), "accuracy": hits / len(data)}
    return {"loss": sum(losses) / tokens, "perplexity": math.exp(sum(losses) / tokens)}


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_batched_evaluation_equals_each_example_alone(task):
    host, data = tiny_host(task, dtype=torch.float64)
    model = randomize_adapter(host, 4)
    assert len({len(ids) for ids in data.ids}) > 3  # lengths vary: batches would pad
    alone = one_by_one(model, data, task)
    for batch_size in (3, 5, 64):
        got = evaluate(model, data, task, batch_size=batch_size)
        assert got["examples"] == len(data)
        for key, value in alone.items():
            assert got[key] == pytest.approx(value, rel=1e-6), (batch_size, key)
