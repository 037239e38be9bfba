"""The Triton kernels against the plain-torch LoRA linear that defines them: outputs, dX, dA, dB
and per-sample grads, on CPU in Triton's interpreter (fp32, fp16) and on CUDA when present
(also bf16). Every output the kernels write is poisoned (NaN) first, so a tile they miss shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import triton_compile

from fedlr.kernels import FusedLoRALinear, clip_and_noise, lora, lora_linear, lora_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative error (Frobenius) allowed against the reference computed in fp32 from the same inputs
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    def poisoned(*shape: int, like: torch.Tensor) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)

    monkeypatch.setattr(lora_triton, "_new", poisoned)


def layer_tensors(b: int, t: int, d_in: int, d_out: int, r: int, bias: bool, seed: int = 0):
    """x (b, t, d_in), W, bias, A, B, probe in fp32 on DEVICE, scaled so y and grads are O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)

    return (rand(b, t, d_in), rand(d_out, d_in, scale=d_in**-0.5),
            rand(d_out) if bias else None, rand(r, d_in, scale=d_in**-0.5), rand(d_out, r),
            rand(b, t, d_out))


def run(kernel: str, tensors, dtype: torch.dtype, scaling: float, trains: tuple[bool, ...],
        per_sample: bool = False, reduction: str = "mean") -> dict[str, torch.Tensor]:
    """y and every gradient the backward gives for the loss reduction(y * probe), in fp32."""
    x, W, bias, A, B, probe = (None if t is None else t.to(dtype, copy=True) for t in tensors)
    for tensor, trained in zip((x, A, B), trains, strict=True):
        tensor.requires_grad_(trained)
    y = lora_linear(x, W, bias, A, B, scaling, per_sample=per_sample, loss_reduction=reduction,
                    kernel=kernel)
    loss = (y * probe).mean() if reduction == "mean" else (y * probe).sum()
    loss.backward()
    named = {"y": y, "dx": x.grad, "dA": A.grad, "dB": B.grad,
             "dA_i": getattr(A, "grad_sample", None), "dB_i": getattr(B, "grad_sample", None)}
    return {name: t.detach().float() for name, t in named.items() if t is not None}


