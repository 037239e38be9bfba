"""What every `fedlr` command shares: the Typer app, the console, list parsing."""

from __future__ import annotations

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
