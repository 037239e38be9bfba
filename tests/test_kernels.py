"""The plain-torch fused LoRA linear: equal to peft's layer, gradcheck-exact, per-sample grads
equal to Opacus's, and a DP-SGD step equal to Opacus's DPOptimizer."""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from opacus.utils.per_sample_gradients_utils import (
    ModelWithLoss,
    check_per_sample_gradients_are_correct,
    compute_opacus_grad_sample,
)
from peft import LoraConfig, get_peft_model
from torch import nn

from fedlr.kernels import (
    FusedLoRALinear,
    clip_and_noise,
    lora,
    lora_linear,
    merge_is_cheaper,
    per_sample_norms,
)

ORDERS = ["lowrank", "merged"]
# (d_in, d_out, r): square, d_out != d_in both ways, r > d
SHAPES = [(6, 6, 2), (7, 5, 3), (4, 9, 8)]


@pytest.fixture(params=ORDERS)
def order(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Force one computation order, so each is checked on every shape."""
    merged = request.param == "merged"
    monkeypatch.setattr(lora, "merge_is_cheaper", lambda *args: merged)


def peft_layer(d_in: int, d_out: int, r: int, bias: bool = True, dtype=torch.float32, seed=0):
    """peft's LoRA Linear on a fresh nn.Linear, with a random (non-zero) B."""
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=["0"], init_lora_weights=False)
    model = get_peft_model(nn.Sequential(nn.Linear(d_in, d_out, bias=bias)), config)
    return model.base_model.model[0].to(dtype)


def grads(layer: nn.Module, x: torch.Tensor, probe: torch.Tensor) -> list[torch.Tensor]:
    """Output and gradients wrt x, A, B of the loss mean(y * probe)."""
    x = x.detach().requires_grad_()
    y = layer(x)
    (y * probe).mean().backward()
    A, B = (p for p in layer.parameters() if p.requires_grad)
    result = [y.detach(), x.grad, A.grad.clone(), B.grad.clone()]
    layer.zero_grad()
    return result


@pytest.mark.parametrize(("d_in", "d_out", "r"), SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(11,), (3, 5)])
@pytest.mark.usefixtures("order")
def test_equals_peft(d_in: int, d_out: int, r: int, bias: bool, lead: tuple[int, ...]):
    layer = peft_layer(d_in, d_out, r, bias)
    fused = FusedLoRALinear.from_peft(layer)
    x, probe = torch.randn(*lead, d_in), torch.randn(*lead, d_out)
    for ours, theirs in zip(grads(fused, x, probe), grads(layer, x, probe), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("d_in", "d_out", "r"), SHAPES)
@pytest.mark.usefixtures("order")
def test_gradcheck(d_in: int, d_out: int, r: int):
    gen = torch.Generator().manual_seed(1)

    def rand(*shape: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=grad)

    weight, bias = rand(d_out, d_in), rand(d_out)
    inputs = (rand(2, 3, d_in, grad=True), rand(r, d_in, grad=True), rand(d_out, r, grad=True))
    assert torch.autograd.gradcheck(
        lambda x, A, B: lora_linear(x, weight, bias, A, B, 1.7), inputs
    )


def test_order_rule():
    """Merge when N is large against the layer, never in half precision."""
    d_in, d_out, r = 64, 48, 4

    def merges(n: int, dtype: torch.dtype) -> bool:
        return merge_is_cheaper(n * r * (d_in + d_out), d_in, d_out, r, dtype)

    assert not merges(8, torch.float32)
    assert merges(4096, torch.float32)
    assert not merges(4096, torch.bfloat16)


@pytest.mark.parametrize("option", [{"lora_dropout": 0.1}, {"use_dora": True}])
def test_from_peft_refuses_what_it_does_not_compute(option: dict):
    config = LoraConfig(r=2, target_modules=["0"], **option)
    layer = get_peft_model(nn.Sequential(nn.Linear(4, 3)), config).base_model.model[0]
    with pytest.raises(ValueError, match="cannot compute"):
        FusedLoRALinear.from_peft(layer)


def test_saves_no_rank_r_activation():
    """Only x, W, A, B are saved; peft keeps the N x r activation x A^T, which this detects."""
    n, d_in, d_out, r = 13, 6, 5, 3
    layer = peft_layer(d_in, d_out, r)
    x = torch.randn(n, d_in, requires_grad=True)

    def saved_shapes(module: nn.Module) -> list[tuple[int, ...]]:
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t
        ):
            module(x)
        return shapes

    assert (n, r) in saved_shapes(layer)
    fused = FusedLoRALinear.from_peft(layer)
    assert sorted(saved_shapes(fused)) == sorted([(n, d_in), (d_out, d_in), (r, d_in), (d_out, r)])


class BufferBaseLoRA(nn.Module):
    """peft's layer with the frozen base as buffers: every parameter is trainable, as Opacus's
    per-sample checker needs, and A, B are nn.Linear layers that its hooks handle."""

    def __init__(self, fused: FusedLoRALinear) -> None:
        super().__init__()
        self.register_buffer("weight", fused.base_layer.weight.detach().clone())
        self.register_buffer("bias", fused.base_layer.bias.detach().clone())
        self.lora_A, self.lora_B = fused.lora_A, fused.lora_B
        self.scaling = fused.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = nn.functional.linear(x, self.weight, self.bias)
        return base + self.lora_B(self.lora_A(x)) * self.scaling


