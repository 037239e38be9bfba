"""`fedlr inspect` and `fedlr predict`: look at an adapter, use an exported one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedlr.cli.common import app, console
from fedlr.errors import FedlrError


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A fedlr adapter file or a PEFT adapter directory.")],
) -> None:
    """Show an adapter's modules, ranks, scalings, ||dW|| and metadata."""
    from fedlr.adapters import load_adapter

    adapter = load_adapter(path)
    table = Table(title=str(path))
    for col in ("module", "kind", "rank", "scaling", "||dW||_F"):
        table.add_column(col)
    deltas = adapter.delta_weights()
    for name in sorted(deltas):
        f = adapter.lora.get(name)
        kind = "lora" + ("+base" if name in adapter.base else "") if f else "base"
        table.add_row(
            name,
            kind,
            str(f.rank) if f else "-",
            f"{f.scaling:g}" if f else "-",
            f"{float(deltas[name].norm()):.4g}",
        )
    console.print(table)
    for name, t in sorted(adapter.extras.items()):
        console.print(f"extra {name}: {tuple(t.shape)}")
    if adapter.meta:
        console.print(f"meta: {adapter.meta}")


@app.command()
def predict(
    adapter: Annotated[Path, typer.Argument(help="A run's adapter/ folder.")],
    texts: Annotated[
        list[str] | None, typer.Argument(help="Texts to classify or continue.")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="One text per line.")] = None,
    top: Annotated[int, typer.Option(min=1, help="Classes shown per text.")] = 3,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Causal LM: tokens to add.")] = 32,
) -> None:
    """Label names with scores for each text (or a continuation, for a causal LM), from the
    base and the exported adapter."""
    given = list(texts or [])
    if file is not None:
        if not file.is_file():
            raise FedlrError(f"--file not found: {file}")
        given += [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not given:
        raise FedlrError("no text to predict: give texts as arguments or --file FILE")
    if not adapter.is_dir():
        raise FedlrError(f"{adapter} is not a directory; give a run's adapter/ folder")
    from fedlr.predict import classify, generate, load_exported

    exported = load_exported(adapter)
    table = Table(title=f"{adapter} on {exported.spec.name}")
    table.add_column("text", overflow="fold", max_width=60)
    if exported.spec.task == "classification":
        widest = max((len(name) for name in exported.labels), default=10)
        table.add_column("prediction", no_wrap=True, min_width=widest)  # a label stays whole
        table.add_column("score", justify="right")
        table.add_column("next", overflow="fold")
        for text, ranked in zip(given, classify(exported, given, top), strict=True):
            label, score = ranked[0]
            rest = ", ".join(f"{name} {p:.3f}" for name, p in ranked[1:])
            table.add_row(text, label, f"{score:.3f}", rest)
    else:
        table.add_column("continuation", overflow="fold")
        for text, more in zip(given, generate(exported, given, max_new_tokens), strict=True):
            table.add_row(text, more)
    console.print(table)
