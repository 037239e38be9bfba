"""What one process loads once and keeps: the frozen base model and the tokenised data.

A simulation runs hundreds of virtual clients in a few worker processes; each process loads the
base once (shared by every client it serves, one small adapter per rank), never per virtual
client. The data is partitioned and tokenised once, by the driver, which packs the shards for the
workers to read (`pack_shards`, `client_shards`); a deployed node without a data file of its own
partitions the run's dataset as the server does (the partitioners are seeded by the run).

What it loads lives as long as the process, so it is moved out of the garbage collector's way
(`gc.freeze`): otherwise every full collection walks the half a million objects that the
imports and the model leave, a quarter of a second each time, in the middle of a round.
"""

from __future__ import annotations

import atexit
import functools
import gc
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlr.data.batches import Encoded, encode
from fedlr.data.packed import SHARDS_ENV, PackedShards, write_shards
from fedlr.data.sources import TextData, evaluation_subset, load_data, load_local, partition
from fedlr.models.hosts import (
    LoraHost,
    ModelSpec,
    default_targets,
    load_base_model,
    load_tokenizer,
    resolve_device,
)
from fedlr.settings.specs import DataSpec


@dataclass
class ModelSession:
    spec: ModelSpec
    tokenizer: Any
    host: LoraHost


@dataclass
class DataSession:
    """The partition of the training data and the encoded held-out split. A client's shard is
    tokenised on first use, so each process encodes only the clients it serves."""

    data: TextData
    partitions: list[Any]
    heldout: Encoded
    tokenizer: Any
    max_length: int
    evaluated: Any = None  # the held-out rows `heldout` encodes (datasets.Dataset)
    _encoded: dict[int, Encoded] = field(default_factory=dict)

    def evaluation_facts(self) -> dict[str, Any]:
        """What the reported held-out metrics cover, and the bar to beat."""
        facts: dict[str, Any] = {"examples": len(self.heldout),
                                 "heldout_examples": len(self.data.heldout)}
        if self.data.label_names and "label" in self.evaluated.column_names:
            counts = Counter(self.evaluated["label"])
            facts.update(labels=list(self.data.label_names), classes_evaluated=len(counts),
                         classes=len(self.data.label_names),
                         chance_accuracy=max(counts.values()) / len(self.evaluated),
                         chance="accuracy of always guessing the most frequent class")
        return facts

    def partition_facts(self) -> dict[str, Any]:
        """Each client's example count and a digest of every shard's rows: what shows that two
        runs trained on the same federation (`fedlr compare` checks it)."""
        digest = hashlib.sha256()
        for shard in self.partitions:
            digest.update(json.dumps(shard.to_dict(), sort_keys=True, default=str).encode())
        return {"client_examples": [len(shard) for shard in self.partitions],
                "sha256": digest.hexdigest()}

    def shard(self, client: int) -> Encoded:
        if client not in self._encoded:
            self._encoded[client] = encode(self.partitions[client], self.tokenizer, self.max_length)
        return self._encoded[client]


@functools.lru_cache(maxsize=2)
def data_source(source: str, task: str) -> TextData:
    return load_data(source, task)


@functools.lru_cache(maxsize=2)
def tokenizer_for(spec: ModelSpec) -> Any:
    return load_tokenizer(spec)


@functools.lru_cache(maxsize=2)
def model_session(spec: ModelSpec, alpha: float, device: str = "auto") -> ModelSession:
    """The base goes to its device before any adapter or DP hook is attached (opacus#820)."""
    tokenizer = tokenizer_for(spec)
    base = load_base_model(spec, tokenizer).to(resolve_device(device))
    targets = spec.targets or default_targets(base)
    session = ModelSession(spec, tokenizer, LoraHost(base, spec.task, targets, alpha=alpha))
    settle()
    return session


@functools.lru_cache(maxsize=2)
def data_session(spec: DataSpec, model: ModelSpec) -> DataSession:
    """Every process computes the same partition: the partitioners are seeded by the run."""
    data = data_source(spec.source, spec.task)
    tokenizer = tokenizer_for(model)
    shards = partition(data.train, spec.num_clients, spec.partition, seed=spec.seed)
    heldout = evaluation_subset(data.heldout, spec.eval_examples, spec.seed)
    session = DataSession(data, shards, encode(heldout, tokenizer, spec.max_length), tokenizer,
                          spec.max_length, heldout)
    settle()
    return session


def shards_key(spec: DataSpec, model: ModelSpec) -> str:
    """What a packed shard file was written for: the data settings and the model whose tokenizer
    encoded them."""
    return hashlib.sha256(repr((spec, model.name)).encode()).hexdigest()


def pack_shards(path: Path, data: DataSession, spec: DataSpec, model: ModelSpec) -> None:
    """Every client's encoded shard into `path`, for the workers of a simulation to read;
    encoded for the file alone, not kept in `data` (the driver trains no client)."""
    write_shards(path, [encode(part, data.tokenizer, data.max_length)
                        for part in data.partitions], shards_key(spec, model))


@functools.lru_cache(maxsize=2)
def packed_shards(path: str, key: str) -> PackedShards:
    return PackedShards(Path(path), key)


def client_shards(spec: DataSpec, model: ModelSpec) -> DataSession | PackedShards:
    """Where a node without its own data file finds its shard: a simulated node in the file its
    run packed (`SHARDS_ENV`, without loading the dataset), a deployed one in its partition of
    the run's dataset, partitioned here as the server does."""
    packed = os.environ.get(SHARDS_ENV)
    if packed:
        return packed_shards(packed, shards_key(spec, model))
    return data_session(spec, model)


def settle() -> None:
    """What exists now stays for the process: collected once, then never scanned again (until
    exit, where the interpreter's last collection should see everything again)."""
    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)



@functools.lru_cache(maxsize=2)
def local_shard(path: str, task: str, labels: tuple[str, ...], model: ModelSpec,
                max_length: int) -> Encoded:
    """A deployed client's own data file, tokenised once per process."""
    return encode(load_local(path, task, labels), tokenizer_for(model), max_length)
