"""Small models and data for the client tests: the `tiny` preset, built in seconds."""

from __future__ import annotations

import torch

from fedlr.data.batches import Encoded, encode
from fedlr.models.hosts import LoraHost, default_targets, load_base_model, load_tokenizer
from fedlr.peft_layout import from_peft_model
from fedlr.settings.specs import ModelSpec

TEXTS = [
    "open a socket and connect to the server",
    "a thread pool runs tasks concurrently",
    "parse a json document",
    "the square root of a decimal number, rounded half even",
    "read every file in a directory tree and copy it",
    "a lock protects the queue",
    "encode bytes as base64",
    "the tk widget draws a canvas",
    "split a path into its directory and name",
    "format the date in ISO 8601",
    "an http request with headers",
    "tokenize python source",
]


def tiny_host(
    task: str = "classification", dtype: torch.dtype = torch.float32
) -> tuple[LoraHost, Encoded]:
    """A LoraHost on the tiny preset and a dozen encoded examples of varying length."""
    from datasets import Dataset

    spec = ModelSpec(name="tiny", task=task, num_labels=3)
    tokenizer = load_tokenizer(spec)
    base = load_base_model(spec, tokenizer).to(dtype)
    host = LoraHost(base, task, default_targets(base))
    rows = {"text": TEXTS, "label": [i % 3 for i in range(len(TEXTS))]}
    return host, encode(Dataset.from_dict(rows), tokenizer, 32)


def randomize_adapter(host: LoraHost, rank: int, seed: int = 0):
    """The rank's PEFT model with non-zero A and B (so every LoRA gradient is non-zero)."""
    model = host.model(rank)
    gen = torch.Generator().manual_seed(seed)
    name = host.adapter_name(rank)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f".{name}." in pname:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
                p.requires_grad_(True)
    return model


def current_adapter(host: LoraHost, rank: int):
    return from_peft_model(host.model(rank), host.adapter_name(rank))


def f64_bert_host(device: str = "cpu") -> tuple[LoraHost, Encoded]:
    """A small BERT in float64 without dropout, on the tiny preset's examples: every op stays
    float64 (the tiny LLaMA computes its RMSNorm in float32, which would round two paths' last
    bits apart), and its head takes the pooled output, as MiniLM's does. On `device` before its
    LoRA layers are attached (opacus#820); the examples stay on the CPU, as a shard does."""
    from transformers import BertConfig, BertForSequenceClassification

    _, data = tiny_host()
    config = BertConfig(vocab_size=int(max(int(ids.max()) for ids in data.ids)) + 1,
                        hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=data.pad_id)
    torch.manual_seed(0)
    base = BertForSequenceClassification(config).to(torch.float64).eval().requires_grad_(False)
    base = base.to(device)
    return LoraHost(base, "classification", ("query", "value")), data
