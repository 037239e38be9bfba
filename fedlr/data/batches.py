"""Tokenised examples, padded batches, and the per-example loss DP-SGD needs.

The loss is per example by construction: a causal LM's batch-mean token loss would make each
sample's gradient depend on the other samples' lengths, so each sequence's loss is the mean over
its own tokens and only then are sequences averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Batch:
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor  # class ids (classification) or unused (-1) for causal LM

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in (
            self.input_ids, self.attention_mask, self.labels
        )))


class Encoded(torch.utils.data.Dataset):
    """Token ids per example (unpadded) and its label."""

    def __init__(self, ids: list[Tensor], labels: Tensor, pad_id: int) -> None:
        self.ids, self.labels, self.pad_id = ids, labels, pad_id

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.ids[i], self.labels[i]

    def batch(self, indices: Sequence[int]) -> Batch:
        return collate([self[i] for i in indices], self.pad_id)

    def passes(self, indices: Sequence[int], tokens: int) -> list[list[int]]:
        """`indices` cut into passes of similar length (`padded_passes`)."""
        positions = padded_passes([len(self.ids[i]) for i in indices], tokens)
        return [[indices[k] for k in part] for part in positions]


def padded_passes(lengths: Sequence[int], tokens: int) -> list[list[int]]:
    """Positions into `lengths`, sorted by length (stably) and cut into passes of at most
    `tokens` padded tokens, each padded to its longest (at least one sequence a pass): a batch
    run as these passes computes the same per-example losses on less padding."""
    passes: list[list[int]] = []
    for position in sorted(range(len(lengths)), key=lengths.__getitem__):
        if passes and (len(passes[-1]) + 1) * lengths[position] <= tokens:
            passes[-1].append(position)
        else:
            passes.append([position])
    return passes


def encode(dataset: Any, tokenizer: Any, max_length: int) -> Encoded:
    """Tokenise a `datasets.Dataset` with a `text` column (and `label`, if classification)."""
    texts = list(dataset["text"])
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    labels = (
        torch.tensor(dataset["label"], dtype=torch.long)
        if "label" in dataset.column_names
        else torch.full((len(texts),), -1, dtype=torch.long)
    )
    return Encoded([torch.tensor(x, dtype=torch.long) for x in ids], labels, tokenizer.pad_token_id)


def collate(items: Sequence[tuple[Tensor, Tensor]], pad_id: int) -> Batch:
    """Right-pad to the longest sequence of the batch."""
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (ids, _) in enumerate(items):
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    return Batch(input_ids, mask, torch.stack([label for _, label in items]))


def _at_least_fp32(logits: Tensor) -> Tensor:
    """Half-precision logits are upcast for the loss; float64 ones stay float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def per_example_loss(model: torch.nn.Module, batch: Batch, task: str) -> Tensor:
    """Loss of each example: cross-entropy of its label, or its mean next-token loss."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    if task == "classification":
        return torch.nn.functional.cross_entropy(_at_least_fp32(logits), batch.labels,
                                                 reduction="none")
    return sequence_token_losses(logits, batch).sum(1) / token_counts(batch).clamp(min=1)


def sequence_token_losses(logits: Tensor, batch: Batch) -> Tensor:
    """Next-token cross-entropy per position (B x T-1), zero at padding."""
    targets = batch.input_ids[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        _at_least_fp32(logits[:, :-1]).transpose(1, 2), targets, reduction="none"
    )
    return losses * batch.attention_mask[:, 1:]


def token_counts(batch: Batch) -> Tensor:
    return batch.attention_mask[:, 1:].sum(1)
