"""The client-id scan of the privacy tests (`rundirs.client_ids_in`) finds an id wherever a
plausible bug would write one, and nothing in a directory that names no client."""

from __future__ import annotations

import json

import pytest
import torch
from rundirs import client_ids_in
from safetensors.torch import save_file


def run_directory(root):
    """A run directory of a 4-client population that names no participant."""
    (root / "rounds" / "0003").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "adapter").mkdir()
    (root / "run.json").write_text(json.dumps(
        {"client_ranks": {"0": 2, "1": 4, "2": 2, "3": 4},
         "config": {"num_clients": 4, "ranks": [2, 4]}}))
    (root / "metrics.jsonl").write_text(json.dumps(
        {"round": 3, "num_clients": 2, "client_seconds": 1.5, "rejected": [{"reason": "x"}]})
        + "\n")
    (root / "adapter" / "config.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b"}}))
    save_file({"examples": torch.zeros(4)}, str(root / "data" / "shards.safetensors"),
              metadata={"fedlr": json.dumps({"clients": ["0", "1", "2", "3"]})})
    save_file({"lora_A::q": torch.zeros(2)}, str(root / "rounds" / "0003" / "global.safetensors"),
              metadata={"fedlr": json.dumps({"meta": {"round": 3}})})
    (root / "audit.md").write_text("3 rounds, 2 clients per round\n")
    return root


def test_a_directory_that_names_no_participant_is_clean(tmp_path):
    assert client_ids_in(run_directory(tmp_path)) == []


@pytest.mark.parametrize("plant", [
    lambda r: (r / "metrics.jsonl").write_text(json.dumps({"round": 1, "cohort": ["0", "2"]})),
    lambda r: (r / "metrics.jsonl").write_text(json.dumps({"round": 1, "by": "0,2,3"})),
    lambda r: (r / "metrics.jsonl").write_text(json.dumps({"losses": {"2": 0.5}})),
    lambda r: (r / "privacy.json").write_text(json.dumps({"note": "client 2 was rejected"})),
    lambda r: (r / "audit.md").write_text("node-3 took part\n"),
    lambda r: (r / "rounds" / "0003" / "2.bin").write_bytes(b"\0"),
    lambda r: save_file({"lora_A::q": torch.zeros(2)},
                        str(r / "rounds" / "0003" / "global.safetensors"),
                        metadata={"fedlr": json.dumps({"meta": {"from": ["1"]}})}),
    lambda r: save_file({"partition_id=1::q": torch.zeros(2)},
                        str(r / "rounds" / "0003" / "global.safetensors")),
    lambda r: (r / "metrics.jsonl").write_text(json.dumps({"round": 1, "who": [0, 2]})),
    lambda r: (r / "audit.md").write_text("clients 0,2 took part\n"),
    lambda r: (r / "audit.md").write_text("client_ids=[1]\n"),
    lambda r: (r / "audit.md").write_text("nodes: 1\n"),
], ids=["new-key", "joined-string", "id-key", "sentence", "text-file", "file-name",
        "safetensors-metadata", "tensor-name", "integers", "plural", "ids-list", "nodes"])
def test_an_id_planted_where_a_bug_would_write_it_is_found(tmp_path, plant):
    plant(run_directory(tmp_path))
    assert client_ids_in(tmp_path)