def assert_matches_reference(tensors, dtype: torch.dtype, **options) -> None:
    """Triton in `dtype` against the torch function in fp32 on the same (rounded) inputs."""
    rounded = [None if t is None else t.to(dtype).float() for t in tensors]
    theirs = run("torch", rounded, torch.float32, **options)
    ours = run("triton", tensors, dtype, **options)
    assert ours.keys() == theirs.keys()
    for name, expected in theirs.items():
        error = (ours[name] - expected).norm() / expected.norm().clamp(min=1e-30)
        assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.2e} in {dtype}"


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(1, 3), t=st.integers(1, 20), d_in=st.integers(1, 40), d_out=st.integers(1, 40),
    r=st.integers(1, 20), bias=st.booleans(), per_sample=st.booleans(),
    reduction=st.sampled_from(lora.LOSS_REDUCTIONS),
    trains=st.sampled_from([(True, True, True), (True, False, True), (False, True, True),
                            (False, False, True), (True, True, False)]),
)
def test_equals_reference_fp32(b, t, d_in, d_out, r, bias, per_sample, reduction, trains):
    """Any shape (blocks partly filled, r padded to the dot's minimum), with or without bias,
    per-sample or summed, and every mix of trained tensors (A frozen as FFA-LoRA trains, x
    without grad as the first adapted layer sees it)."""
    tensors = layer_tensors(b, t, d_in, d_out, r, bias)
    assert_matches_reference(tensors, torch.float32, scaling=1.5, trains=trains,
                             per_sample=per_sample, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("b", "t", "d_in", "d_out", "r"),
                         [(3, 11, 37, 29, 5), (2, 16, 32, 48, 16)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_equals_reference(dtype, b, t, d_in, d_out, r, per_sample):
    tensors = layer_tensors(b, t, d_in, d_out, r, bias=True, seed=1)
    assert_matches_reference(tensors, dtype, scaling=2.0, trains=(True, True, True),
                             per_sample=per_sample)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 tl.dot is wrong in Triton's interpreter")
@pytest.mark.parametrize("per_sample", [False, True])
def test_equals_reference_bf16_on_cuda(per_sample: bool):
    tensors = layer_tensors(4, 96, 512, 384, 16, bias=True, seed=2)
    assert_matches_reference(tensors, torch.bfloat16, scaling=2.0, trains=(True, True, True),
                             per_sample=per_sample)


def test_dp_step_equals_reference():
    """Two layers' per-sample grads from the kernels, clipped together and noised with one
    generator seed, give the reference's DP-SGD step."""
    steps = []
    for kernel in ("torch", "triton"):
        torch.manual_seed(3)
        layers = [FusedLoRALinear.new(torch.nn.Linear(12, 12), r=4, alpha=8, per_sample=True,
                                      kernel=kernel).to(DEVICE) for _ in range(2)]
        for layer in layers:
            torch.nn.init.normal_(layer.lora_B.weight)
        x = torch.randn(5, 3, 12, generator=torch.Generator().manual_seed(4)).to(DEVICE)
        layers[1](layers[0](x)).square().mean().backward()
        params = [p for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]
        clip_and_noise(params, max_grad_norm=0.1, noise_multiplier=1.0, expected_batch_size=5,
                       generator=torch.Generator(DEVICE).manual_seed(5))
        steps.append([p.grad for p in params])
    for ours, theirs in zip(steps[1], steps[0], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_auto_keeps_cpu_tensors_on_torch(monkeypatch: pytest.MonkeyPatch):
    def refuse(*args):
        raise AssertionError("auto sent CPU tensors to Triton")

    monkeypatch.setattr(lora_triton.TritonLoRALinear, "apply", refuse)
    x, W, bias, A, B, _ = layer_tensors(2, 3, 8, 8, 2, bias=True)
    lora_linear(x.cpu(), W.cpu(), bias.cpu(), A.cpu(), B.cpu(), 1.0)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
def test_auto_takes_triton_for_half_precision_on_cuda(monkeypatch: pytest.MonkeyPatch):
    calls = []
    apply = lora_triton.TritonLoRALinear.apply
    monkeypatch.setattr(lora_triton.TritonLoRALinear, "apply",
                        lambda *args: calls.append(1) or apply(*args))
    x, W, bias, A, B, _ = (t.bfloat16() for t in layer_tensors(2, 3, 8, 8, 2, bias=True))
    lora_linear(x, W, bias, A, B, 1.0)
    assert calls


def test_refusals(monkeypatch: pytest.MonkeyPatch):
    x, W, _, A, B, _ = layer_tensors(2, 3, 8, 8, 2, bias=False)
    with pytest.raises(ValueError, match="one dtype"):
        lora_linear(x.double(), W.double(), None, A.double(), B.double(), 1.0, kernel="triton")
    with pytest.raises(ValueError, match="kernel must be one of"):
        lora_linear(x, W, None, A, B, 1.0, kernel="cuda")
    if DEVICE == "cpu":
        monkeypatch.setattr(lora_triton, "INTERPRETING", False)
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            lora_linear(x, W, None, A, B, 1.0, kernel="triton")


# sm_90's largest shared memory a block may use (227 KiB)
H100_SHARED_BYTES = 232448


def compile_for_h100(*options: str) -> list[dict]:
    """tests/triton_compile.py in a process without the interpreter (its kernels must be JIT
    functions, not interpreted ones)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = Path(__file__).with_name("triton_compile.py")
    done = subprocess.run([sys.executable, str(script), "90", *options], env=env, check=True,
                          capture_output=True, text=True)
    return [json.loads(line) for line in done.stdout.splitlines()]


def assert_fit_h100(builds: list[dict]) -> None:
    assert {b["kernel"] for b in builds} == triton_compile.FLAGS.keys()
    for build in builds:
        assert build["cubin"], build
        assert build["shared_bytes"] <= H100_SHARED_BYTES, build


def test_kernels_compile_for_h100():
    """Each kernel and flag combination lowers to an sm_90 cubin in bf16 (no GPU needed: Triton
    ships ptxas): code the interpreter runs but the compiler rejects fails here."""
    builds = compile_for_h100("--quick")
    assert len(builds) == sum(len(flags) for flags in triton_compile.FLAGS.values())
    assert_fit_h100(builds)


@pytest.mark.slow
def test_every_config_compiles_for_h100():
    """Every autotune config, dtype and flag combination (126 builds, a few minutes) compiles for
    sm_90 and fits in its shared memory."""
    assert_fit_h100(compile_for_h100())
