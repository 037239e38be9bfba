"""The final adapter in PEFT's format, loadable with `PeftModel.from_pretrained(base, DIR)`."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from fedlr.adapters import Adapter, LoraFactors, peft_config_fields, to_peft_state_dict
from fedlr.lowrank import svd
from fedlr.strategies import GlobalState, Strategy
from fedlr.strategies.flora import FLoRA

TASK_TYPES = {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


def final_adapter(strategy: Strategy, state: GlobalState, export_rank: int | None
                  ) -> tuple[Adapter, dict[str, Any]]:
    """What the run hands over, and facts about it.

    FLoRA: the exact cumulative update of all rounds as one LoRA of the stacked rank (scaling 1),
    re-factored exactly by an SVD where that rank exceeds min(d_out, d_in) (no exact LoRA needs
    more); or, with `export_rank`, its best rank-`export_rank` approximation and the energy each
    module keeps. The others: the global adapter at the federation's largest rank, in PEFT's
    scaling.
    """
    info: dict[str, Any] = {"strategy": strategy.name, "round": state.round}
    if isinstance(strategy, FLoRA):
        if export_rank is not None:
            compressed, energy = strategy.compressed(state, export_rank)
            source, info["energy_kept"] = compressed, energy
        else:
            source = strategy.cumulative(state)
            capped = {name: min(x.shape) for name, x in source.items() if x.rank > min(x.shape)}
            source = {name: svd(x).top(capped[name]) if name in capped else x
                      for name, x in source.items()}
            info["refactored_exactly"] = sorted(capped)
        lora = {name: LoraFactors(x.A, x.B, 1.0) for name, x in source.items()}
    else:
        rank = strategy.spec.max_rank
        scaling = strategy.spec.scaling(rank)
        lora = {name: LoraFactors.from_effective(x, scaling) for name, x in state.lora.items()}
    info["ranks"] = sorted({f.rank for f in lora.values()})
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
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
