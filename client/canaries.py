"""White-box gradient canaries for an empirical sample-level DP audit (one training run).

A canary is an extra example whose per-sample gradient the auditor chooses: C times a unit vector
at one coordinate of the trainable LoRA/head parameters (distinct coordinates, so the canaries are
orthogonal). The M canaries are indices of the training set after the real examples, so the
trainer's own sampler draws them, at its own rate, like every real example; each canary is in the
data set with probability 1/2 (from OS entropy), and a drawn canary that is in it adds its
gradient to the batch, through Opacus's clipping and noise with the others. A sampler that is not
what the accountant assumes (fixed batches, a wrong q) shows in the scores.

The auditor sees every step's released (clipped, summed, noised) gradient and knows the data:
its score for a canary is the sum over steps of the released gradient at the canary's coordinate
minus the real examples' clipped contribution there, i.e. C per time it was drawn plus the noise.
Removing the known data part is allowed: the subsampled Gaussian's guarantee holds for any fixed
contribution of the other examples. Excluded canaries score noise alone; if the noise cannot hide
the difference, the bound exceeds the claimed epsilon and something is broken.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedlr.errors import ConfigError
from fedlr.kernels import per_sample_norms
from fedlr.privacy.sample_level import private_generator


@dataclass
class GradientCanaries:
    count: int
    norm: float  # the clipping bound C: a canary's gradient is never clipped, never smaller
    seed: int | None = None  # tests only: a run draws inclusion from OS entropy
    coordinates: Tensor = field(init=False)
    included: Tensor = field(init=False)
    sampled: Tensor = field(init=False)  # how often each included canary was drawn
    scores: Tensor = field(init=False)
    _params: list[Tensor] = field(init=False, default_factory=list)
    _data_part: Tensor = field(init=False)

    def bind(self, params: list[Tensor]) -> None:
        """Place the canaries on the trainable parameters (before training)."""
        self._params = params
        total = sum(p.numel() for p in params)
        if self.count > total:
            raise ConfigError(f"{self.count} canaries need as many trainable coordinates; this "
                              f"adapter has {total}: use fewer canaries or a larger rank")
        generator = private_generator("cpu", self.seed)
        self.coordinates = torch.randperm(total, generator=generator)[: self.count]
        self.included = torch.rand(self.count, generator=generator) < 0.5
        self.sampled = torch.zeros(self.count, dtype=torch.long)
        self.scores = torch.zeros(self.count, dtype=torch.float64)

    def inject(self, drawn: list[int]) -> None:
        """Before Opacus's step: note the real examples' clipped sum at the canary coordinates
        (Opacus's own clip factors), then append the gradients of the canaries the sampler drew
        (`drawn`, canary numbers) that are in the data set as extra per-sample rows."""
        params = self._params
        samples = [p.grad_sample.flatten(1) for p in params]  # a batch may be empty
        factors = (self.norm / (per_sample_norms(samples) + 1e-6)).clamp(max=1.0)
        clipped_sum = torch.cat([(factors[:, None] * g).sum(0) for g in samples])
        self._data_part = clipped_sum[self.coordinates.to(clipped_sum.device)].double().cpu()

        mask = torch.zeros(self.count, dtype=torch.bool)
        mask[torch.tensor(drawn, dtype=torch.long)] = True
        mask &= self.included
        self.sampled += mask
        chosen = self.coordinates[mask]
        start = 0
        for p in params:
            size = p.numel()
            extra = p.new_zeros((len(chosen), size))
            local = chosen - start
            inside = (local >= 0) & (local < size)
            extra[inside.nonzero().squeeze(1), local[inside].to(p.device)] = self.norm
            p.grad_sample = torch.cat([p.grad_sample, extra.view(len(chosen), *p.shape)])
            start += size

    def observe(self, expected_batch: float) -> None:
        """After Opacus's step: p.grad is (clipped sum + noise) / expected batch size."""
        released = torch.cat([p.grad.reshape(-1) for p in self._params])[
            self.coordinates.to(self._params[0].device)].double().cpu() * expected_batch
        self.scores += released - self._data_part
