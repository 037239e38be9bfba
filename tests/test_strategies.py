"""Properties of the five strategies on random federations with mixed ranks (float64), with
partial participation: after the first round only a random subset of clients reports."""

from __future__ import annotations

import math

import pytest
import torch
from federation import MIXED_RANKS, client_updates, dense_ideal, random_spec, relative_error
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlr.errors import ConfigError
from fedlr.lora.lowrank import LowRank
from fedlr.lora.rounds import aggregate_round, plan_round
from fedlr.lora.strategies import (
    STRATEGIES,
    FederationSpec,
    GlobalState,
    ModuleShape,
    make_strategy,
)
from fedlr.lora.strategies.base import HETERO_METHODS
from fedlr.lora.validation import ValidationPolicy

seeds = st.integers(0, 2**31 - 1)
rank_lists = st.lists(st.sampled_from(MIXED_RANKS), min_size=2, max_size=6)
hetero = st.sampled_from(list(HETERO_METHODS))
SETTINGS = settings(max_examples=40, deadline=None)


def run_rounds(name: str, seed: int, ranks: list[int], rounds: int = 2, **options):
    gen = torch.Generator().manual_seed(seed)
    spec = random_spec(gen, ranks, rslora=bool(seed % 2))
    strategy = make_strategy(name, spec, seed=seed, **options)
    state = strategy.init_state()
    for round_ in range(rounds):
        updates = client_updates(strategy, state, gen)
        if round_ > 0:  # partial participation: a random non-empty subset reports
            keep = torch.rand(len(updates), generator=gen) < 0.5
            keep[int(torch.randint(len(updates), (1,), generator=gen))] = True
            updates = [u for u, k in zip(updates, keep.tolist(), strict=True) if k]
        previous = state
        state, report = strategy.aggregate(state, updates)
    return strategy, previous, state, updates, report


def global_dense(strategy, state: GlobalState, name: str) -> torch.Tensor:
    if strategy.name == "flora":  # the round's exact stacked update
        return state.history[-1][name].dense()
    return state.lora[name].dense()


@SETTINGS
@given(seed=seeds, ranks=rank_lists)
def test_flora_round_update_is_exact(seed, ranks):
    strategy, _, state, updates, report = run_rounds("flora", seed, ranks)
    ideal = dense_ideal(updates)
    for name, ref in ideal.items():
        assert relative_error(global_dense(strategy, state, name), ref) <= 1e-10
    assert report.residual <= 1e-10


@SETTINGS
@given(seed=seeds, ranks=rank_lists, method=hetero)
def test_ffa_is_exact_and_keeps_a(seed, ranks, method):
    _, previous, state, updates, report = run_rounds("ffa", seed, ranks, hetero=method)
    for name, ref in dense_ideal(updates).items():
        assert relative_error(state.lora[name].dense(), ref) <= 1e-10
        assert torch.equal(state.lora[name].A, previous.lora[name].A)
    assert report.residual <= 1e-10


@SETTINGS
@given(seed=seeds, ranks=rank_lists, method=hetero)
def test_fedsvd_orthonormal_and_exact(seed, ranks, method):
    strategy, previous, state, updates, report = run_rounds("fedsvd", seed, ranks, hetero=method)
    total = sum(u.num_examples for u in updates)
    R = strategy.spec.max_rank
    for name, new in state.lora.items():
        eye = torch.eye(R, dtype=torch.float64)
        assert float((new.A @ new.A.T - eye).abs().max()) <= 1e-10
        b_bar = torch.zeros(new.B.shape[0], R, dtype=torch.float64)
        for u in updates:
            f = u.adapter.lora[name]
            b_bar[:, : f.rank] += (u.num_examples / total) * f.scaling * f.B
        product = b_bar @ previous.lora[name].A
        assert relative_error(new.dense(), product) <= 1e-10
    assert report.residual <= 1e-10


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x * y).sum() / (torch.linalg.matrix_norm(x) * torch.linalg.matrix_norm(y)))


