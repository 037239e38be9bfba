"""The mutation harness: every named mutant (`tests/mutants.py`) against the tests that must
kill it, each in its own pytest process with the mutant put in (`tests/mutant_plugin.py`).

Fails if a mutant survives (its tests pass) or cannot be applied. Prints a table (mutant, the
test that killed it, seconds) and writes it to benchmarks/results/mutants.json. Runs as many
mutants at a time as the machine has cores (`FEDLR_MUTANT_JOBS` to change it).

    python scripts/mutants.py [NAME ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from xml.etree import ElementTree

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from mutants import MUTANTS  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "mutants.json"
# how a test fails when what it checks is false: an assert, pytest.fail or pytest.raises that
# saw nothing raised; anything else (a NameError, a crash in a fixture) is no kill
ASSERTED = ("assert", "AssertionError", "Failed")


def failures(report: Path) -> list[tuple[str, str]]:
    """(test id, failure message) of every failed test in a JUnit XML report."""
    if not report.is_file():
        return []
    found = []
    for case in ElementTree.parse(report).iter("testcase"):
        failure = case.find("failure")
        if failure is not None:
            test = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
            found.append((test, failure.get("message") or ""))
    return found


def run(mutant) -> dict:
    paths = [str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "FEDLR_MUTANT": mutant.name, "PYTHONPATH": os.pathsep.join(paths)}
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "mutant_plugin",
             "-p", "no:cacheprovider", "-m", "not slow", f"--junitxml={report}",
             f"--basetemp={Path(tmp) / 'pytest'}", *mutant.tests],
            cwd=ROOT, env=env, capture_output=True, text=True)
        failed = failures(report)
    seconds = time.perf_counter() - tic
    killers = [test for test, message in failed if message.startswith(ASSERTED)]
    # a listed test's check failed: killed; all passed: survived; a crash, an error in a
    # fixture or the collection, or an unknown mutant: not run
    verdict = ("survived" if done.returncode == 0 else
               "killed" if done.returncode == 1 and killers else "error")
    return {"mutant": mutant.name, "why": mutant.why, "verdict": verdict,
            "killed_by": killers[0] if killers else None, "seconds": round(seconds, 1),
            "output": "" if verdict == "killed" else (done.stdout + done.stderr)[-3000:]}


def safely(mutant) -> dict:
    """A harness failure on one mutant is that mutant's error, never the loss of the table."""
    try:
        return run(mutant)
    except Exception as exc:  # reported in the table
        return {"mutant": mutant.name, "why": mutant.why, "verdict": "error", "killed_by": None,
                "seconds": 0.0, "output": repr(exc)}


def main() -> int:
    wanted = set(sys.argv[1:])
    chosen = [m for m in MUTANTS if not wanted or m.name in wanted]
    console = Console(width=max(120, Console().width))
    jobs = max(1, int(os.environ.get("FEDLR_MUTANT_JOBS", len(os.sched_getaffinity(0)))))
    with console.status(f"{len(chosen)} mutants, {jobs} at a time") as status, \
            ThreadPoolExecutor(jobs) as pool:  # each mutant is its own pytest process
        pending = [pool.submit(safely, mutant) for mutant in chosen]
        for k, future in enumerate(as_completed(pending), 1):
            status.update(f"mutants: {k}/{len(chosen)} done ({future.result()['mutant']})")
        results = [future.result() for future in pending]
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
