"""Sizing a private run before it starts: noise for a target epsilon, or epsilon for a noise.

Two privacy units, each in both directions:

- Sample level (DP-SGD on every client, `fedlr.privacy`): one training example of one client.
  A client that trains in every round runs `rounds * local_steps` Poisson-sampled steps at sample
  rate q = batch / examples. Forward: Opacus's epsilon (PRV or RDP) for a noise multiplier sigma.
  Reverse: `noise_for_target`, the very solver a client runs when it is given a target epsilon, so
  the plan predicts the sigma the run will use. dp-accounting's PLD and RDP accountants give the
  same history a second opinion. No amplification from client sampling is claimed.
- Client level (DP-FedAvg, `fedlr.client_dp`): one client's whole contribution. Forward:
  `client_level_epsilon` for a client noise multiplier z. Reverse: the smallest z (a bracketing
  search, `smallest_noise`, to a factor 1 + `REL_TOL`) whose epsilon is at most the target; never
  above it. dp-accounting's other accountant and Opacus's PRV cross-check Poisson sampling.

Accounting is never done here: every epsilon comes from `fedlr.privacy` or `fedlr.client_dp`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from fedlr.config import ACCOUNTANTS as SAMPLE_ACCOUNTANTS
from fedlr.config import CLIENT_ACCOUNTANTS
from fedlr.config import SAMPLING_MODES as SAMPLINGS
from fedlr.errors import ConfigError

MAX_NOISE = 1000.0  # a noise multiplier beyond this leaves nothing to learn; plans stop here
MIN_NOISE = 1e-4
REL_TOL = 1e-3  # client-level reverse: the solved z is within this factor of the smallest one
# PRV and PLD run only where RDP's epsilon is at most this: above it they take minutes (PLD can
# exhaust memory) and no meaningful guarantee remains; RDP's value, an upper bound, stands there
PRV_CEILING = 100.0
SAMPLE_UNIT = "one training example of one client (each client accounts the steps it ran)"
SAMPLE_ADJACENCY = "add or remove one example (Poisson sampling of examples)"


@dataclass(frozen=True)
class PrivacyPlan:
    """One sized run: its inputs, the noise it uses (given or solved), its epsilon by the chosen
    accountant and the same plan by other accountants (`cross_checks`: name -> epsilon)."""

    level: str  # "sample" or "client"
    privacy_unit: str
    adjacency: str
    delta: float
    rounds: int
    target_epsilon: float | None
    noise_multiplier: float
    solved: bool  # True when the noise was solved from target_epsilon
    epsilon: float
    accountant: str  # e.g. "opacus prv", "dp-accounting rdp"
    cross_checks: dict[str, float]
    # sample level
    local_steps: int | None = None
    steps: int | None = None
    sample_rate: float | None = None
    batch_size: int | None = None
    examples_per_client: int | None = None
    # client level
    num_clients: int | None = None
    clients_per_round: int | None = None
    sampling: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def spread(self) -> tuple[float, float]:
        """The lowest and highest epsilon over the chosen accountant and its cross-checks."""
        values = [self.epsilon, *self.cross_checks.values()]
        return min(values), max(values)

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs for a two-column table."""
        rows = [
            ("privacy unit", self.privacy_unit),
            ("adjacency", self.adjacency),
            ("delta", f"{self.delta:g}"),
            ("rounds", str(self.rounds)),
        ]
        if self.level == "sample":
            rows.append(("local steps per round", str(self.local_steps)))
            rows.append(("DP-SGD steps per client", str(self.steps)))
            q = f"{self.sample_rate:.6g}"
            if self.batch_size is not None:
                q += f" (batch {self.batch_size} / {self.examples_per_client} examples)"
            rows.append(("sample rate q", q))
        else:
            rows.append(("clients", str(self.num_clients)))
            per_round = "expected, Poisson" if self.sampling == "poisson" else "fixed size"
            rows.append(("clients per round", f"{self.clients_per_round} ({per_round})"))
            assert self.num_clients is not None and self.clients_per_round is not None
            rate = self.clients_per_round / self.num_clients
            rows.append(("client sampling rate", f"{rate:.6g}"))
        if self.target_epsilon is not None:
            rows.append(("target epsilon", f"{self.target_epsilon:g}"))
        name = "noise multiplier sigma" if self.level == "sample" else "client noise multiplier z"
        how = "solved for the target" if self.solved else "given"
        rows.append((name, f"{self.noise_multiplier:.6g} ({how})"))
        rows.append((f"epsilon ({self.accountant})", _fmt_eps(self.epsilon)))
        for check, value in self.cross_checks.items():
            rows.append((f"cross-check ({check})", _fmt_eps(value)))
        if self.cross_checks:
            lo, hi = self.spread
            rows.append(("spread over accountants", f"{_fmt_eps(lo)} to {_fmt_eps(hi)}"))
        rows.extend(("note", note) for note in self.notes)
        return rows

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["notes"] = list(self.notes)
        return data


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting's RDP logs each order it drops ("failed to converge"): the bound stays valid,
    only looser, and a plan evaluates many noise levels; keep its errors, drop the chatter."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def _fmt_eps(value: float) -> str:
    return "inf (no guarantee)" if math.isinf(value) else f"{value:.4f}"