@SETTINGS
@given(seed=seeds, ranks=rank_lists, method=hetero)
def test_fair_cosine_never_below_fedit(seed, ranks, method):
    """FAIR corrects FedIT's example-weighted average: never less aligned than that."""
    _, _, fair_state, updates, _ = run_rounds("fair", seed, ranks, rounds=1, hetero=method)
    _, _, fedit_state, _, _ = run_rounds("fedit", seed, ranks, rounds=1, hetero="hetlora-fedavg")
    for name, ref in dense_ideal(updates).items():
        fair_cos = cosine(fair_state.lora[name].dense(), ref)
        fedit_cos = cosine(fedit_state.lora[name].dense(), ref)
        assert fair_cos >= fedit_cos - 1e-12


@SETTINGS
@given(seed=seeds, ranks=rank_lists, lam=st.floats(1e-6, 1.0))
def test_fair_frobenius_residual_never_above_fedit(seed, ranks, lam):
    _, _, fair_state, updates, report = run_rounds(
        "fair", seed, ranks, rounds=1, objective="frobenius", lam=lam
    )
    _, _, fedit_state, _, fedit_report = run_rounds("fedit", seed, ranks, rounds=1,
                                                    hetero="hetlora-fedavg")
    for name, ref in dense_ideal(updates).items():
        assert (
            relative_error(fair_state.lora[name].dense(), ref)
            <= relative_error(fedit_state.lora[name].dense(), ref) + 1e-12
        )
    assert report.residual <= fedit_report.residual + 1e-12
    assert math.isclose(report.details["fedit_residual"], fedit_report.residual, rel_tol=1e-9)


@SETTINGS
@given(seed=seeds, ranks=rank_lists)
def test_fedit_reported_residual_matches_dense(seed, ranks):
    _, _, state, updates, report = run_rounds("fedit", seed, ranks, rounds=1)
    ideal = dense_ideal(updates)
    num = sum(
        float(torch.linalg.matrix_norm(state.lora[n].dense() - r)) ** 2 for n, r in ideal.items()
    )
    den = sum(float(torch.linalg.matrix_norm(r)) ** 2 for r in ideal.values())
    assert math.isclose(report.residual, math.sqrt(num / den), rel_tol=1e-9)
    for name, ref in ideal.items():
        expected = relative_error(state.lora[name].dense(), ref)
        assert math.isclose(report.residual_per_module[name], expected, rel_tol=1e-9)


@pytest.mark.parametrize("method", ["hetlora-fedavg", "hetlora"])
@SETTINGS
@given(seed=seeds, ranks=rank_lists)
def test_fedit_equal_ranks_is_fedavg_of_factors(seed, ranks, method):
    """With one rank there is nothing heterogeneous: FedAvg of A and B, example-weighted."""
    ranks = [ranks[0]] * len(ranks)
    _, _, state, updates, _ = run_rounds("fedit", seed, ranks, rounds=1, hetero=method)
    total = sum(u.num_examples for u in updates)
    for name, g in state.lora.items():
        a = sum(u.num_examples / total * u.adapter.lora[name].A for u in updates)
        b = sum(u.num_examples / total * u.adapter.lora[name].B for u in updates)
        s = updates[0].adapter.lora[name].scaling
        assert torch.allclose(g.A, a, atol=1e-12) and torch.allclose(g.B, s * b, atol=1e-12)


