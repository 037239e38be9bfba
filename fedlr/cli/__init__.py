"""The `fedlr` command line. Errors a user can fix print as one line (exit 2), never a traceback.

The CLI is the one part of `fedlr` that may import `fedlr.client` and `fedlr.server`, and only
inside a command, so that arguments are checked before any heavy import.
"""

from __future__ import annotations

import sys
import warnings
from typing import Annotated

import typer
from rich.console import Console

from fedlr import __version__
from fedlr.cli import adapter, compare, deploy, privacy, run  # noqa: F401  (they register the commands)
from fedlr.cli.common import app, console
from fedlr.errors import FedlrError


def _version(value: bool) -> None:
    if value:
        console.print(f"fedlr {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Federated fine-tuning of language models with LoRA."""


def main() -> None:
    """Entry point: run the app, turning fedlr's own errors into one clear line."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' notices to developers
    try:
        app()
    except FedlrError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before a command installed its own handling
        Console(stderr=True).print("interrupted", highlight=False)
        sys.exit(130)
