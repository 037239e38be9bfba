"""A client's step on a CPU runs its batch as length-sorted passes of the base
(`LocalTrainer.pass_tokens`), which cuts padding and changes nothing else: in float64 the round
equals the round run in one pass per step, without DP and under DP-SGD."""

from __future__ import annotations

import pytest
import torch

from fedlr.client import training
from fedlr.data.batches import Encoded
from fedlr.privacy.sample_level import PrivacyLedger
from fedlr.settings.specs import DPConfig, TrainConfig
from tests.training_setup import current_adapter, f64_bert_host, randomize_adapter


@pytest.fixture(scope="module")
def f64_host():
    return f64_bert_host()


@pytest.mark.parametrize("mode", [None, "hooks", "fused"], ids=["plain", "hooks", "fused"])
def test_a_step_in_passes_equals_the_step_in_one(f64_host, monkeypatch, mode):
    """Every step cut into passes of one example each, against one pass a step: the same
    adapter and head within 1e-10, the same losses, the same ledger (under DP-SGD with fixed
    Poisson and noise draws, tests only; per-sample gradients by hooks or the fused layers,
    clipped over the whole batch, not per pass)."""
    host, data = f64_host
    dp = None if mode is None else DPConfig(noise_multiplier=0.7, max_grad_norm=0.5,
                                            grad_sample_mode=mode)
    trainer = training.LocalTrainer(host, TrainConfig(local_steps=4, batch_size=6, lr=0.05,
                                                      dp=dp))
    randomize_adapter(host, 4, seed=4)
    start = current_adapter(host, 4)
    passes: list[list[int]] = []
    cut = Encoded.passes

    def recorded(self, indices, tokens):
        out = cut(self, indices, tokens)
        passes.append([len(part) for part in out])
        return out

    monkeypatch.setattr(Encoded, "passes", recorded)

    def round_(tokens):
        monkeypatch.setattr(training, "CPU_PASS_TOKENS", tokens)
        passes.clear()
        ledger = PrivacyLedger() if dp else None
        result = trainer.train("0", start, data, rank=4, train_head=True, seed=3, ledger=ledger,
                               dp_seed=11 if dp else None)
        return result, ledger, list(passes)

    (one, one_ledger, one_passes), (many, many_ledger, many_passes) = round_(1 << 20), round_(1)
    assert all(len(step) <= 1 for step in one_passes)
    assert any(len(step) > 1 for step in many_passes) and all(
        size == 1 for step in many_passes for size in step)
    for name, f in one.adapter.lora.items():
        torch.testing.assert_close(many.adapter.lora[name].A, f.A, rtol=0, atol=1e-10)
        torch.testing.assert_close(many.adapter.lora[name].B, f.B, rtol=0, atol=1e-10)
    for name, t in one.adapter.extras.items():
        torch.testing.assert_close(many.adapter.extras[name], t, rtol=0, atol=1e-10)
    assert many.metrics["train_loss"] == pytest.approx(one.metrics["train_loss"], abs=1e-10)
    if dp:
        assert many_ledger.history == one_ledger.history
    moved = max((f.B - start.lora[n].B).abs().max().item() for n, f in one.adapter.lora.items())
    assert moved > 1e-3  # two trained adapters, not two untouched ones


def test_ghost_clipping_runs_a_step_in_one_pass(f64_host):
    """Ghost clipping takes its per-example norms from one backward over the whole batch."""
    host, _ = f64_host
    trainer = training.LocalTrainer(host, TrainConfig())
    ghost = training.DPPlan(1.0, 1.0, 0.1, 5, "ghost")
    hooks = training.DPPlan(1.0, 1.0, 0.1, 5, "hooks")
    assert trainer.pass_tokens(hooks) == trainer.pass_tokens(None) == training.CPU_PASS_TOKENS
    assert trainer.pass_tokens(ghost) > 1 << 40
