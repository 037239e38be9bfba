"""Loss and accuracy (classification) or perplexity (causal LM) of a model on encoded examples."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from fedlr.data.batches import Encoded, sequence_token_losses, token_counts
from fedlr.precision import autocast

if TYPE_CHECKING:
    from fedlr.models.hosts import LoraHost


def evaluate_as_trained(host: LoraHost, model: torch.nn.Module, data: Encoded, task: str,
                        precision: str) -> dict[str, float]:
    """`evaluate` one of `host`'s models in the run's `precision`, resolved on this machine as
    training resolves it (fedlr.precision): the server's rounds and the local-only baseline
    report what a model trained and used in that precision gives."""
    with autocast(precision, host.device, host.dtype, host.width):
        return evaluate(model, data, task)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: Encoded, task: str, batch_size: int = 64
) -> dict[str, float]:
    """Mean loss over examples, and accuracy; for causal LM the token-weighted loss and its
    perplexity. Batches hold examples of similar length (each example's result does not depend
    on its batch), so little of the forward pass is spent on padding."""
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty split")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct, tokens = 0.0, 0, 0
    try:
        order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
        for start in range(0, len(data), batch_size):
            batch = data.batch(order[start:start + batch_size]).to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            if task == "classification":
                loss_sum += float(
                    torch.nn.functional.cross_entropy(logits.float(), batch.labels, reduction="sum")
                )
                correct += int((logits.argmax(-1) == batch.labels).sum())
            else:
                loss_sum += float(sequence_token_losses(logits, batch).sum())
                tokens += int(token_counts(batch).sum())
    finally:
        model.train(was_training)
    if task == "classification":
        n = len(data)
        return {"loss": loss_sum / n, "accuracy": correct / n, "examples": n}
    mean = loss_sum / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "examples": len(data)}
