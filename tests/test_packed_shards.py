"""The simulated nodes' data file (`fedlr.data.packed`): what a worker reads is exactly what
partitioning and tokenising the run's dataset gives, and a file of other settings is refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlr.data.batches import Encoded
from fedlr.data.packed import SHARDS_ENV, PackedShards, ShardFileError, write_shards
from fedlr.session import client_shards, data_session, pack_shards, packed_shards, shards_key
from fedlr.settings.specs import DataSpec, ModelSpec

SPEC = DataSpec("stdlib-docs", "classification", 6, "dirichlet:0.5", 3, 32, 16)
MODEL = ModelSpec("tiny", num_labels=2)


def same(a: Encoded, b: Encoded) -> bool:
    return (len(a) == len(b) and a.pad_id == b.pad_id and torch.equal(a.labels, b.labels)
            and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a.ids, b.ids,
                                                                              strict=True)))


# each client's examples as token-id lengths (a client may hold examples of length 0 or 1)
shard_lengths = st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=5), min_size=1,
                         max_size=6)


@settings(max_examples=30, deadline=None)
@given(shard_lengths, st.integers(0, 2**31 - 1))
def test_every_shard_reads_back_as_written(tmp_path_factory, lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    shards = [Encoded([torch.randint(0, 2**31 - 1, (n,), generator=gen) for n in client],
                      torch.randint(-1, 50, (len(client),), generator=gen), pad_id=7)
              for client in lengths]
    path = tmp_path_factory.mktemp("packed") / "shards.safetensors"
    write_shards(path, shards, key="k")
    packed = PackedShards(path, "k")
    assert len(packed) == len(shards)
    for c in reversed(range(len(shards))):  # any order: each client's own slice
        assert same(packed.shard(c), shards[c])
    assert [p.name for p in path.parent.iterdir()] == ["shards.safetensors"]  # no temp left


def test_a_simulated_node_reads_the_shard_the_run_partitioned(tmp_path, monkeypatch):
    """The driver's partition and tokenisation, read back through the worker's entry point."""
    data = data_session(SPEC, MODEL)
    path = tmp_path / "data" / "shards.safetensors"
    pack_shards(path, data, SPEC, MODEL)
    monkeypatch.setenv(SHARDS_ENV, str(path))
    packed = client_shards(SPEC, MODEL)
    assert isinstance(packed, PackedShards)
    for c in range(SPEC.num_clients):
        assert same(packed.shard(c), data.shard(c))
    monkeypatch.delenv(SHARDS_ENV)
    assert client_shards(SPEC, MODEL) is data  # a deployed node partitions the dataset itself


def test_shards_of_other_settings_or_no_file_are_refused_with_the_fix(tmp_path):
    path = tmp_path / "shards.safetensors"
    write_shards(path, [Encoded([torch.tensor([1, 2])], torch.tensor([0]), 0)],
                 shards_key(SPEC, MODEL))
    other = DataSpec(**{**SPEC.__dict__, "max_length": 64})
    with pytest.raises(ShardFileError, match="other data or another model's tokenizer"):
        packed_shards(str(path), shards_key(other, MODEL))
    with pytest.raises(ShardFileError, match="other data or another model's tokenizer"):
        PackedShards(path, shards_key(SPEC, ModelSpec("minilm", num_labels=2)))
    with pytest.raises(ShardFileError, match="client 1 has no shard"):
        PackedShards(path, shards_key(SPEC, MODEL)).shard(1)
    with pytest.raises(ShardFileError, match=r"not readable.*--resume"):
        PackedShards(tmp_path / "missing.safetensors", "k")
    path.write_bytes(b"torn")
    with pytest.raises(ShardFileError, match="not readable"):
        PackedShards(path, "k")


def test_shards_of_different_tokenizers_cannot_be_packed_together(tmp_path):
    shards = [Encoded([torch.tensor([1])], torch.tensor([0]), pad) for pad in (0, 1)]
    with pytest.raises(ValueError, match="different pad ids"):
        write_shards(tmp_path / "s.safetensors", shards, "k")
