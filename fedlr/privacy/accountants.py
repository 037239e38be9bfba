"""Every accountant fedlr accounts with, keyed by privacy level and method: the one registry
the settings, the planners and the audit check names against (no torch import, so settings are
checked before any heavy import)."""

from __future__ import annotations

from fedlr.errors import ConfigError

ACCOUNTANTS: dict[str, dict[str, str]] = {
    "sample": {  # DP-SGD on each client: Opacus's accountants over the client's ledger
        "prv": "Opacus PRV (Gopi et al. 2021), numerically tight",
        "rdp": "Opacus RDP (Mironov 2017), an upper bound",
    },
    "client": {  # DP-FedAvg on the server: dp-accounting's accountants
        "rdp": "dp-accounting RDP, an upper bound",
        "pld": "dp-accounting PLD (privacy loss distributions), numerically tight",
    },
}
SAMPLING_MODES = ("poisson", "fixed")  # how the server samples clients under client-level DP


def accountant_names(level: str) -> tuple[str, ...]:
    return tuple(ACCOUNTANTS[level])


def check_accountant(level: str, name: str) -> None:
    """Refuse an accountant the level does not have, naming the ones it has."""
    if name not in ACCOUNTANTS[level]:
        raise ConfigError(
            f"unknown {level}-level accountant {name!r}; choose one of {accountant_names(level)}"
        )