# -- validation -------------------------------------------------------------------------------


def _count(name: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _one_of(target_epsilon: float | None, noise_multiplier: float | None, noise: str) -> None:
    if (target_epsilon is None) == (noise_multiplier is None):
        got = "both" if target_epsilon is not None else "neither"
        raise ConfigError(
            f"a privacy plan needs exactly one of target epsilon (to solve the {noise}) or "
            f"{noise} (to compute epsilon); got {got}"
        )
    if target_epsilon is not None and not (
        isinstance(target_epsilon, int | float)
        and math.isfinite(target_epsilon)
        and target_epsilon > 0
    ):
        raise ConfigError(f"target epsilon must be a finite number > 0, got {target_epsilon!r}")
    if noise_multiplier is not None and not (
        isinstance(noise_multiplier, int | float)
        and math.isfinite(noise_multiplier)
        and noise_multiplier >= 0
    ):
        raise ConfigError(f"{noise} must be a finite number >= 0, got {noise_multiplier!r}")


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, int | float) and 0 < delta < 1):
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")


def _sample_rate(
    sample_rate: float | None, batch_size: int | None, examples: int | None
) -> tuple[float, list[str]]:
    """q, given directly or as batch / examples (capped at 1, as a client does)."""
    by_batch = batch_size is not None or examples is not None
    if (sample_rate is not None) == by_batch:
        raise ConfigError(
            "give the sample rate q, or batch size and examples per client (q = batch / examples)"
            + (", not both" if by_batch else "")
        )
    if sample_rate is not None:
        if isinstance(sample_rate, bool) or not (
            isinstance(sample_rate, int | float) and 0 < sample_rate <= 1
        ):
            raise ConfigError(f"sample rate q must be in (0, 1], got {sample_rate!r}")
        return float(sample_rate), []
    if batch_size is None or examples is None:
        raise ConfigError("q = batch / examples needs both batch size and examples per client")
    _count("batch size", batch_size)
    _count("examples per client", examples)
    if batch_size >= examples:
        return 1.0, [
            f"batch {batch_size} >= {examples} examples: q = 1, every step sees every example "
            "(no amplification by sampling)"
        ]
    return batch_size / examples, []


# -- sample level -----------------------------------------------------------------------------


