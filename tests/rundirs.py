"""Reading a run directory the way an outsider would, for the privacy tests."""

from __future__ import annotations

import json
from pathlib import Path

ID_KEYS = {"clients", "accepted", "client", "client_rounds", "ledgers", "client_id"}


def client_ids_in(run: Path) -> list[str]:
    """Every place of the run directory that names which clients took part: id-valued keys in
    its JSON files (the population's ranks in run.json excepted), and per-client files."""
    found = [str(p.relative_to(run)) for p in run.rglob("*")
             if p.parent.name in ("clients", "nodes")]

    def walk(value, where):
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ID_KEYS and item not in ([], {}, None):
                    found.append(f"{where}: {key}")
                walk(item, where)
        elif isinstance(value, list):
            for item in value:
                walk(item, where)

    for path in [*run.rglob("*.json"), *run.rglob("*.jsonl")]:
        lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
        for line in lines:
            document = json.loads(line)
            if path.name == "run.json":
                document.pop("client_ranks")
                document["config"].pop("ranks")
            walk(document, str(path.relative_to(run)))
    return found
