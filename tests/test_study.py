"""The committed study (`simulations/study/`) and its README summary: the numbers people read
are the committed compare.json's, nothing typed by hand."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedlr.comparison.report import MB, _pm, markdown, overview

ROOT = Path(__file__).parents[1]
STUDY = ROOT / "simulations" / "study"
# every number a sentence can quote: 6, 0.085, 1e-5, 5.5e-01; not the 6 of "L6" or the 2 of "v2",
# and a number that ends a sentence ("0.026.") still counts
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e[-+]?\d+)?(?!\w|\.\d)")

Document = dict[str, Any]
Derive = Callable[[Document], str]


def document() -> Document:
    return json.loads((STUDY / "compare.json").read_text())


def readme_section() -> str:
    """The README's "The study" section, up to the next heading of its level or above."""
    text = (ROOT / "README.md").read_text()
    start = text.index("### The study")
    body = text.index("\n", start)
    end = re.search(r"^#{1,3} ", text[body:], re.MULTILINE)
    return text[start:body + end.start()] if end else text[start:]


def at(doc: Document, method: str, epsilon: float | None = None) -> dict[str, Any]:
    """The cell of `method` at the level of target `epsilon` (None: non-private), so that every
    quoted number names the run it comes from."""
    level = next(v["name"] for v in doc["levels"] if v["epsilon"] == epsilon)
    return next(c for c in doc["cells"] if c["method"] == method and c["level"] == level)


def federated(doc: Document, epsilon: float | None) -> list[dict[str, Any]]:
    """The strategies' cells (not the references') at the level of target `epsilon`."""
    return [at(doc, m, epsilon) for m in doc["settings"]["compare"]["strategies"]]


def mean(cell: dict[str, Any], key: str, scale: float = 1.0, digits: int = 3,
         style: str = "f") -> str:
    """The mean as compare.md writes it, without the spread: what a sentence quotes."""
    return _pm(cell, key, scale, digits, style).split(" ± ")[0]


def one(texts: list[str]) -> str:
    """The text every cell renders when the README quotes one number for them all; several
    texts joined, so a disagreement cannot equal the quote."""
    return " / ".join(sorted(set(texts)))


def spent(doc: Document, epsilon: float) -> str:
    """The epsilon spent by every strategy at a target, and the target."""
    return (one([_pm(c, "epsilon_spent", digits=2) for c in federated(doc, epsilon)])
            + f" at target {epsilon:g}")


def between(doc: Document) -> str:
    """The range of the strategies' final accuracy over the private levels."""
    finals = [c["final"]["mean"] for v in doc["levels"] if v["epsilon"] is not None
              for c in federated(doc, v["epsilon"])]
    return f"between {min(finals):.3f} and {max(finals):.3f}"


def listed(values: list[Any]) -> str:
    """4, 8 and 16: a list as a sentence writes it."""
    shown = [f"{v:g}" for v in values]
    return ", ".join(shown[:-1]) + " and " + shown[-1]


def base(doc: Document) -> dict[str, Any]:
    return doc["settings"]["base"]


def gpu_study() -> dict[str, Any]:
    """study-gpu.toml, which the section names as the setting of FedSVD's claim."""
    return tomllib.loads((STUDY / "study-gpu.toml").read_text())