@pytest.mark.parametrize("method", ["hetlora-fedavg", "hetlora"])
@SETTINGS
@given(seed=seeds, ranks=rank_lists)
def test_fedit_mixed_ranks_weights_clients_as_its_method_says(seed, ranks, method):
    """The components every client holds: sum_k p_k of the factors, p_k = n_k / sum n
    (hetlora-fedavg) or ||s_k B_k A_k||_F / sum (hetlora, the paper's weighting)."""
    ranks = [*ranks, 16 if min(ranks) < 16 else 2]
    _, _, state, updates, _ = run_rounds("fedit", seed, ranks, rounds=1, hetero=method)
    shared = min(ranks)
    for name, g in state.lora.items():
        if method == "hetlora":
            raw = [float(torch.linalg.matrix_norm(u.adapter.lora[name].delta())) for u in updates]
        else:
            raw = [float(u.num_examples) for u in updates]
        p = [w / sum(raw) for w in raw]
        a = sum(w * u.adapter.lora[name].A[:shared] for w, u in zip(p, updates, strict=True))
        b = sum(w * u.adapter.lora[name].scaling * u.adapter.lora[name].B[:, :shared]
                for w, u in zip(p, updates, strict=True))
        assert torch.allclose(g.A[:shared], a, atol=1e-12)
        assert torch.allclose(g.B[:, :shared], b, atol=1e-12)


@SETTINGS
@given(seed=seeds, ranks=rank_lists, name=st.sampled_from(["fedit", "fair", "fedsvd"]))
def test_flexlora_downlink_is_best_rank_r_approximation(seed, ranks, name):
    strategy, _, state, _, _ = run_rounds(name, seed, ranks, rounds=1, hetero="flexlora")
    for cid, rank in strategy.spec.ranks.items():
        down = strategy.downlink(state, cid)
        for module, f in down.lora.items():
            full = state.lora[module].dense()
            s = torch.linalg.svdvals(full)
            tail = float(torch.sqrt((s[rank:] ** 2).sum()))
            error = float(torch.linalg.matrix_norm(full - f.delta()))
            assert error <= tail + 1e-9 * float(s[0])
            assert f.scaling == strategy.spec.scaling(rank)


@SETTINGS
@given(seed=seeds, ranks=rank_lists)
def test_ffa_flexlora_downlink_is_least_squares_on_fixed_rows(seed, ranks):
    strategy, _, state, _, _ = run_rounds("ffa", seed, ranks, rounds=1, hetero="flexlora")
    for cid, rank in strategy.spec.ranks.items():
        down = strategy.downlink(state, cid)
        for module, f in down.lora.items():
            g = state.lora[module]
            assert torch.equal(f.A, g.A[:rank])
            residual = g.dense() - f.delta()
            assert float((residual @ f.A.T).abs().max()) <= 1e-10 * float(g.dense().abs().max() + 1)


@SETTINGS
@given(seed=seeds, ranks=rank_lists, name=st.sampled_from(["fedit", "ffa", "fair", "fedsvd"]))
def test_hetlora_downlink_truncates_in_client_scaling(seed, ranks, name):
    strategy, _, state, _, _ = run_rounds(name, seed, ranks, rounds=1)
    for cid, rank in strategy.spec.ranks.items():
        down = strategy.downlink(state, cid)
        for module, f in down.lora.items():
            expected = state.lora[module].truncated(rank).dense()
            assert f.rank == rank
            assert torch.allclose(f.delta(), expected, atol=1e-12)


@SETTINGS
@given(seed=seeds, ranks=rank_lists, skipped=st.integers(0, 3))
def test_flora_catch_up_downlink_is_exact_cumulative_update(seed, ranks, skipped):
    gen = torch.Generator().manual_seed(seed)
    spec = random_spec(gen, ranks)
    strategy = make_strategy("flora", spec)
    state, round_updates = strategy.init_state(), []
    for _ in range(skipped + 1):
        updates = client_updates(strategy, state, gen)
        round_updates.append(dense_ideal(updates))
        state, _ = strategy.aggregate(state, updates)
    since = state.round - skipped - 1
    down = strategy.downlink(state, "c0", since_round=since)
    deltas = down.delta_weights()
    for name, shape in spec.modules.items():
        expected = sum(r[name] for r in round_updates)
        assert relative_error(deltas[name], expected) <= 1e-10
        stacked_rank = sum(ranks) * (skipped + 1)
        dense_is_cheaper = stacked_rank * (shape.d_out + shape.d_in) >= shape.d_out * shape.d_in
        assert isinstance(down.base[name], torch.Tensor) == dense_is_cheaper
    assert not down.lora  # every FLoRA round starts from a fresh LoRA


