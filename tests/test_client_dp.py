"""Client-level DP (DP-FedAvg): clipping, the non-private limit, noise, ranks, accounting."""

from __future__ import annotations

import dataclasses
import math

import dp_accounting
import numpy as np
import pytest
import torch
from federation import client_updates, random_spec, relative_error
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlr.adapters import Adapter, LoraFactors
from fedlr.errors import ConfigError, RoundFailedError
from fedlr.federation import Federation
from fedlr.lora.rounds import aggregate_round, sample_clients
from fedlr.lora.strategies import (
    ClientUpdate,
    FederationSpec,
    ModuleShape,
    make_strategy,
    strategy_traits,
)
from fedlr.lora.validation import ValidationPolicy
from fedlr.privacy.client_level import (
    ClientDPConfig,
    DPFedAvg,
    client_level_description,
    client_level_epsilon,
    dp_fedavg,
)
from fedlr.settings.schema import SimulationConfig

seeds = st.integers(0, 2**31 - 1)
SETTINGS = settings(max_examples=15, deadline=None)
NO_CLIP = 1e12


def federation(name: str, seed: int, ranks: list[int], extras: bool = True):
    """A strategy after one ordinary round (so B != 0), and that state."""
    gen = torch.Generator().manual_seed(seed)
    spec = random_spec(gen, ranks, extras=extras)
    strategy = make_strategy(name, spec, seed=seed)
    state = strategy.init_state(
        {n: torch.randn(*s, generator=gen, dtype=torch.float64) for n, s in spec.extras.items()}
    )
    state, _ = strategy.aggregate(state, client_updates(strategy, state, gen))
    return strategy, state, gen


def sent_adapters(strategy, state) -> dict[str, Adapter]:
    return {cid: strategy.starting_adapter(state, cid) for cid in strategy.spec.ranks}


def rescaled(update: ClientUpdate, start: Adapter, c: float) -> ClientUpdate:
    """start + c (update - start), factor by factor (the ranks of update and start agree)."""
    lora = {}
    for name, f in update.adapter.lora.items():
        s = start.lora[name]
        lora[name] = LoraFactors(s.A + c * (f.A - s.A), s.B + c * (f.B - s.B), f.scaling)
    extras = {
        n: start.extras[n] + c * (t - start.extras[n]) for n, t in update.adapter.extras.items()
    }
    return ClientUpdate(update.client_id, Adapter(lora=lora, extras=extras), update.num_examples)


def direct_norm(strategy, update: ClientUpdate, start: Adapter) -> float:
    """||delta|| over B (effective), A if trained and the head, computed without fedlr."""
    total = 0.0
    for name, f in update.adapter.lora.items():
        s = start.lora[name]
        total += float(((f.scaling * f.B - s.scaling * s.B) ** 2).sum())
        if strategy.trains_a:
            total += float(((f.A - s.A) ** 2).sum())
    if strategy.head == "train":
        total += sum(
            float(((t - start.extras[n]) ** 2).sum()) for n, t in update.adapter.extras.items()
        )
    return math.sqrt(total)


def state_change(strategy, old, new) -> list[torch.Tensor]:
    """Everything the release moved: B, A when trained, the head when trained."""
    parts = [new.lora[n].B - g.B for n, g in old.lora.items()]
    if strategy.trains_a:
        parts += [new.lora[n].A - g.A for n, g in old.lora.items()]
    if strategy.head == "train":
        parts += [new.extras[n] - t for n, t in old.extras.items()]
    return parts


def flat_norm(parts: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float((p**2).sum()) for p in parts))


# -- clipping ---------------------------------------------------------------------------------