# The results the section quotes, each as the README writes it and as compare.json's named
# fields render it (formatted as compare.md formats them).
QUOTED: dict[str, Derive] = {
    # final held-out accuracy, mean ± std over seeds
    "0.373 ± 0.039": lambda d: _pm(at(d, "flora"), "final"),
    "0.350 ± 0.035": lambda d: _pm(at(d, "ffa"), "final"),
    "0.247 ± 0.081": lambda d: _pm(at(d, "fedit"), "final"),
    "0.262 ± 0.082": lambda d: _pm(at(d, "fedsvd"), "final"),
    "0.267 ± 0.081": lambda d: _pm(at(d, "fair"), "final"),
    "0.200 ± 0.023": lambda d: _pm(at(d, "local-only"), "final"),
    "0.567 ± 0.026": lambda d: _pm(at(d, "centralized"), "final"),
    "0.168 ± 0.045 at epsilon 6": lambda d: _pm(at(d, "centralized", 6.0), "final")
    + " at epsilon 6",
    "between 0.085 and 0.108": between,
    # best held-out accuracy
    "0.337 ± 0.020": lambda d: _pm(at(d, "fedsvd"), "best"),
    # aggregation residual, mean over seeds
    "residual 5.5e-01": lambda d: "residual " + mean(at(d, "fedit"), "residual", digits=1,
                                                     style="e"),
    "9.9e-07": lambda d: mean(at(d, "fedsvd"), "residual", digits=1, style="e"),
    "1.2e-01": lambda d: mean(at(d, "fair"), "residual", digits=1, style="e"),
    # bytes up and down, mean over seeds
    "6.12 MB": lambda d: mean(at(d, "ffa"), "bytes_up", MB, 2) + " MB",
    "11.60 MB": lambda d: mean(at(d, "fedit"), "bytes_up", MB, 2) + " MB",
    "134.05 MB": lambda d: mean(at(d, "flora"), "bytes_down", MB, 2) + " MB",
    "11.62 MB": lambda d: mean(at(d, "fedit"), "bytes_down", MB, 2) + " MB",
    # epsilon spent (the largest over clients), the same for every strategy at a target
    "5.55 ± 0.14 at target 6": lambda d: spent(d, 6.0),
    "2.77 ± 0.08 at target 3": lambda d: spent(d, 3.0),
    # the evaluation's chance level
    "the 0.085 of always guessing": lambda d: (
        f"the {d['evaluation']['chance_accuracy']:.3f} of always guessing"),
    # wall time
    "1.37 hours": lambda d: f"{d['wall_seconds']['total'] / 3600:.2f} hours",
    "50 runs": lambda d: f"{d['wall_seconds']['runs_timed']} runs",
    "0.40 hours": lambda d: f"{d['wall_seconds']['untimed_round_seconds'] / 3600:.2f} hours",
    "13 runs": lambda d: (
        f"{d['wall_seconds']['runs_finished'] - d['wall_seconds']['runs_timed']} runs"),
}

# The settings the section names, each from the settings compare.json records (or, for the GPU
# study it points to, study-gpu.toml).
SETTINGS: dict[str, Derive] = {
    "6 clients": lambda d: f"{base(d)['num_clients']} clients",
    "Dirichlet 0.5": lambda d: "Dirichlet " + base(d)["partition"].removeprefix("dirichlet:"),
    "ranks 4, 8 and 16": lambda d: "ranks " + listed(base(d)["ranks"]),
    "3 clients sampled": lambda d: f"{base(d)['clients_per_round']} clients sampled",
    "10 rounds": lambda d: f"{base(d)['rounds']} rounds",
    "round 10": lambda d: f"round {base(d)['rounds']}",
    "5 local steps": lambda d: f"{base(d)['local_steps']} local steps",
    "50 local steps at most": lambda d: (
        f"{base(d)['rounds'] * base(d)['local_steps']} local steps at most"),
    "batch 16": lambda d: f"batch {base(d)['batch_size']}",
    "epsilon 6 and 3": lambda d: "epsilon " + listed(
        [v["epsilon"] for v in d["levels"] if v["epsilon"] is not None]),
    "delta 1e-5": lambda d: "delta " + f"{base(d)['delta']:.0e}".replace("e-0", "e-"),
    "seeds 0, 1 and 2": lambda d: "seeds " + listed(d["settings"]["compare"]["seeds"]),
    "200 of the 813": lambda d: (
        f"{d['evaluation']['examples']} of the {d['evaluation']['heldout_examples']}"),
    "20 clients, 30 rounds": lambda d: (
        f"{gpu_study()['federation']['num_clients']} clients, "
        f"{gpu_study()['federation']['rounds']} rounds"),
}

# Numbers the section quotes that neither compare.json nor the study's configs record, and why
# they are there: each one a README claim that no test can check.
UNRECORDED: dict[str, str] = {
    "2-core CPU": "the machine the study ran on",
}


