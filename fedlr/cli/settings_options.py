"""`fedlr simulate`'s options, derived from the settings schema (`fedlr.settings.schema`): one
option per setting, with its help, its default and its section, and nothing to keep in step."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import Field, fields
from pathlib import Path
from typing import Annotated, Any

import typer

from fedlr.errors import FedlrError
from fedlr.settings.schema import SECTIONS, SimulationConfig
from fedlr.settings.text import default_of, from_text, kind_of, shown


def flags_of(f: Field) -> list[str]:
    primary = "--" + f.name.replace("_", "-")
    if kind_of(f) == (bool, False):
        return [f"{primary}/--no-{f.name.replace('_', '-')}"]
    return [primary, *f.metadata["flags"]]


def parameter(f: Field) -> inspect.Parameter:
    kind, is_list = kind_of(f)
    kind = str if is_list else kind  # a list is typed as comma-separated text
    option = typer.Option(*flags_of(f), help=f.metadata["help"], show_default=shown(default_of(f)),
                          rich_help_panel=SECTIONS[f.metadata["section"]])
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind | None, option])  # type: ignore[valid-type]


def with_settings(command: Callable[..., None] | None = None, *, also: type | None = None,
                  resume: bool = True) -> Any:
    """`command(config, resume, settings, *more)` as a Typer command that takes every setting as
    an option (None when not given, so that a --config file can set it). `also`: a dataclass of
    the command's own settings, declared with `setting` like the schema's, passed as `more`;
    `resume`: whether it takes --resume (else `resume` is False)."""
    if command is None:
        return lambda command: with_settings(command, also=also, resume=resume)
    extra = [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=Annotated[Path | None, typer.Option(
                              "--config", help="TOML file with any of these settings.")]),
    ]
    if resume:
        extra.append(inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=False,
                                       annotation=Annotated[bool, typer.Option(
                                           help="Continue the run in --out.")]))
    schema, own = fields(SimulationConfig), fields(also) if also is not None else ()

    def run(config: Path | None = None, resume: bool = False, **given: Any) -> None:
        settings = {f.name: from_text(f, given[f.name], flags_of(f)[0]) for f in schema}
        more = [{f.name: from_text(f, given[f.name], flags_of(f)[0]) for f in own}] if own else []
        command(config, resume, settings, *more)

    parameters = extra + [parameter(f) for f in (*own, *schema)]
    run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    run.__doc__ = command.__doc__
    run.__name__ = command.__name__
    run.__annotations__ = {}
    return run


def as_flags(message: str, given: list[str]) -> str:
    """An error about settings, with each setting given on the command line named by its flag
    (names of several words only: a one-word name is the same word in prose)."""
    import re

    for name in (n for n in given if "_" in n):
        flag = "--" + name.replace("_", "-")
        message = re.sub(rf"(?<![-\w]){name}(?![-\w])", flag, message)
    return message


def check_resume(config: Path | None, resume: bool, settings: dict[str, Any]) -> None:
    if resume and settings.get("out") is None and config is None:
        raise FedlrError("--resume needs the --out of the run to continue")
