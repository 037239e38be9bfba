"""Data sources, the built-in stdlib-docs task, partitioning, and one-line errors for bad input."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from datasets import Dataset
from training_setup import current_adapter, tiny_host

from fedlr.client.training import LocalTrainer
from fedlr.data import stdlib_docs
from fedlr.data.batches import Encoded
from fedlr.data.sources import PartitionScheme, load_data, partition
from fedlr.errors import ConfigError, FedlrError
from fedlr.models.hosts import LoraHost, load_base_model, load_tokenizer, resolve_device
from fedlr.settings.specs import DPConfig, ModelSpec, TrainConfig


@pytest.fixture(scope="module")
def docs():
    return load_data("stdlib-docs")


def test_stdlib_docs_is_a_balanced_deterministic_topic_task(docs):
    assert 8 <= docs.num_labels <= 16
    assert docs.label_names == stdlib_docs.LABELS
    train, heldout = set(docs.train["text"]), set(docs.heldout["text"])
    assert not train & heldout  # no example in both splits
    counts = Counter(docs.train["label"]) + Counter(docs.heldout["label"])
    assert set(counts) == set(range(docs.num_labels))  # every topic present
    assert max(counts.values()) <= stdlib_docs.DEFAULT_PER_TOPIC
    assert 0.15 < len(heldout) / (len(train) + len(heldout)) < 0.25
    again = load_data("stdlib-docs")
    assert again.train["text"] == docs.train["text"]


def test_stdlib_docs_labels_follow_the_package_mapping():
    train, _ = stdlib_docs.build(per_topic=50)
    owner = {pkg: topic for topic, pkgs in stdlib_docs.TOPICS.items() for pkg in pkgs}
    for example in train:
        package = example.source.split(".")[0]
        assert stdlib_docs.LABELS[example.label] == owner[package]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.5"])
def test_partitions_cover_the_data_exactly_once(docs, scheme):
    shards = partition(docs.train, 7, scheme, seed=3)
    texts = [t for s in shards for t in s["text"]]
    assert sorted(texts) == sorted(docs.train["text"])
    if scheme == "iid":
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1


def test_pathological_clients_hold_k_whole_classes_between_them(docs):
    """With 7 x 2 class slots for 14 topics some topics may go unused; used ones are whole."""
    shards = partition(docs.train, 7, "pathological:2", seed=3)
    assert all(len(set(s["label"])) <= 2 for s in shards)
    texts = [t for s in shards for t in s["text"]]
    assert len(texts) == len(set(texts))
    used = {label for s in shards for label in s["label"]}
    assert Counter(label for s in shards for label in s["label"]) == Counter(
        label for label in docs.train["label"] if label in used
    )


def test_dirichlet_skews_labels_more_as_alpha_shrinks(docs):
    def mean_top_share(alpha):
        shards = partition(docs.train, 8, f"dirichlet:{alpha}", seed=0)
        return sum(max(Counter(s["label"]).values()) / len(s) for s in shards) / len(shards)

    assert mean_top_share(0.1) > mean_top_share(100.0) + 0.2


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_jsonl_and_csv_files_load_with_string_labels(tmp_path):
    rows = [{"text": f"example number {i}", "label": ["spam", "ham"][i % 2]} for i in range(40)]
    jsonl = _write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    csv = _write(tmp_path, "d.csv", "text,label\n" + "\n".join(f"{r['text']},{r['label']}"
                                                               for r in rows))
    for path in (jsonl, csv):
        data = load_data(path)
        assert data.label_names == ("ham", "spam")
        assert len(data.train) + len(data.heldout) == 40
        original = {r["text"]: r["label"] for r in rows}
        for split in (data.train, data.heldout):
            for text, label in zip(split["text"], split["label"], strict=True):
                assert data.label_names[label] == original[text]


def test_plain_text_is_a_causal_lm_corpus(tmp_path):
    path = _write(tmp_path, "corpus.txt", "\n\n".join(f"paragraph {i} of text" for i in range(30)))
    data = load_data(path, task="causal-lm")
    assert len(data.train) + len(data.heldout) == 30
    assert "label" not in data.train.column_names


def one_line_error(exc_type, fn, *args, **kwargs):
    with pytest.raises(exc_type) as caught:
        fn(*args, **kwargs)
    message = str(caught.value)
    assert message and "\n" not in message
    return message


def test_bad_data_gives_one_line_errors(tmp_path):
    assert "not found" in one_line_error(ConfigError, load_data, str(tmp_path / "missing.jsonl"))
    bad = _write(tmp_path, "bad.jsonl", '{"text": "ok", "label": 1}\n{"text": oops}\n')
    assert "bad.jsonl:2: malformed JSON" in one_line_error(ConfigError, load_data, bad)
    nolabel = _write(tmp_path, "nolabel.jsonl", '{"text": "a"}\n{"text": "b"}\n')
    assert "no 'label' column" in one_line_error(ConfigError, load_data, nolabel)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"text,label\n\xff\xfe\x00,1\n")
    assert "not UTF-8" in one_line_error(ConfigError, load_data, str(binary))
    assert "directory" in one_line_error(ConfigError, load_data, str(tmp_path))
    same = '{"text": "a", "label": 0}\n{"text": "b", "label": 0}'
    one_label = _write(tmp_path, "one.jsonl", same)
    assert "at least 2 distinct labels" in one_line_error(ConfigError, load_data, one_label)
    text = _write(tmp_path, "c.txt", "words")
    assert "causal-lm" in one_line_error(ConfigError, load_data, text)


def test_a_hub_dataset_while_offline_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = one_line_error(ConfigError, load_data, "someone/no-such-dataset-here")
    assert "HF_HUB_OFFLINE" in message


def test_bad_partitions_give_one_line_errors(docs):
    small = Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0]})
    assert "only 3 training examples" in one_line_error(ConfigError, partition, small, 5, "iid")
    skewed = Dataset.from_dict({"text": [f"t{i}" for i in range(8)], "label": [0] * 6 + [1, 2]})
    assert "failed" in one_line_error(ConfigError, partition, skewed, 6, "dirichlet:0.01")
    for scheme in ("random", "dirichlet:-1", "dirichlet:x", "pathological:1.5", "iid:3"):
        one_line_error(ConfigError, PartitionScheme.parse, scheme)


def test_an_empty_client_dataset_is_refused_before_training():
    host, data = tiny_host()
    empty = Encoded([], torch.zeros(0, dtype=torch.long), data.pad_id)
    trainer = LocalTrainer(host, TrainConfig(local_steps=1))
    message = one_line_error(FedlrError, trainer.train, "c7", current_adapter(host, 2), empty,
                             rank=2)
    assert "client c7 has no training examples" in message


def test_bad_models_give_one_line_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" in one_line_error(
        ConfigError, load_tokenizer, ModelSpec(name="someone/no-such-model-here")
    )
    assert "not found" in one_line_error(
        ConfigError, load_tokenizer, ModelSpec(name=str(tmp_path / "nope"))
    )
    assert "config.json" in one_line_error(ConfigError, load_tokenizer,
                                           ModelSpec(name=str(tmp_path)))
    one_line_error(ConfigError, ModelSpec, task="translation")
    spec = ModelSpec(name="tiny", num_labels=3)
    base = load_base_model(spec, load_tokenizer(spec))
    assert "no linear layer matches" in one_line_error(
        ConfigError, LoraHost, base, "classification", ["nonexistent_proj"]
    )
    host = LoraHost(base, "classification", ["q_proj"])
    for rank in (0, -2):
        assert "positive integer" in one_line_error(ConfigError, host.model, rank)
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        assert "no CUDA device" in one_line_error(ConfigError, resolve_device, "cuda")


def test_bad_training_settings_fail_before_any_work():
    one_line_error(ConfigError, TrainConfig, local_steps=0)
    one_line_error(ConfigError, TrainConfig, lr=float("nan"))
    one_line_error(ConfigError, DPConfig, noise_multiplier=-1.0)
    one_line_error(ConfigError, DPConfig, noise_multiplier=1.0, target_epsilon=3.0)
    one_line_error(ConfigError, DPConfig, noise_multiplier=1.0, max_grad_norm=0.0)
    one_line_error(ConfigError, DPConfig, noise_multiplier=1.0, delta=1.0)
    one_line_error(ConfigError, DPConfig, noise_multiplier=1.0, grad_sample_mode="functorch2")


def test_a_model_saved_to_a_local_directory_loads_by_path(tmp_path):
    """The user path for `--model DIR`: same architecture, weights and tokenizer as saved."""
    spec = ModelSpec(name="tiny", num_labels=3)
    tokenizer = load_tokenizer(spec)
    model = load_base_model(spec, tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    local = ModelSpec(name=str(tmp_path), num_labels=3)
    loaded = load_base_model(local, load_tokenizer(local))
    batch = tokenizer(["import a module by name"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_the_stdlib_docs_cache_returns_exactly_what_a_fresh_build_gives(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    root = stdlib_docs.stdlib_dir()
    first = stdlib_docs.build(40, root)  # builds and writes the cache
    assert stdlib_docs.cache_path(40, root).is_file()
    assert stdlib_docs.build(40, root) == first == stdlib_docs._build(40, root)
    stdlib_docs.cache_path(40, root).write_text("{not json")  # a torn or stale cache is rebuilt
    assert stdlib_docs.build(40, root) == first


def test_padded_passes_keep_every_example_once_and_bound_the_padding():
    from fedlr.data.batches import padded_passes

    lengths = [5, 30, 7, 30, 12, 3, 64, 9]
    passes = padded_passes(lengths, tokens=64)
    assert sorted(k for part in passes for k in part) == list(range(len(lengths)))
    widths = [max(lengths[k] for k in part) for part in passes]
    for part, width in zip(passes, widths, strict=True):
        assert len(part) == 1 or len(part) * width <= 64
    assert widths == sorted(widths)
    assert sum(len(part) * w for part, w in zip(passes, widths, strict=True)) < 8 * 64


def test_an_encoded_sets_passes_are_of_its_own_indices():
    ids = [torch.ones(n, dtype=torch.long) for n in (9, 2, 7, 2)]
    data = Encoded(ids, torch.zeros(4, dtype=torch.long), pad_id=0)
    # lengths 2, 9, 7: the 2 and the 7 share a pass (2 x 7 <= 16 tokens), the 9 goes alone
    assert data.passes([3, 0, 2], tokens=16) == [[3, 2], [0]]
