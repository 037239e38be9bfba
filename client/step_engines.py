"""How one optimiser step runs: plainly (`StepEngine`), with the fused kernels' per-example
gradients (`FusedLayers`), or under Opacus's DP-SGD (`OpacusEngine`): clip every example's
gradient to C, add the noise once per step, count the step."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedlr.client.canaries import GradientCanaries
from fedlr.errors import ConfigError


@dataclass(frozen=True)
class DPPlan:
    """What one round of DP-SGD will run with, fixed before the first step."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    mode: str

    @property
    def segment(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)



def one_batch_in_own_dtype(param: Tensor) -> None:
    """A step's per-sample gradients as one batch in the parameter's own dtype. One batch: the
    passes of a step each leave their own (a list), which Opacus would take for accumulated
    batches and divide by their count. Own dtype: computed under autocast (Opacus's hooks keep
    the products' bf16), so that the norms DP-SGD clips by and the sums it adds are taken on the
    same fp32 values, and clipping stays exact whatever precision computed them."""
    samples = getattr(param, "grad_sample", None)
    if isinstance(samples, list):
        param.grad_sample = torch.cat([g.to(param.dtype) for g in samples])
    elif samples is not None:
        param.grad_sample = samples.to(param.dtype)


class StepEngine:
    """Non-private training: mean loss, ordinary backward and step."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, per_example: Tensor, batch: int | None = None) -> None:
        """One pass's examples of a step's `batch` examples (by default all of them): their share
        of the batch's mean loss."""
        (per_example.sum() / (batch or len(per_example))).backward()

    def step(self, canary_draws: Iterable[int] = ()) -> None:
        self.optimizer.step()

    def no_examples(self, params: list[Tensor]) -> None:
        """Without DP batches are never empty."""

    def close(self) -> None:
        """Nothing attached."""


class FusedLayers:
    """While training, peft's LoRA Linear layers run fedlr.kernels' fused function for their
    active adapter, which leaves per-sample gradients on A and B in the ordinary backward (no
    hooks on them). peft's modules and state dict stay as they are."""

    def __init__(self, model: Any) -> None:
        from peft.tuners.lora.layer import Linear

        from fedlr.kernels import FusedLoRALinear

        self.patched: list[Any] = []
        for module in model.modules():
            if not isinstance(module, Linear):
                continue
            (adapter,) = module.active_adapters
            try:
                fused = FusedLoRALinear.from_peft(module, adapter, per_sample=True,
                                                  loss_reduction="mean")
            except ValueError as exc:
                self.close()
                raise ConfigError(f"grad_sample_mode fused: {exc}; use hooks") from None
            module.forward = fused.forward
            self.patched.append(module)

    def close(self) -> None:
        for module in self.patched:
            del module.forward  # back to peft's own forward
        self.patched = []


class OpacusEngine(StepEngine):
    """DP-SGD through Opacus: per-sample gradients by hooks, by the fused LoRA layers (with hooks
    only where they still run: the head), or ghost clipping; clipped to C over all trainable
    tensors together, Gaussian noise added once per step, averaged over the expected batch size
    as Poisson sampling requires."""

    def __init__(
        self, model: Any, optimizer: torch.optim.Optimizer, plan: DPPlan,
        noise_gen: torch.Generator, expected_batch: float,
        canaries: GradientCanaries | None = None,
    ) -> None:
        from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

        self.plan, self.canaries, self.expected_batch = plan, canaries, expected_batch
        common = {
            "noise_multiplier": plan.noise_multiplier,
            "max_grad_norm": plan.max_grad_norm,
            "expected_batch_size": expected_batch,
            "loss_reduction": "mean",
            "generator": noise_gen,
        }
        self.fused = FusedLayers(model) if plan.mode == "fused" else None
        if plan.mode == "ghost":
            self.hooks: Any = GradSampleHooksFastGradientClipping(
                model, loss_reduction="mean", max_grad_norm=plan.max_grad_norm,
                use_ghost_clipping=True,
            )
            optimizer = DPOptimizerFastGradientClipping(optimizer, **common)
        else:
            self.hooks = GradSampleHooks(model, loss_reduction="mean")
            optimizer = DPOptimizer(optimizer, **common)
        super().__init__(optimizer)

    def backward(self, per_example: Tensor, batch: int | None = None) -> None:
        """Each example's own gradient, from one pass: its mean loss, which Opacus and the fused
        layers scale back by the pass's size ("mean"); the step clips and sums them over the
        whole batch. Ghost clipping runs a step in one pass."""
        if self.plan.mode == "ghost":
            from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

            DPTensorFastGradientClipping(self.hooks, self.optimizer, per_example, "mean").backward()
        else:
            per_example.mean().backward()

    def no_examples(self, params: list[Tensor]) -> None:
        """A Poisson batch can hold no real example: the step still happens (noise, and any
        canaries drawn), as accounted."""
        for p in params:
            if self.plan.mode == "ghost":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))

    def step(self, canary_draws: Iterable[int] = ()) -> None:
        for p in self.optimizer.params:
            one_batch_in_own_dtype(p)
        if self.canaries is None:
            self.optimizer.step()
            return
        self.canaries.inject(list(canary_draws))  # an audit: the drawn canaries join the batch
        self.optimizer.step()
        self.canaries.observe(self.expected_batch)

    def close(self) -> None:
        self.hooks.cleanup()
        if self.fused is not None:
            self.fused.close()
