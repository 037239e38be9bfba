"""Adapter state: LoRA factors per module, files, and conversion to and from PEFT.

One type travels everywhere (client uploads, downlinks, round artifacts, exports):

- `lora`: the trainable LoRA factors per module, dW = scaling * B @ A, in the client's scaling;
- `base`: an update to merge into the frozen weights before training (FLoRA's merged rounds), either
  low-rank (scaling folded into B) or dense, whichever is cheaper;
- `extras`: trainable tensors outside LoRA (a classification head), stored whole;
- `meta`: JSON-able facts (`num_examples`, `client_id`, round, strategy, ...).

Files are safetensors with the fedlr metadata as JSON under the key "fedlr", written atomically.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from fedlr.atomic import atomic_write
from fedlr.errors import AdapterFileError
from fedlr.lora.lowrank import LowRank

FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA: A (r x d_in), B (d_out x r) and the scaling s in dW = s B A."""

    A: Tensor
    B: Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def effective(self) -> LowRank:
        """The same update with the scaling folded into B, the form the strategies work in."""
        return LowRank(self.B * self.scaling, self.A)

    def delta(self) -> Tensor:
        return self.scaling * (self.B @ self.A)

    @classmethod
    def from_effective(cls, x: LowRank, scaling: float) -> LoraFactors:
        """Factors that a client with LoRA scaling `scaling` loads to reproduce x exactly."""
        return cls(A=x.A, B=x.B / scaling, scaling=scaling)


BaseDelta = LowRank | Tensor


@dataclass
class Adapter:
    lora: dict[str, LoraFactors] = field(default_factory=dict)
    base: dict[str, BaseDelta] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def delta_weights(self) -> dict[str, Tensor]:
        """dW per module: the LoRA product plus any base update."""
        out: dict[str, Tensor] = {name: f.delta() for name, f in self.lora.items()}
        for name, d in self.base.items():
            dense = d.dense() if isinstance(d, LowRank) else d
            out[name] = out[name] + dense if name in out else dense
        return out

    def tensors(self) -> dict[str, Tensor]:
        """Flat name -> tensor view, as stored in files."""
        flat: dict[str, Tensor] = {}
        for name, f in self.lora.items():
            flat[f"lora_A::{name}"] = f.A
            flat[f"lora_B::{name}"] = f.B
        for name, d in self.base.items():
            if isinstance(d, LowRank):
                flat[f"base_A::{name}"] = d.A
                flat[f"base_B::{name}"] = d.B
            else:
                flat[f"base_dense::{name}"] = d
        for name, t in self.extras.items():
            flat[f"extra::{name}"] = t
        return flat

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def save_adapter(adapter: Adapter, path: str | Path) -> None:
    """Save as safetensors; metadata records ranks, scalings and `adapter.meta`."""
    header = {
        "format_version": FORMAT_VERSION,
        "scaling": {n: f.scaling for n, f in adapter.lora.items()},
        "ranks": {n: f.rank for n, f in adapter.lora.items()},
        "meta": adapter.meta,
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.tensors().items()}
    atomic_write(
        Path(path), lambda tmp: save_file(tensors, tmp, metadata={"fedlr": json.dumps(header)})
    )


