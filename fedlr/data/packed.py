"""A simulation's client shards, tokenised once by the driver and read by the workers.

Partitioning and tokenising the run's dataset in every worker cost each of them the `datasets`
stack (pyarrow, pandas, flwr-datasets: about 160 MB and 1.4 s per worker on the tiny preset, a
one-off measurement) to produce what the driver already holds. The driver writes every
client's encoded shard into one safetensors file of the run directory instead; a worker reads
the slices of the clients it trains (memory-mapped: pages only of what it reads). It is a
simulated node's data file, as a deployed node has its own.

The file names the data and tokenizer it was written for (`key`), and a reader with another key
refuses it: a worker never trains on shards of another run's settings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedlr.atomic import atomic_write
from fedlr.data.batches import Encoded
from fedlr.errors import FedlrError

FORMAT = "fedlr-shards-1"
# where `fedlr simulate` tells its workers the file is (the driver writes it before any round)
SHARDS_ENV = "FEDLR_SIMULATED_SHARDS"


class ShardFileError(FedlrError):
    pass


def write_shards(path: Path, shards: Sequence[Encoded], key: str) -> None:
    """Every client's examples, in client order: one token array, each example's length and
    label, each client's example count."""
    if not shards:
        raise ValueError("no shards to write")
    pad_ids = {shard.pad_id for shard in shards}
    if len(pad_ids) != 1:
        raise ValueError(f"the shards were encoded with different pad ids: {sorted(pad_ids)}")
    ids = [x for shard in shards for x in shard.ids]
    tensors = {
        "tokens": torch.cat(ids).to(torch.int32) if ids else torch.zeros(0, dtype=torch.int32),
        "lengths": torch.tensor([len(x) for x in ids], dtype=torch.int64),
        "labels": torch.cat([shard.labels for shard in shards]).to(torch.int64),
        "examples": torch.tensor([len(shard) for shard in shards], dtype=torch.int64),
    }
    header = {"format": FORMAT, "key": key, "pad_id": pad_ids.pop()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp,
                                                   metadata={"fedlr": json.dumps(header)}))


class PackedShards:
    """The clients' shards of a file `write_shards` wrote for `key`; `shard(c)` reads client c's
    examples on first use, as `fedlr.session.DataSession.shard` encodes them."""

    def __init__(self, path: Path, key: str) -> None:
        self.path = Path(path)
        try:
            with safe_open(str(self.path), framework="pt") as fh:
                header = json.loads((fh.metadata() or {}).get("fedlr", "{}"))
                lengths, labels = fh.get_tensor("lengths"), fh.get_tensor("labels")
                examples = fh.get_tensor("examples")
        except Exception as exc:  # missing, torn by hand, or not safetensors
            raise ShardFileError(f"the simulated nodes' data {self.path} is not readable "
                                 f"({exc}); run the simulation again (or --resume it), which "
                                 "writes it") from None
        if header.get("format") != FORMAT or header.get("key") != key:
            raise ShardFileError(f"the simulated nodes' data {self.path} was written for other "
                                 "data or another model's tokenizer than this job's; resume the "
                                 "run with its own settings")
        self.pad_id = int(header["pad_id"])
        self.lengths, self.labels = lengths, labels
        self.first_example = torch.cat([torch.zeros(1, dtype=torch.int64), examples.cumsum(0)])
        self.first_token = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        self._read: dict[int, Encoded] = {}

    def __len__(self) -> int:
        return len(self.first_example) - 1

    def shard(self, client: int) -> Encoded:
        if not 0 <= client < len(self):
            raise ShardFileError(f"client {client} has no shard in {self.path} "
                                 f"({len(self)} clients)")
        if client not in self._read:
            a, b = (int(x) for x in self.first_example[client:client + 2])
            start, stop = int(self.first_token[a]), int(self.first_token[b])
            with safe_open(str(self.path), framework="pt") as fh:
                tokens = fh.get_slice("tokens")[start:stop].to(torch.long)
            ids = list(torch.split(tokens, self.lengths[a:b].tolist()))
            self._read[client] = Encoded(ids, self.labels[a:b].clone(), self.pad_id)
        return self._read[client]
