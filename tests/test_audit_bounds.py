"""Empirical privacy lower bounds: published reference values, monotonicity, validity checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import optimize, stats
from two_worlds import best_threshold_bound, clopper_pearson_lower_bound, clopper_pearson_upper

from fedlr.errors import ConfigError
from fedlr.privacy.bounds import (
    abstention_pairs,
    best_one_run_bound,
    ceiling,
    one_run_lower_bound,
)

# ../shared/reference/privacy.md, "Empirical audits": Steinke, Nasr, Jagielski 2023
ONE_RUN_REFERENCE = [
    (1000, 100, 100, 3.4654),
    (1000, 100, 90, 1.6261),
    (1000, 500, 400, 1.1980),
    (10000, 1000, 1000, 5.5293),
]
# jax_privacy auditing_test.py, test_epsilon_one_run_close (CanaryScoreAuditor.epsilon_one_run)
JAX_PRIVACY_ONE_RUN = [(1, 1.13346), (2, 2.311945), (4, 4.395568)]


def deterministic_normal(mu: float, n: int) -> np.ndarray:
    """N(mu, 1) quantiles at the midpoints of n equal-probability bins: a noise-free sample."""
    return stats.norm.ppf((np.arange(n) + 0.5) / n) + mu


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon at delta of the Gaussian shift N(mu, 1) vs N(0, 1) (mu-GDP)."""

    def excess(eps: float) -> float:
        return (
            stats.norm.cdf(-eps / mu + mu / 2)
            - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
            - delta
        )

    return optimize.brentq(excess, 0.0, 100.0, xtol=1e-10)


def roc_hull_pairs(scores: np.ndarray, included: np.ndarray) -> list[tuple[int, int]]:
    """(k, 0) for each k whose (FP, TP) point of "top k are in" is a vertex of the ROC's upper
    convex hull, endpoints included: the thresholds jax_privacy's Bonferroni strategy tries."""
    ranked = included[np.argsort(-scores, kind="stable")]
    tp = np.concatenate([[0], np.cumsum(ranked)])
    fp = np.arange(tp.size) - tp
    hull: list[int] = []
    for k in range(tp.size):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (fp[b] - fp[a]) * (tp[k] - tp[a]) - (tp[b] - tp[a]) * (fp[k] - fp[a]) < 0:
                break
            hull.pop()  # b lies on or under the chord from a to k
        hull.append(k)
    return [(k, 0) for k in hull]


def in_out(scores_in: np.ndarray, scores_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.concatenate([scores_in, scores_out])
    included = np.arange(scores.size) < scores_in.size
    return scores, included


# ---- one run: reference values ------------------------------------------------------------


@pytest.mark.parametrize(("m", "r", "v", "expected"), ONE_RUN_REFERENCE)
def test_one_run_reproduces_steinke_nasr_jagielski(m: int, r: int, v: int, expected: float) -> None:
    assert one_run_lower_bound(m, r, v, delta=1e-5, significance=0.05) == pytest.approx(
        expected, abs=1e-3
    )


@pytest.mark.parametrize(("mu", "expected"), JAX_PRIVACY_ONE_RUN)
def test_one_run_reproduces_jax_privacy(mu: float, expected: float) -> None:
    """jax_privacy: 10000 in + 10000 out canaries as one run of m = 20000, "in" for the top k
    (k- = 0) at every ROC hull vertex, significance divided by the number of vertices. The
    vertices depend on the inclusion bits, so that count is jax_privacy's convention rather
    than a family fixed in advance; the bound arithmetic is what this checks."""
    n = 10_000
    scores, included = in_out(deterministic_normal(mu, n), deterministic_normal(0.0, n))
    pairs = roc_hull_pairs(scores, included)
    audit = best_one_run_bound(scores, included, 1e-6, 0.05, pairs=pairs)
    assert audit.canaries == 2 * n
    assert audit.pairs_tried == len(pairs)
    assert audit.epsilon_lower_bound == pytest.approx(expected, rel=1e-5)
    assert audit.epsilon_lower_bound < gaussian_epsilon(mu, 1e-6)


def test_one_run_default_grid_grows_with_signal_and_stays_below_truth() -> None:
    n, delta = 2000, 1e-6
    bounds = []
    for mu in (0.5, 1.0, 2.0, 4.0):
        audit = best_one_run_bound(
            *in_out(deterministic_normal(mu, n), deterministic_normal(0.0, n)), delta
        )
        assert audit.epsilon_lower_bound < gaussian_epsilon(mu, delta)
        assert audit.epsilon_lower_bound <= audit.ceiling
        bounds.append(audit.epsilon_lower_bound)
    assert bounds[0] > 0
    assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds)


