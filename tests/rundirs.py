"""Reading a run directory the way an outsider would, for the privacy tests."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

ID_KEYS = {"clients", "accepted", "client", "client_rounds", "ledgers", "client_id"}
# "client 2", "node-2", "partition_id=2", "client_ids=[2", "clients 0,2", "nodes: 1" in any
# text or binary file
NAMED = re.compile(rb"(?i)(?:client|node|partition)s?(?:[ _#:=/\"'\[\],-]|_?ids?)*(\d+)\b")
NOT_IDS = {"ranks"}  # integer lists that are sizes, not clients
ID_LIST = re.compile(r"\s*\d+(?:\s*[,;|/ ]\s*\d+)*\s*")  # "0,2,3": ids joined in a string
POPULATION = ("data",)  # the population's shards: who exists, not who took part


def population_ids(run: Path) -> set[str]:
    """Every client id of the run's population, from run.json (ids are partition numbers)."""
    return {str(k) for k in range(json.loads((run / "run.json").read_text())["config"]
                                   ["num_clients"])}


def client_ids_in(run: Path) -> list[str]:
    """Every place of the run directory that names which clients took part, in every file: a
    per-client file or folder name; in JSON, JSON lines and safetensors headers (metadata
    included), a key or string equal to a client id, an id-valued key, or text that names one;
    in any other file, bytes that name one. The population (run.json's ranks, the shards) and
    the exported model's own config (its label ids) are excepted."""
    ids = population_ids(run)
    found: list[str] = []
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        where = str(path.relative_to(run))
        if path.relative_to(run).parts[0] in POPULATION or where == "adapter/config.json":
            continue
        parts = path.relative_to(run).with_suffix("").parts
        if any(p in ids or p in ("clients", "nodes") or NAMED.search(p.encode()) for p in parts):
            found.append(f"{where}: its name")
        try:
            structured = documents(path)
        except (ValueError, SafetensorError):  # not what its name says: read as bytes
            structured = None
        for document in structured or []:
            if path.name == "run.json":
                document.pop("client_ranks")
                document["config"].pop("ranks")
            found += [f"{where}: {hit}" for hit in walk(document, ids)]
        if structured is None:
            found += [f"{where}: {m.group().decode(errors='replace')!r}"
                      for m in NAMED.finditer(path.read_bytes())]
    return found


def documents(path: Path) -> list[Any] | None:
    """The structured content of a JSON, JSON lines or safetensors file (its tensor names and
    its metadata, JSON values parsed); None for other files."""
    if path.suffix == ".json":
        return [json.loads(path.read_text())]
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            names = list(fh.keys())
        return [{"tensors": dict.fromkeys(names),
                 "__metadata__": {k: parsed(v) for k, v in metadata.items()}}]
    return None


def parsed(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def walk(value: Any, ids: set[str]) -> list[str]:
    """What in a JSON value names a client: an id-valued key, a key equal to an id, a list of
    integers that are all ids, a string of ids alone ("2", "0,2,3") or one that names a
    client."""
    hits: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ID_KEYS and item not in ([], {}, None):
                hits.append(f"key {key!r}")
            if key in ids or NAMED.search(key.encode()):
                hits.append(f"key {key!r}")
            if key not in NOT_IDS and isinstance(item, list) and item and all(
                    type(x) is int and str(x) in ids for x in item):
                hits.append(f"key {key!r}: ids as integers {item}")
            hits += walk(item, ids)
    elif isinstance(value, list):
        for item in value:
            hits += walk(item, ids)
    elif isinstance(value, str) and (NAMED.search(value.encode()) or (
            ID_LIST.fullmatch(value) and set(re.findall(r"\d+", value)) <= ids)):
        hits.append(f"value {value!r}")
    return hits
