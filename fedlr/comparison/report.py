"""What a person looks at after a comparison: compare.md (a table per privacy level, with the
spread over seeds) and compare.png (held-out quality per round, one panel per level)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MB = 2**20


def _pm(cell: dict[str, Any], key: str, scale: float = 1.0, digits: int = 3,
        style: str = "f") -> str:
    """Mean ± standard deviation over seeds (the mean alone for one seed); `style` "e" for
    values that span decades, such as residuals."""
    s = cell[key]
    if s["mean"] is None:
        return "-"
    text = f"{s['mean'] / scale:.{digits}{style}}"
    return text + (f" ± {s['std'] / scale:.{digits}{style}}" if s["n"] > 1 else "")


def overview(document: dict[str, Any]) -> list[str]:
    """The final held-out metric of every method at every level in one table (mean ± standard
    deviation over seeds): the comparison at a glance."""
    levels = document["levels"]
    lines = ["| method | " + " | ".join(level["label"] for level in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for method in dict.fromkeys(c["method"] for c in document["cells"]):
        row = {c["level"]: c for c in document["cells"] if c["method"] == method}
        shown = ["-" if row.get(level["name"]) is None or "skipped" in row[level["name"]]
                 else _pm(row[level["name"]], "final") for level in levels]
        name = f"*{method}*" if next(iter(row.values()))["reference"] else method
        lines.append(f"| {name} | " + " | ".join(shown) + " |")
    return lines


def markdown(document: dict[str, Any]) -> str:
    """compare.md: the overview, one table per privacy level (references in italics), and what
    the numbers cover."""
    metric = document["metric"]
    lines = [f"# {document['title']}", "", document["federation_line"], ""]
    if not document["complete"]:
        lines += [f"**Incomplete**: {len(document['pending_runs'])} runs have not finished "
                  "(rerun the same `fedlr compare` command to continue); a cell shows the seeds "
                  "finished so far.", ""]
    lines += [f"Final held-out {metric}:", "", *overview(document), ""]
    for level in document["levels"]:
        rows = [c for c in document["cells"] if c["level"] == level["name"]]
        target = next((c["target"] for c in rows if "target" in c), None)
        shown = f"{target:.3f}" if target is not None else "-"
        lines += [f"## {level['label']}", "",
                  f"| method | final {metric} | best {metric} | rounds to {shown} | MB up | "
                  "MB down | aggregation residual | epsilon spent | seconds in rounds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in rows:
            name = f"*{c['method']}*" if c["reference"] else c["method"]
            if "skipped" in c:
                lines.append(f"| {name} | not run: {c['skipped']} |" + " |" * 7)
                continue
            seeds = len(c["seeds"])
            reached = (f"{_pm(c, 'rounds_to_target', digits=1)} ({c['reached_target']}/"
                       f"{seeds})" if not c["reference"] or c["method"] == "centralized"
                       else "-")
            residual = "exact" if c["exact"] else _pm(c, "residual", digits=1, style="e")
            lines.append(" | ".join([
                f"| {name}", _pm(c, "final"), _pm(c, "best"), reached,
                *(["-", "-"] if c["reference"] else
                  [_pm(c, "bytes_up", MB, 2), _pm(c, "bytes_down", MB, 2)]),
                "-" if c["reference"] else residual, _pm(c, "epsilon_spent", digits=2),
                _pm(c, "seconds", digits=0)]) + " |")
        lines.append("")
    wall = document.get("wall_seconds", {})
    if wall.get("runs_timed"):
        lines += [f"Wall time: {wall['total'] / 3600:.2f} hours for the {wall['runs_timed']} "
                  f"of {wall['runs_finished']} finished runs that fedlr compare timed (each "
                  "run's own, start-up included)" + _untimed(wall) + ".", ""]
    lines += ["## What this covers", "", *[f"- {note}" for note in document["notes"]], ""]
    return "\n".join(lines)


def _untimed(wall: dict[str, Any]) -> str:
    untimed = wall["runs_finished"] - wall["runs_timed"]
    if not untimed:
        return ""
    return (f"; {untimed} more ran before fedlr compare timed runs, and spent "
            f"{wall.get('untimed_round_seconds', 0) / 3600:.2f} hours in their rounds")


def plot(document: dict[str, Any], path: Path) -> None:
    """Held-out quality per round: the mean over seeds, the band from min to max; centralized
    dashed, local-only as a dotted level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    levels = document["levels"]
    methods = list(dict.fromkeys(c["method"] for c in document["cells"]))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}  # one colour per method, every panel
    chance = document.get("evaluation", {}).get("chance_accuracy")
    fig, axes = plt.subplots(1, len(levels), figsize=(5.2 * len(levels), 4.0), squeeze=False,
                             sharey=True)
    for ax, level in zip(axes[0], levels, strict=True):
        for c in (c for c in document["cells"] if c["level"] == level["name"]):
            if "skipped" in c or not c["seeds"]:
                continue
            if c["method"] == "local-only":
                ax.axhline(c["final"]["mean"], color=colors[c["method"]], linestyle=":",
                           label="local-only (mean over clients)")
                continue
            curves = [dict(map(tuple, s["curve"])) for s in c["seeds"].values()]
            rounds = sorted(set.intersection(*(set(k) for k in curves)))
            values = [[curve[r] for curve in curves] for r in rounds]
            mean = [sum(v) / len(v) for v in values]
            style = "--" if c["method"] == "centralized" else "-"
            color = colors[c["method"]]
            ax.plot(rounds, mean, style, color=color, marker="o", markersize=3,
                    label=c["method"])
            if len(curves) > 1:
                ax.fill_between(rounds, [min(v) for v in values], [max(v) for v in values],
                                color=color, alpha=0.15)
        if chance is not None and document["metric"] == "accuracy":
            ax.axhline(chance, color="grey", linestyle="--", linewidth=0.8,
                       label="most frequent class")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(level["label"])
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"held-out {document['metric']}")
    if axes[0][-1].get_legend_handles_labels()[0]:
        axes[0][-1].legend(fontsize=8)
    fig.suptitle(document["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