# ---- one run: properties ------------------------------------------------------------------

counts = st.integers(1, 120).flatmap(
    lambda m: st.tuples(st.just(m), st.integers(0, m)).flatmap(
        lambda mr: st.tuples(st.just(mr[0]), st.just(mr[1]), st.integers(0, mr[1]))
    )
)
deltas = st.sampled_from([0.0, 1e-6, 1e-3, 0.05])


@settings(max_examples=60, deadline=None)
@given(counts, deltas, st.floats(0.01, 0.5))
def test_bound_non_decreasing_in_correct_guesses(
    mrv: tuple[int, int, int], delta: float, significance: float
) -> None:
    m, r, v = mrv
    assume(v < r)
    lower = one_run_lower_bound(m, r, v, delta, significance)
    assert one_run_lower_bound(m, r, v + 1, delta, significance) >= lower - 1e-9


@settings(max_examples=60, deadline=None)
@given(counts, deltas, st.floats(0.01, 0.3), st.floats(1.1, 5.0))
def test_bound_non_increasing_in_significance_level(
    mrv: tuple[int, int, int], delta: float, significance: float, factor: float
) -> None:
    stricter = one_run_lower_bound(*mrv, delta, significance / factor)
    assert stricter <= one_run_lower_bound(*mrv, delta, significance) + 1e-9


@settings(max_examples=60, deadline=None)
@given(counts, deltas, st.floats(0.01, 0.5))
def test_ceiling_dominates_every_outcome(
    mrv: tuple[int, int, int], delta: float, significance: float
) -> None:
    m = mrv[0]
    assert ceiling(m, delta, significance) >= one_run_lower_bound(*mrv, delta, significance) - 1e-9