@SETTINGS
@given(
    seed=seeds,
    name=st.sampled_from(["fedit", "ffa", "fedsvd"]),
    scales=st.lists(st.sampled_from([1e-6, 1e-2, 1.0, 1e3, 1e8]), min_size=2, max_size=5),
    clip_norm=st.floats(1e-3, 1e3),
)
def test_clipping_bounds_every_update(seed, name, scales, clip_norm):
    ranks = [2, 4, 8, 16, 4][: len(scales)]
    strategy, state, gen = federation(name, seed, ranks)
    sent = sent_adapters(strategy, state)
    updates = [  # each with the adapter it started from, as the round attaches it
        dataclasses.replace(rescaled(u, sent[u.client_id], c), start=sent[u.client_id])
        for u, c in zip(client_updates(strategy, state, gen), scales, strict=True)
    ]
    config = ClientDPConfig(noise_multiplier=1.0, clip_norm=clip_norm)
    _, report = dp_fedavg(strategy, state, updates, config, 3.0, torch.Generator())
    for u in updates:
        pre, post = report.pre_clip_norms[u.client_id], report.post_clip_norms[u.client_id]
        assert math.isclose(pre, direct_norm(strategy, u, sent[u.client_id]), rel_tol=1e-9)
        assert post <= clip_norm * (1 + 1e-6)
        if pre <= clip_norm:
            assert post == pre
        else:
            assert math.isclose(post, clip_norm, rel_tol=1e-9)
    clipped = sum(n > clip_norm for n in report.pre_clip_norms.values()) / len(updates)
    assert report.clipped_fraction == clipped
    assert report.noise_std == clip_norm and report.denominator == 3.0


@SETTINGS
@given(
    seed=seeds,
    name=st.sampled_from(["fedit", "ffa"]),
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
    clip_norm=st.floats(1e-2, 10.0),
    m=st.floats(0.5, 20.0),
)
def test_one_client_release_is_its_clipped_delta_over_m(seed, name, scale, clip_norm, m):
    strategy, state, gen = federation(name, seed, [4, 8])
    sent = sent_adapters(strategy, state)
    update = rescaled(client_updates(strategy, state, gen)[1], sent["c1"], scale)
    update = dataclasses.replace(update, start=sent["c1"])
    config = ClientDPConfig(noise_multiplier=0.0, clip_norm=clip_norm)
    new, report = dp_fedavg(strategy, state, [update], config, m, torch.Generator())
    expected = min(report.pre_clip_norms["c1"], clip_norm) / m
    assert math.isclose(flat_norm(state_change(strategy, state, new)), expected, rel_tol=1e-7)


@SETTINGS
@given(seed=seeds, name=st.sampled_from(["fedit", "ffa"]), clip_norm=st.floats(1e-2, 10.0))
def test_the_release_is_the_same_whatever_the_clients_example_counts(seed, name, clip_norm):
    """Equal weights: two clients of 1 and 1000 examples release what they would with the
    counts swapped or both 1, so no weighting (raw or normalised) reveals n_k or lets the
    larger client move the release by more than S / m."""
    strategy, state, gen = federation(name, seed, [4, 8])
    sent = sent_adapters(strategy, state)
    updates = [dataclasses.replace(u, start=sent[u.client_id])
               for u in client_updates(strategy, state, gen)[:2]]
    config = ClientDPConfig(noise_multiplier=0.0, clip_norm=clip_norm)
    released = []
    for counts in ((1, 1000), (1000, 1), (1, 1)):
        weighted = [dataclasses.replace(u, num_examples=n)
                    for u, n in zip(updates, counts, strict=True)]
        new, _ = dp_fedavg(strategy, state, weighted, config, 2.0, torch.Generator())
        released.append(new.to_tensors()[0])
    for other in released[1:]:
        for key, t in released[0].items():
            torch.testing.assert_close(other[key], t, rtol=1e-6, atol=1e-9)


# -- non-private limit ------------------------------------------------------------------------


