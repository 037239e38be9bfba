"""`fedlr predict`: a run's exported adapter on new text, with the class names it was trained on.

The export (adapter/) holds PEFT's adapter files, the base's config naming the classes, and
fedlr_export.json, which says how fedlr built the base (preset, directory or hub id, seed), so
nothing has to be guessed, not even for the random-weight `tiny` preset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlr.errors import AdapterFileError
from fedlr.models.hosts import load_base_model, load_tokenizer
from fedlr.settings.specs import ModelSpec


@dataclass
class Exported:
    model: Any
    tokenizer: Any
    spec: ModelSpec
    labels: list[str]


def load_exported(folder: Path) -> Exported:
    """The base with the exported adapter, ready to predict."""
    from peft import PeftModel

    facts_path = folder / "fedlr_export.json"
    if not facts_path.is_file():
        raise AdapterFileError(f"{folder} is not a fedlr export (no fedlr_export.json); give the "
                               "adapter/ folder of a run")
    try:
        facts = json.loads(facts_path.read_text(encoding="utf-8"))
        model = dict(facts["model"])
        spec = ModelSpec(**{**model, "targets": tuple(model["targets"] or ()) or None})
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterFileError(f"{facts_path} is unreadable ({exc}); export the run again"
                               ) from None
    tokenizer = load_tokenizer(spec)
    base = load_base_model(spec, tokenizer)
    try:
        peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{folder}: cannot load the adapter ({exc})") from None
    return Exported(peft_model, tokenizer, spec, list(facts.get("labels", [])))


@torch.no_grad()
def classify(exported: Exported, texts: list[str], top: int = 3) -> list[list[tuple[str, float]]]:
    """Each text's `top` classes by probability, named."""
    batch = exported.tokenizer(texts, padding=True, truncation=True,
                               max_length=exported.spec.max_length, return_tensors="pt")
    probs = torch.softmax(exported.model(**batch).logits.float(), dim=-1)
    names = exported.labels or [str(i) for i in range(probs.shape[-1])]
    best = probs.topk(min(top, probs.shape[-1]), dim=-1)
    return [[(names[int(i)], float(p)) for p, i in zip(ps, idx, strict=True)]
            for ps, idx in zip(best.values, best.indices, strict=True)]


@torch.no_grad()
def generate(exported: Exported, texts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy continuations of each text (causal LM)."""
    out = []
    for text in texts:
        batch = exported.tokenizer(text, return_tensors="pt")
        tokens = exported.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=exported.tokenizer.pad_token_id)
        out.append(exported.tokenizer.decode(tokens[0, batch["input_ids"].shape[1]:],
                                             skip_special_tokens=True))
    return out
