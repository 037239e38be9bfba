"""Privacy that holds against the server: a node's own ledger, limits and randomness.

Each test plays the server the guarantee protects against: one that replays a client's round with
everything it knows (the job, its seed, the run directory), one that sends an empty ledger every
round, one that asks for too little noise or sends a job without DP."""

from __future__ import annotations

import math
import tomllib
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedlr.adapters import Adapter
from fedlr.client.jobs import run_job
from fedlr.client.samplers import PoissonBatches
from fedlr.client.step_engines import DPPlan
from fedlr.client.training import LocalTrainer
from fedlr.errors import ConfigError, NodeLimitError
from fedlr.federation import Federation
from fedlr.privacy.node import NodeLimits, NodeState
from fedlr.privacy.sample_level import PrivacyLedger, opacus_epsilon, private_generator
from fedlr.server.coordinator import Coordinator
from fedlr.server.rundir import RunDir
from fedlr.settings.schema import SimulationConfig
from fedlr.settings.specs import DPConfig
from fedlr.wire import Job, TrainReply

TINY = dict(strategy="ffa", model="tiny", num_clients=3, rounds=3, ranks=[4], local_steps=3,
            batch_size=8, lr=1e-2, eval_examples=16, seed=7)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    config = SimulationConfig.load(None, {**TINY, "noise_multiplier": 1.0,
                                          "out": str(tmp_path_factory.mktemp("run") / "r")})
    return Federation.build(config)


def job_for(fed: Federation, round_: int = 1, *, ledger: dict | None = None, **dp) -> tuple[
        Job, Adapter]:
    """What the server sends client 0: its job and downlink, as the coordinator builds them."""
    coordinator = Coordinator(fed, RunDir(fed.config.out))
    state = fed.strategy.init_state(fed.model.host.initial_head)
    downlink = fed.strategy.downlink(state, "0")
    job = coordinator.job("0", round_)
    job.ledger = ledger
    if job.dp is not None:
        job.dp = {**job.dp, **dp}
    return job, downlink


def trained(reply: TrainReply) -> dict[str, torch.Tensor]:
    return reply.adapter.tensors()


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- randomness ------------------------------------------------------------------------------


def test_a_curious_server_cannot_replay_a_clients_dp_round(federation):
    """The server knows the job (its seed), run.json (the run's seed), the downlink and, in the
    worst case, the client's data; replaying the round with any seed it could derive, or with
    the client's own code, does not give the client's update."""
    job, downlink = job_for(federation)
    update = trained(run_job(job, downlink))
    assert not same(trained(run_job(job, downlink)), update)  # the same job twice

    host, shard, config = federation.model.host, federation.data.shard(0), job.train_config()
    known = {job.seed, federation.config.seed, 0}
    known |= {s + 1 for s in known}
    for guess in sorted(known):
        replay = LocalTrainer(host, config).train(
            "0", downlink, shard, rank=job.rank,
            train_a=job.train_a, train_head=job.train_head, ledger=PrivacyLedger(),
            seed=job.seed, dp_seed=guess)
        tensors = replay.adapter.tensors()
        assert not same({k: tensors[k] for k in update}, update)


def test_the_noise_alone_is_never_replayed(federation):
    """q = 1 (a batch larger than the client's data): every step's batch is all of its
    examples, fixed, so two runs of one job differ by the noise alone; noise drawn from
    anything the server knows (the job's seed) would give the same update twice, and the
    server could subtract it."""
    job, downlink = job_for(federation)
    job.train = {**job.train, "batch_size": 4 * len(federation.data.shard(0)), "local_steps": 1}
    assert not same(trained(run_job(job, downlink)), trained(run_job(job, downlink)))


def test_the_batches_alone_are_never_replayed(federation):
    """sigma = 0: no noise, so two runs of one job differ by their Poisson batches alone;
    batches drawn from the job's seed would give the same update twice (and tell the server
    which examples each step used)."""
    job, downlink = job_for(federation, noise_multiplier=0.0)
    assert not same(trained(run_job(job, downlink)), trained(run_job(job, downlink)))


