"""metrics.jsonl, a run's record per round, read back by every part that needs it (resume, a
comparison, an audit), so that a torn or foreign file is the same clear error everywhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedlr.errors import ConfigError

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The round records in file order; none when the run has not finished a round."""
    if not path.is_file():
        return []
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{lineno} is not valid JSON ({exc.msg}); it is not a "
                              "metrics file fedlr wrote, or it was edited") from None
        if not isinstance(record, dict) or not isinstance(record.get("round"), int):
            raise ConfigError(f"{path}:{lineno} is not a round record (an object with an "
                              "integer 'round'); it is not a metrics file fedlr wrote")
        records.append(record)
    return records