@SETTINGS
@given(seed=seeds, name=st.sampled_from(["fedit", "ffa", "fedsvd"]), rank=st.sampled_from([2, 8]))
def test_no_noise_no_clip_equals_equal_weight_aggregate(seed, name, rank):
    strategy, state, gen = federation(name, seed, [rank] * 4)
    updates = [dataclasses.replace(u, num_examples=1) for u in client_updates(strategy, state, gen)]
    before = {k: v.clone() for k, v in state.to_tensors()[0].items()}
    config = ClientDPConfig(noise_multiplier=0.0, clip_norm=NO_CLIP)
    private, _ = dp_fedavg(strategy, state, updates, config, 4, torch.Generator())
    plain, _ = strategy.aggregate(state, updates)
    assert private.round == plain.round == state.round + 1
    for n, g in plain.lora.items():
        assert relative_error(private.lora[n].dense(), g.dense()) <= 1e-10
    for n, t in plain.extras.items():
        assert torch.allclose(private.extras[n], t, rtol=0, atol=1e-10)
    after = state.to_tensors()[0]
    assert all(torch.equal(before[k], after[k]) for k in before)  # inputs untouched


# -- noise ------------------------------------------------------------------------------------


def wide_ffa(num_clients: int):
    spec = FederationSpec(
        modules={f"m{i}": ModuleShape(64, 48) for i in range(4)},
        ranks={f"c{k}": 16 for k in range(num_clients)},
        extras={"head": (8, 16)},
        dtype=torch.float64,
    )
    strategy = make_strategy("ffa", spec)
    return strategy, strategy.init_state({"head": torch.zeros(8, 16, dtype=torch.float64)})


def unchanged_updates(strategy, state) -> list[ClientUpdate]:
    return [
        ClientUpdate(cid, strategy.starting_adapter(state, cid), 10) for cid in strategy.spec.ranks
    ]


@pytest.mark.parametrize("send", [True, False], ids=["zero-deltas", "no-updates"])
def test_noise_has_std_z_s_over_m_and_zero_mean(send):
    strategy, state = wide_ffa(5)
    updates = unchanged_updates(strategy, state) if send else []
    z, s, m = 1.3, 0.7, 5.0
    config = ClientDPConfig(noise_multiplier=z, clip_norm=s)
    new, _ = dp_fedavg(strategy, state, updates, config, m, torch.Generator().manual_seed(1))
    noise = torch.cat([p.flatten() for p in state_change(strategy, state, new)])
    n, sigma = noise.numel(), z * s / m
    assert abs(float(noise.std()) / sigma - 1) <= 5 / math.sqrt(2 * n)
    assert abs(float(noise.mean())) <= 5 * sigma / math.sqrt(n)
    assert all(torch.equal(new.lora[k].A, g.A) for k, g in state.lora.items())  # A frozen


def test_noise_is_fresh_each_round_and_reproducible_from_the_seed():
    strategy, state = wide_ffa(3)
    updates = unchanged_updates(strategy, state)
    config = ClientDPConfig(noise_multiplier=1.0, clip_norm=1.0)

    def release(gen: torch.Generator) -> torch.Tensor:
        new, _ = dp_fedavg(strategy, state, updates, config, 3, gen)
        return torch.cat([p.flatten() for p in state_change(strategy, state, new)])

    gen = torch.Generator().manual_seed(7)
    first, second = release(gen), release(gen)
    corr = float(torch.corrcoef(torch.stack([first, second]))[0, 1])
    assert abs(corr) <= 5 / math.sqrt(first.numel())
    assert torch.equal(first, release(torch.Generator().manual_seed(7)))


# -- heterogeneous ranks ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fedit", "ffa"])
def test_low_rank_client_touches_only_its_columns(name):
    strategy, state, gen = federation(name, 3, [2, 8], extras=False)
    update = client_updates(strategy, state, gen)[0]  # c0, rank 2
    quiet = ClientDPConfig(noise_multiplier=0.0, clip_norm=NO_CLIP)
    new, _ = dp_fedavg(strategy, state, [update], quiet, 1, torch.Generator())
    for n, g in state.lora.items():
        d_b = new.lora[n].B - g.B
        assert float(d_b[:, :2].abs().max()) > 0 and torch.equal(
            d_b[:, 2:], torch.zeros_like(d_b[:, 2:])
        )
        d_a = new.lora[n].A - g.A
        assert torch.equal(d_a[2:], torch.zeros_like(d_a[2:]))
    noisy = ClientDPConfig(noise_multiplier=1.0, clip_norm=1.0)
    new, _ = dp_fedavg(strategy, state, [update], noisy, 1, torch.Generator())
    for n, g in state.lora.items():  # the noise covers every padded column
        assert bool(((new.lora[n].B - g.B)[:, 2:] != 0).all())