def test_seeded_dp_draws_would_be_replayed_exactly_which_is_why_runs_never_seed_them(
        federation):
    """The adversary's replay works when the draws are seeded: the test above can fail."""
    job, downlink = job_for(federation)
    host, shard, config = federation.model.host, federation.data.shard(0), job.train_config()

    def round_with(seed):
        result = LocalTrainer(host, config).train(
            "0", downlink, shard, rank=job.rank,
            train_a=job.train_a, train_head=job.train_head, ledger=PrivacyLedger(),
            seed=job.seed, dp_seed=seed)
        return result.adapter.tensors()

    assert same(round_with(job.seed), round_with(job.seed))


def test_without_dp_the_same_job_reproduces_the_update_bit_for_bit(tmp_path):
    config = SimulationConfig.load(None, {**TINY, "out": str(tmp_path / "r")})
    job, downlink = job_for(Federation.build(config))
    assert job.dp is None
    assert same(trained(run_job(job, downlink)), trained(run_job(job, downlink)))


def test_dp_batches_are_poisson_with_the_planned_rate():
    """200 steps of the trainer's own sampler, with OS entropy (so not reproducible, and the
    bounds are wide enough to fail by chance about once in 10^5 runs): mean within 4.5 standard
    errors of q N, variance consistent with Binomial(N, q) (two-sided chi-square at 10^-6 each
    side). A rate 10 % off moves the mean by 6 standard errors."""
    n, q, steps = 500, 0.04, 200
    plan = DPPlan(1.0, 1.0, q, steps, "fused")
    sampler = LocalTrainer.batches(replace_config(batch_size=20), n, plan,
                                   private_generator())
    assert isinstance(sampler, PoissonBatches) and sampler.poisson
    sizes = torch.tensor([len(b) for b in sampler], dtype=torch.float64)
    assert len(sizes) == steps
    mean, var = n * q, n * q * (1 - q)
    assert abs(float(sizes.mean()) - mean) < 4.5 * math.sqrt(var / steps)
    statistic = (steps - 1) * float(sizes.var()) / var
    low, high = stats.chi2.ppf([1e-6, 1 - 1e-6], steps - 1)
    assert low < statistic < high


def test_every_example_joins_each_batch_independently_at_rate_q():
    """Poisson sampling is about who is in a batch, not only how many: 400 steps of the
    trainer's own sampler (OS entropy) over 200 examples at q = 0.3. Each example's count of
    batches is Binomial(400, q) and the counts are independent, so their chi-square statistic
    is chi-square with 200 degrees of freedom (too even counts fail too); the pairs (0, 1),
    (2, 3), ... join one batch together Binomial(400, q^2) times. Each bound is two-sided at
    10^-6. Batches cut from shuffled passes, with Binomial sizes, give pairs a rate near q."""
    n, q, steps = 200, 0.3, 400
    plan = DPPlan(1.0, 1.0, q, steps, "fused")
    sampler = LocalTrainer.batches(replace_config(batch_size=60), n, plan, private_generator())
    member = torch.zeros(steps, n, dtype=torch.float64)
    for t, batch in enumerate(sampler):
        member[t, batch] = 1.0
    assert t == steps - 1

    def chi_square_is_null(counts: torch.Tensor, p: float) -> bool:
        statistic = float(((counts - steps * p) ** 2).sum()) / (steps * p * (1 - p))
        low, high = stats.chi2.ppf([1e-6, 1 - 1e-6], counts.numel())
        return bool(low < statistic < high)

    assert chi_square_is_null(member.sum(0), q)
    assert chi_square_is_null((member[:, 0::2] * member[:, 1::2]).sum(0), q * q)


def replace_config(**changes):
    """A stand-in trainer with only a config: `batches` needs nothing else."""
    from fedlr.settings.specs import TrainConfig

    trainer = LocalTrainer.__new__(LocalTrainer)
    trainer.config = replace(TrainConfig(), **changes)
    return trainer


