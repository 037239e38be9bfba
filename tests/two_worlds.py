"""Two-world audit bounds (Clopper-Pearson), a test reference only: n_in independent trials with
the canary in, n_out without; a decision rule's intervals on TPR and FPR give
eps >= ln(TPR - delta) - ln(FPR). The product audits in one run (`fedlr.privacy.bounds`); these
bounds check its statistics against the classical ones."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from fedlr.privacy.bounds import check_count, check_delta, check_level, scores_array


def _cp_upper(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Upper Clopper-Pearson bounds for an array of success counts out of n."""
    safe_k = np.minimum(k, n - 1)  # keeps beta's parameters valid; k == n is replaced by 1
    return np.where(k < n, stats.beta.ppf(1 - alpha, safe_k + 1, n - safe_k), 1.0)


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided upper Clopper-Pearson bound on a binomial rate: P[Bin(n, p) <= k] = alpha."""
    n = check_count("trials n", n, 1)
    k = check_count("successes k", k, 0, n)
    check_level("alpha", alpha)
    return float(_cp_upper(np.asarray(k), n, alpha))


def clopper_pearson_lower_bound(
    fn: int, n_in: int, fp: int, n_out: int, delta: float, alpha: float = 0.05
) -> float:
    """eps_LB from one decision rule's false negatives and false positives (alpha split
    evenly between the TPR and FPR intervals)."""
    n_in, n_out = check_count("n_in", n_in, 1), check_count("n_out", n_out, 1)
    fn, fp = check_count("fn", fn, 0, n_in), check_count("fp", fp, 0, n_out)
    check_delta(delta)
    check_level("alpha", alpha)
    tpr_low = 1 - float(_cp_upper(np.asarray(fn), n_in, alpha / 2))
    fpr_high = float(_cp_upper(np.asarray(fp), n_out, alpha / 2))
    if tpr_low - delta <= 0:
        return 0.0
    return max(0.0, math.log(tpr_low - delta) - math.log(fpr_high))


def _best_cut(positive: np.ndarray, negative: np.ndarray, delta: float, alpha: float) -> float:
    """Best eps_LB of "positive if score >= t" over the cuts between distinct scores."""
    cuts = np.unique(np.concatenate([positive, negative]))[1:]
    fn = np.searchsorted(np.sort(positive), cuts, side="left")
    fp = negative.size - np.searchsorted(np.sort(negative), cuts, side="left")
    slack = 1 - _cp_upper(fn, positive.size, alpha / 2) - delta
    fpr_high = _cp_upper(fp, negative.size, alpha / 2)
    usable = slack > 0
    if not np.any(usable):
        return 0.0
    return max(0.0, float(np.max(np.log(slack[usable]) - np.log(fpr_high[usable]))))


def best_threshold_bound(
    scores_in: Sequence[float], scores_out: Sequence[float], delta: float, alpha: float = 0.05
) -> float:
    """The best two-world eps_LB over every score threshold, Bonferroni-corrected.

    Tries each cut between distinct scores as "in above" and as "in below" (so the score's
    sign need not be known), each for both directions of the DP inequality (in-world or
    out-world as the first dataset): 4 rules per cut, alpha / (4 * cuts) each."""
    s_in, s_out = scores_array("scores_in", scores_in), scores_array("scores_out", scores_out)
    check_delta(delta)
    check_level("alpha", alpha)
    cuts = np.unique(np.concatenate([s_in, s_out])).size - 1
    if cuts == 0:
        return 0.0
    each = alpha / (4 * cuts)
    orientations = [(s_in, s_out), (-s_in, -s_out), (s_out, s_in), (-s_out, -s_in)]
    return max(_best_cut(pos, neg, delta, each) for pos, neg in orientations)
