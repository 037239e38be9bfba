"""Per-client privacy accounting for sample-level DP-SGD, and its cross-check.

Each client keeps a ledger of the DP-SGD steps it actually ran, as (noise multiplier, sample
rate, steps) segments, which is exactly Opacus's accountant history. The ledger persists between
rounds (it is what a client would otherwise lose by rebuilding its PrivacyEngine), its epsilon is
Opacus's (PRV or RDP), and dp-accounting's PLD and RDP accountants give an independent value for
the same history. No amplification from client sampling is claimed.

Every random draw the guarantee relies on (Poisson batch sampling, the Gaussian noise) comes from
`private_generator`: OS entropy on the client, never a seed the server sends or a run records.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import secrets
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import torch

from fedlr.errors import ConfigError, FedlrError
from fedlr.privacy.accountants import accountant_names
from fedlr.privacy.epsilon_cache import cached
from fedlr.privacy.solve import MAX_NOISE, Unreachable, smallest_noise

Segment = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


class BudgetExhaustedError(FedlrError):
    """A client's next round would take its epsilon past its maximum; it refuses to train."""


def private_generator(device: torch.device | str = "cpu", seed: int | None = None
                      ) -> torch.Generator:
    """A torch generator for a draw that a DP guarantee relies on, seeded with 63 bits of OS
    entropy (`secrets`), so that nobody else (the server, a reader of the run directory) can
    replay it. `seed` is for tests only: no run passes one."""
    generator = torch.Generator(device=device)
    return generator.manual_seed(secrets.randbits(63) if seed is None else seed)


def opacus_epsilon(history: Sequence[Segment], delta: float, accountant: str = "prv") -> float:
    """Epsilon of a DP-SGD history by Opacus's accountant (`prv` or `rdp`), computed once per
    machine (`fedlr.privacy.epsilon_cache`). Neighbouring segments of one mechanism are merged
    first, so a budget check's history and the ledger's after the round are one key."""
    merged = tuple((float(s), float(q), int(n)) for (s, q), n in _steps_by_mechanism(history))
    if not merged:
        return 0.0
    if any(s == 0 for s, _, _ in merged):
        return math.inf  # a noiseless step releases its gradients as they are
    return _cached_opacus_epsilon(merged, float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _cached_opacus_epsilon(history: tuple[Segment, ...], delta: float, accountant: str
                           ) -> float:
    """The in-process memo in front of the machine's cache; the key holds every float exactly
    (`repr`) and Opacus's version, so an upgrade computes afresh."""
    key = json.dumps({"accountant": f"opacus {accountant}", "version": version("opacus"),
                      "delta": repr(delta), "history": [[repr(s), repr(q), n]
                                                        for s, q, n in history]})
    return cached(key, lambda: _opacus_epsilon(history, delta, accountant))


def _opacus_epsilon(history: Sequence[Segment], delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    with _quiet_rdp_orders():
        return float(acc.get_epsilon(delta))


@contextlib.contextmanager
def _quiet_rdp_orders() -> Iterator[None]:
    """Opacus warns when the best RDP order is at the end of its grid, also inside PRV's domain
    bound where it does not matter; the cross-checks against dp-accounting catch a loose value."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        yield


def dp_accounting_epsilon(history: Sequence[Segment], delta: float, method: str = "pld") -> float:
    """The same history by dp-accounting (Google's library): PLD or RDP."""
    import dp_accounting
    from dp_accounting import pld, rdp

    if not history:
        return 0.0
    if any(s == 0 for s, _, _ in history):
        return math.inf
    event = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n
            )
            for s, q, n in history
        ]
    )
    if method == "pld":
        acc: Any = pld.PLDAccountant()
    elif method == "rdp":
        acc = rdp.RdpAccountant()
    else:
        raise ConfigError(f"unknown dp-accounting method {method!r}; use pld or rdp")
    acc.compose(event)
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def noise_for_target(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv"
) -> float:
    """The smallest noise multiplier (to a factor 1 + REL_TOL) whose `steps` reach at most the
    target epsilon, by `fedlr.privacy.solve.smallest_noise`, the solve both levels plan with.

    RDP is solved first: it is cheap and never below PRV, so an RDP failure means the target is
    out of reach, and its noise starts PRV's search from above, where PRV is fast."""

    def epsilon(name: str):
        return lambda z: opacus_epsilon([(z, sample_rate, steps)], delta, name)

    try:
        with _quiet_rdp_orders():
            sigma = smallest_noise(epsilon("rdp"), target_epsilon)
            if accountant == "rdp":
                return sigma
            return smallest_noise(epsilon(accountant), target_epsilon, start=sigma)
    except Unreachable as exc:
        raise ConfigError(
            f"no noise multiplier up to {MAX_NOISE:g} reaches epsilon {target_epsilon} at delta "
            f"{delta} over {steps} steps with sample rate {sample_rate:.4g} (it gives "
            f"{exc.epsilon:.4g}); raise the target or train less"
        ) from None