def test_duplicate_client_is_refused():
    strategy, state, gen = federation("ffa", 0, [4, 4])
    update = client_updates(strategy, state, gen)[0]
    config = ClientDPConfig(noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(ValueError, match="two updates"):
        dp_fedavg(strategy, state, [update, update], config, 2, torch.Generator())


# -- accounting -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "rounds", "delta", "accountant", "golden"),
    [
        (0.01, 1000, 1e-5, "rdp", 2.1014),
        (0.01, 1000, 1e-5, "pld", 1.8282),
        (0.1, 100, 1e-4, "rdp", 6.8216),
        (0.1, 100, 1e-4, "pld", 5.9659),
    ],
)
def test_poisson_epsilon_matches_golden(q, rounds, delta, accountant, golden):
    config = ClientDPConfig(1.0, 1.0, "poisson", delta, accountant)
    eps = client_level_epsilon(config, num_clients=1000, per_round=round(q * 1000), rounds=rounds)
    assert math.isclose(eps, golden, rel_tol=1e-3)


@pytest.mark.parametrize(("z", "rounds"), [(0.8, 1), (1.5, 10), (3.0, 200)])
def test_fixed_without_sampling_is_gaussian_with_sensitivity_2s(z, rounds):
    """With every client in every round, replace-one DP-FedAvg is the Gaussian mechanism with
    sensitivity 2 S and std z S composed `rounds` times. Its RDP is written down directly,
    rounds * alpha (2/z)^2 / 2, and converted with dp-accounting's RDP-to-(eps, delta) bound."""
    config = ClientDPConfig(z, 1.0, "fixed", 1e-5, "rdp")
    eps = client_level_epsilon(config, num_clients=50, per_round=50, rounds=rounds)
    orders = np.array(dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
    curve = rounds * orders * (2 / z) ** 2 / 2
    direct, _ = dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon(orders, curve, 1e-5)
    assert math.isclose(eps, direct, rel_tol=1e-9)
    # never below the exact epsilon of that Gaussian (std / sensitivity = z / (2 sqrt(rounds)))
    assert eps >= dp_accounting.get_epsilon_gaussian(z / (2 * math.sqrt(rounds)), 1e-5)
    # and well above what forgetting the doubled sensitivity would claim
    assert eps > 1.5 * dp_accounting.get_epsilon_gaussian(z / math.sqrt(rounds), 1e-5)


@settings(max_examples=20, deadline=None)
@given(
    sampling=st.sampled_from(["poisson", "fixed"]),
    z=st.floats(0.5, 5.0),
    more_noise=st.floats(1.01, 3.0),
    rounds=st.integers(1, 200),
    extra=st.integers(1, 200),
)
def test_epsilon_grows_with_rounds_and_falls_with_noise(sampling, z, more_noise, rounds, extra):
    def eps(z: float, rounds: int) -> float:
        config = ClientDPConfig(z, 1.0, sampling, 1e-5, "rdp")
        return client_level_epsilon(config, num_clients=200, per_round=20, rounds=rounds)

    assert eps(z, rounds) <= eps(z, rounds + extra)
    assert eps(z * more_noise, rounds) <= eps(z, rounds)


def test_epsilon_edge_cases():
    config = ClientDPConfig(0.0, 1.0)
    assert client_level_epsilon(config, num_clients=10, per_round=2, rounds=5) == math.inf
    assert client_level_epsilon(config, num_clients=10, per_round=2, rounds=0) == 0.0
    with pytest.raises(ConfigError, match="clients per round"):
        client_level_epsilon(config, num_clients=10, per_round=11, rounds=5)


def test_description_states_unit_adjacency_and_sampling():
    poisson = client_level_description(ClientDPConfig(1.0, 2.0), 100, 10)
    assert poisson["privacy_unit"].startswith("one client's whole contribution")
    assert poisson["adjacency"] == "add or remove one client" and poisson["sensitivity"] == 2.0
    assert poisson["sampling"]["q"] == 0.1
    assert poisson["accountant_library"].startswith("dp-accounting ")
    fixed = client_level_description(ClientDPConfig(1.0, 2.0, "fixed"), 100, 10)
    assert fixed["adjacency"] == "replace one client" and fixed["sensitivity"] == 4.0
    assert (fixed["sampling"]["num_clients"], fixed["sampling"]["per_round"]) == (100, 10)


# -- what does not compose, bad settings ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hetero"), [("flora", "hetlora"), ("fair", "hetlora"), ("fedit", "flexlora")]
)
def test_non_composing_strategies_are_refused(name, hetero):
    with pytest.raises(ConfigError, match=f"strategy '{name}'"):
        strategy_traits(name).check_client_dp(hetero)
    strategy = make_strategy(name, random_spec(torch.Generator(), [2, 4]), hetero=hetero)
    with pytest.raises(ConfigError, match=f"strategy '{name}'"):
        dp_fedavg(strategy, strategy.init_state(), [], ClientDPConfig(1.0, 1.0), 1, None)
    with pytest.raises(ConfigError, match=f"strategy '{name}'"):
        DPFedAvg(strategy, ClientDPConfig(1.0, 1.0), expected_clients=1, generator=None)