def test_extras_are_fedavg_or_frozen():
    gen = torch.Generator().manual_seed(0)
    spec = random_spec(gen, [4, 8], extras=True)
    for name in STRATEGIES:
        for head in ("train", "freeze"):
            strategy = make_strategy(name, spec, head=head)
            initial = {"classifier.weight": torch.zeros(3, 8, dtype=torch.float64)}
            state = strategy.init_state(initial)
            updates = client_updates(strategy, state, gen)
            new, _ = strategy.aggregate(state, updates)
            total = sum(u.num_examples for u in updates)
            avg = sum(
                u.num_examples / total * u.adapter.extras["classifier.weight"] for u in updates
            )
            expected = avg if head == "train" else initial["classifier.weight"]
            assert torch.allclose(new.extras["classifier.weight"], expected, atol=1e-12)
    assert make_strategy("fedsvd", spec).head == "freeze"  # as in the FedSVD paper
    assert make_strategy("fedit", spec).head == "train"


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_aggregate_does_not_touch_its_input_state(name):
    gen = torch.Generator().manual_seed(1)
    strategy = make_strategy(name, random_spec(gen, [2, 8]))
    state = strategy.init_state()
    state, _ = strategy.aggregate(state, client_updates(strategy, state, gen))
    before, info = state.to_tensors()
    before = {k: v.clone() for k, v in before.items()}
    strategy.aggregate(state, client_updates(strategy, state, gen))
    after, info_after = state.to_tensors()
    assert info == info_after and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_state_round_trips_through_tensors(name):
    gen = torch.Generator().manual_seed(2)
    strategy = make_strategy(name, random_spec(gen, [4, 2, 8], extras=True))
    state = strategy.init_state({"classifier.weight": torch.ones(3, 8, dtype=torch.float64)})
    for _ in range(2):
        state, _ = strategy.aggregate(state, client_updates(strategy, state, gen))
    flat, info = state.to_tensors()
    restored = GlobalState.from_tensors(flat, info)
    assert restored.round == state.round == 2
    d1 = strategy.downlink(state, "c1")
    d2 = strategy.downlink(restored, "c1")
    for module, delta in d1.delta_weights().items():
        assert torch.equal(delta, d2.delta_weights()[module])


