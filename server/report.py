"""What a person looks at after a run: a table of rounds and a PNG of accuracy, loss and epsilon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table


def summary_table(records: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    columns = ["round", "clients", "rejected", "train loss", "eval loss", "accuracy / ppl",
               "residual", "MB up", "MB down", "s"]
    if any("epsilon_max" in r for r in records):
        columns.insert(6, "epsilon")
    for column in columns:
        table.add_column(column, justify="right")
    for r in records:
        quality = r.get("eval_accuracy", r.get("eval_perplexity"))
        row = [
            str(r["round"]), f"{len(r['accepted'])}/{r['num_clients']}", str(len(r["rejected"])),
            _num(r["train_loss"]), _num(r["eval_loss"]), _num(quality),
            f"{r['aggregation_residual']:.2e}", f"{r['bytes_up'] / 2**20:.2f}",
            f"{r['bytes_down'] / 2**20:.2f}", f"{r['seconds']:.1f}",
        ]
        if "epsilon" in columns:
            row.insert(6, _num(r.get("epsilon_max")))
        table.add_row(*row)
    return table


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in records]
    panels = [("eval_accuracy", "held-out accuracy"), ("eval_perplexity", "held-out perplexity")]
    quality = next(((k, label) for k, label in panels if k in records[0]), None)
    shown = [quality] if quality else []
    shown.append(("loss", "loss"))
    if any("epsilon_max" in r for r in records):
        shown.append(("epsilon_max", "max client epsilon"))
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], shown, strict=True):
        if key == "loss":
            ax.plot(rounds, [r["eval_loss"] for r in records], marker="o", label="held-out")
            ax.plot(rounds, [r["train_loss"] for r in records], marker="s", label="train (clients)")
            ax.legend()
        else:
            ax.plot(rounds, [r.get(key) for r in records], marker="o")
        ax.set_xlabel("round")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