@_quiet_absl()
def plan_sample_level(
    *,
    delta: float,
    rounds: int,
    local_steps: int,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    sample_rate: float | None = None,
    batch_size: int | None = None,
    examples_per_client: int | None = None,
    accountant: str = "prv",
    cross_check: bool = True,
) -> PrivacyPlan:
    """DP-SGD on each client for `rounds * local_steps` steps at sample rate q.

    Give exactly one of `target_epsilon` (the smallest sigma whose epsilon is at most the target,
    to Opacus's tolerance of 0.005 in epsilon: what a client solves itself) or `noise_multiplier`.
    Give q as `sample_rate`, or as `batch_size` and `examples_per_client`.
    """
    from fedlr.privacy import dp_accounting_epsilon, noise_for_target, opacus_epsilon

    _one_of(target_epsilon, noise_multiplier, "noise multiplier")
    _check_delta(delta)
    _count("rounds", rounds)
    _count("local steps", local_steps)
    q, notes = _sample_rate(sample_rate, batch_size, examples_per_client)
    if accountant not in SAMPLE_ACCOUNTANTS:
        raise ConfigError(
            f"unknown sample-level accountant {accountant!r}; choose one of {SAMPLE_ACCOUNTANTS}"
        )
    steps = rounds * local_steps

    def history(sigma: float) -> list[tuple[float, float, int]]:
        return [(sigma, q, steps)]

    if target_epsilon is not None and accountant == "prv" and target_epsilon > PRV_CEILING:
        accountant = "rdp"
        notes.append(
            f"target above {PRV_CEILING:g}: solved by RDP (PRV is slow there, and no meaningful "
            "guarantee remains)"
        )
    if target_epsilon is not None:
        # RDP is never below PRV: if RDP reaches the target at MAX_NOISE, PRV does too
        at_cap = opacus_epsilon(history(MAX_NOISE), delta, "rdp")
        if at_cap > target_epsilon and accountant == "prv":
            at_cap = opacus_epsilon(history(MAX_NOISE), delta, "prv")
        if at_cap > target_epsilon:
            raise ConfigError(
                f"target epsilon {target_epsilon:g} is out of reach: even noise multiplier "
                f"{MAX_NOISE:g} gives epsilon {at_cap:.4g} over {steps} steps at q={q:.4g} "
                f"(delta {delta:g}); plan fewer rounds or local steps, or a smaller q (smaller "
                "batches or more examples per client)"
            )
        sigma = noise_for_target(target_epsilon, delta, q, steps, accountant)
    else:
        assert noise_multiplier is not None
        sigma = float(noise_multiplier)

    used = accountant
    rdp_eps = opacus_epsilon(history(sigma), delta, "rdp")
    if sigma == 0:
        epsilon = math.inf
        notes.append("no noise: the gradients are released as they are, no guarantee")
    elif accountant == "prv" and target_epsilon is None and rdp_eps > PRV_CEILING:
        # PRV's domain grows with epsilon: above the ceiling it takes minutes and says nothing
        # (a sigma solved by PRV has already been evaluated by it: its value stands)
        epsilon, used = rdp_eps, "rdp"
        notes.append(
            f"epsilon above {PRV_CEILING:g}: PRV and PLD skipped (slow, and no meaningful "
            "guarantee remains); Opacus RDP, an upper bound, is shown"
        )
    elif accountant == "rdp":
        epsilon = rdp_eps
    else:
        epsilon = opacus_epsilon(history(sigma), delta, accountant)

    checks: dict[str, float] = {}
    if cross_check and sigma > 0:
        methods = ("pld", "rdp") if rdp_eps <= PRV_CEILING else ("rdp",)
        for method in methods:
            checks[f"dp-accounting {method}"] = dp_accounting_epsilon(history(sigma), delta, method)
    notes.append(
        "per client that trains in every round; a client that skips rounds spends less; no "
        "amplification from client sampling is claimed"
    )
    return PrivacyPlan(
        level="sample",
        privacy_unit=SAMPLE_UNIT,
        adjacency=SAMPLE_ADJACENCY,
        delta=float(delta),
        rounds=rounds,
        target_epsilon=None if target_epsilon is None else float(target_epsilon),
        noise_multiplier=float(sigma),
        solved=target_epsilon is not None,
        epsilon=float(epsilon),
        accountant=f"opacus {used}",
        cross_checks=checks,
        local_steps=local_steps,
        steps=steps,
        sample_rate=q,
        batch_size=batch_size,
        examples_per_client=examples_per_client,
        notes=tuple(notes),
    )


class _Unreachable(Exception):
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
            raise _Unreachable(e_hi)
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