def prose(section: str, doc: Document) -> str:
    """The section without the overview table (checked verbatim on its own), whitespace
    collapsed so that a quote may wrap across lines."""
    return " ".join(section.replace("\n".join(overview(doc)), "").split())


def quoted(quote: str, text: str) -> list[re.Match[str]]:
    """Where `quote` stands in `text` as a whole (the 6 of "6 clients" is not in "16 clients")."""
    return list(re.finditer(rf"(?<![\w.]){re.escape(quote)}(?!\w|\.\d)", text))


def unmapped(section: str, doc: Document) -> list[str]:
    """Every number in the section's prose that no QUOTED, SETTINGS or UNRECORDED text covers,
    each with the words around it: a number typed or changed by hand."""
    text = prose(section, doc)
    covered = [False] * len(text)
    for quote in [*QUOTED, *SETTINGS, *UNRECORDED]:
        for m in quoted(quote, text):
            covered[m.start():m.end()] = [True] * (m.end() - m.start())
    return [f"{m.group()} in '{text[max(m.start() - 30, 0):m.end() + 30]}'"
            for m in NUMBER.finditer(text) if not all(covered[m.start():m.end()])]


def test_the_study_is_complete_with_three_seeds_in_every_cell_it_ran():
    doc = document()
    assert doc["complete"] and not doc["pending_runs"]
    ran = [c for c in doc["cells"] if "skipped" not in c]
    assert len(ran) == 7 * 3  # 5 strategies and 2 references at 3 privacy levels
    assert {c["final"]["n"] for c in ran} == {3}
    same = doc["same_federation"]  # per seed: the federated runs checked to be one federation
    assert set(same) == {"0", "1", "2"} and all(v["runs"] == 15 for v in same.values())


def test_compare_md_is_what_compare_json_renders():
    assert (STUDY / "compare.md").read_text() == markdown(document())


def test_the_readme_summary_quotes_only_numbers_of_the_committed_compare_json():
    """The overview table verbatim, every other number the one its field renders, and no
    number in the section that is not one of those."""
    doc, section = document(), readme_section()
    assert "\n".join(overview(doc)) in section  # the overview table, verbatim
    text = prose(section, doc)
    for quote, derive in [*QUOTED.items(), *SETTINGS.items()]:
        assert derive(doc) == quote, f"the README quotes {quote!r}, compare.json gives " \
                                     f"{derive(doc)!r}"
    for quote in [*QUOTED, *SETTINGS, *UNRECORDED]:
        assert quoted(quote, text), \
            f"{quote!r} is no longer in the README's study section: drop it here"
    assert not unmapped(section, doc), "numbers of the README's study section that come " \
                                       f"from no field of compare.json: {unmapped(section, doc)}"


@pytest.mark.parametrize(("old", "new", "reported"), [
    ("134.05 MB", "134.06 MB", ["134.06"]),  # a changed result
    ("(9.9e-07)", "(9.8e-07)", ["9.8e-07"]),  # a changed result in scientific notation
    # a changed spread, at the end of a sentence: the mean it was quoted with is no longer
    # the quote either
    ("0.567 ± 0.026", "0.567 ± 0.025", ["0.567", "0.025"]),
    ("the 0.085 of", "the 0.086 of", ["0.086"]),  # one of two quotes of the same number
    ("delta 1e-5", "delta 1e-6", ["1e-6"]),  # a changed setting
    ("What it shows,", "What its 0.9 shows,", ["0.9"]),  # a new number
])
def test_a_number_of_the_study_section_that_no_field_gives_is_reported(
        old: str, new: str, reported: list[str]):
    """A number typed into the section by hand, or changed there, fails the summary's test
    (the edit is made at the last occurrence, in the prose after the overview table)."""
    doc, section = document(), readme_section()
    assert not unmapped(section, doc) and old in section
    edited = new.join(section.rsplit(old, 1))
    assert [u.split()[0] for u in unmapped(edited, doc)] == reported
