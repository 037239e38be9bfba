"""Text data for federated fine-tuning: where it comes from and how it is split over clients.

Sources: the built-in `stdlib-docs` task, a JSONL or CSV file with `text` and `label` columns, a
plain-text file (causal LM: one example per paragraph), or a Hugging Face hub dataset by name.
Everything becomes an in-memory `datasets.Dataset` with a held-out split, and clients get their
shards from flwr-datasets partitioners (`iid`, `dirichlet:ALPHA`, `pathological:K`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlr.errors import ConfigError

BUILTIN = "stdlib-docs"
HELDOUT_FRACTION = 0.2
PARTITION_KINDS = ("iid", "dirichlet", "pathological")


@dataclass(frozen=True)
class TextData:
    """Train and held-out examples, columns `text` (+ `label` for classification)."""

    name: str
    task: str
    train: Any  # datasets.Dataset
    heldout: Any  # datasets.Dataset
    label_names: tuple[str, ...] = ()

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _dataset(rows: dict[str, list[Any]]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict(rows)


def _in_heldout(text: str) -> bool:
    digest = hashlib.sha256(("heldout:" + text).encode()).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < HELDOUT_FRACTION * 1000


def _labelled(name: str, task: str, texts: list[str], labels: list[Any] | None) -> TextData:
    """Map labels to ids and split off the held-out examples by a hash of their text."""
    if not texts:
        raise ConfigError(f"{name}: no examples found")
    label_names: tuple[str, ...] = ()
    ids: list[int] = []
    if task == "classification":
        assert labels is not None
        if all(isinstance(x, int) and not isinstance(x, bool) for x in labels):
            if min(labels) < 0:
                raise ConfigError(f"{name}: integer labels must be >= 0, found {min(labels)}")
            label_names = tuple(str(i) for i in range(max(labels) + 1))
            ids = list(labels)
        else:
            label_names = tuple(sorted({str(x) for x in labels}))
            index = {n: i for i, n in enumerate(label_names)}
            ids = [index[str(x)] for x in labels]
        if len(label_names) < 2:
            raise ConfigError(f"{name}: classification needs at least 2 distinct labels")
    split: dict[bool, dict[str, list[Any]]] = {
        flag: {"text": [], **({"label": []} if ids else {})} for flag in (False, True)
    }
    for i, text in enumerate(texts):
        part = split[_in_heldout(text)]
        part["text"].append(text)
        if ids:
            part["label"].append(ids[i])
    return TextData(name, task, _dataset(split[False]), _dataset(split[True]), label_names)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{lineno}: expected a JSON object per line")
            rows.append(row)
    return rows


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _columns(path: Path, rows: list[dict[str, Any]], task: str) -> tuple[list[str], list | None]:
    needed = ("text", "label") if task == "classification" else ("text",)
    for lineno, row in enumerate(rows, 1):
        for column in needed:
            if column not in row:
                hint = " (or use the causal-lm task for unlabelled text)" * (column == "label")
                raise ConfigError(
                    f"{path}: record {lineno} has no {column!r} column; every record needs "
                    f"{' and '.join(repr(c) for c in needed)}{hint}"
                )
        if not isinstance(row["text"], str):
            raise ConfigError(f"{path}: record {lineno}: 'text' must be a string")
    texts = [row["text"] for row in rows]
    labels = [row["label"] for row in rows] if task == "classification" else None
    return texts, labels


def load_file(path: Path, task: str) -> TextData:
    return _labelled(str(path), task, *read_file(path, task))


def load_local(source: str, task: str, label_names: Sequence[str]) -> Any:
    """A client's own examples (all of them, in file order) with labels mapped to the run's ids,
    so its classes mean what they mean on every other client and on the server."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"this client's data file is not found: {source}")
    texts, labels = read_file(path, task)
    if not texts:
        raise ConfigError(f"{path}: no examples found")
    rows: dict[str, list[Any]] = {"text": texts}
    if labels is not None:
        index = {name: i for i, name in enumerate(label_names)}
        unknown = sorted({str(x) for x in labels} - set(index))
        if unknown:
            raise ConfigError(
                f"{path}: labels {unknown[:5]} are not among the run's labels "
                f"{list(label_names)}; relabel them or leave those examples out"
            )
        rows["label"] = [index[str(x)] for x in labels]
    return _dataset(rows)