def test_fedsvd_rank_deficient_product_is_deterministic_and_orthonormal():
    spec = FederationSpec({"m": ModuleShape(12, 10)}, {"a": 4, "b": 4}, dtype=torch.float64)
    strategy = make_strategy("fedsvd", spec)
    state = strategy.init_state()
    zero = [u for u in client_updates(strategy, state, torch.Generator().manual_seed(0), scale=0.0)]
    first, _ = strategy.aggregate(state, zero)
    second, _ = strategy.aggregate(state, zero)
    a = first.lora["m"].A
    assert torch.equal(a, second.lora["m"].A)
    assert torch.allclose(a @ a.T, torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert float(first.lora["m"].B.abs().max()) == 0.0


def test_config_errors_name_the_problem():
    shape = {"m": ModuleShape(8, 8)}
    with pytest.raises(ConfigError, match="unknown strategy 'fedprox'"):
        make_strategy("fedprox", FederationSpec(shape, {"a": 2}))
    with pytest.raises(ConfigError, match="rank must be a positive integer"):
        FederationSpec(shape, {"a": 0})
    with pytest.raises(ConfigError, match="exceeds the smallest module dimension"):
        FederationSpec(shape, {"a": 16})
    spec = FederationSpec(shape, {"a": 2})
    with pytest.raises(ConfigError, match="heterogeneous-rank method"):
        make_strategy("fedit", spec, hetero="zeros")
    with pytest.raises(ConfigError, match="fair objective"):
        make_strategy("fair", spec, objective="l1")
    with pytest.raises(ConfigError, match="unexpected keyword"):
        make_strategy("fedit", spec, objective="cosine")


def test_lowrank_helpers_match_dense():
    gen = torch.Generator().manual_seed(3)
    from fedlr.lora.lowrank import difference_norm, frobenius_norm, svd

    for d_out, d_in, r in [(30, 20, 4), (10, 12, 25), (64, 48, 1)]:
        x = LowRank(
            torch.randn(d_out, r, generator=gen, dtype=torch.float64),
            torch.randn(r, d_in, generator=gen, dtype=torch.float64),
        )
        y = LowRank(
            torch.randn(d_out, 3, generator=gen, dtype=torch.float64),
            torch.randn(3, d_in, generator=gen, dtype=torch.float64),
        )
        assert math.isclose(
            frobenius_norm(x), float(torch.linalg.matrix_norm(x.dense())), rel_tol=1e-12
        )
        assert math.isclose(
            difference_norm(x, y),
            float(torch.linalg.matrix_norm(x.dense() - y.dense())),
            rel_tol=1e-12,
        )
        f = svd(x)
        k = min(d_out, d_in, r)
        assert torch.allclose(f.S[:k], torch.linalg.svdvals(x.dense())[:k], rtol=1e-10)
        assert torch.allclose((f.U * f.S) @ f.Vh, x.dense(), atol=1e-10)
    # A difference that is zero is measured at rounding level, not at the sqrt(eps) ~ 1e-8 floor
    # that ||x||^2 - 2<x, y> + ||y||^2 would leave.
    same = difference_norm(x, LowRank(x.B.clone(), x.A.clone()))
    assert same / frobenius_norm(x) < 1e-14


@SETTINGS
@given(seed=seeds, ranks=rank_lists, target=st.sampled_from(MIXED_RANKS))
def test_flora_compression_is_the_best_rank_r_export_with_its_energy(seed, ranks, target):
    strategy, _, state, _, _ = run_rounds("flora", seed, ranks, rounds=2)
    compressed, energy = strategy.compressed(state, target)
    for name, exact in strategy.downlink(state, "c0").delta_weights().items():
        s = torch.linalg.svdvals(exact)
        kept = float((s[:target] ** 2).sum() / (s**2).sum())
        assert math.isclose(energy[name], kept, rel_tol=1e-9)
        error = float(torch.linalg.matrix_norm(exact - compressed[name].dense()))
        assert math.isclose(
            error, float(torch.sqrt((s[target:] ** 2).sum())), rel_tol=1e-6, abs_tol=1e-9
        )


@SETTINGS
@given(seed=seeds, ranks=rank_lists, method=hetero, name=st.sampled_from(sorted(STRATEGIES)))
def test_a_round_where_only_the_smallest_ranks_report_keeps_every_clients_rank(seed, ranks,
                                                                               method, name):
    """Round 1: everyone; round 2: only the clients of the smallest rank; round 3: everyone
    again. The state keeps the federation's rank, every client's downlink its own rank, and
    FedIT/FAIR keep the components no participant held."""
    ranks = [*ranks, min(ranks) + 1 if min(ranks) < 16 else 2]  # at least two distinct ranks
    gen = torch.Generator().manual_seed(seed)
    spec = random_spec(gen, ranks)
    strategy = make_strategy(name, spec, hetero=method)
    state = strategy.init_state()
    small = min(ranks)
    for round_ in range(3):
        updates = client_updates(strategy, state, gen)
        if round_ == 1:
            updates = [u for u in updates if spec.ranks[u.client_id] == small]
        before = state
        state, _ = strategy.aggregate(state, updates)
        for module, g in state.lora.items():
            assert g.rank == spec.max_rank and bool(torch.isfinite(g.dense()).all())
            if round_ == 1 and name in ("fedit", "fair") and method != "flexlora":
                tail = slice(small, None)
                assert torch.equal(g.A[tail], before.lora[module].A[tail])
                if name == "fedit":
                    assert torch.equal(g.B[:, tail], before.lora[module].B[:, tail])
        for cid, rank in spec.ranks.items():
            down = strategy.downlink(state, cid)
            assert all(f.rank == rank for f in down.lora.values())


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_round_without_valid_updates_carries_the_state_over(name):
    gen = torch.Generator().manual_seed(4)
    strategy = make_strategy(name, random_spec(gen, [2, 4], extras=True))
    state = strategy.init_state({"classifier.weight": torch.ones(3, 8, dtype=torch.float64)})
    state, _ = strategy.aggregate(state, client_updates(strategy, state, gen))
    result = aggregate_round(strategy, state, [], policy=ValidationPolicy(min_valid_updates=0))
    assert result.state.round == state.round + 1 and result.accepted == []
    assert math.isnan(result.report.residual)
    for cid in strategy.spec.ranks:
        before = strategy.downlink(state, cid).delta_weights()
        after = strategy.downlink(result.state, cid).delta_weights()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[m], after[m]) for m in before)
    nxt, _ = strategy.aggregate(result.state, client_updates(strategy, result.state, gen))
    assert nxt.round == state.round + 2


