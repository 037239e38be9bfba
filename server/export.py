"""The final adapter in PEFT's format, loadable with `PeftModel.from_pretrained(base, DIR)`."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from fedlr.adapters import Adapter, peft_config_fields, to_peft_state_dict
from fedlr.atomic import fsync_path
from fedlr.lora.strategies import GlobalState, Strategy

TASK_TYPES = {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


def final_adapter(strategy: Strategy, state: GlobalState, export_rank: int | None
                  ) -> tuple[Adapter, dict[str, Any]]:
    """What the run hands over (`Strategy.export_lora`), and facts about it."""
    lora, facts = strategy.export_lora(state, export_rank)
    info: dict[str, Any] = {"strategy": strategy.name, "round": state.round, **facts,
                            "ranks": sorted({f.rank for f in lora.values()})}
    return Adapter(lora=lora, extras=dict(state.extras)), info


def export_peft(folder: Path, adapter: Adapter, base_model: str, task: str,
                info: dict[str, Any], model_config: Any = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors into `folder`, atomically, with
    fedlr_export.json (`info`) and, given the base's transformers config, config.json: a
    classifier's num_labels, id2label and label2id, where transformers looks for them."""
    from peft import LoraConfig

    fields = peft_config_fields(adapter)
    config = LoraConfig(**fields, task_type=TASK_TYPES[task], base_model_name_or_path=base_model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in to_peft_state_dict(adapter).items()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        config.save_pretrained(str(staging))
        if model_config is not None:
            model_config.save_pretrained(str(staging))
        save_file(tensors, str(staging / "adapter_model.safetensors"))
        (staging / "fedlr_export.json").write_text(json.dumps(info, indent=2) + "\n")
        replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_folder(new: Path, folder: Path) -> None:
    """`new` renamed to `folder`, replacing what was there so that a crash at any point leaves
    one whole export at `folder` or at its aside name (`.NAME.old`): the old one is renamed
    aside first, then the new one into place (the old one back if that fails), and only then is
    the old one deleted. The new files and both renames are fsynced."""
    aside = folder.parent / f".{folder.name}.old"
    if aside.exists() and not folder.exists():  # a crash between the renames: it is the export
        aside.rename(folder)
    elif aside.exists():  # a crash after the new one was in place: an older export
        shutil.rmtree(aside)
    for file in new.iterdir():
        fsync_path(file)
    fsync_path(new)
    had_old = folder.exists()
    if had_old:
        folder.rename(aside)
    try:
        new.rename(folder)
    except BaseException:
        if had_old:
            aside.rename(folder)
        raise
    fsync_path(folder.parent)
    if had_old:
        shutil.rmtree(aside)
