"""Where models come from, which of their linear layers LoRA adapts, and the shared frozen base.

A model is named by a preset (`minilm`, the default; `tiny`, for fast tests), a local directory, or
a Hugging Face hub id. Nothing is downloaded behind the user's back: with HF_HUB_OFFLINE set, a hub
id must already be in the local cache, and the error says so.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedlr.adapters import LoraFactors
from fedlr.errors import ConfigError
from fedlr.lora.lowrank import LowRank, kaiming_uniform_a
from fedlr.lora.strategies.base import ModuleShape
from fedlr.models.dropout import use_fast_dropout
from fedlr.models.sources import PRESETS, resolve_source
from fedlr.peft_layout import PeftLayout
from fedlr.settings.specs import ModelSpec

# LoRA targets per architecture, the usual attention query/value choice.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "distilbert": ("q_lin", "v_lin"),
    "roberta": ("query", "value"),
}
HEAD_NAMES = ("classifier", "score")


def skeleton(model_dir: str | Path) -> torch.nn.Module:
    """The model's module tree on the meta device: shapes without loading or allocating weights."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    with torch.device("meta"):
        return AutoModel.from_config(config)


def target_module_shapes(model: torch.nn.Module, targets: Sequence[str]) -> dict[str, ModuleShape]:
    """Every nn.Linear whose name ends with one of `targets` (PEFT's rule), with its shape."""
    found = {
        name: ModuleShape(mod.out_features, mod.in_features)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
        and any(name == t or name.endswith(f".{t}") for t in targets)
    }
    if not found:
        raise ConfigError(
            f"no linear layer matches target modules {list(targets)}; check the names against "
            "the model's named_modules()"
        )
    return found


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _from_pretrained(loader: Any, source: str, name: str, **kwargs: Any) -> Any:
    """from_pretrained without transformers' load report and progress bars (a fresh head is
    expected), and with errors a user can act on."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return loader.from_pretrained(source, local_files_only=_offline(), **kwargs)
    except OSError as exc:
        if _offline():
            raise ConfigError(
                f"model {name!r} is not a preset {PRESETS}, a local directory, or a hub model in "
                "the local cache, and HF_HUB_OFFLINE is set; download it first or pass its path"
            ) from exc
        raise ConfigError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def load_tokenizer(spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, resolve_source(spec.name), spec.name)
    if tokenizer.pad_token is None:  # causal LMs often ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_config(vocab_size: int, pad_token_id: int, num_labels: int) -> Any:
    """A small LLaMA-style decoder: a federated round of a few clients takes seconds on a CPU."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=pad_token_id,
        num_labels=num_labels,
        tie_word_embeddings=True,
    )