@settings(max_examples=60, deadline=None)
@given(seed=seeds, rank=st.integers(1, 6), dims=st.tuples(st.integers(6, 20),
                                                         st.integers(6, 20)))
def test_svd_sign_rule_holds_on_the_final_factors_whatever_the_factorisation(seed, rank, dims):
    """The largest |entry| of each right singular vector is positive, so B A gives one SVD
    however it was factored (B M)(M^-1 A)."""
    from fedlr.lora.lowrank import svd

    gen = torch.Generator().manual_seed(seed)
    d_out, d_in = dims
    B = torch.randn(d_out, rank, generator=gen, dtype=torch.float64)
    A = torch.randn(rank, d_in, generator=gen, dtype=torch.float64)
    M = torch.randn(rank, rank, generator=gen, dtype=torch.float64) + 3 * torch.eye(
        rank, dtype=torch.float64)
    first, second = svd(LowRank(B, A)), svd(LowRank(B @ M, torch.linalg.solve(M, A)))
    for f in (first, second):
        pivots = f.Vh.gather(1, f.Vh.abs().argmax(dim=1, keepdim=True))
        assert bool((pivots > 0).all())
    assert torch.allclose(first.Vh, second.Vh, atol=1e-8)
    assert torch.allclose(first.U, second.U, atol=1e-8)


def test_top_pads_a_low_rank_product_to_the_requested_rank():
    """A stack of rank 2 asked for rank 5: the same product, five components, orthonormal A."""
    from fedlr.lora.lowrank import svd

    gen = torch.Generator().manual_seed(5)
    x = LowRank(torch.randn(12, 2, generator=gen, dtype=torch.float64),
                torch.randn(2, 9, generator=gen, dtype=torch.float64))
    top = svd(x).top(5)
    assert top.rank == 5
    assert torch.allclose(top.dense(), x.dense(), atol=1e-12)
    assert torch.allclose(top.A @ top.A.T, torch.eye(5, dtype=torch.float64), atol=1e-12)
    assert svd(x).top(12).A.shape == (12, 9)  # past d_in the extra rows are zero


