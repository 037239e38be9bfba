"""The README quotes the benchmarks' committed results, nothing typed by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_the_readme_quotes_the_peer_benchmarks_table_as_its_json_renders_it():
    import peer

    result = json.loads((ROOT / "benchmarks" / "results" / "peer.json").read_text())
    assert result["settings"]["repeats"] >= 3
    assert peer.markdown_table(result) in (ROOT / "README.md").read_text()