# -- the node's ledger ------------------------------------------------------------------------


segments = st.lists(st.tuples(st.sampled_from([0.8, 1.0]), st.sampled_from([0.01, 0.02]),
                              st.integers(1, 5)), max_size=6)


@settings(max_examples=60, deadline=None)
@given(first=segments, more=segments)
def test_a_ledger_extends_its_past_and_nothing_that_differs(first, more):
    past = PrivacyLedger()
    for s in first:
        past.record(s)
    now = PrivacyLedger.from_dict(past.to_dict())
    for s in more:
        now.record(s)
    assert now.extends(past)
    assert past.extends(now) == (now.steps == past.steps)
    if first:  # change the mechanism of the first step: no longer the same history
        sigma, q, n = first[0]
        forged = PrivacyLedger(history=[(sigma * 2, q, n), *past.history[1:]])
        assert not now.extends(forged)


def test_the_node_keeps_the_longer_history_and_ignores_a_shorter_or_different_one(tmp_path):
    state = NodeState(tmp_path / "node")
    own = PrivacyLedger(history=[(1.0, 0.01, 30)], rounds=3)
    state.save(own)
    shorter = PrivacyLedger(history=[(1.0, 0.01, 10)], rounds=1).to_dict()
    different = PrivacyLedger(history=[(5.0, 0.01, 40)], rounds=4).to_dict()
    longer = PrivacyLedger(history=[(1.0, 0.01, 30), (1.0, 0.02, 10)], rounds=4).to_dict()
    assert state.ledger(None, "prv", "0").history == own.history  # an empty ledger
    assert state.ledger({}, "prv", "0").history == own.history
    assert state.ledger(shorter, "prv", "0").history == own.history
    assert state.ledger(different, "prv", "0").history == own.history
    assert state.ledger(longer, "prv", "0").to_dict() == longer  # the node had lost a round
    assert NodeState(None).ledger(shorter, "prv", "0").to_dict() == shorter  # no own state


@pytest.mark.parametrize("content", [
    "{not json", '{"format": 1}', '{"format": 2, "ledger": {}}',
    '{"format": 1, "ledger": {"history": [[1.0, 0.01, -3]]}}',
    '{"format": 1, "ledger": {"history": "abc"}}', "\udcff",
])
def test_a_corrupt_state_file_is_a_clear_error_never_a_reset(tmp_path, content):
    path = tmp_path / "ledger.json"
    path.write_text(content, errors="surrogateescape")
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=f"node state {path}"):
        NodeState(tmp_path).ledger(None, "prv", "0")
    assert path.read_bytes() == before


# -- the node's limits -------------------------------------------------------------------------


def test_limits_refuse_jobs_without_dp_too_little_noise_and_a_loose_clip():
    limits = NodeLimits(max_epsilon=2.0, min_noise_multiplier=0.9, max_clip_norm=1.0)
    with pytest.raises(NodeLimitError, match="without DP-SGD"):
        limits.check_job(None, "0")
    with pytest.raises(NodeLimitError, match="max-clip-norm 1"):
        limits.check_job(DPConfig(noise_multiplier=1.0, max_grad_norm=5.0), "0")
    with pytest.raises(NodeLimitError, match=r"min-noise-multiplier 0\.9"):
        limits.check_round(0.5, (0.5, 0.01, 10), PrivacyLedger(), "0")
    limits.check_round(1.0, (1.0, 0.01, 10), PrivacyLedger(), "0")  # within every limit
    NodeLimits().check_job(None, "0")  # a node without limits trains without DP


def test_the_node_budget_is_checked_at_the_nodes_own_delta():
    """A server cannot loosen the node's budget by sending a large delta: the node accounts at
    its own."""
    segment = (1.0, 0.05, 50)
    at_node_delta = opacus_epsilon([segment], 1e-5)
    limits = NodeLimits(max_epsilon=at_node_delta * 0.9, delta=1e-5)
    assert opacus_epsilon([segment], 0.5) < limits.max_epsilon  # what a loose delta would say
    with pytest.raises(NodeLimitError, match="at delta 1e-05"):
        limits.check_round(1.0, segment, PrivacyLedger(), "0")


