"""The committed study (`simulations/study/`) and its README summary: the numbers people read
are the committed compare.json's, nothing typed by hand."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from fedlr.comparison.report import markdown, overview

ROOT = Path(__file__).parents[1]
STUDY = ROOT / "simulations" / "study"
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])")


def document() -> dict:
    return json.loads((STUDY / "compare.json").read_text())


def readme_section() -> str:
    """The README's "The study" section, up to the next heading of its level or above."""
    text = (ROOT / "README.md").read_text()
    start = text.index("### The study")
    body = text.index("\n", start)
    end = re.search(r"^#{1,3} ", text[body:], re.MULTILINE)
    return text[start:body + end.start()] if end else text[start:]


def leaves(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in leaves(v)]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return [float(value)]
    if isinstance(value, str):
        return [float(x) for x in DECIMAL.findall(value)]
    return []


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
    doc, section = document(), readme_section()
    assert "\n".join(overview(doc)) in section  # the overview table, verbatim
    rendered = set(DECIMAL.findall(markdown(doc)))  # what compare.md derives (hours, MB)
    values = leaves(doc)
    quoted = DECIMAL.findall(section)
    assert quoted, "the study section quotes no numbers"
    for number in quoted:
        digits = len(number.split(".")[1])
        assert number in rendered or any(
            f"{v:.{digits}f}" == number for v in values), f"{number} is not in compare.json"
