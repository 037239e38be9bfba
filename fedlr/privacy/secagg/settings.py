"""A run's secure-aggregation settings and how finely they let a value be encoded so that a
round's sum never wraps: torch-free, so the settings check runs them before any work."""

from __future__ import annotations

from dataclasses import dataclass

from fedlr.errors import ConfigError

BITS = (32, 64)
MIN_LEVELS = 2**8


def levels(bits: int, clients: int) -> int:
    """L: a value in [-c, c] maps to an integer in [-L, L]; clients * L < 2^(bits - 1), so the
    sum of every client's part is exact modulo 2^bits."""
    return (2 ** (bits - 1) - 1) // max(clients, 1)


def check_budget(bits: int, clients: int, max_weight: int) -> None:
    """Refuse encodings that would wrap or leave too few levels per value."""
    if bits not in BITS:
        raise ConfigError(f"secagg_bits must be one of {BITS}, got {bits}")
    if not isinstance(max_weight, int) or max_weight < 1:
        raise ConfigError(f"secagg_max_weight must be a positive integer, got {max_weight!r}")
    room = levels(bits, clients)
    if room < MIN_LEVELS:
        raise ConfigError(f"{clients} clients leave {room} levels per value in {bits} bits; "
                          "use secagg_bits 64")
    if max_weight > room:
        raise ConfigError(f"secagg_max_weight {max_weight} exceeds the {room} levels that "
                          f"{clients} clients leave in {bits} bits; lower it or use 64 bits")


@dataclass(frozen=True)
class SecAggSettings:
    """The `secagg_*` settings of a run (see `fedlr.settings.schema` for their meaning)."""

    neighbours: int = 0
    threshold: float = 0.5
    value_range: float = 1.0
    max_weight: int = 1000
    bits: int = 32