def load_base_model(spec: ModelSpec, tokenizer: Any) -> torch.nn.Module:
    """The frozen base for `spec.task`, in eval mode with every weight's requires_grad off.

    Its dropout draws as `fedlr.models.dropout` does. A classification head that the checkpoint
    lacks is initialised from `spec.seed`, so every client and the server build the same one.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    classify = spec.task == "classification"
    auto = AutoModelForSequenceClassification if classify else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"num_labels": spec.num_labels} if classify else {}
    torch.manual_seed(spec.seed)
    if spec.name == "tiny":
        config = tiny_config(len(tokenizer), tokenizer.pad_token_id, spec.num_labels)
        model = auto.from_config(config)
    else:
        model = _from_pretrained(auto, resolve_source(spec.name), spec.name, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    use_fast_dropout(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA device is available; use cpu or auto")
    return torch.device(name)


def default_targets(model: torch.nn.Module) -> tuple[str, ...]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(
            f"no default LoRA targets for model type {model_type!r}; pass target modules "
            "explicitly (e.g. --targets q_proj,v_proj)"
        )
    return DEFAULT_TARGETS[model_type]


def head_modules(model: torch.nn.Module) -> list[str]:
    """The classification head that is trained (and federated) next to LoRA."""
    return [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), torch.nn.Module)]


class LoraHost:
    """One frozen base model per process, shared by every client that trains in it.

    Each distinct rank gets its own PEFT adapter on the same base weights, so a process serving
    hundreds of virtual clients holds one copy of the base plus a few small adapters. A strategy
    that merges updates into the base (FLoRA) sets them with `set_base_delta`, which keeps the
    original weights of the touched layers so that setting a new delta is exact, not cumulative.
    """

    def __init__(
        self,
        base: torch.nn.Module,
        task: str,
        targets: Sequence[str],
        *,
        alpha: float = 16.0,
        rslora: bool = False,
        dropout: float = 0.0,
    ) -> None:
        self.task, self.alpha, self.rslora, self.dropout = task, alpha, rslora, dropout
        self.shapes = target_module_shapes(base, targets)
        self.targets = tuple(targets)
        self.heads = head_modules(base) if task == "classification" else []
        self.initial_head = {
            f"{head}.{name}": p.detach().clone()
            for head in self.heads
            for name, p in base.get_submodule(head).named_parameters()
        }
        self._base = base
        self._model: Any = None
        self._originals: dict[str, Tensor] = {}
        self._layouts: dict[int, PeftLayout] = {}

    @property
    def head_shapes(self) -> dict[str, tuple[int, ...]]:
        """Trainable tensors outside LoRA, as a FederationSpec's `extras`."""
        return {name: tuple(t.shape) for name, t in self.initial_head.items()}

    @property
    def device(self) -> torch.device:
        return next(self._base.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self._base.parameters()).dtype

    @property
    def width(self) -> int:
        """The widest input of the LoRA-targeted layers (what decides whether bf16 pays)."""
        return max(shape.d_in for shape in self.shapes.values())

    def base_config(self, labels: Sequence[str] = ()) -> Any:
        """A copy of the base's transformers config, naming the classes (id2label, label2id)."""
        config = copy.deepcopy(self._base.config)
        if labels:
            config.id2label = dict(enumerate(labels))
            config.label2id = {name: i for i, name in enumerate(labels)}
        return config

    def _config(self, rank: int) -> Any:
        from peft import LoraConfig

        if rank <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer, got {rank}")
        return LoraConfig(
            r=rank,
            lora_alpha=self.alpha,
            use_rslora=self.rslora,
            lora_dropout=self.dropout,
            target_modules=sorted(self.shapes),
            modules_to_save=self.heads or None,
        )

    def model(self, rank: int) -> Any:
        """The PEFT model with the rank-`rank` adapter active (created on first use)."""
        from peft import get_peft_model

        name = self.adapter_name(rank)
        if self._model is None:
            self._model = get_peft_model(self._base, self._config(rank), adapter_name=name)
        elif name not in self._model.peft_config:
            self._model.add_adapter(name, self._config(rank))
        self._model.set_adapter(name)
        return self._model

    def layout(self, rank: int) -> PeftLayout:
        """Where the rank-`rank` adapter's tensors live in the PEFT model (worked out once)."""
        if rank not in self._layouts:
            self._layouts[rank] = PeftLayout(self.model(rank), self.adapter_name(rank))
        return self._layouts[rank]

    @staticmethod
    def adapter_name(rank: int) -> str:
        return f"r{rank}"

    def scaling(self, rank: int) -> float:
        """PEFT's LoRA scaling for this host's alpha: alpha / r, or alpha / sqrt(r) (rsLoRA)."""
        return self.alpha / rank**0.5 if self.rslora else self.alpha / rank

    def fresh_lora(self, rank: int, seed: int) -> dict[str, LoraFactors]:
        """A new LoRA with dW = 0 (A Kaiming-uniform from `seed`, B = 0), as FLoRA clients start
        every round."""
        gen = torch.Generator().manual_seed(seed)
        dtype = self.dtype
        out = {}
        for name, shape in sorted(self.shapes.items()):
            A = kaiming_uniform_a(rank, shape.d_in, gen, dtype)
            out[name] = LoraFactors(A, A.new_zeros(shape.d_out, rank), self.scaling(rank))
        return out

    def base_layer(self, module: str) -> torch.nn.Linear:
        layer = self._base.get_submodule(module)
        return getattr(layer, "base_layer", layer)

    def set_base_delta(self, deltas: Mapping[str, LowRank | Tensor]) -> None:
        """Make every target layer's weight W0 + delta (W0 for layers not in `deltas`)."""
        unknown = sorted(set(deltas) - set(self.shapes))
        if unknown:
            raise ConfigError(f"base update for unknown modules {unknown[:3]}")
        with torch.no_grad():
            for module in sorted(set(deltas) | set(self._originals)):
                weight = self.base_layer(module).weight
                original = self._originals.setdefault(module, weight.detach().clone())
                weight.copy_(original)
                if module in deltas:
                    d = deltas[module]
                    dense = d.dense() if isinstance(d, LowRank) else d
                    weight.add_(dense.to(weight.device, weight.dtype))