def grad_samples(module: nn.Module, x: torch.Tensor, reduction: str) -> dict[str, torch.Tensor]:
    """Per-sample grads of Opacus's test loss (L1 to zero) from one backward in per-sample mode."""
    ModelWithLoss(module, reduction)(x).backward()
    return {name: p.grad_sample for name, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 7)])
def test_per_sample_equals_single_example_backward(reduction: str, shape: tuple[int, ...]):
    """fp64: each example's grad equals a backward pass on that example alone (under a mean
    loss, on the example's own mean loss, as Opacus defines it)."""
    layer = peft_layer(7, 6, 3, dtype=torch.float64)
    fused = FusedLoRALinear.from_peft(layer, per_sample=True, loss_reduction=reduction)
    x, probe = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape[:-1], 6)
    loss = torch.mean if reduction == "mean" else torch.sum
    loss(fused(x) * probe).backward()
    params = (fused.lora_A.weight, fused.lora_B.weight)
    ours = [p.grad_sample for p in params]
    fused.per_sample = False
    for i in range(len(x)):
        fused.zero_grad()
        loss(fused(x[i : i + 1]) * probe[i : i + 1]).backward()
        for p, grad_sample in zip(params, ours, strict=True):
            torch.testing.assert_close(grad_sample[i], p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 7)])
def test_per_sample_equals_opacus(reduction: str, shape: tuple[int, ...]):
    """Opacus's hooks on the nn.Linear form of the same layer, verified by Opacus's own checker,
    give the per-sample grads of the fused backward."""
    fused = FusedLoRALinear.from_peft(peft_layer(7, 6, 3), loss_reduction=reduction)
    reference = BufferBaseLoRA(fused)
    x = torch.randn(*shape)
    assert check_per_sample_gradients_are_correct(x, reference)
    theirs = compute_opacus_grad_sample(x, reference, loss_reduction=reduction)
    fused.per_sample = True
    ours = grad_samples(fused, x, reduction)
    assert ours.keys() == theirs.keys() == {"lora_A.weight", "lora_B.weight"}
    for name, grad_sample in ours.items():
        torch.testing.assert_close(grad_sample, theirs[name])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_per_sample_mode_keeps_the_gradient(reduction: str):
    """Per-sample mode changes no output or .grad, and .grad is the sum of the per-sample grads
    (over the batch size under a mean loss, whose per-sample grads are each example's own)."""
    layer = peft_layer(6, 5, 2)
    x, probe = torch.randn(4, 3, 6), torch.randn(4, 3, 5)
    plain = grads(FusedLoRALinear.from_peft(layer), x, probe)
    fused = FusedLoRALinear.from_peft(layer, per_sample=True, loss_reduction=reduction)
    ours = grads(fused, x, probe)
    for got, expected in zip(ours, plain, strict=True):
        torch.testing.assert_close(got, expected)
    batch = len(x) if reduction == "mean" else 1
    for p, grad in zip((fused.lora_A.weight, fused.lora_B.weight), ours[2:], strict=True):
        torch.testing.assert_close(p.grad_sample.sum(0) / batch, grad)


def test_frozen_A_gets_no_grad_sample():
    """Training B alone (a client option) leaves A without grad or grad_sample."""
    fused = FusedLoRALinear.from_peft(peft_layer(6, 5, 2), per_sample=True)
    fused.lora_A.requires_grad_(False)
    fused(torch.randn(4, 6)).sum().backward()
    assert fused.lora_A.weight.grad is None
    assert getattr(fused.lora_A.weight, "grad_sample", None) is None
    assert fused.lora_B.weight.grad_sample.shape == (4, 5, 2)


class Classifier(nn.Module):
    """Two fused LoRA layers and a trainable head, whose grads come from Opacus's hooks."""

    def __init__(self, d: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.ModuleList(
            FusedLoRALinear.from_peft(peft_layer(d, d, r, seed=r), per_sample=True) for r in (2, 4)
        )
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.body:
            x = torch.tanh(layer(x))
        return self.head(x.mean(1))


@pytest.mark.parametrize("batches", [1, 2])
def test_clip_and_noise_equals_dp_optimizer(batches: int):
    """Flat clipping over the fused layers and a hooked head, one noise draw, over the expected
    batch size: the same p.grad as Opacus's DPOptimizer with the same generator state."""
    model = Classifier()
    hooks = GradSampleHooks(model.head, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(batches):  # a second batch before the step is Opacus's gradient accumulation
        x, labels = torch.randn(8, 5, 6), torch.randint(0, 3, (8,))
        nn.functional.cross_entropy(model(x), labels).backward()
    flat = [torch.cat(p.grad_sample) if batches > 1 else p.grad_sample for p in params]
    clip = float(per_sample_norms(flat).median())  # clips about half the examples

    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=1.0), noise_multiplier=0.7, max_grad_norm=clip,
        expected_batch_size=6.5, generator=torch.Generator().manual_seed(3),
    )
    assert optimizer.pre_step()
    theirs = [p.grad.clone() for p in params]  # DPOptimizer left the grad_samples in place

    clip_and_noise(params, clip, 0.7, 6.5, torch.Generator().manual_seed(3))
    for p, expected in zip(params, theirs, strict=True):
        torch.testing.assert_close(p.grad, expected)
        assert p.grad_sample is None
    hooks.cleanup()
