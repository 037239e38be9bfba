"""Sizing a private run before it starts: noise for a target epsilon, or epsilon for a noise.

Two privacy units, each in both directions:

- Sample level (DP-SGD on every client, `fedlr.privacy.sample_level`): one training example of
  one client. A client that trains in every round runs `rounds * local_steps` Poisson-sampled
  steps at sample rate q = batch / examples. Forward: Opacus's epsilon (PRV or RDP) for a noise
  multiplier sigma. Reverse: `noise_for_target`, the very solver a client runs when it is given
  a target epsilon, so the plan predicts the sigma the run will use. dp-accounting's PLD and RDP
  accountants give the same history a second opinion. No amplification from client sampling.
- Client level (DP-FedAvg, `fedlr.privacy.client_level`): one client's whole contribution.
  Forward: `client_level_epsilon` for a client noise multiplier z. Reverse: the smallest z (a
  bracketing search, `smallest_noise`, to a factor 1 + `REL_TOL`) whose epsilon is at most the
  target; never above it. dp-accounting's other accountant and Opacus's PRV cross-check Poisson
  sampling.

The planners are in `fedlr.privacy.planners`, the noise solve in `fedlr.privacy.solve`; this
module holds the plan and its checks. Accounting is never done here: every epsilon comes from
`fedlr.privacy.sample_level` or `fedlr.privacy.client_level`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from fedlr.errors import ConfigError

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
        rows.append((f"epsilon ({self.accountant})", format_epsilon(self.epsilon)))
        for check, value in self.cross_checks.items():
            rows.append((f"cross-check ({check})", format_epsilon(value)))
        if self.cross_checks:
            lo, hi = self.spread
            spread = f"{format_epsilon(lo)} to {format_epsilon(hi)}"
            rows.append(("spread over accountants", spread))
        rows.extend(("note", note) for note in self.notes)
        return rows

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["notes"] = list(self.notes)
        return data


def solved_plan(delta: float, rounds: int, target_epsilon: float | None, noise: float,
                epsilon: float, accountant: str, cross_checks: dict[str, float]
                ) -> dict[str, Any]:
    """The fields every plan has, whichever level: what was asked, the noise, the epsilon."""
    return {
        "delta": float(delta),
        "rounds": rounds,
        "target_epsilon": None if target_epsilon is None else float(target_epsilon),
        "noise_multiplier": float(noise),
        "solved": target_epsilon is not None,
        "epsilon": float(epsilon),
        "accountant": accountant,
        "cross_checks": cross_checks,
    }


def solving_accountant(accountant: str, target_epsilon: float | None, notes: list[str],
                       why: str) -> str:
    """The accountant that solves for a target, at either level: RDP where the target is above
    PRV_CEILING (the tight one, PRV or PLD, is no use there: `why`), else the chosen one."""
    if target_epsilon is not None and accountant != "rdp" and target_epsilon > PRV_CEILING:
        notes.append(f"target above {PRV_CEILING:g}: solved by RDP ({why}, and no meaningful "
                     "guarantee remains)")
        return "rdp"
    return accountant


def reported_epsilon(noise: float, accountant: str, rdp_epsilon: float,
                     tight: Callable[[], float], *, solved: bool, notes: list[str],
                     no_noise: str, skipped: str) -> tuple[float, str]:
    """The epsilon a plan reports, and by which accountant, at either level: none without noise;
    RDP's upper bound where a given noise puts epsilon above PRV_CEILING (the tight accountant,
    PRV or PLD, would take minutes or exhaust memory there and say nothing; a noise solved by it
    was evaluated by it, and its value stands); else the chosen accountant's."""
    if noise == 0:
        notes.append(no_noise)
        return math.inf, accountant
    if accountant != "rdp" and not solved and rdp_epsilon > PRV_CEILING:
        notes.append(f"epsilon above {PRV_CEILING:g}: {skipped}")
        return rdp_epsilon, "rdp"
    return (rdp_epsilon if accountant == "rdp" else tight()), accountant


@contextlib.contextmanager
def quiet_absl() -> Iterator[None]:
    """dp-accounting's RDP logs each order it drops ("failed to converge"): the bound stays valid,
    only looser, and a plan evaluates many noise levels; keep its errors, drop the chatter."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def format_epsilon(value: float) -> str:
    return "inf (no guarantee)" if math.isinf(value) else f"{value:.4f}"


# -- validation -------------------------------------------------------------------------------


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_one_of(target_epsilon: float | None, noise_multiplier: float | None, noise: str) -> None:
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


def check_delta(delta: float) -> None:
    if not (isinstance(delta, int | float) and 0 < delta < 1):
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")


def sample_rate_of(
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
    check_count("batch size", batch_size)
    check_count("examples per client", examples)
    if batch_size >= examples:
        return 1.0, [
            f"batch {batch_size} >= {examples} examples: q = 1, every step sees every example "
            "(no amplification by sampling)"
        ]
    return batch_size / examples, []