def load_adapter(path: str | Path) -> Adapter:
    """Load a fedlr adapter file, or a PEFT adapter directory (adapter_config.json + weights)."""
    path = Path(path)
    if path.is_dir():
        return load_peft_dir(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw_meta = (fh.metadata() or {}).get("fedlr")
            flat = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except Exception as exc:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({exc})") from exc
    if raw_meta is None:
        raise AdapterFileError(
            f"{path} has no fedlr metadata; for a PEFT adapter pass its directory instead"
        )
    header = json.loads(raw_meta)
    try:
        return adapter_from_tensors(flat, header.get("scaling", {}), header.get("meta", {}))
    except (KeyError, ValueError) as exc:
        raise AdapterFileError(f"{path}: {exc}") from None


def adapter_from_tensors(
    flat: dict[str, Tensor], scaling: dict[str, float], meta: dict[str, Any] | None = None
) -> Adapter:
    """The inverse of `Adapter.tensors()`, given each LoRA module's scaling."""
    adapter = Adapter(meta=dict(meta or {}))
    for key, tensor in flat.items():
        kind, _, name = key.partition("::")
        if kind == "lora_A":
            adapter.lora[name] = LoraFactors(tensor, flat[f"lora_B::{name}"], float(scaling[name]))
        elif kind == "base_A":
            adapter.base[name] = LowRank(flat[f"base_B::{name}"], tensor)
        elif kind == "base_dense":
            adapter.base[name] = tensor
        elif kind == "extra":
            adapter.extras[name] = tensor
        elif kind not in ("lora_B", "base_B"):
            raise ValueError(f"unknown tensor key {key!r}")
    return adapter


def load_delta_weights(path: str | Path) -> dict[str, Tensor]:
    """dW per module for any adapter file fedlr writes (or a PEFT adapter directory)."""
    return load_adapter(path).delta_weights()


# --- PEFT ------------------------------------------------------------------------------------


def _peft_scaling(module: str, rank: int, config: dict[str, Any]) -> float:
    """LoRA scaling of one module as PEFT computes it (alpha_pattern, rsLoRA)."""
    alpha = float(config.get("lora_alpha", 8))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    return alpha / rank**0.5 if config.get("use_rslora") else alpha / rank


def from_peft_state_dict(state_dict: dict[str, Tensor], config: dict[str, Any]) -> Adapter:
    """Adapter from `peft.get_peft_model_state_dict(model)` and the LoraConfig (as a dict)."""
    factors: dict[str, dict[str, Tensor]] = {}
    extras: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        bare = key.removeprefix(PEFT_PREFIX)
        match = _LORA_KEY.match(bare)
        if match:
            factors.setdefault(match["module"], {})[match["factor"]] = tensor
        else:
            extras[bare] = tensor
    lora = {}
    for module, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise AdapterFileError(f"PEFT state dict has only lora_{''.join(ab)} for {module}")
        rank = ab["A"].shape[0]
        lora[module] = LoraFactors(ab["A"], ab["B"], _peft_scaling(module, rank, config))
    return Adapter(lora=lora, extras=extras)


def to_peft_state_dict(adapter: Adapter) -> dict[str, Tensor]:
    """The inverse: keys as `get_peft_model_state_dict` produces, for `set_peft_model_state_dict`.

    Scalings are not part of a state dict: write them with `peft_config_fields` or load into a
    model with `load_into_peft_model`, which rescales B where the model's scaling differs.
    """
    if adapter.base:
        raise ValueError(
            "an adapter with a base update has no PEFT state-dict form; merge it first"
        )
    sd: dict[str, Tensor] = {}
    for module, f in adapter.lora.items():
        sd[f"{PEFT_PREFIX}{module}.lora_A.weight"] = f.A
        sd[f"{PEFT_PREFIX}{module}.lora_B.weight"] = f.B
    for name, t in adapter.extras.items():
        sd[f"{PEFT_PREFIX}{name}"] = t
    return sd


def peft_config_fields(adapter: Adapter) -> dict[str, Any]:
    """LoraConfig fields (r, lora_alpha, patterns, targets) reproducing every module's scaling."""
    if not adapter.lora:
        raise ValueError("adapter has no LoRA modules")
    ranks = [f.rank for f in adapter.lora.values()]
    r = max(set(ranks), key=ranks.count)
    alpha = next(f.scaling * f.rank for f in adapter.lora.values() if f.rank == r)
    rank_pattern, alpha_pattern = {}, {}
    for module, f in adapter.lora.items():
        key = f"^{re.escape(module)}"
        if f.rank != r:
            rank_pattern[key] = f.rank
        if abs(f.scaling * f.rank - alpha) > 1e-9 * max(1.0, abs(alpha)):
            alpha_pattern[key] = f.scaling * f.rank
    modules_to_save = sorted({name.rsplit(".", 1)[0] for name in adapter.extras})
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(adapter.lora),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": modules_to_save or None,
    }


def load_peft_dir(path: Path) -> Adapter:
    """Adapter from a directory written by PEFT's `save_pretrained`."""
    config_file = path / "adapter_config.json"
    weights = path / "adapter_model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise AdapterFileError(
            f"{path} is not a PEFT adapter directory (needs adapter_config.json and "
            "adapter_model.safetensors)"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{config_file} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{config_file} is not a PEFT adapter config (not an object)")
    try:
        with safe_open(str(weights), framework="pt") as fh:
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for torn files
        raise AdapterFileError(f"{weights} is not a readable safetensors file ({exc})") from None
    try:
        return from_peft_state_dict(state, config)
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterFileError(f"{path}: adapter_config.json does not describe its weights "
                               f"({type(exc).__name__}: {exc})") from None
