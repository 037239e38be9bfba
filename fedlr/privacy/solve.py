"""The one noise solve both privacy levels plan with: the smallest noise multiplier whose
epsilon meets a target, for any accountant given as a function of the noise."""

from __future__ import annotations

import math
from collections.abc import Callable

MAX_NOISE = 1000.0  # a noise multiplier beyond this leaves nothing to learn; plans stop here
MIN_NOISE = 1e-4
REL_TOL = 1e-3  # the solved noise is within this factor of the smallest one


class Unreachable(Exception):
    """No noise up to MAX_NOISE meets the target; `epsilon` is the value at MAX_NOISE."""

    def __init__(self, epsilon: float) -> None:
        super().__init__(epsilon)
        self.epsilon = epsilon


def smallest_noise(
    epsilon: Callable[[float], float],
    target: float,
    start: float = 1.0,
    rel_tol: float = REL_TOL,
    factor: float = 2.0,
) -> float:
    """The smallest noise z in [MIN_NOISE, MAX_NOISE], to a factor 1 + rel_tol, with
    epsilon(z) <= target, for an epsilon that does not increase with z.

    The result z always meets the target, and z / (1 + rel_tol) does not (unless z is MIN_NOISE).
    A bracket [lo, hi] with epsilon(lo) > target >= epsilon(hi) is found by steps of `factor`
    from `start`, then shrunk by secant steps on (log z, log epsilon) through the two points
    nearest the target, each guess probed just above and below; a geometric bisection step
    follows two secant steps in a row that fail to halve the bracket's log-width.
    """
    seen: list[tuple[float, float]] = []

    def evaluate(z: float) -> float:
        e = epsilon(z)
        seen.append((z, e))
        return e

    hi = min(max(start, MIN_NOISE), MAX_NOISE)
    e_hi = evaluate(hi)
    lo, e_lo = hi, e_hi
    while e_hi > target:
        if hi >= MAX_NOISE:
            raise Unreachable(e_hi)
        lo, e_lo = hi, e_hi
        hi = min(factor * hi, MAX_NOISE)
        e_hi = evaluate(hi)
    while e_lo <= target:
        if lo <= MIN_NOISE:
            return MIN_NOISE
        hi, e_hi = lo, e_lo
        lo = max(lo / factor, MIN_NOISE)
        e_lo = evaluate(lo)

    def probe(z: float) -> bool:
        """Evaluate z inside the bracket and move one end; True when z meets the target."""
        nonlocal lo, hi
        if evaluate(z) <= target:
            hi = z
            return True
        lo = z
        return False

    stalls = 0
    while hi > lo * (1 + rel_tol):
        width = math.log(hi / lo)
        guess = _secant_guess(seen, target) if stalls < 2 else None
        if guess is None or not lo < guess < hi:
            probe(math.sqrt(lo * hi))
            stalls = 0
            continue
        above, below = guess * (1 + rel_tol) ** 0.45, guess * (1 + rel_tol) ** -0.45
        if not (lo < above < hi and not probe(above)) and lo < below < hi:
            probe(below)  # the guess met the target (or sat at hi): try just under it
        stalls = stalls + 1 if math.log(hi / lo) > width / 2 else 0
    return hi


def _secant_guess(seen: list[tuple[float, float]], target: float) -> float | None:
    """Where the line through the two points nearest the target on (log z, log epsilon) meets
    the target, or None when they do not define one."""
    usable = [(z, e) for z, e in seen if z > 0 and 0 < e < math.inf]
    usable.sort(key=lambda p: abs(math.log(p[1] / target)))
    if len(usable) < 2:
        return None
    (z1, e1), (z2, e2) = usable[:2]
    if z1 == z2 or e1 == e2:
        return None
    slope = math.log(z2 / z1) / math.log(e2 / e1)
    log_guess = math.log(z1) + math.log(target / e1) * slope
    return math.exp(log_guess) if abs(log_guess) < 700 else None  # beyond: no overflow, bisect