@pytest.mark.parametrize("bad", [dict(max_epsilon=0.0), dict(min_noise_multiplier=-1.0),
                                 dict(max_clip_norm=math.inf), dict(delta=1.5)])
def test_bad_limits_fail_before_anything_starts(bad):
    with pytest.raises(ConfigError):
        NodeLimits(**bad)


def test_a_server_sending_empty_ledgers_cannot_push_a_node_past_its_max_epsilon(federation,
                                                                                tmp_path):
    """Every round the server forgets the node's history (and asks for the largest budget it
    likes); the node trains exactly as many rounds as its own --max-epsilon allows, refuses the
    next with a reason, and its persisted ledger shows every step, also after a restart."""
    job, downlink = job_for(federation)
    q = job.train["batch_size"] / len(federation.data.shard(0))
    steps = job.train["local_steps"]
    eps = [opacus_epsilon([(1.0, q, steps * k)], 1e-5) for k in (1, 2, 3)]
    limits = NodeLimits(max_epsilon=(eps[1] + eps[2]) / 2)
    state = NodeState(tmp_path / "node")
    for round_ in (1, 2):
        job, downlink = job_for(federation, round_, ledger=None, max_epsilon=1e9)
        reply = run_job(job, downlink, state=state, limits=limits)
        assert reply.ledger is not None
        assert reply.ledger.to_dict() == state.load().to_dict()  # it reports its own ledger
    job, downlink = job_for(federation, 3, ledger={}, max_epsilon=1e9)
    with pytest.raises(NodeLimitError, match=r"past its --max-epsilon"):
        run_job(job, downlink, state=state, limits=limits)
    restarted = NodeState(tmp_path / "node").load()
    assert restarted.steps == 2 * steps and restarted.rounds == 2
    assert restarted.epsilon(1e-5) == pytest.approx(eps[1], rel=1e-6)


def test_a_node_with_limits_refuses_a_job_that_turns_dp_off(tmp_path):
    config = SimulationConfig.load(None, {**TINY, "out": str(tmp_path / "r")})
    job, downlink = job_for(Federation.build(config))
    with pytest.raises(NodeLimitError, match="without DP-SGD"):
        run_job(job, downlink, state=NodeState(tmp_path / "n"), limits=NodeLimits(max_epsilon=3))
    assert not (tmp_path / "n").exists()


def test_a_job_asking_for_less_noise_than_the_node_allows_is_refused_before_training(
        federation, tmp_path):
    job, downlink = job_for(federation, noise_multiplier=0.3)
    with pytest.raises(NodeLimitError, match=r"noise multiplier 0\.3"):
        run_job(job, downlink, state=NodeState(tmp_path / "n"),
                limits=NodeLimits(min_noise_multiplier=0.8))
    assert NodeState(tmp_path / "n").load() is None  # nothing trained, nothing recorded


def test_the_node_config_written_by_fedlr_client_is_what_the_node_reads(tmp_path):
    from fedlr.client.launch import supernode_argv

    limits = NodeLimits(max_epsilon=3.0, delta=1e-6, min_noise_multiplier=0.7, max_clip_norm=2.0)
    argv = supernode_argv("127.0.0.1:1", ca=None, key=None, partition_id=1, num_partitions=2,
                          port=9, insecure=True, state_dir=tmp_path / "s", limits=limits)
    text = argv[argv.index("--node-config") + 1]
    parsed = tomllib.loads("\n".join(text.split(" ")))
    assert parsed["state-dir"] == str((tmp_path / "s").resolve())
    assert NodeLimits.from_node_config(parsed) == limits
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "ledger.json").write_text("garbage")
    with pytest.raises(ConfigError, match="is unreadable"):  # a corrupt ledger stops the start
        supernode_argv("127.0.0.1:1", ca=None, key=None, partition_id=1, num_partitions=2,
                       port=9, insecure=True, state_dir=tmp_path / "s")
