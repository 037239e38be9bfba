"""bf16 autocast of local training and evaluation: when it applies, that the LoRA kernels compute
in it and hand back fp32 gradients, that DP-SGD's clipping stays exact on the values it sums, and
that held-out evaluation follows the same setting."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from torch import nn

from fedlr import precision
from fedlr.client.group_training import GroupJob, GroupTrainer
from fedlr.client.step_engines import one_batch_in_own_dtype
from fedlr.client.training import ClientOptions, LocalTrainer
from fedlr.evaluation import evaluate, evaluate_as_trained
from fedlr.kernels import FusedLoRALinear, lora_linear, per_sample_norms
from fedlr.kernels.grouped import grouped_lora, reference_grouped_lora
from fedlr.privacy.sample_level import PrivacyLedger
from fedlr.settings.specs import DPConfig, TrainConfig
from tests.training_setup import current_adapter, randomize_adapter, tiny_host

BF16 = torch.bfloat16
CPU = torch.device("cpu")


def bf16_autocast():
    return torch.autocast("cpu", dtype=BF16)


@pytest.mark.parametrize("native", [True, False])
def test_auto_takes_bf16_only_where_the_device_computes_it_natively(monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    wide, narrow = precision.AUTO_MIN_WIDTH, precision.AUTO_MIN_WIDTH - 1
    assert precision.autocast_dtype("auto", CPU, torch.float32, wide) == (BF16 if native else None)
    assert precision.autocast_dtype("auto", CPU, torch.float32, narrow) is None
    assert precision.autocast_dtype("bf16", CPU, torch.float32, narrow) == BF16
    assert precision.autocast_dtype("fp32", CPU, torch.float32, wide) is None
    for asked in precision.PRECISIONS:  # a model in another dtype is left as it is
        assert precision.autocast_dtype(asked, CPU, torch.float64, wide) is None
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.autocast_dtype("fp16", CPU, torch.float32, wide)


def layer_tensors(seed=0, n=6, tokens=5, d_in=16, d_out=12, r=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, tokens, d_in, generator=gen)
    W, b = torch.randn(d_out, d_in, generator=gen), torch.randn(d_out, generator=gen)
    A = torch.randn(r, d_in, generator=gen).requires_grad_()
    B = torch.randn(d_out, r, generator=gen).requires_grad_()
    return x, W, b, A, B


def assert_close_in_bf16(actual, expected):
    """Within a few bf16 roundings (2^-8 each) of the whole tensor's size."""
    error = (actual.double() - expected.double()).norm() / expected.double().norm()
    assert error < 2e-2, f"relative error {error:.3g}"


def rounded(t):
    """What bf16 autocast multiplies: the operand rounded to bf16, here kept in float64."""
    return t.detach().to(BF16).double()


def test_lora_linear_under_autocast_multiplies_in_bf16_and_returns_fp32_gradients():
    x, W, b, A, B = layer_tensors()
    with bf16_autocast():
        y = lora_linear(x, W, b, A, B, 2.0, per_sample=True, loss_reduction="sum")
    assert y.dtype == BF16
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y.float() * probe).sum().backward()
    # the same products on bf16-rounded operands, in float64
    xr, Ar, Br = rounded(x), rounded(A), rounded(B * 2.0)
    expected = xr @ rounded(W).T + rounded(b) + (xr @ Ar.T) @ Br.T
    assert_close_in_bf16(y, expected)
    u = rounded(probe) @ Br  # s g B per token; dA_i = u_i^T x_i
    assert_close_in_bf16(A.grad_sample, u.mT @ xr)
    for param in (A, B):
        assert param.grad.dtype == param.grad_sample.dtype == torch.float32
        # the summed gradient autograd sees is the sum of exactly the per-sample values
        torch.testing.assert_close(param.grad, param.grad_sample.sum(0), rtol=1e-6, atol=1e-5)


