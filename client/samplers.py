"""Which examples each local step trains on: Poisson sampling under DP-SGD (what the accountant
assumes), reshuffled fixed-size batches otherwise."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch


class BatchSampler(Protocol):
    """The index sets of a round's steps; `poisson` says whether they are what the accountant
    assumes (recorded in the ledger, so privacy.json states the sampling really used)."""

    n: int  # the examples it draws from (canaries included)
    poisson: bool

    def __iter__(self) -> Iterator[list[int]]: ...


@dataclass
class PoissonBatches:
    """DP-SGD's sampler: every index joins each step's batch independently with probability q
    (Opacus's UniformWithReplacementSampler); batches may be empty."""

    n: int
    sample_rate: float
    steps: int
    generator: torch.Generator
    poisson: bool = True

    def __iter__(self) -> Iterator[list[int]]:
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        yield from UniformWithReplacementSampler(num_samples=self.n, sample_rate=self.sample_rate,
                                                 generator=self.generator, steps=self.steps)


@dataclass
class ShuffledBatches:
    """Non-private training: fixed-size batches from reshuffled passes over the data."""

    n: int
    size: int
    steps: int
    generator: torch.Generator
    poisson: bool = False

    def __iter__(self) -> Iterator[list[int]]:
        size = min(self.size, self.n)
        order: list[int] = []
        for _ in range(self.steps):
            if len(order) < size:
                order += torch.randperm(self.n, generator=self.generator).tolist()
            yield order[:size]
            order = order[size:]
