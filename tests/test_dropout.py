"""fedlr.models.dropout: CPU dropout from 16-bit draws keeps torch's dropout's distribution (up
to the 1/65536 quantisation of p), its scaling and its gradient, and the attention that drops
probabilities computes what SDPA computes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fedlr.models.dropout as fd


def _within(kept: torch.Tensor, q: float, sigmas: float = 6.0) -> bool:
    n = kept.numel()
    return abs(kept.double().mean().item() - q) <= sigmas * math.sqrt(q * (1 - q) / n)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.03])
def test_masks_keep_the_quantised_probability_in_every_lane(p: float) -> None:
    """Each int64 gives four 16-bit draws: every one of the four lanes must keep at the same
    rate (an unbounded `random_` leaves the sign of the fourth lane at 0: always kept)."""
    torch.manual_seed(0)
    mask, scale = fd.keep_mask((1 << 22,), p)
    q = 1 - fd.drop_steps(p) / fd.STEPS
    assert abs(q - (1 - p)) <= 0.5 / fd.STEPS
    assert scale * q == pytest.approx(1.0, abs=1e-15)
    lanes = mask.view(-1, 4)
    for lane in range(4):
        assert _within(lanes[:, lane], q), f"lane {lane}: {lanes[:, lane].double().mean()}"


def test_neighbouring_draws_are_uncorrelated() -> None:
    torch.manual_seed(1)
    mask, _ = fd.keep_mask((1 << 22,), 0.5)
    a, b = mask[:-1].double(), mask[1:].double()
    correlation = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
    assert abs(correlation.item()) < 6 / math.sqrt(a.numel())


def test_kept_values_are_scaled_and_the_rest_zero() -> None:
    """Kept values are x / q to the dtype's precision (torch's dropout rounds the same way)."""
    torch.manual_seed(2)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = torch.randn(64, 96, dtype=torch.float64).add_(3.0).to(dtype)  # no zeros
        out = fd.drop(x, 0.1)
        kept = out != 0
        scale = fd.STEPS / (fd.STEPS - fd.drop_steps(0.1))
        assert torch.allclose(out[kept].double(), x.double()[kept] * scale, atol=0,
                              rtol=torch.finfo(dtype).eps)
        assert 0.8 < kept.double().mean().item() < 0.98


def test_the_gradient_is_the_mask_times_the_scale() -> None:
    torch.manual_seed(3)
    x = (torch.rand(32, 48, dtype=torch.float64) + 1.0).requires_grad_()
    grad = torch.randn(32, 48, dtype=torch.float64)
    out = fd.drop(x, 0.25)
    out.backward(grad)
    scale = fd.STEPS / (fd.STEPS - fd.drop_steps(0.25))
    assert torch.equal(x.grad, grad * (out != 0) * scale)


def test_draws_follow_torchs_seed() -> None:
    torch.manual_seed(4)
    first = fd.keep_mask((1000,), 0.1)[0]
    second = fd.keep_mask((1000,), 0.1)[0]
    torch.manual_seed(4)
    assert torch.equal(fd.keep_mask((1000,), 0.1)[0], first)
    assert not torch.equal(first, second)


def test_evaluation_and_no_dropout_leave_the_input() -> None:
    x = torch.randn(8, 8)
    layer = fd.FastDropout(0.1).eval()
    assert layer(x) is x
    assert fd.drop(x, 0.0) is x
    assert torch.equal(fd.drop(x, 1.0), torch.zeros_like(x))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fd.drop_steps(1.5)


class _Attention(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, False


def _reference(q, k, v, mask, keep, scale, groups):  # float64, by hand
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1) * keep * scale
    return (probs @ v).transpose(1, 2)


@pytest.mark.parametrize("groups", [1, 2])
def test_attention_drops_the_probabilities_with_the_mask(monkeypatch, groups: int) -> None:
    torch.manual_seed(5)
    b, h, length, d = 3, 4, 7, 8
    q = torch.randn(b, h, length, d, dtype=torch.float64)
    k = torch.randn(b, h // groups, length, d, dtype=torch.float64)
    v = torch.randn(b, h // groups, length, d, dtype=torch.float64)
    lengths = torch.tensor([7, 4, 1])  # padding: each query sees only its sequence's keys
    mask = (torch.arange(length) < lengths[:, None])[:, None, None, :].expand(b, 1, length,
                                                                              length)
    keep = torch.rand(b, h, length, length) > 0.3
    monkeypatch.setattr(fd, "keep_mask", lambda shape, p, device="cpu": (keep, 1 / 0.7))
    out, weights = fd.attention(_Attention(groups), q, k, v, mask, dropout=0.3)
    assert weights is None
    assert torch.allclose(out, _reference(q, k, v, mask, keep, 1 / 0.7, groups), atol=1e-12)


def test_attention_without_dropout_is_sdpa() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(6)
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    ours = fd.attention(_Attention(1), q, k, v, mask, dropout=0.0)[0]
    assert torch.equal(ours, sdpa_attention_forward(_Attention(1), q, k, v, mask)[0])


def test_what_only_sdpa_handles_goes_to_sdpa(monkeypatch) -> None:
    """A position bias is added inside SDPA: with dropout, `attention` must hand it over (its
    own path would drop the bias)."""
    from transformers.integrations import sdpa_attention

    calls = []
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward",
                        lambda *args, **kwargs: calls.append(kwargs) or ("sdpa", None))
    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    bias = torch.zeros(1, 2, 3, 3)
    assert fd.attention(_Attention(1), q, k, v, None, dropout=0.1,
                        position_bias=bias)[0] == "sdpa"
    assert calls[0]["position_bias"] is bias and calls[0]["dropout"] == 0.1


def test_a_model_with_its_own_sdpa_code_keeps_it() -> None:
    model = _bert()
    model._supports_attention_backend = False
    fd.use_fast_dropout(model)
    assert model.config._attn_implementation == "sdpa"
    assert any(isinstance(m, fd.FastDropout) for m in model.modules())


def test_reduced_precision_attention_is_computed_in_float32(monkeypatch) -> None:
    torch.manual_seed(7)
    q, k, v = (torch.randn(2, 2, 6, 16) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    keep = torch.ones(2, 2, 6, 6, dtype=torch.bool)
    monkeypatch.setattr(fd, "keep_mask", lambda shape, p, device="cpu": (keep, 1.0))
    low = [t.bfloat16() for t in (q, k, v)]
    out = fd.attention(_Attention(1), *low, mask, dropout=0.1)[0]
    exact = _reference(*(t.double() for t in low), mask, keep, 1.0, 1)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, exact.to(torch.bfloat16)) or torch.allclose(
        out.double(), exact, atol=2 ** -8 * exact.abs().max().item())


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(8)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, num_labels=3,
                        max_position_embeddings=32, attn_implementation="sdpa")
    return BertForSequenceClassification(config)


def test_a_model_keeps_its_outputs_when_nothing_is_dropped(monkeypatch) -> None:
    """A BERT with fast dropout, training with masks that keep everything, gives exactly what
    the stock model gives without dropout: the new attention and layers change only the draws."""
    stock = _bert().eval()
    fast = _bert()
    fd.use_fast_dropout(fast)
    assert not any(type(m) is nn.Dropout for m in fast.modules())
    assert sum(isinstance(m, fd.FastDropout) for m in fast.modules()) == sum(
        type(m) is nn.Dropout for m in stock.modules())
    assert fast.config._attn_implementation == fd.ATTENTION
    ids = torch.randint(1, 50, (3, 9))
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[1, 5:] = 0
    attention_mask[2, 2:] = 0
    expected = stock(input_ids=ids, attention_mask=attention_mask).logits
    fast.eval()
    assert torch.equal(fast(input_ids=ids, attention_mask=attention_mask).logits, expected)
    monkeypatch.setattr(fd, "keep_mask",
                        lambda shape, p, device="cpu": (torch.ones(shape, dtype=torch.bool), 1.0))
    fast.train()
    trained = fast(input_ids=ids, attention_mask=attention_mask).logits
    assert torch.allclose(trained, expected, atol=1e-5)
