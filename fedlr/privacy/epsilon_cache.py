"""Epsilons computed once per machine, not once per call.

An accountant call costs up to seconds (Opacus's PRV about 2.4 s on one core), and a run asks
for the same value many times and in many processes: every client of a round whose history is
the same, each client's budget check before a round and its epsilon after it, the server again
for privacy.json, every probe of a noise solve. So a value is memoised by the caller in its
process and kept here, in a SQLite file that every process of the user shares
(`FEDLR_CACHE_DIR`, else `$XDG_CACHE_HOME/fedlr`, else ~/.cache/fedlr).

The caller's key names everything the value depends on (the history with its floats exactly,
delta, the accountant and its library's version); the file name carries this module's own
format. Each row holds an HMAC of its key and value under a secret of this user (`secret.key`,
mode 0600, in a folder of mode 0700), so a damaged row, a row planted by anyone without the
secret, or a file that is not a database, is a miss and the value is computed again: a fault in
the cache costs time, never a wrong epsilon. The folder is the user's alone, since its histories
reveal each client's noise and sampling rate (so its example count). One process computes a key
while the others wait on its lock, then read its row.
Nothing here knows an accountant: the callers (`fedlr.privacy.sample_level`) build the keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

CACHE_DIR_ENV = "FEDLR_CACHE_DIR"
FILE = "epsilons-v2.sqlite"  # a new version whenever a row's meaning changes
SECRET_FILE = "secret.key"
LOCK_STRIPES = 256  # lock files; keys that share one wait on each other's computation
CORRUPT = ("SQLITE_CORRUPT", "SQLITE_NOTADB")


def cache_dir() -> Path:
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedlr"


def cached(key: str, compute: Callable[[], float]) -> float:
    """`compute()`, or the value it gave for `key` earlier in any process of this user. Without
    a writable cache directory every call computes."""
    folder = cache_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
        secret = _secret(folder)
    except OSError:
        return compute()
    with _key_lock(folder, key):
        value = _read(folder / FILE, key, secret)
        if value is None:
            value = compute()
            _write(folder / FILE, key, value, secret)
    return value


def _secret(folder: Path) -> bytes:
    """This user's cache secret, made once (mode 0600); without it no row can be vouched for."""
    path = folder / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
            fh.flush()
            os.fsync(fh.fileno())
    secret = path.read_bytes()
    if len(secret) < 32:
        raise OSError(f"{path} is not a cache secret")
    return secret


def _digest(secret: bytes, key: str, text: str) -> str:
    return hmac.new(secret, f"{key}\0{text}".encode(), hashlib.sha256).hexdigest()


@contextlib.contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    """The cache database, in WAL mode so that readers never wait for a writer; a file that is
    not a database (or is damaged) is deleted, to be rebuilt by the next write."""
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS epsilons "
                   "(key TEXT PRIMARY KEY, epsilon TEXT NOT NULL, digest TEXT NOT NULL)")
        yield db
    except sqlite3.DatabaseError as exc:
        if exc.sqlite_errorname in CORRUPT:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        raise
    finally:
        db.close()


def _read(path: Path, key: str, secret: bytes) -> float | None:
    """The stored value, or None: absent, unreadable, or not the value its digest vouches for."""
    try:
        with _connect(path) as db:
            row = db.execute("SELECT epsilon, digest FROM epsilons WHERE key = ?",
                             (key,)).fetchone()
    except sqlite3.Error:
        return None
    if row is None or not hmac.compare_digest(
            str(row[1]), _digest(secret, key, str(row[0]))):
        return None
    return float(row[0])


def _write(path: Path, key: str, value: float, secret: bytes) -> None:
    """Store a value; a cache that cannot be written (locked too long, read-only, damaged) only
    means the next process computes it again."""
    text = repr(float(value))
    with contextlib.suppress(sqlite3.Error), _connect(path) as db:
        db.execute("INSERT OR REPLACE INTO epsilons VALUES (?, ?, ?)",
                   (key, text, _digest(secret, key, text)))


@contextlib.contextmanager
def _key_lock(folder: Path, key: str) -> Iterator[None]:
    """An exclusive lock on the key's stripe, held while it is looked up, computed and stored,
    so concurrent processes compute each key once. Where files cannot be locked (no `fcntl`,
    an unwritable folder) every process computes for itself."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    stripe = int(hashlib.sha256(key.encode()).hexdigest(), 16) % LOCK_STRIPES
    try:
        (folder / "locks").mkdir(exist_ok=True)
        handle = open(folder / "locks" / f"{stripe:03d}.lock", "a+b")  # noqa: SIM115
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
