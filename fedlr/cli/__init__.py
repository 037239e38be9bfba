"""The `fedlr` command line. Errors a user can fix print as one line (exit 2), never a traceback.

The CLI is the one part of `fedlr` that may import `fedlr.client` and `fedlr.server`, and only
inside a command, so that arguments are checked before any heavy import.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import warnings
from typing import Annotated, NoReturn

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


def entry() -> NoReturn:
    """The `fedlr` command: `main`, then out of the process without tearing the interpreter
    down object by object, which after a run (the model, torch, transformers, Ray's client)
    takes about 2 s and keeps nothing: every file is closed by then. What a normal exit does
    that matters still happens, in its order: other threads are waited for, the exit handlers
    run (logs flushed, temporary folders removed), standard output and error are flushed."""
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exit_status(exc.code)
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def exit_status(code: object) -> int:
    """What `sys.exit(code)` exits with; a message is printed to stderr, as Python does."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1