@_quiet_absl()
def plan_client_level(
    *,
    delta: float,
    rounds: int,
    num_clients: int,
    clients_per_round: int,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    sampling: str = "poisson",
    accountant: str = "rdp",
    cross_check: bool = True,
) -> PrivacyPlan:
    """DP-FedAvg over `rounds` rounds, `clients_per_round` of `num_clients` sampled each round
    (expected number for Poisson, exact for fixed-size sampling without replacement).

    Give exactly one of `target_epsilon` (the smallest z, to a factor 1 + REL_TOL, whose epsilon
    is at most the target) or `noise_multiplier` z (noise std z S on the sum of clipped updates).
    """
    from fedlr.client_dp import ClientDPConfig, client_level_description, client_level_epsilon
    from fedlr.privacy import opacus_epsilon

    _one_of(target_epsilon, noise_multiplier, "client noise multiplier")
    _check_delta(delta)
    _count("rounds", rounds)
    _count("number of clients", num_clients)
    _count("clients per round", clients_per_round)
    if clients_per_round > num_clients:
        raise ConfigError(
            f"clients per round ({clients_per_round}) cannot exceed the number of clients "
            f"({num_clients})"
        )
    if sampling not in SAMPLINGS:
        raise ConfigError(f"unknown client sampling {sampling!r}; choose one of {SAMPLINGS}")
    if accountant not in CLIENT_ACCOUNTANTS:
        raise ConfigError(
            f"unknown client-level accountant {accountant!r}; choose one of {CLIENT_ACCOUNTANTS}"
        )

    def config(z: float, acc: str = accountant) -> ClientDPConfig:
        return ClientDPConfig(
            noise_multiplier=z, clip_norm=1.0, sampling=sampling, delta=delta, accountant=acc
        )

    cache: dict[tuple[float, str], float] = {}

    def eps(z: float, acc: str) -> float:
        if (z, acc) not in cache:
            cache[z, acc] = client_level_epsilon(
                config(z, acc), num_clients=num_clients, per_round=clients_per_round, rounds=rounds
            )
        return cache[z, acc]

    def eps_rdp(z: float) -> float:
        return eps(z, "rdp")

    def eps_pld(z: float) -> float:
        # PLD's discretisation runs out of memory at huge epsilon. It is only asked about targets
        # <= PRV_CEILING, which a z whose RDP epsilon (never below PLD's) is over twice that
        # misses by far: report that bound, and the search moves past the z
        bound = eps_rdp(z)
        return bound if bound > 2 * PRV_CEILING else eps(z, "pld")

    config(1.0).validate()  # pld with fixed-size sampling is refused here, with its fix
    description = client_level_description(config(1.0), num_clients, clients_per_round)
    q = clients_per_round / num_clients
    notes: list[str] = []
    used = accountant
    if target_epsilon is not None and accountant == "pld" and target_epsilon > PRV_CEILING:
        used = "rdp"
        notes.append(
            f"target above {PRV_CEILING:g}: solved by RDP (PLD runs out of memory there, and no "
            "meaningful guarantee remains)"
        )
    if target_epsilon is not None:
        try:
            # RDP is cheap and never below PLD: its z brackets PLD's from above
            z = smallest_noise(eps_rdp, target_epsilon)
            if used == "pld":
                z = smallest_noise(eps_pld, target_epsilon, start=z, factor=1.25)
        except _Unreachable as exc:
            fewer = "fewer clients per round or more clients" if q < 1 else "more clients"
            raise ConfigError(
                f"target epsilon {target_epsilon:g} is out of reach: even client noise "
                f"multiplier {MAX_NOISE:g} gives epsilon {exc.epsilon:.4g} over {rounds} rounds "
                f"with {clients_per_round} of {num_clients} clients per round (delta {delta:g}); "
                f"plan fewer rounds, or {fewer} (a smaller client sampling rate)"
            ) from None
        if z <= MIN_NOISE:
            notes.append(
                f"target epsilon {target_epsilon:g} is met by any noise >= {MIN_NOISE:g}: it "
                "protects next to nothing"
            )
    else:
        assert noise_multiplier is not None
        z = float(noise_multiplier)

    rdp_eps = eps_rdp(z)
    if z == 0:
        epsilon = math.inf
        notes.append("no noise: the clipped sum is released as it is, no guarantee")
    elif used == "pld" and target_epsilon is None and rdp_eps > PRV_CEILING:
        epsilon, used = rdp_eps, "rdp"
        notes.append(
            f"epsilon above {PRV_CEILING:g}: PLD skipped (it runs out of memory there, and no "
            "meaningful guarantee remains); RDP, an upper bound, is shown"
        )
    else:
        epsilon = eps(z, used)  # a z solved by PLD has been evaluated by it: cached

    checks: dict[str, float] = {}
    if cross_check and z > 0 and sampling == "poisson":
        if used != "rdp":
            checks["dp-accounting rdp"] = rdp_eps
        if rdp_eps <= PRV_CEILING:
            if used != "pld":
                checks["dp-accounting pld"] = eps(z, "pld")
            checks["opacus prv"] = opacus_epsilon([(z, q, rounds)], delta, "prv")
        else:
            notes.append(f"epsilon above {PRV_CEILING:g}: PLD and PRV cross-checks skipped")
    elif cross_check and z > 0:
        notes.append(
            "no cross-check: only dp-accounting's RDP accounts fixed-size sampling without "
            "replacement (replace-one adjacency); sample Poisson to compare accountants"
        )
    if sampling == "fixed":
        notes.append("sensitivity 2 S under replace-one adjacency; z is relative to S")
    notes.append(
        "covers what the server releases; example counts, client metrics and the list of "
        "sampled clients are outside the guarantee"
    )
    return PrivacyPlan(
        level="client",
        privacy_unit=description["privacy_unit"],
        adjacency=description["adjacency"],
        delta=float(delta),
        rounds=rounds,
        target_epsilon=None if target_epsilon is None else float(target_epsilon),
        noise_multiplier=float(z),
        solved=target_epsilon is not None,
        epsilon=float(epsilon),
        accountant=f"dp-accounting {used}",
        cross_checks=checks,
        num_clients=num_clients,
        clients_per_round=clients_per_round,
        sampling=sampling,
        notes=tuple(notes),
    )