@pytest.mark.parametrize(
    ("name", "hetero"), [("fedit", "hetlora"), ("ffa", "flexlora"), ("fedsvd", "flexlora")]
)
def test_composing_strategies_pass(name, hetero):
    strategy_traits(name).check_client_dp(hetero)
    strategy = make_strategy(name, random_spec(torch.Generator(), [2, 4]), hetero=hetero)
    private = DPFedAvg(strategy, ClientDPConfig(1.0, 1.0), expected_clients=1,
                       generator=torch.Generator())
    assert private.name == name and private.every_round_released


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        (dict(noise_multiplier=-1.0, clip_norm=1.0), "noise multiplier"),
        (dict(noise_multiplier=math.nan, clip_norm=1.0), "noise multiplier"),
        (dict(noise_multiplier=1.0, clip_norm=0.0), "clip norm"),
        (dict(noise_multiplier=1.0, clip_norm=math.inf), "clip norm"),
        (dict(noise_multiplier=1.0, clip_norm=1.0, sampling="uniform"), "client sampling"),
        (dict(noise_multiplier=1.0, clip_norm=1.0, delta=1.0), "delta"),
        (dict(noise_multiplier=1.0, clip_norm=1.0, accountant="prv"), "accountant"),
        (dict(noise_multiplier=1.0, clip_norm=1.0, sampling="fixed", accountant="pld"),
         "accountant 'pld'"),
    ],
)
def test_bad_settings_are_refused(settings, setting):
    with pytest.raises(ConfigError, match=setting):
        ClientDPConfig(**settings)


def test_the_wrapper_releases_every_round_even_without_a_valid_update():
    """DP-FedAvg as a wrapper strategy: the round needs no valid update (counting them would
    depend on who took part), and one without any releases the noise alone, exactly
    N(0, (z S / m)^2) per coordinate of the released space."""
    strategy, state, _ = federation("ffa", 3, [4, 8])
    z, clip, m = 2.0, 0.5, 4.0
    private = DPFedAvg(strategy, ClientDPConfig(z, clip), expected_clients=m,
                       generator=torch.Generator().manual_seed(5))
    policy = ValidationPolicy(min_valid_updates=1)
    result = aggregate_round(private, state, [], policy=policy)
    assert result.accepted == [] and result.state.round == state.round + 1
    noise = torch.cat([(result.state.lora[n].B - state.lora[n].B).reshape(-1)
                       for n in sorted(state.lora)]).double()
    assert torch.equal(result.state.lora[next(iter(state.lora))].A,
                       state.lora[next(iter(state.lora))].A)  # FFA: A is never released
    expected = z * clip / m
    assert abs(float(noise.std()) - expected) < 5 * expected / math.sqrt(2 * noise.numel())
    with pytest.raises(RoundFailedError):  # the wrapped strategy alone would refuse the round
        aggregate_round(strategy, state, [], policy=policy)