def read_file(path: Path, task: str) -> tuple[list[str], list[Any] | None]:
    """Texts (and labels, for classification) of a .jsonl, .csv or .txt file."""
    if not os.access(path, os.R_OK):
        raise ConfigError(f"data file is not readable: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            texts, labels = _columns(path, _read_jsonl(path), task)
        elif suffix == ".csv":
            texts, labels = _columns(path, _read_csv(path), task)
        elif suffix in (".txt", ".text"):
            if task != "causal-lm":
                raise ConfigError(
                    f"{path}: plain text has no labels; use it with the causal-lm task, or give "
                    "a JSONL/CSV file with 'text' and 'label' for classification"
                )
            paragraphs = path.read_text(encoding="utf-8").split("\n\n")
            texts, labels = [p.strip() for p in paragraphs if p.strip()], None
        else:
            raise ConfigError(f"{path}: unknown data format {suffix!r}; use .jsonl, .csv or .txt")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read data file {path}: {exc.strerror}") from None
    return texts, labels


def load_hub(name: str, task: str) -> TextData:
    import datasets

    try:
        loaded = datasets.load_dataset(name)
    except Exception as exc:  # datasets raises many types; all mean "not available here"
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        hint = "HF_HUB_OFFLINE is set and it is not cached; " if offline else ""
        raise ConfigError(
            f"data {name!r} is neither {BUILTIN!r}, an existing file, nor a loadable hub dataset "
            f"({hint}{type(exc).__name__}); check the name or pass a file path"
        ) from None
    train = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    rows = train.to_dict()
    if "text" not in rows or (task == "classification" and "label" not in rows):
        raise ConfigError(
            f"hub dataset {name!r} needs 'text' and 'label' columns, has {sorted(rows)}"
        )
    return _labelled(name, task, rows["text"], rows.get("label"))


def load_stdlib_docs(per_topic: int | None = None) -> TextData:
    from fedlr.data import stdlib_docs

    train, heldout = stdlib_docs.build(per_topic or stdlib_docs.DEFAULT_PER_TOPIC)
    as_rows = lambda xs: {"text": [e.text for e in xs], "label": [e.label for e in xs]}  # noqa: E731
    return TextData(
        BUILTIN, "classification", _dataset(as_rows(train)), _dataset(as_rows(heldout)),
        stdlib_docs.LABELS,
    )


def load_data(source: str = BUILTIN, task: str = "classification") -> TextData:
    """Resolve a data source name: the built-in task, a file, or a hub dataset."""
    if source == BUILTIN:
        if task != "classification":
            raise ConfigError(f"{BUILTIN} is a classification task; use task classification")
        return load_stdlib_docs()
    path = Path(source).expanduser()
    if path.is_dir():
        raise ConfigError(f"data path {path} is a directory; give a .jsonl, .csv or .txt file")
    if path.exists():
        return load_file(path, task)
    if names_a_file(source):
        raise ConfigError(f"data file not found: {source}")
    return load_hub(source, task)


def names_a_file(source: str) -> bool:
    """Whether a data source that is not the built-in task means a local file (not a hub name)."""
    return source.startswith((".", "/", "~")) or Path(source).suffix.lower() in (
        ".jsonl", ".json", ".csv", ".txt",
    )


# --- partitioning ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionScheme:
    kind: str
    param: float | None = None

    @classmethod
    def parse(cls, text: str) -> PartitionScheme:
        kind, _, raw = text.partition(":")
        if kind not in PARTITION_KINDS:
            raise ConfigError(
                f"unknown partition {text!r}; use iid, dirichlet:ALPHA or pathological:K"
            )
        if kind == "iid":
            if raw:
                raise ConfigError(f"partition iid takes no parameter, got {text!r}")
            return cls(kind)
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"partition {kind} needs a number after ':', got {text!r}") from None
        if kind == "dirichlet" and not value > 0:
            raise ConfigError(f"dirichlet alpha must be > 0, got {raw}")
        if kind == "pathological" and (value != int(value) or value < 1):
            raise ConfigError(f"pathological:K needs a whole number of classes K >= 1, got {raw}")
        return cls(kind, value)


def partition(dataset: Any, num_clients: int, scheme: str, seed: int = 0) -> list[Any]:
    """Split `dataset` into `num_clients` shards with a flwr-datasets partitioner."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    parsed = PartitionScheme.parse(scheme)
    if num_clients < 1:
        raise ConfigError(f"need at least one client, got {num_clients}")
    if num_clients > len(dataset):
        raise ConfigError(
            f"{num_clients} clients but only {len(dataset)} training examples; use fewer clients"
        )
    if parsed.kind != "iid" and "label" not in dataset.column_names:
        raise ConfigError(f"partition {scheme} splits by label; it needs a labelled dataset")
    if parsed.kind == "iid":
        partitioner: Any = IidPartitioner(num_clients)
        dataset = dataset.shuffle(seed=seed)
    elif parsed.kind == "dirichlet":
        partitioner = DirichletPartitioner(
            num_clients, "label", parsed.param, min_partition_size=1, self_balancing=True, seed=seed
        )
    else:
        partitioner = PathologicalPartitioner(
            num_clients, "label", int(parsed.param or 1),
            class_assignment_mode="first-deterministic", seed=seed,
        )
    partitioner.dataset = dataset
    try:
        with warnings.catch_warnings():  # retries and unused classes; failures raise below
            warnings.simplefilter("ignore", UserWarning)
            shards = [partitioner.load_partition(i) for i in range(num_clients)]
    except ValueError as exc:
        raise ConfigError(f"partition {scheme} over {num_clients} clients failed: {exc}") from None
    empty = [i for i, s in enumerate(shards) if len(s) == 0]
    if empty:
        raise ConfigError(
            f"partition {scheme} left {len(empty)} of {num_clients} clients without data "
            f"(first: client {empty[0]}); use fewer clients or a larger alpha / K"
        )
    return shards



def evaluation_subset(heldout: Any, size: int, seed: int) -> Any:
    """`size` held-out examples that represent the split: stratified by label (each class in
    proportion, by largest remainders, drawn from a seeded shuffle), or a seeded random sample
    without labels. Never the first rows: a split in label order would cover a few classes."""
    if size >= len(heldout):
        return heldout
    order = list(range(len(heldout)))
    random.Random(f"evaluation:{seed}").shuffle(order)
    if "label" not in heldout.column_names:
        return heldout.select(sorted(order[:size]))
    labels = heldout["label"]
    by_class: dict[int, list[int]] = {}
    for i in order:
        by_class.setdefault(int(labels[i]), []).append(i)
    quotas = {c: size * len(rows) / len(heldout) for c, rows in by_class.items()}
    counts = {c: int(q) for c, q in quotas.items()}
    leftover = size - sum(counts.values())
    for c in sorted(quotas, key=lambda c: (counts[c] - quotas[c], c))[:leftover]:
        counts[c] += 1
    return heldout.select(sorted(i for c, rows in by_class.items() for i in rows[: counts[c]]))
