"""The batched engine: a group of clients trained in one pass equals each client trained alone.

The grouped kernels against their one-client-at-a-time references, then whole rounds in float64:
mixed ranks {2, 4, 8}, clients of different data sizes, with and without A and head trained,
without DP and under DP-SGD with a fixed noise source (tests only); the whole rounds on every
device present (CUDA on a GPU machine, `scripts/device-check.sh`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fedlr.client.group_training import GroupJob, GroupTrainer
from fedlr.client.training import ClientOptions, LocalTrainer
from fedlr.data.batches import Encoded
from fedlr.errors import ConfigError, FedlrError
from fedlr.kernels.grouped import (
    grouped_linear,
    grouped_lora,
    reference_grouped_linear,
    reference_grouped_lora,
)
from fedlr.privacy.sample_level import PrivacyLedger
from fedlr.settings.specs import DPConfig, TrainConfig
from tests.training_setup import current_adapter, f64_bert_host, randomize_adapter, tiny_host

F64 = torch.float64


def factors(ranks, d_in=6, d_out=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = [torch.randn(r, d_in, generator=gen, dtype=F64).requires_grad_() for r in ranks]
    B = [torch.randn(d_out, r, generator=gen, dtype=F64).requires_grad_() for r in ranks]
    return A, B


@pytest.mark.parametrize("counts", [[3, 1, 2], [0, 4, 1], [2, 2, 0]])
@pytest.mark.parametrize("tokens", [(), (5,)])
def test_grouped_lora_equals_one_client_at_a_time(counts, tokens):
    """Values and every gradient (A, B, x) equal the per-client reference; a client without
    examples gets a zero gradient."""
    ranks, scales = [2, 4, 8], [4.0, 2.0, 0.5]
    owner = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    x = torch.randn(sum(counts), *tokens, 6, dtype=F64, requires_grad=True)
    A, B = factors(ranks)
    weight = torch.randn(sum(counts), *tokens, 5, dtype=F64)
    grads = []
    for function in (grouped_lora, reference_grouped_lora):
        for t in [x, *A, *B]:
            t.grad = None
        y = function(x, owner, A, B, scales)
        (y * weight).sum().backward()
        grads.append((y.detach(), [t.grad.clone() for t in [x, *A, *B]]))
    (y1, g1), (y2, g2) = grads
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-12)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_grouped_per_sample_gradients_are_each_examples_own():
    """With per_sample, each example's gradient of its own output, on its client's tensors only;
    no summed gradient is formed."""
    counts, ranks = [2, 0, 3], [2, 4, 8]
    owner = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    x = torch.randn(5, 4, 6, dtype=F64)
    A, B = factors(ranks, seed=1)
    W = [torch.randn(3, 5, dtype=F64).requires_grad_() for _ in ranks]
    b = [torch.randn(3, dtype=F64).requires_grad_() for _ in ranks]
    weight = torch.randn(5, 4, 3, dtype=F64)
    out = grouped_linear(grouped_lora(x, owner, A, B, [1.0, 2.0, 3.0], per_sample=True), owner,
                         W, b, per_sample=True)
    (out * weight).sum().backward()
    assert all(t.grad is None for t in [*A, *B, *W, *b])
    assert [t.grad_sample.shape[0] for t in A] == counts
    for i in range(5):
        c = int(owner[i])
        mine = [A[c], B[c], W[c], b[c]]
        alone = torch.autograd.grad(
            (reference_grouped_linear(reference_grouped_lora(
                x[i:i + 1], owner[:1] * 0, [A[c]], [B[c]], [float(c + 1)]), owner[:1] * 0,
                [W[c]], [b[c]]) * weight[i:i + 1]).sum(), mine)
        row = i - sum(counts[:c])
        for t, g in zip(mine, alone, strict=True):
            torch.testing.assert_close(t.grad_sample[row], g, rtol=0, atol=1e-12)


def test_grouped_lora_refuses_unsorted_owner():
    A, B = factors([2, 2])
    with pytest.raises(ValueError, match="sorted"):
        grouped_lora(torch.randn(3, 6, dtype=F64), torch.tensor([1, 0, 1]), A, B, [1.0, 1.0])


# -- whole rounds ------------------------------------------------------------------------------

def subset(data: Encoded, rows: list[int]) -> Encoded:
    return Encoded([data.ids[i] for i in rows], data.labels[rows], data.pad_id)


# every device here: on a GPU machine the whole-round equivalences run on CUDA too
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(scope="module", params=DEVICES)
def f64_host(request):
    return f64_bert_host(request.param)


def start_adapters(host, ranks):
    """A non-zero start adapter per rank (every gradient non-zero)."""
    out = {}
    for r in sorted(set(ranks)):
        randomize_adapter(host, r, seed=r)
        out[r] = current_adapter(host, r)
    return out


def jobs_for(host, data, ranks, *, train_a, train_head, dp):
    sizes = [12, 5, 9][: len(ranks)]
    starts = start_adapters(host, ranks)
    return [GroupJob(str(c), starts[r], subset(data, list(range(12 - n, 12))),
                     ClientOptions(rank=r, train_a=train_a, train_head=train_head,
                                   ledger=PrivacyLedger() if dp else None, seed=100 + c,
                                   dp_seed=7_000 + c if dp else None))
            for c, (r, n) in enumerate(zip(ranks, sizes, strict=True))]


def alone(trainer, job):
    ledger = None if job.ledger is None else PrivacyLedger(accountant=job.ledger.accountant)
    return trainer.train(job.client_id, job.start, job.data, **{**job.options, "ledger": ledger})


@pytest.mark.parametrize("chunk_tokens", [None, 48], ids=["one-pass", "micro-batches"])
@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
@pytest.mark.parametrize("train_a,train_head", [(True, True), (False, True), (True, False)],
                         ids=["fedit", "ffa", "frozen-head"])
def test_group_round_equals_each_client_alone(f64_host, dp, train_a, train_head, chunk_tokens):
    """Float64: every client's trained adapter, loss and ledger from the group equal training it
    alone within 1e-10 (mixed ranks 2/4/8, 12, 5 and 9 examples, 4 steps; under DP-SGD with
    each client's own fixed Poisson and noise seeds, so both paths draw the same), whether a
    step is one pass of the base or several length-sorted micro-batches."""
    host, data = f64_host
    dp_config = DPConfig(noise_multiplier=0.7, max_grad_norm=0.5, delta=1e-5) if dp else None
    config = TrainConfig(local_steps=4, batch_size=4, lr=0.05, dp=dp_config)
    trainer = LocalTrainer(host, config)
    jobs = jobs_for(host, data, [2, 4, 8], train_a=train_a, train_head=train_head, dp=dp)
    together = GroupTrainer(trainer, chunk_tokens).train(jobs)
    for job, grouped in zip(jobs, together, strict=True):
        single = alone(trainer, job)
        assert not isinstance(grouped, FedlrError), grouped
        assert set(grouped.adapter.lora) == set(single.adapter.lora)
        for name, f in single.adapter.lora.items():
            g = grouped.adapter.lora[name]
            torch.testing.assert_close(g.A, f.A, rtol=0, atol=1e-10)
            torch.testing.assert_close(g.B, f.B, rtol=0, atol=1e-10)
        for name, t in single.adapter.extras.items():
            torch.testing.assert_close(grouped.adapter.extras[name], t, rtol=0, atol=1e-10)
        assert grouped.metrics["train_loss"] == pytest.approx(single.metrics["train_loss"],
                                                               abs=1e-10)
        assert grouped.metrics["examples_seen"] == single.metrics["examples_seen"]
        if dp:
            assert job.ledger.history == [(0.7, 4 / len(job.data), 4)]
        moved = max((g.B - job.start.lora[n].B).abs().max().item()
                    for n, g in grouped.adapter.lora.items())
        assert moved > 1e-3  # the comparison is not between two untrained adapters


def test_a_member_whose_poisson_batch_is_empty_steps_on_noise_alone(f64_host):
    """Under DP-SGD a step may draw none of a client's examples (Poisson sampling, batch 1 of 5
    to 12 examples here): that member's gradient is noise alone, as training alone gives it, and
    neither it nor the group fails."""
    host, data = f64_host
    dp_config = DPConfig(noise_multiplier=0.7, max_grad_norm=0.5, delta=1e-5)
    trainer = LocalTrainer(host, TrainConfig(local_steps=6, batch_size=1, lr=0.05, dp=dp_config))
    jobs = jobs_for(host, data, [2, 4, 8], train_a=True, train_head=True, dp=True)
    drawn = [list(trainer.begin(j.client_id, j.start, j.data, **j.options).sampler) for j in jobs]
    assert any(not batch for batches in drawn for batch in batches)  # some step drew nobody
    together = GroupTrainer(trainer).train(jobs)
    for job, grouped in zip(jobs, together, strict=True):
        single = alone(trainer, job)
        assert not isinstance(grouped, FedlrError), grouped
        for name, f in single.adapter.lora.items():
            torch.testing.assert_close(grouped.adapter.lora[name].A, f.A, rtol=0, atol=1e-10)
            torch.testing.assert_close(grouped.adapter.lora[name].B, f.B, rtol=0, atol=1e-10)
        for name, t in single.adapter.extras.items():
            torch.testing.assert_close(grouped.adapter.extras[name], t, rtol=0, atol=1e-10)


def test_one_clients_refusal_leaves_the_others_training(f64_host):
    """A client past its budget refuses with the error training alone raises; the rest of the
    group trains as if it were not there."""
    host, data = f64_host
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, max_epsilon=20.0,
                  accountant="rdp")
    trainer = LocalTrainer(host, TrainConfig(local_steps=2, batch_size=4, lr=0.05, dp=dp))
    jobs = jobs_for(host, data, [2, 4, 8], train_a=True, train_head=True, dp=True)
    for job in jobs:
        job.options["ledger"] = PrivacyLedger(accountant="rdp")
    spent = PrivacyLedger(accountant="rdp", history=[(1.0, 0.8, 3_000)])
    jobs[1].options["ledger"] = spent
    first, second, third = GroupTrainer(trainer).train(jobs)
    assert isinstance(second, FedlrError) and "budget" in str(second)
    alone_third = alone(trainer, jobs[2])
    for name, f in alone_third.adapter.lora.items():
        torch.testing.assert_close(third.adapter.lora[name].B, f.B, rtol=0, atol=1e-10)
    assert not isinstance(first, FedlrError)


def test_a_group_with_canaries_is_refused_before_any_training(f64_host):
    """Canaries live in the per-client step engine: a group carrying them fails as a whole with
    the fix named, before any member's ledger records a step."""
    host, data = f64_host
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, accountant="rdp")
    trainer = LocalTrainer(host, TrainConfig(local_steps=2, batch_size=4, lr=0.05, dp=dp))
    jobs = jobs_for(host, data, [2, 4], train_a=True, train_head=True, dp=True)
    jobs[1].options["canaries"] = SimpleNamespace()
    with pytest.raises(ConfigError, match="--engine per-client"):
        GroupTrainer(trainer).train(jobs)
    assert all(job.ledger.history == [] for job in jobs)