def test_a_runs_client_level_epsilon_is_accounted_without_dp_accountings_chatter(caplog):
    """Each round's client-level epsilon is the RDP accountant's, and the notes dp-accounting
    logs for every order it drops (a valid, looser bound) stay out of the run's output."""
    import logging

    from fedlr.privacy.client_level import client_level_epsilon
    from fedlr.privacy.report import RunPrivacy
    from fedlr.settings.schema import SimulationConfig

    config = SimulationConfig(model="tiny", strategy="ffa", num_clients=6, clients_per_round=3,
                              client_noise_multiplier=1.235612, client_clip_norm=0.5)
    with caplog.at_level(logging.WARNING, logger="absl"):
        found = RunPrivacy(config).client_level(2)
        quiet = list(caplog.records)
        expected = client_level_epsilon(config.client_dp_config(), num_clients=6, per_round=3,
                                        rounds=2)
    assert found["epsilon"] == pytest.approx(expected)
    assert not [r for r in quiet if "failed to converge" in r.getMessage()]
    assert [r for r in caplog.records if "failed to converge" in r.getMessage()]  # unquieted


# -- secrecy: what a reader of run.json (the run's seed) could replay -----------------------------


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_the_secret_client_sample_is_never_replayed_from_the_seed_and_round(sampling):
    """The adversary knows the run's seed (run.json) and the round; twenty draws with the same
    (seed, round) must not all agree, as a sample derived from them would (here 10 of 100
    clients: two honest draws agree with probability 1 / C(100, 10) = 6e-14 fixed-size, 0.82^100 =
    3e-9 Poisson)."""
    ids = [str(k) for k in range(100)]
    draws = {tuple(sample_clients(ids, 10, 3, seed=7, private_sampling=sampling))
             for _ in range(20)}
    assert len(draws) > 1


def test_the_servers_own_draw_of_the_client_sample_is_never_replayed(tmp_path):
    """The sampler the coordinator calls each round, for a run whose seed run.json publishes:
    twenty draws of round 3 must not all agree (12 clients at q = 1/3: two honest Poisson draws
    agree with probability (5/9)^12, under 1e-3)."""
    from fedlr.server.coordinator import Coordinator
    from fedlr.server.rundir import RunDir

    config = SimulationConfig.load(None, dict(
        strategy="ffa", model="tiny", num_clients=12, clients_per_round=4, ranks=[4],
        eval_examples=16, client_noise_multiplier=1.0, client_clip_norm=0.5,
        out=str(tmp_path / "r")))
    coordinator = Coordinator(Federation.build(config), RunDir(tmp_path / "r"))
    assert len({tuple(coordinator.sample(3)) for _ in range(20)}) > 1


def test_the_servers_noise_is_never_replayed_from_the_run_seed(tmp_path):
    """Two federations built from one configuration (the seed run.json publishes) release
    different noise for the same round with no update: noise drawn from the run's seed would
    let anyone who reads run.json subtract it."""
    config = SimulationConfig.load(None, dict(
        strategy="ffa", model="tiny", num_clients=4, ranks=[4], eval_examples=16,
        client_noise_multiplier=1.0, client_clip_norm=0.5, out=str(tmp_path / "r")))
    releases = []
    for _ in range(2):
        fed = Federation.build(config)
        state = fed.strategy.init_state(fed.model.host.initial_head)
        result = aggregate_round(fed.strategy, state, [],
                                 policy=ValidationPolicy(min_valid_updates=1))
        releases.append(result.state.lora)
    assert all(not torch.equal(releases[0][n].B, releases[1][n].B) for n in releases[0])
