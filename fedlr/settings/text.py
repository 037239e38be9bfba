"""Settings as text, for the front ends that carry only scalars (the command line, Flower's run
config): each setting's default as it is shown, and a typed value read back from text. Lists
travel comma-separated; "" (or "none") is unset."""

from __future__ import annotations

from dataclasses import MISSING, Field, fields
from typing import Any

from fedlr.errors import ConfigError
from fedlr.settings.schema import SimulationConfig

SCALARS = {"int": int, "float": float, "str": str, "bool": bool}
SETTINGS = {f.name: f for f in fields(SimulationConfig)}


def default_of(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]


def shown(value: Any) -> str:
    """A default as --help shows it."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "unset" if value is None else str(value)


def kind_of(f: Field) -> tuple[type, bool]:
    """The setting's scalar type (a list's item type) and whether it is a list."""
    base = str(f.type).replace(" | None", "")
    if base.startswith("list["):
        return SCALARS[base[5:-1]], True
    return SCALARS[base], False


def from_text(f: Field, value: Any, spelled: str | None = None) -> Any:
    """A setting's value from a front end: comma-separated text becomes a list, "" or "none"
    is unset where the setting may be; other values pass through for the schema to check.
    `spelled`: how the user named the setting, for the error."""
    optional = f.default is None
    if isinstance(value, str) and value.strip().lower() in ("", "none") and optional:
        return None
    kind, is_list = kind_of(f)
    if not is_list or not isinstance(value, str):
        return value
    try:
        return [kind(x.strip()) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{spelled or f.name} must be comma-separated {kind.__name__} values, "
                          f"got {value!r}") from None