# -- carrying groups ---------------------------------------------------------------------------

def test_a_bundle_unbundles_to_each_clients_own_message():
    from fedlr.wire import Parts, bundle, unbundle

    parts = {"3": Parts({"lora_A::x": torch.ones(2), "lora_B::x": torch.randn(4, 2).T,
                         "steps": torch.tensor(7)}, {"job": "a", "n": 1}),
             "10": Parts({"lora_A::x": torch.zeros(3, dtype=torch.float64),
                          "extra::w": torch.randn(2, 3, 2)}, {"job": "b", "n": 2}),
             "11": Parts({}, {"kind": "refusal"})}
    carried = bundle(parts, engine="batched")
    assert carried.fields["engine"] == "batched"
    # one packed buffer per dtype, not one tensor per client and name
    assert sorted(carried.arrays) == ["packed/float32", "packed/float64", "packed/int64"]
    back = unbundle(carried)
    assert list(back) == ["3", "10", "11"]
    for client, p in parts.items():
        assert back[client].fields == p.fields
        assert back[client].arrays.keys() == p.arrays.keys()
        for k, t in p.arrays.items():
            assert back[client].arrays[k].dtype == t.dtype
            assert torch.equal(back[client].arrays[k], t)


def test_a_bundle_whose_index_overruns_its_buffers_is_malformed():
    from fedlr.wire import Parts, WireError, bundle, unbundle

    carried = bundle({"0": Parts({"w": torch.ones(4)}, {}), "1": Parts({"w": torch.ones(2)}, {})})
    short = Parts({"packed/float32": carried.arrays["packed/float32"][:5]}, carried.fields)
    with pytest.raises(WireError, match="1's w runs past the packed float32 buffer"):
        unbundle(short)
    with pytest.raises(WireError, match="malformed group"):
        unbundle(Parts({}, carried.fields))  # the buffer is missing


