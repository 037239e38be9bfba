"""The mutation harness: every named mutant (`tests/mutants.py`) against the tests that must
kill it, each in its own pytest process with the mutant put in (`tests/mutant_plugin.py`).

Fails if a mutant survives (its tests pass) or cannot be applied. Prints a table (mutant, the
test that killed it, seconds) and writes it to benchmarks/results/mutants.json.

    python scripts/mutants.py [NAME ...]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from mutants import MUTANTS  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "mutants.json"
FAILED = re.compile(r"^FAILED (\S+)", re.MULTILINE)


def run(mutant) -> dict:
    env = {**os.environ, "FEDLR_MUTANT": mutant.name,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    tic = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "mutant_plugin",
         "-p", "no:cacheprovider", "-m", "not slow", *mutant.tests],
        cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - tic
    killers = FAILED.findall(done.stdout)
    # a test's assertion failed: killed; all passed: survived; an error in a fixture or the
    # collection (pytest's exit code 1 too, but no FAILED line), or any other code: not run
    verdict = ("survived" if done.returncode == 0 else
               "killed" if done.returncode == 1 and killers else "error")
    return {"mutant": mutant.name, "why": mutant.why, "verdict": verdict,
            "killed_by": killers[0] if killers else None, "seconds": round(seconds, 1),
            "output": "" if verdict == "killed" else (done.stdout + done.stderr)[-3000:]}


def main() -> int:
    wanted = set(sys.argv[1:])
    chosen = [m for m in MUTANTS if not wanted or m.name in wanted]
    console = Console(width=max(120, Console().width))
    results = []
    with console.status("mutants") as status:
        for k, mutant in enumerate(chosen, 1):
            status.update(f"mutant {k}/{len(chosen)}: {mutant.name}")
            results.append(run(mutant))
    table = Table(title="mutation harness: every mutant must be killed")
    for column in ("mutant", "verdict", "killed by", "seconds"):
        table.add_column(column, overflow="fold")
    for r in results:
        style = "green" if r["verdict"] == "killed" else "bold red"
        table.add_row(r["mutant"], f"[{style}]{r['verdict']}[/]", r["killed_by"] or "-",
                      f"{r['seconds']:.1f}")
    console.print(table)
    bad = [r for r in results if r["verdict"] != "killed"]
    for r in bad:
        console.print(f"[bold red]{r['mutant']} {r['verdict']}[/] ({r['why']}):\n{r['output']}")
    if not wanted:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps({"mutants": [{k: v for k, v in r.items() if k != "output"}
                                               for r in results]}, indent=2) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
