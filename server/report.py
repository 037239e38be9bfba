"""What a person looks at after a run: a table of rounds and a PNG of accuracy, loss and epsilon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table


def summary_table(records: list[dict[str, Any]], title: str) -> Table:
    """One row per round, narrow enough for an 80-column terminal."""
    quality = "acc" if "eval_accuracy" in records[0] else "ppl"
    dp = any("epsilon_max" in r for r in records)
    client_dp = any("client_epsilon" in r for r in records)
    table = Table(title=title, box=box.SIMPLE_HEAD)
    columns = ["round", "ok/sent", "train", "eval", quality, *(["eps"] if dp else []),
               *(["client eps"] if client_dp else []), "residual", "MB up", "MB dn", "s"]
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for r in records:
        row = [
            str(r["round"]), f"{r['num_accepted']}/{r['num_clients']}",
            _num(r["train_loss"]), _num(r["eval_loss"]),
            _num(r.get("eval_accuracy", r.get("eval_perplexity"))),
            *([_num(r.get("epsilon_max"))] if dp else []),
            *([_num(r.get("client_epsilon"))] if client_dp else []),
            "exact" if r.get("aggregation_exact") else _sci(r["aggregation_residual"]),
            f"{r['bytes_up'] / 2**20:.2f}",
            f"{r['bytes_down'] / 2**20:.2f}", f"{r['seconds']:.0f}",
        ]
        table.add_row(*row)
    return table


def evaluated(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """The rounds that have a held-out value, and the values: with `eval_every` above 1 the
    others hold None, and the curve to draw runs through the evaluated rounds alone."""
    kept = [r for r in records if r.get(key) is not None]
    return [r["round"] for r in kept], [r[key] for r in kept]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def evaluation_note(evaluation: dict[str, Any]) -> str:
    """What the held-out numbers cover, in one line under the table."""
    note = (f"held-out metrics on {evaluation['examples']} of {evaluation['heldout_examples']} "
            "examples")
    if "classes" in evaluation:
        note += (f", {evaluation['classes_evaluated']} of {evaluation['classes']} classes "
                 f"(stratified); always guessing the most frequent class scores "
                 f"{evaluation['chance_accuracy']:.3f}")
    quality = evaluation.get("round_0", {})
    if "accuracy" in quality:
        note += f"; before training {quality['accuracy']:.3f}"
    return note


def plot(records: list[dict[str, Any]], path: Path, title: str,
         evaluation: dict[str, Any] | None = None) -> None:
    """Held-out quality, losses and epsilon per round; with `evaluation` (run.json) the
    untrained adapter as round 0 and the chance level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    evaluation = evaluation or {}
    start = evaluation.get("round_0")
    rounds = [r["round"] for r in records]
    panels = [("eval_accuracy", "held-out accuracy"), ("eval_perplexity", "held-out perplexity")]
    quality = next(((k, label) for k, label in panels if k in records[0]), None)
    shown = [quality] if quality else []
    shown.append(("loss", "loss"))
    if any("epsilon_max" in r for r in records):
        shown.append(("epsilon_max", "max client epsilon (sample level)"))
    if any("client_epsilon" in r for r in records):
        shown.append(("client_epsilon", "epsilon (client level)"))
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], shown, strict=True):
        if key == "loss":
            before = [0] if start else []
            xs, ys = evaluated(records, "eval_loss")
            ax.plot(before + xs, ([start["loss"]] if start else []) + ys, marker="o",
                    label="held-out")
            ax.plot(rounds, [r["train_loss"] for r in records], marker="s", label="train (clients)")
            ax.legend()
        elif key in ("eval_accuracy", "eval_perplexity"):
            metric = key.removeprefix("eval_")
            before = [0] if start and metric in start else []
            xs, ys = evaluated(records, key)
            ax.plot(before + xs, ([start[metric]] if before else []) + ys, marker="o",
                    label="global adapter")
            if key == "eval_accuracy" and "chance_accuracy" in evaluation:
                ax.axhline(evaluation["chance_accuracy"], color="grey", linestyle="--",
                           label="most frequent class")
                ax.legend()
        else:
            ax.plot(rounds, [r.get(key) for r in records], marker="o")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