class Classifier(nn.Module):
    """Fused LoRA layers and a plain head (its per-sample grads from Opacus's hooks)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.ModuleList(
            FusedLoRALinear.new(nn.Linear(16, 16), r=4, alpha=8.0, per_sample=True)
            for _ in range(2))
        for layer in self.body:
            nn.init.normal_(layer.lora_B.weight, std=0.3)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        for layer in self.body:
            x = torch.tanh(layer(x))
        return self.head(x.mean(1))


def test_dp_clipping_under_autocast_is_exact_on_the_values_it_sums():
    """Under bf16 autocast Opacus's hooks leave the head's per-sample grads in bf16; taken in
    fp32 first, DPOptimizer's clipped sum (no noise) equals, to fp32 rounding, the float64 sum of
    min(1, C / ||g_i||) g_i over those very values: no example weighs more than C."""
    model = Classifier()
    hooks = GradSampleHooks(model.head, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    x, labels = torch.randn(8, 5, 16), torch.randint(0, 3, (8,))
    with bf16_autocast():
        logits = model(x)
    nn.functional.cross_entropy(logits.float(), labels).backward()
    assert model.head.weight.grad_sample.dtype == BF16  # what the cast is for
    for p in params:
        one_batch_in_own_dtype(p)
    samples = [p.grad_sample for p in params]
    assert {s.dtype for s in samples} == {torch.float32}
    norms = per_sample_norms([s.double() for s in samples])
    clip = float(norms.median())  # clips about half the examples
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = [torch.tensordot(factor, s.double(), dims=1) / 8 for s in samples]
    contributions = per_sample_norms([s.double() * factor.view(-1, *[1] * (s.dim() - 1))
                                      for s in samples])
    assert bool((contributions <= clip * (1 + 1e-9)).all())

    optimizer = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0,
                            max_grad_norm=clip, expected_batch_size=8)
    assert optimizer.pre_step()
    for p, want in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-5, atol=1e-7)
    hooks.cleanup()


def test_grouped_lora_under_autocast_gives_each_client_fp32_gradients_of_its_own_examples():
    gen = torch.Generator().manual_seed(0)
    ranks, counts, d_in, d_out = [2, 4], [3, 2], 16, 12
    A = [torch.randn(r, d_in, generator=gen).requires_grad_() for r in ranks]
    B = [torch.randn(d_out, r, generator=gen).requires_grad_() for r in ranks]
    owner = torch.tensor([c for c, n in enumerate(counts) for _ in range(n)])
    x = torch.randn(len(owner), 5, d_in, generator=gen)
    scales = [1.5, 0.75]
    with bf16_autocast():
        y = grouped_lora(x, owner, A, B, scales, per_sample=True)
    assert y.dtype == BF16
    assert_close_in_bf16(y, reference_grouped_lora(x, owner, A, B, scales).detach())
    y.float().square().sum().backward()
    for c, n in enumerate(counts):
        assert A[c].grad_sample.dtype == B[c].grad_sample.dtype == torch.float32
        assert A[c].grad_sample.shape[0] == B[c].grad_sample.shape[0] == n
    # summed instead of per example: the same values
    summed = [t.detach().clone().requires_grad_() for t in (*A, *B)]
    with bf16_autocast():
        y2 = grouped_lora(x, owner, summed[:2], summed[2:], scales)
    y2.float().square().sum().backward()
    for t, s in zip((*A, *B), summed, strict=True):
        assert s.grad.dtype == torch.float32
        torch.testing.assert_close(s.grad, t.grad_sample.sum(0), rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def host_and_data():
    return tiny_host()


def start(host, rank=4):
    randomize_adapter(host, rank, seed=rank)
    return current_adapter(host, rank)


def train(host, data, precision_, dp=None, **options):
    # SGD: Adam's first steps are about lr * sign(g), which any rounding flips where g ~ 0
    config = TrainConfig(local_steps=4, batch_size=4, lr=0.5, optimizer="sgd",
                         precision=precision_, dp=dp)
    ledger = PrivacyLedger() if dp else None
    return LocalTrainer(host, config).train("0", start(host), data, rank=4, seed=3, ledger=ledger,
                                            dp_seed=11 if dp else None, **options)


def moved_apart(a, b, origin):
    """Largest difference between two trained adapters, relative to how far they moved."""
    diff = max((a.lora[n].B - b.lora[n].B).abs().max().item() for n in a.lora)
    moved = max((a.lora[n].B - origin.lora[n].B).abs().max().item() for n in a.lora)
    return diff / moved


@pytest.mark.parametrize("mode", [None, "hooks", "fused"])
def test_bf16_training_follows_fp32_training(host_and_data, mode):
    """The same round (same data order, same DP draws) in bf16 and in fp32 moves the adapter to
    nearly the same place: bf16 changes the rounding, not the training."""
    host, data = host_and_data
    dp = None if mode is None else DPConfig(noise_multiplier=0.3, max_grad_norm=1.0,
                                            grad_sample_mode=mode)
    exact, low = train(host, data, "fp32", dp), train(host, data, "bf16", dp)
    assert moved_apart(low.adapter, exact.adapter, start(host)) < 0.1
    assert low.metrics["train_loss"] == pytest.approx(exact.metrics["train_loss"], rel=0.05)
    assert low.metrics["train_loss"] != exact.metrics["train_loss"]  # bf16 really ran


def test_ghost_clipping_ignores_bf16(host_and_data):
    """Ghost clipping takes its norms from the products themselves, so it runs in fp32: asking
    for bf16 gives bit for bit the fp32 round."""
    host, data = host_and_data
    dp = DPConfig(noise_multiplier=0.3, max_grad_norm=1.0, grad_sample_mode="ghost")
    exact, asked = train(host, data, "fp32", dp), train(host, data, "bf16", dp)
    for name, f in exact.adapter.lora.items():
        assert torch.equal(asked.adapter.lora[name].B, f.B)


def test_a_bf16_group_follows_its_clients_trained_alone(host_and_data):
    """The batched engine in bf16: each member's round stays close to training it alone in bf16
    (the passes differ in shape, so the roundings differ)."""
    host, data = host_and_data
    config = TrainConfig(local_steps=4, batch_size=4, lr=0.5, optimizer="sgd", precision="bf16")
    trainer = LocalTrainer(host, config)
    origin = start(host)
    jobs = [GroupJob(str(c), origin, data, ClientOptions(rank=4, seed=c)) for c in range(3)]
    together = GroupTrainer(trainer, None).train(jobs)
    for job, grouped in zip(jobs, together, strict=True):
        single = trainer.train(job.client_id, origin, data, **job.options)
        assert moved_apart(grouped.adapter, single.adapter, origin) < 0.1


def test_evaluation_follows_the_precision_setting(host_and_data):
    """fp32, and `auto` on a model too narrow for bf16, are plain evaluation bit for bit; bf16
    evaluates in it, to nearly the same loss."""
    host, data = host_and_data
    model = randomize_adapter(host, 4, seed=5)
    exact = evaluate(model, data, "classification")
    assert evaluate_as_trained(host, model, data, "classification", "fp32") == exact
    assert evaluate_as_trained(host, model, data, "classification", "auto") == exact  # 64 wide
    low = evaluate_as_trained(host, model, data, "classification", "bf16")
    assert low["loss"] != exact["loss"]  # bf16 really ran
    assert low["loss"] == pytest.approx(exact["loss"], rel=0.02)
    assert low["examples"] == exact["examples"]


def test_training_config_refuses_an_unknown_precision():
    from fedlr.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown precision 'fp16'"):
        replace(TrainConfig(), precision="fp16")
