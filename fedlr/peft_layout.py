"""Where each tensor of an adapter lives in a live PEFT model, worked out once per adapter name.

Loading a client's adapter into the shared PEFT model and reading it back went through PEFT's
state-dict functions and a walk over every module, about 10 ms a client on the tiny preset: a
batched group of a hundred clients spent a tenth of its round there. A `PeftLayout` maps each
parameter of one adapter (its LoRA factors, and its copy of a trained head) to the adapter key
it carries once; loading, reading, and handing a client its own copies of the tensors are then
plain copies. `from_peft_model` and `load_into_peft_model` are the layout used once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedlr.adapters import _LORA_KEY, PEFT_PREFIX, Adapter, LoraFactors


@dataclass(frozen=True)
class Slot:
    """One tensor of the adapter: its name in the model, what it is (`A`, `B` or `extra`), the
    adapter key it carries (a LoRA module, or an extras name), for LoRA the model's scaling, and
    whether it is a parameter (a buffer is carried, never trained)."""

    param: str
    kind: str
    key: str
    scaling: float = 1.0
    parameter: bool = True


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: mod for name, mod in model.named_modules() if isinstance(mod, LoraLayer)}


class PeftLayout:
    """The slots of adapter `adapter_name` in `model`, in the model's parameter order (the order
    DP-SGD draws its noise in). Valid while the model keeps its modules (adding another
    adapter does not replace this one's tensors)."""

    def __init__(self, model: torch.nn.Module, adapter_name: str = "default") -> None:
        from peft import get_peft_model_state_dict

        params = dict(model.named_parameters())
        live = {**params, **dict(model.named_buffers())}
        found: dict[str, Slot] = {}
        for path, mod in _lora_layers(model).items():
            if adapter_name not in mod.lora_A:
                continue
            module, scaling = path.removeprefix(PEFT_PREFIX), float(mod.scaling[adapter_name])
            for kind in "AB":
                param = f"{path}.lora_{kind}.{adapter_name}.weight"
                found[param] = Slot(param, kind, module, scaling)
        by_storage = {(t.data_ptr(), tuple(t.shape)): name for name, t in live.items()}
        for key, value in get_peft_model_state_dict(model, adapter_name=adapter_name).items():
            bare = key.removeprefix(PEFT_PREFIX)
            if not _LORA_KEY.match(bare):
                param = by_storage.get((value.data_ptr(), tuple(value.shape)))
                if param is None:
                    raise ValueError(f"{key} of PEFT's state dict is no tensor of the model")
                found[param] = Slot(param, "extra", bare, parameter=param in params)
        self.slots = [found[name] for name in live if name in found]
        self.live = {slot.param: live[slot.param] for slot in self.slots}
        self.modules = {slot.key for slot in self.slots if slot.kind == "A"}
        self.extras = {slot.key for slot in self.slots if slot.kind == "extra"}

    def tensors(self, adapter: Adapter) -> dict[str, Tensor]:
        """Fresh copies of every slot: the adapter's values where it has them (B rescaled to the
        model's scaling, so that s B A is the adapter's dW), the model's current ones elsewhere,
        as PEFT's loading leaves them."""
        missing = sorted(set(adapter.lora) - self.modules)
        if missing:
            raise ValueError(f"model has no LoRA layer for {missing[:3]}; check target modules")
        unexpected = sorted(set(adapter.extras) - self.extras)
        if unexpected:
            raise ValueError(f"model has no trainable tensor for {unexpected[:3]}")
        out: dict[str, Tensor] = {}
        for slot in self.slots:
            current = self.live[slot.param].detach()
            value = self._value(slot, adapter)
            if value is not None and value.shape != current.shape:
                f = adapter.lora[slot.key]
                raise ValueError(
                    f"{slot.key}: model LoRA {slot.kind} has shape {tuple(current.shape)}, the "
                    f"adapter's {tuple(value.shape)}; build the model with rank {f.rank} for "
                    "this module")
            source = current if value is None else value
            out[slot.param] = source.to(current.device, current.dtype).clone()
        return out

    @staticmethod
    def _value(slot: Slot, adapter: Adapter) -> Tensor | None:
        if slot.kind == "extra":
            return adapter.extras.get(slot.key)
        f = adapter.lora.get(slot.key)
        if f is None:
            return None
        return f.A if slot.kind == "A" else f.B * (f.scaling / slot.scaling)

    def load(self, adapter: Adapter) -> None:
        """Copy an adapter into the model in place (`tensors`' values)."""
        values = self.tensors(adapter)
        with torch.no_grad():
            for name, value in values.items():
                self.live[name].copy_(value)

    def adapter(self, values: Mapping[str, Tensor] | None = None) -> Adapter:
        """The adapter that `values` (by slot name; the model's own tensors when None) make, in
        the model's scalings; copies, detached."""
        source: Mapping[str, Any] = self.live if values is None else values
        factors: dict[str, dict[str, Tensor]] = {}
        scalings: dict[str, float] = {}
        extras: dict[str, Tensor] = {}
        for slot in self.slots:
            tensor = source[slot.param].detach().clone()
            if slot.kind == "extra":
                extras[slot.key] = tensor
            else:
                factors.setdefault(slot.key, {})[slot.kind] = tensor
                scalings[slot.key] = slot.scaling
        lora = {m: LoraFactors(ab["A"], ab["B"], scalings[m]) for m, ab in factors.items()}
        return Adapter(lora=lora, extras=extras)


def from_peft_model(model: torch.nn.Module, adapter_name: str = "default") -> Adapter:
    """Read the live LoRA factors, scalings and trainable extras of a PEFT model."""
    return PeftLayout(model, adapter_name).adapter()


def load_into_peft_model(model: torch.nn.Module, adapter: Adapter,
                         adapter_name: str = "default") -> None:
    """Copy an adapter into a PEFT model in place, rescaling B where the model's scaling differs.

    The product s B A is what matters, so a model whose LoRA scaling differs from the adapter's
    still ends up with exactly the adapter's dW."""
    PeftLayout(model, adapter_name).load(adapter)