def test_groups_spread_a_rounds_clients_over_the_workers_within_their_size():
    from fedlr.grouping import Grouping

    clients = [str(i) for i in range(10)]
    assert Grouping(size=64).split(clients, workers=2) == [clients[:5], clients[5:]]
    assert Grouping(size=3).split(clients, workers=2) == [
        clients[:3], clients[3:6], clients[6:9], clients[9:]]
    assert Grouping(size=64).split(clients[:3], workers=16) == [["0"], ["1"], ["2"]]


def test_memory_bounds_the_pass_and_the_group():
    """Half a worker's share of memory bounds a pass's activations (longer sequences: fewer
    tokens per pass), half what the members keep (DP-SGD's per-example gradients: fewer
    members)."""
    from fedlr.grouping import (
        CPU_CHUNK_BYTES,
        CPU_CHUNK_TOKENS,
        MIN_CHUNK_TOKENS,
        plan_grouping,
        sequence_bytes,
    )
    from fedlr.settings.schema import SimulationConfig

    host, _ = tiny_host()
    config = host.base_config()
    assert sequence_bytes(config, 128) > 2 * sequence_bytes(config, 64)

    def plan(free, **settings):
        return plan_grouping(SimulationConfig.load(None, {"model": "tiny", **settings}), host,
                             free, workers=2)

    assert plan(64 << 30).chunk_tokens == CPU_CHUNK_TOKENS  # plenty: the CPU's best pass
    minilm_like = SimpleNamespace(num_hidden_layers=12, hidden_size=384, num_attention_heads=12)
    per_token = sequence_bytes(minilm_like, 64) / 64
    assert CPU_CHUNK_BYTES // per_token < CPU_CHUNK_TOKENS  # a bigger model: fewer tokens
    short, long = plan(1 << 30, max_length=32), plan(1 << 30, max_length=512)
    assert MIN_CHUNK_TOKENS <= long.chunk_tokens < short.chunk_tokens
    plain, private = plan(1 << 28), plan(1 << 28, noise_multiplier=1.0)
    assert plain.size > 3 * private.size >= 3
    assert plan(1 << 28, group_size=5).size == 5
    assert plan(1 << 28, engine="per-client") is None


