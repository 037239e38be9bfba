"""The machine-wide epsilon cache: a value from it is the accountant's own, another process
reads it instead of computing, concurrent processes compute a key once, and a damaged cache
costs a computation, never a wrong epsilon."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest

from fedlr.privacy.epsilon_cache import CACHE_DIR_ENV, FILE, cached
from fedlr.privacy.sample_level import PrivacyLedger, opacus_epsilon


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory of this test's own (subprocesses inherit it)."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                            stdout=subprocess.PIPE, text=True)


def output(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    return out.strip()


def counting(value: float, calls: list[int]):
    def compute() -> float:
        calls.append(1)
        return value
    return compute


def test_a_cached_epsilon_is_opacuss_own_and_another_process_reads_it_without_computing(
        cache):
    from opacus.accountants import create_accountant

    history = [(1.0, 0.0123456789, 37), (1.3, 0.0234, 11)]  # no other test's history
    accountant = create_accountant(mechanism="prv")
    accountant.history = history
    fresh = accountant.get_epsilon(1e-5)
    assert opacus_epsilon(history, 1e-5, "prv") == fresh
    # a second process whose Opacus has no accountant at all: the value can only be the row
    reader = python(f"""
        import opacus.accountants
        def no_accountant(*args, **kwargs):
            raise AssertionError("the accountant was called")
        opacus.accountants.create_accountant = no_accountant
        from fedlr.privacy.sample_level import opacus_epsilon
        print(repr(opacus_epsilon({history!r}, 1e-5, "prv")))
        """)
    assert float(output(reader)) == fresh
    with sqlite3.connect(cache / FILE) as db:
        assert db.execute("SELECT COUNT(*) FROM epsilons").fetchone() == (1,)


def test_a_budget_check_and_the_ledger_after_the_round_are_one_value():
    """The history before a round plus its segment, and the ledger that recorded it (merged into
    one segment), are the same mechanism: the same key, so exactly the same epsilon."""
    ledger = PrivacyLedger(history=[(1.1, 0.02, 30)])
    before = ledger.epsilon_after((1.1, 0.02, 7), 1e-5)
    ledger.record((1.1, 0.02, 7))
    assert ledger.history == [(1.1, 0.02, 37)]
    assert ledger.epsilon(1e-5) == before


def test_processes_that_need_one_value_at_once_compute_it_once(cache, tmp_path):
    calls = tmp_path / "calls"
    code = f"""
        import time
        from fedlr.privacy.epsilon_cache import cached
        def compute():
            with open({str(calls)!r}, "a") as fh:
                fh.write("computed\\n")
            time.sleep(2.0)  # both processes are waiting for this key meanwhile
            return 2.5
        print(cached("one key", compute))
        """
    procs = [python(code) for _ in range(2)]
    assert [output(p) for p in procs] == ["2.5", "2.5"]
    assert calls.read_text().splitlines() == ["computed"]


def test_a_file_that_is_not_a_database_is_rebuilt(cache):
    cache.mkdir()
    (cache / FILE).write_bytes(b"this is not a database " * 200)
    calls: list[int] = []
    assert cached("key", counting(1.5, calls)) == 1.5
    assert cached("key", counting(9.0, calls)) == 1.5  # stored in the rebuilt file
    assert calls == [1]


def test_a_damaged_row_is_computed_again_and_replaced(cache):
    calls: list[int] = []
    assert cached("key", counting(1.5, calls)) == 1.5
    with sqlite3.connect(cache / FILE) as db:  # a plausible value its digest does not vouch for
        db.execute("UPDATE epsilons SET epsilon = '0.25' WHERE key = 'key'")
    assert cached("key", counting(1.5, calls)) == 1.5  # never the damaged value
    assert cached("key", counting(9.0, calls)) == 1.5  # the row is whole again
    assert calls == [1, 1]


def test_without_a_usable_cache_directory_every_call_computes(tmp_path, monkeypatch):
    blocked = tmp_path / "a file"
    blocked.write_text("")
    monkeypatch.setenv(CACHE_DIR_ENV, str(blocked / "cache"))
    calls: list[int] = []
    assert [cached("key", counting(1.5, calls)) for _ in range(2)] == [1.5, 1.5]
    assert calls == [1, 1]