def test_perfect_separation_reaches_the_ceiling() -> None:
    rng = np.random.default_rng(7)
    m, delta = 1000, 1e-5
    half = rng.permutation(np.arange(m) < m // 2)  # exactly m/2 in: every canary a right guess
    audit = best_one_run_bound(half + rng.random(m) * 0.5, half, delta)
    assert (audit.k_plus, audit.k_minus, audit.guesses, audit.correct) == (500, 500, m, m)
    assert audit.epsilon_lower_bound == pytest.approx(audit.ceiling, abs=1e-6)

    coin = rng.random(m) < 0.5  # inclusion by fair coins: k = m//2 - isqrt(m) still all right
    audit = best_one_run_bound(coin + rng.random(m) * 0.5, coin, delta)
    assert audit.correct == audit.guesses >= m - 2 * math.isqrt(m)
    assert audit.epsilon_lower_bound >= 0.95 * audit.ceiling


@pytest.mark.parametrize("seed", range(5))
def test_scores_independent_of_inclusion_certify_almost_nothing(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = 1000
    audit = best_one_run_bound(rng.normal(size=m), rng.random(m) < 0.5, 1e-5)
    assert audit.epsilon_lower_bound < 0.5
    assert audit.ceiling > 4


def test_best_bound_is_the_max_over_pairs_at_the_corrected_significance() -> None:
    """Skipping pairs that cannot beat the best so far must not change the answer."""
    rng = np.random.default_rng(3)
    m, delta, significance = 300, 1e-4, 0.05
    included = rng.random(m) < 0.5
    scores = included * 1.5 + rng.normal(size=m)
    pairs = abstention_pairs(m)
    order = np.argsort(-scores, kind="stable")
    expected = 0.0
    for k_plus, k_minus in pairs:
        top, bottom = order[:k_plus], order[m - k_minus :]
        v = int(included[top].sum() + (~included[bottom]).sum())
        bound = one_run_lower_bound(m, k_plus + k_minus, v, delta, significance / len(pairs))
        expected = max(expected, bound)
    audit = best_one_run_bound(scores, included, delta, significance)
    assert expected > 0
    assert audit.epsilon_lower_bound == pytest.approx(expected, abs=1e-7)
    assert audit.pairs_tried == len(pairs)
    assert audit.epsilon_lower_bound == pytest.approx(
        one_run_lower_bound(m, audit.guesses, audit.correct, delta, significance / len(pairs)),
        abs=1e-7,
    )


# ---- two worlds ---------------------------------------------------------------------------


def test_clopper_pearson_with_no_errors_matches_closed_form() -> None:
    n, alpha = 1000, 0.05
    fpr_high = 1 - (alpha / 2) ** (1 / n)  # (1 - p)^n = alpha/2 solves P[Bin(n, p) <= 0]
    assert clopper_pearson_upper(0, n, alpha / 2) == pytest.approx(fpr_high, rel=1e-10)
    expected = math.log(1 - fpr_high) - math.log(fpr_high)
    assert clopper_pearson_lower_bound(0, n, 0, n, 0.0, alpha) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(5.6006, abs=1e-4)


@pytest.mark.parametrize(("k", "n", "alpha"), [(3, 50, 0.05), (40, 100, 0.01), (99, 100, 0.1)])
def test_clopper_pearson_upper_is_the_binomial_tail_inverse(k: int, n: int, alpha: float) -> None:
    p = clopper_pearson_upper(k, n, alpha)
    assert stats.binom.cdf(k, n, p) == pytest.approx(alpha, rel=1e-8)
    assert clopper_pearson_upper(n, n, alpha) == 1.0


def test_clopper_pearson_delta_guard() -> None:
    assert clopper_pearson_lower_bound(1000, 1000, 0, 1000, 0.0) == 0.0  # TPR_lo = 0
    tpr_low = 1 - clopper_pearson_upper(700, 1000, 0.025)  # about 0.27
    assert clopper_pearson_lower_bound(700, 1000, 0, 1000, tpr_low) == 0.0
    assert clopper_pearson_lower_bound(700, 1000, 0, 1000, 0.5) == 0.0
    assert clopper_pearson_lower_bound(700, 1000, 0, 1000, 0.2) > 0.0


def test_threshold_bound_grows_with_signal_and_stays_below_truth() -> None:
    n, delta = 2000, 1e-6
    bounds = [
        best_threshold_bound(deterministic_normal(mu, n), deterministic_normal(0.0, n), delta)
        for mu in (0.5, 1.0, 2.0, 4.0)
    ]
    assert bounds[0] > 0 and bounds == sorted(bounds) and len(set(bounds)) == len(bounds)
    for mu, bound in zip((0.5, 1.0, 2.0, 4.0), bounds, strict=True):
        assert bound < gaussian_epsilon(mu, delta)


def test_threshold_bound_needs_neither_the_score_sign_nor_the_world_order() -> None:
    rng = np.random.default_rng(1)
    s_in, s_out = rng.normal(1.0, 1.0, 500), rng.normal(0.0, 1.0, 700)
    bound = best_threshold_bound(s_in, s_out, 1e-5)
    assert bound > 0
    assert best_threshold_bound(-s_in, -s_out, 1e-5) == pytest.approx(bound, rel=1e-12)
    assert best_threshold_bound(s_out, s_in, 1e-5) == pytest.approx(bound, rel=1e-12)


def test_threshold_bound_is_zero_for_indistinguishable_worlds() -> None:
    rng = np.random.default_rng(2)
    assert best_threshold_bound(rng.normal(size=1000), rng.normal(size=1000), 1e-5) == 0.0
    assert best_threshold_bound([1.0, 1.0], [1.0], 0.0) == 0.0


# ---- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: one_run_lower_bound(0, 0, 0, 1e-5), "canaries m"),
        (lambda: one_run_lower_bound(10, 11, 5, 1e-5), "guesses r"),
        (lambda: one_run_lower_bound(10, 5, 6, 1e-5), "correct guesses v"),
        (lambda: one_run_lower_bound(10, 5, 5, 1.0), "delta"),
        (lambda: one_run_lower_bound(10, 5, 5, -1e-9), "delta"),
        (lambda: one_run_lower_bound(10, 5, 5, 1e-5, 0.0), "significance"),
        (lambda: one_run_lower_bound(10, 5, 5, 1e-5, 1.0), "significance"),
        (lambda: one_run_lower_bound(10, 5.5, 5, 1e-5), "integer"),
        (lambda: ceiling(0, 1e-5), "canaries m"),
        (lambda: best_one_run_bound([1.0, 2.0], [True], 1e-5), "included"),
        (lambda: best_one_run_bound([], [], 1e-5), "scores"),
        (lambda: best_one_run_bound([1.0, math.nan], [True, False], 1e-5), "finite"),
        (lambda: best_one_run_bound([1.0, 2.0], [True, False], 1e-5, pairs=[(2, 1)]), "pairs"),
        (lambda: best_one_run_bound([1.0, 2.0], [True, False], 1e-5, pairs=[]), "pairs"),
        (lambda: clopper_pearson_upper(5, 4, 0.05), "successes k"),
        (lambda: clopper_pearson_lower_bound(0, 10, 0, 10, 1e-5, alpha=1.5), "alpha"),
        (lambda: clopper_pearson_lower_bound(11, 10, 0, 10, 1e-5), "fn"),
        (lambda: clopper_pearson_lower_bound(0, 10, 0, 0, 1e-5), "n_out"),
        (lambda: best_threshold_bound([1.0], [], 1e-5), "scores_out"),
    ],
)
def test_bad_inputs_raise_one_line_config_errors(call, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        call()
    assert "\n" not in str(info.value)