@pytest.mark.parametrize("settings,message", [
    ({"engine": "fast"}, "unknown engine"),
    ({"group_size": 0}, "group_size must be a positive integer"),
    ({"engine": "per-client", "group_size": 4}, "batched engine only"),
    ({"engine": "batched", "secure_aggregation": True, "ranks": [4]}, "client by client"),
])
def test_engine_settings_fail_before_any_work(settings, message):
    from fedlr.errors import ConfigError
    from fedlr.settings.schema import SimulationConfig

    with pytest.raises(ConfigError, match=message):
        SimulationConfig.load(None, {"model": "tiny", **settings})


def test_secure_aggregation_trains_client_by_client_under_auto():
    from fedlr.settings.schema import SimulationConfig

    config = SimulationConfig.load(None, {"model": "tiny", "secure_aggregation": True,
                                          "ranks": [4], "strategy": "ffa"})
    assert config.training_engine == "per-client"


def test_a_deployed_node_refuses_to_train_a_group(monkeypatch):
    """Only a simulated node (whose nodes folder the simulation set) trains other clients."""
    from fedlr.client.jobs import train_group
    from fedlr.privacy.node import SIMULATED_NODES_ENV
    from fedlr.wire import Parts, bundle, unbundle

    monkeypatch.delenv(SIMULATED_NODES_ENV, raising=False)
    replies = unbundle(train_group(bundle({"0": Parts({}, {"job": "{}"}),
                                           "1": Parts({}, {"job": "{}"})})))
    for client in ("0", "1"):
        assert replies[client].fields["kind"] == "refusal"
        assert "simulation only" in str(replies[client].fields["reason"])
