"""Empirical lower bounds on epsilon from canary audits in one training run.

An audit plants canaries, runs the mechanism, scores every canary from what was released and
asks how well the scores tell the included canaries from the others. Each bound here is a lower
bound on the epsilon, at the given delta, of the mechanism that was actually run: were it
(eps, delta)-DP for an eps below the bound, counts as good as the observed ones would occur
with probability below `significance`. So the bound is wrong with probability at most
`significance`, and it holds only under the canaries' threat model: sample-level canaries
bound sample-level epsilon, client canaries client-level epsilon, and the score may depend on
a canary only through the released output.

A lower bound above the epsilon the accountant claims means a bug (clipping, noise, sampling
or accounting), not bad luck. A bound far below it proves little: audits are loose, and
`ceiling` says the most that many canaries could certify however good the attack.

- One run (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training Run"): m
  canaries, each included independently with probability 1/2, in a single run; guess "in" for
  the top k+ scores and "out" for the bottom k-, abstain on the rest; r guesses, v right.

Every function that picks the best of several decision rules divides the significance by the
number of rules it tried (Bonferroni), so its bound keeps the stated significance.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

from fedlr.errors import ConfigError

Pair = tuple[int, int]  # (k_plus, k_minus): guess "in" for the top k_plus, "out" for the bottom


@dataclass(frozen=True)
class OneRunAudit:
    """The best one-run bound over the abstention pairs tried, with what a report must state."""

    epsilon_lower_bound: float
    guesses: int  # r of the pair that gave the bound
    correct: int  # v of that pair
    canaries: int  # m
    significance: float  # as asked; each pair was tested at significance / pairs_tried
    k_plus: int  # the pair that gave the bound (the first pair when none certifies anything)
    k_minus: int
    ceiling: float  # the most m canaries could certify at the corrected significance
    pairs_tried: int


# ---- validation ---------------------------------------------------------------------------


def check_count(name: str, value: int, low: int, high: float = math.inf) -> int:
    try:
        n = operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if n < low:
        raise ConfigError(f"{name} must be at least {low}, got {n}")
    if n > high:
        raise ConfigError(f"{name} must be at most {high}, got {n}")
    return n


def check_delta(delta: float) -> None:
    if not 0 <= delta < 1:
        raise ConfigError(f"delta must be in [0, 1), got {delta}")


def check_level(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise ConfigError(f"{name} must be in (0, 1), got {value}")


def scores_array(name: str, values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ConfigError(f"{name} must be a non-empty list of finite numbers")
    return arr


# ---- one run ------------------------------------------------------------------------------


def _one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P-value of "v of r guesses right" under an (eps, delta)-DP null (Steinke et al. Thm 3.3).

    The alpha term sums pmf values from v-1 downwards rather than subtracting tail
    probabilities, so it does not cancel when q is near 1."""
    q = special.expit(eps)
    beta = float(stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(1.0, beta)
    below_v = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[X = v-1], P[X = v-2], ...
    alpha = float(np.max(np.cumsum(below_v) / np.arange(1, v + 1)))
    return min(1.0, beta + alpha * delta * 2 * m)


def _largest_rejected(
    p_value: Callable[[float], float], significance: float, floor: float
) -> float:
    """sup{eps >= floor : p_value(eps) < significance}, or `floor` if there is none.

    p_value grows with eps (beta does as q grows; the delta term did in every case checked), so
    the set is an interval from 0: double until it is left, then find the crossing. Starting
    at `floor` lets a search over many rules skip, with one evaluation, every rule that cannot
    beat the best so far."""

    def margin(eps: float) -> float:
        return significance - p_value(eps)

    if margin(floor) <= 0:
        return floor
    low, high = floor, max(1.0, 2 * floor)
    while margin(high) > 0:
        low, high = high, 2 * high
    return float(optimize.brentq(margin, low, high, xtol=1e-9))


def _one_run_bound(
    m: int, r: int, v: int, delta: float, significance: float, floor: float
) -> float:
    return _largest_rejected(lambda eps: _one_run_p_value(m, r, v, eps, delta), significance, floor)


def one_run_lower_bound(m: int, r: int, v: int, delta: float, significance: float = 0.05) -> float:
    """eps_LB of a one-run audit with m canaries, r guesses and v of them right (0 if none)."""
    m = check_count("canaries m", m, 1)
    r = check_count("guesses r", r, 0, m)
    v = check_count("correct guesses v", v, 0, r)
    check_delta(delta)
    check_level("significance", significance)
    return _one_run_bound(m, r, v, delta, significance, 0.0)


def _ceiling_guess_counts(m: int) -> list[int]:
    """r = m first (it wins in every case checked), then a geometric grid below it."""
    grid = np.unique(np.round(np.geomspace(1, m, 32)).astype(int))
    return [m, *sorted((int(r) for r in grid if r < m), reverse=True)]


def ceiling(m: int, delta: float, significance: float = 0.05) -> float:
    """The largest one-run eps_LB m canaries can certify: every guess right, the best r tried."""
    m = check_count("canaries m", m, 1)
    check_delta(delta)
    check_level("significance", significance)
    best = 0.0
    for r in _ceiling_guess_counts(m):
        best = _one_run_bound(m, r, r, delta, significance, best)
    return best


def abstention_pairs(m: int) -> list[Pair]:
    """The default (k+, k-) grid: k = 1, 2, 4, ..., m // 2 - isqrt(m) and m // 2, each both
    symmetric (k, k) and "in" only (k, 0).

    Fixed before looking at the scores, as Bonferroni needs, and small, so the correction costs
    little. k = m // 2 - isqrt(m) is at most min(#in, #out) with probability about 0.98 when
    each canary is in with probability 1/2, so perfectly separating scores make all of those
    2k guesses right and come close to the ceiling."""
    m = check_count("canaries m", m, 1)
    half = max(1, m // 2)
    ks = {2**j for j in range(half.bit_length())} | {half, m // 2 - math.isqrt(m)}
    ks = {k for k in ks if 1 <= k <= half}
    return sorted({*((k, k) for k in ks if 2 * k <= m), *((k, 0) for k in ks)})


def _pairs(pairs: Sequence[Pair], m: int) -> list[Pair]:
    problem = f"pairs must be a non-empty list of integer (k+, k-) >= 0 with k+ + k- <= {m}"
    try:
        unique = sorted({(operator.index(kp), operator.index(km)) for kp, km in pairs})
    except (TypeError, ValueError):
        raise ConfigError(problem) from None
    if not unique or any(kp < 0 or km < 0 or kp + km > m for kp, km in unique):
        raise ConfigError(problem)
    return unique


def _ranked_inclusion(scores: Sequence[float], included: Sequence[bool]) -> np.ndarray:
    """Inclusion bits ordered by score, highest first; ties keep the canaries' order."""
    s = scores_array("scores", scores)
    inc = np.asarray(included, dtype=bool)
    if inc.shape != s.shape:
        raise ConfigError(f"scores has {s.size} entries but included has {inc.size}")
    return inc[np.argsort(-s, kind="stable")]


def best_one_run_bound(
    scores: Sequence[float],
    included: Sequence[bool],
    delta: float,
    significance: float = 0.05,
    pairs: Sequence[Pair] | None = None,
) -> OneRunAudit:
    """The best one-run eps_LB over abstention pairs, each tested at significance / pairs tried.

    `scores[i]` is canary i's attack score (higher means "looks included"), `included[i]`
    whether it was really included. The ordering of canaries must not depend on inclusion,
    since ties are broken by it. `pairs` defaults to `abstention_pairs(m)`; pass your own grid,
    fixed before seeing the scores, to change it."""
    ranked = _ranked_inclusion(scores, included)
    check_delta(delta)
    check_level("significance", significance)
    m = ranked.size
    tried = _pairs(abstention_pairs(m) if pairs is None else pairs, m)
    corrected = significance / len(tried)
    ins_above = np.concatenate([[0], np.cumsum(ranked)])  # included among the top k

    def counts(pair: Pair) -> tuple[int, int]:
        k_plus, k_minus = pair
        outs_below = k_minus - int(ins_above[m] - ins_above[m - k_minus])
        return k_plus + k_minus, int(ins_above[k_plus]) + outs_below

    best, best_pair = 0.0, tried[0]
    for pair in tried:
        r, v = counts(pair)
        eps = _one_run_bound(m, r, v, delta, corrected, best) if r > 0 else 0.0
        if eps > best:
            best, best_pair = eps, pair
    r, v = counts(best_pair)
    return OneRunAudit(
        epsilon_lower_bound=best,
        guesses=r,
        correct=v,
        canaries=m,
        significance=significance,
        k_plus=best_pair[0],
        k_minus=best_pair[1],
        ceiling=ceiling(m, delta, corrected),
        pairs_tried=len(tried),
    )


def canary_report(bound: OneRunAudit, included: Sequence[bool], drawn: Sequence[int]
                  ) -> dict[str, float | int]:
    """What every canary audit reports about its canaries and its bound."""
    return {
        "canaries": bound.canaries,
        "inclusion_probability": 0.5,
        "included": int(sum(map(bool, included))),
        "sampled_at_least_once": int(sum(d > 0 for d in drawn)),
        "significance": bound.significance,
        "pairs_tried": bound.pairs_tried,
        "guesses": bound.guesses,
        "correct": bound.correct,
        "epsilon_lower_bound": bound.epsilon_lower_bound,
        "ceiling": bound.ceiling,
    }
