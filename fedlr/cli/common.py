"""What every `fedlr` command shares: the Typer app, the console, list parsing."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer
from rich.console import Console

from fedlr.errors import FedlrError

app = typer.Typer(
    help="Federated fine-tuning of language models with LoRA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def split_ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FedlrError(f"{what} must be comma-separated integers, got {text!r}") from None


def stop_on_signals(out: Path, how: str) -> None:
    """Ctrl-C (or SIGTERM) ends the process within seconds: every process it started (Flower's
    and Ray's) is killed, one line says `how` to continue (or that nothing was written, when
    `out` does not exist), and it exits with 130 (143). Every file of a run directory is written
    atomically, so continuing picks up from wherever it stopped."""
    import os
    import signal

    import psutil

    def stop(signum: int, frame: object) -> None:
        told = how if out.exists() else "nothing was written"
        Console(stderr=True).print(f"\ninterrupted: {told}", highlight=False, soft_wrap=True)
        quiet = os.open(os.devnull, os.O_WRONLY)  # Flower's threads would report the kills
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        children = psutil.Process().children(recursive=True)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(children, timeout=5)
        os._exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