# The accountant's time grows with a history's distinct mechanisms (PRV: about 2 s for 10, 9 s
# for 100, a minute for 300), and whoever sends a ledger chooses how many it holds: a node's own
# ledger merges the steps of one (noise, sample rate), so it holds one per run setting it
# trained with. A ledger with more is refused wherever it is read (node and server alike).
MAX_MECHANISMS = 64


@dataclass
class PrivacyLedger:
    """One client's DP-SGD history; persists across rounds so its epsilon accumulates.

    `non_poisson_steps` counts steps whose batches were not Poisson-sampled: the accountant
    assumes Poisson sampling, so for those the epsilon is not a guarantee (never in a real run)."""

    accountant: str = "prv"
    history: list[Segment] = field(default_factory=list)
    rounds: int = 0
    non_poisson_steps: int = 0

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    @property
    def sampling(self) -> str:
        if not self.non_poisson_steps:
            return "poisson"
        return f"not Poisson for {self.non_poisson_steps} of {self.steps} steps"

    def epsilon(self, delta: float) -> float:
        return opacus_epsilon(self.history, delta, self.accountant)

    def epsilon_after(self, segment: Segment, delta: float) -> float:
        return opacus_epsilon([*self.history, segment], delta, self.accountant)

    def check_budget(self, segment: Segment, delta: float, budget: float | None, who: str) -> None:
        """Refuse a round whose steps would take epsilon past `budget`."""
        if budget is None:
            return
        after = self.epsilon_after(segment, delta)
        if after > budget * (1 + 1e-9):
            raise BudgetExhaustedError(
                f"client {who}: another round of {segment[2]} steps would take its epsilon from "
                f"{self.epsilon(delta):.3f} to {after:.3f}, past its budget {budget:g} "
                f"(delta {delta:g}); it stops training"
            )

    def record(self, segment: Segment, poisson: bool = True) -> None:
        sigma, q, n = segment
        if n <= 0:
            return
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + n)
        else:
            self.history.append((sigma, q, n))
        self.rounds += 1
        if not poisson:
            self.non_poisson_steps += n

    def extends(self, other: PrivacyLedger) -> bool:
        """Whether this history is `other`'s, possibly followed by more steps."""
        mine, theirs = _steps_by_mechanism(self.history), _steps_by_mechanism(other.history)
        if not theirs:
            return True
        last = len(theirs) - 1
        if len(mine) <= last or mine[:last] != theirs[:last]:
            return False
        return mine[last][0] == theirs[last][0] and mine[last][1] >= theirs[last][1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant,
            "history": [list(s) for s in self.history],
            "rounds": self.rounds,
            "non_poisson_steps": self.non_poisson_steps,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyLedger:
        """A ledger from JSON; anything malformed is a ConfigError (never a silent reset)."""
        try:
            history = [(float(s), float(q), int(n)) for s, q, n in data.get("history", [])]
            ledger = cls(accountant=str(data.get("accountant", "prv")), history=history,
                         rounds=int(data.get("rounds", 0)),
                         non_poisson_steps=int(data.get("non_poisson_steps", 0)))
        except (AttributeError, TypeError, ValueError) as exc:
            raise ConfigError(f"privacy ledger is malformed ({exc}); it cannot be trusted"
                              ) from None
        if any(not (math.isfinite(s) and s >= 0 and 0 < q <= 1 and n > 0) for s, q, n in history):
            raise ConfigError("privacy ledger has an invalid segment; it cannot be trusted")
        if ledger.rounds < 0 or not 0 <= ledger.non_poisson_steps <= ledger.steps:
            raise ConfigError("privacy ledger has impossible counts; it cannot be trusted")
        if ledger.accountant not in accountant_names("sample"):
            raise ConfigError(f"privacy ledger names accountant {ledger.accountant[:40]!r}, not "
                              f"one of {accountant_names('sample')}; it cannot be trusted")
        if len(_steps_by_mechanism(history)) > MAX_MECHANISMS:
            raise ConfigError(f"privacy ledger has more than {MAX_MECHANISMS} (noise, sample rate) "
                              "mechanisms, more than any run records; it cannot be trusted")
        return ledger


def _steps_by_mechanism(history: Sequence[Segment]) -> list[tuple[tuple[float, float], int]]:
    """The history with neighbouring segments of one mechanism merged, so that two ledgers that
    recorded the same steps in different round sizes compare equal."""
    merged: list[tuple[tuple[float, float], int]] = []
    for sigma, q, n in history:
        if merged and merged[-1][0] == (sigma, q):
            merged[-1] = ((sigma, q), merged[-1][1] + n)
        else:
            merged.append(((sigma, q), n))
    return merged