def test_a_flora_export_never_has_a_rank_above_the_module_dimension():
    """Stacking many clients grows the rank past min(d_out, d_in); the export re-factors such a
    module exactly at that rank (no exact LoRA needs more)."""
    from fedlr.server.export import final_adapter

    gen = torch.Generator().manual_seed(6)
    spec = FederationSpec({"small": ModuleShape(10, 12), "wide": ModuleShape(40, 48)},
                          {f"c{k}": 4 for k in range(5)}, dtype=torch.float64)
    strategy = make_strategy("flora", spec)
    state = strategy.init_state()
    for _ in range(2):  # stacked rank 40 per module
        state, _ = strategy.aggregate(state, client_updates(strategy, state, gen))
    adapter, info = final_adapter(strategy, state, None)
    exact = strategy.cumulative(state)
    assert adapter.lora["small"].rank == 10 and adapter.lora["wide"].rank == 40
    assert info["refactored_exactly"] == ["small"]
    for name, f in adapter.lora.items():
        assert relative_error(f.delta(), exact[name].dense()) < 1e-10


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_residual_is_called_exact_only_where_it_is_zero_by_construction(name):
    """FLoRA's round update is the stacked sum itself, FFA-LoRA's average B over the shared A
    is dW* itself: their reports say exact instead of showing a measured-looking zero."""
    from rich.console import Console

    from fedlr.server.report import summary_table

    _, _, _, _, report = run_rounds(name, 3, [2, 4, 8])
    exact = bool(report.details.get("exact"))
    assert exact == (name in ("flora", "ffa"))
    record = {"round": 1, "num_accepted": 3, "num_clients": 3, "train_loss": 1.0,
              "eval_loss": 1.0, "eval_accuracy": 0.5, "aggregation_residual": report.residual,
              "aggregation_exact": exact, "bytes_up": 1, "bytes_down": 1, "seconds": 1.0}
    console = Console(width=120, record=True)
    console.print(summary_table([record], "t"))
    assert ("exact" in console.export_text()) == exact


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("hetero", HETERO_METHODS)
def test_a_plans_start_is_the_strategys_starting_adapter(name, hetero):
    """plan_round derives each start from the downlink (minus its base update) instead of
    asking the strategy again: the same tensors as `starting_adapter`, after a real round."""
    gen = torch.Generator().manual_seed(11)
    spec = random_spec(gen, list(MIXED_RANKS), extras=True)
    strategy = make_strategy(name, spec, hetero=hetero, seed=0)
    state = strategy.init_state({"classifier.weight": torch.zeros(3, 8, dtype=torch.float64)})
    state = aggregate_round(strategy, state, client_updates(strategy, state, gen)).state
    plan = plan_round(strategy, state, sorted(spec.ranks))
    for client, start in plan.starts.items():
        expected = strategy.starting_adapter(state, client).tensors()
        got = start.tensors()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)
        assert {n: f.scaling for n, f in start.lora.items()} == {
            n: f.scaling for n, f in strategy.starting_adapter(state, client).lora.items()}


@SETTINGS
@given(seed=seeds, ranks=rank_lists, name=st.sampled_from(["fedit", "ffa", "fair", "fedsvd"]),
       method=hetero)
def test_downlinks_are_fitted_from_the_state_they_are_asked_for(seed, ranks, name, method):
    """A strategy fits each rank's downlink once per state: asked again for an earlier state,
    or for a state whose module was replaced, it answers as a strategy that never saw another."""
    strategy, previous, state, _, _ = run_rounds(name, seed, ranks, rounds=2, hetero=method)

    def same(s: GlobalState) -> None:
        fresh = make_strategy(name, strategy.spec, seed=seed, hetero=method)
        for cid in strategy.spec.ranks:
            got, want = strategy.downlink(s, cid), fresh.downlink(s, cid)
            assert got.meta == want.meta
            assert got.tensors().keys() == want.tensors().keys()
            assert all(torch.equal(got.tensors()[k], want.tensors()[k]) for k in got.tensors())

    for s in (state, previous, state):
        same(s)
    module = next(iter(state.lora))
    state.lora[module] = LowRank(2 * state.lora[module].B, state.lora[module].A)
    same(state)
