"""The built-in task `stdlib-docs`: which part of Python's standard library a docstring comes from.

Built at run time from the running interpreter's own stdlib sources, so it needs no download and
no data file: every module, class and function docstring of a package in `TOPICS` becomes one
example labelled with that package's topic. Sources are parsed with `ast`, never imported (no
side effects, no GUI, fast). The split into train and held-out is a hash of the text, so it is
stable across runs and machines; each topic is capped so that the classes stay balanced.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from fedlr.atomic import atomic_write
from fedlr.errors import ConfigError

TOPICS: dict[str, tuple[str, ...]] = {
    "networking": (
        "socket", "ssl", "http", "urllib", "ftplib", "smtplib", "smtpd", "imaplib", "poplib",
        "nntplib", "telnetlib", "socketserver", "xmlrpc", "ipaddress", "selectors", "asynchat",
        "asyncore", "wsgiref", "webbrowser", "netrc", "cgi", "cgitb",
    ),
    "concurrency": (
        "threading", "multiprocessing", "concurrent", "asyncio", "queue", "sched", "subprocess",
        "contextvars", "signal",
    ),
    "gui": ("tkinter", "turtle", "turtledemo", "idlelib", "curses"),
    "file_formats": (
        "json", "csv", "xml", "html", "zipfile", "tarfile", "gzip", "bz2", "lzma", "configparser",
        "plistlib", "tomllib", "wave", "aifc", "sunau", "chunk", "pickle", "pickletools",
        "shelve", "dbm", "sqlite3", "zipapp", "imghdr", "sndhdr", "xdrlib",
    ),
    "numbers": (
        "math", "cmath", "decimal", "_pydecimal", "fractions", "statistics", "random", "numbers",
        "colorsys",
    ),
    "os_and_files": (
        "os", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "stat", "filecmp", "fileinput",
        "io", "_pyio", "posixpath", "ntpath", "genericpath", "platform", "getpass", "pty", "tty",
    ),
    "testing_and_introspection": (
        "unittest", "doctest", "inspect", "pdb", "bdb", "trace", "traceback", "dis", "tracemalloc",
        "cProfile", "profile", "pstats", "timeit", "code", "codeop",
    ),
    "import_and_packaging": (
        "importlib", "pkgutil", "zipimport", "ensurepip", "venv", "runpy", "modulefinder",
        "sysconfig", "site", "distutils", "compileall", "py_compile", "imp",
    ),
    "text_processing": (
        "string", "re", "sre_compile", "sre_parse", "textwrap", "difflib", "unicodedata",
        "stringprep", "gettext", "locale", "codecs", "encodings", "pprint", "reprlib", "shlex",
    ),
    "data_structures": (
        "collections", "dataclasses", "enum", "heapq", "bisect", "array", "copy", "functools",
        "itertools", "operator", "typing", "types", "weakref", "abc", "_collections_abc",
        "contextlib", "graphlib", "struct",
    ),
    "dates_and_times": ("datetime", "_pydatetime", "calendar", "time", "zoneinfo", "_strptime"),
    "email_and_encodings": (
        "email", "mailbox", "mimetypes", "base64", "binascii", "quopri", "mailcap", "uu",
        "hashlib", "hmac", "secrets", "uuid",
    ),
    "language_tools": (
        "ast", "tokenize", "token", "keyword", "symtable", "pyclbr", "tabnanny", "opcode",
        "lib2to3", "pydoc",
    ),
    "command_line_and_logging": (
        "argparse", "optparse", "getopt", "cmd", "logging", "rlcompleter", "warnings", "atexit",
    ),
}
LABELS: tuple[str, ...] = tuple(TOPICS)
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages"})
MIN_CHARS = 24
MAX_CHARS = 400
DEFAULT_PER_TOPIC = 300
HELDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    source: str  # dotted path of the documented object, for inspection


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _sources(root: Path, package: str) -> Iterator[tuple[str, Path]]:
    single = root / f"{package}.py"
    if single.is_file():
        yield package, single
    pkg = root / package
    if pkg.is_dir():
        for path in sorted(pkg.rglob("*.py")):
            rel = path.relative_to(root)
            if SKIP_DIRS.intersection(rel.parts[:-1]):
                continue
            dotted = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            yield dotted, path


def _docstrings(module: str, path: Path) -> Iterator[tuple[str, str]]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return  # a few stdlib files are templates or Python-2 era; they carry no usable text
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, documented):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                name = getattr(node, "name", "")
                yield (f"{module}.{name}" if name else module), doc


def _normalise(doc: str) -> str:
    return re.sub(r"\s+", " ", doc).strip()[:MAX_CHARS]


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def cache_path(per_topic: int, root: Path) -> Path:
    """Where a built dataset is kept: keyed by everything the build depends on."""
    key = json.dumps([sys.version, str(root), TOPICS, per_topic, MIN_CHARS, MAX_CHARS,
                      HELDOUT_FRACTION, sorted(SKIP_DIRS)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "fedlr" / f"stdlib-docs-{digest}.json"


def build(per_topic: int = DEFAULT_PER_TOPIC, root: Path | None = None) -> tuple[
    list[Example], list[Example]
]:
    """(train, held-out) examples, built once per interpreter and then read from a cache file
    (every worker process of a simulation needs them)."""
    root = root or stdlib_dir()
    cache = cache_path(per_topic, root)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(cache.read_text())
        return tuple([Example(**e) for e in data[part]] for part in ("train", "heldout"))
    train, heldout = _build(per_topic, root)
    with contextlib.suppress(OSError):  # a read-only home only costs the rebuild
        text = json.dumps({"train": [asdict(e) for e in train],
                           "heldout": [asdict(e) for e in heldout]})
        atomic_write(cache, lambda tmp: Path(tmp).write_text(text))
    return train, heldout


def _build(per_topic: int, root: Path) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples; at most `per_topic` per topic, chosen by text hash."""
    if per_topic <= 0:
        raise ConfigError(f"stdlib-docs needs a positive count per topic, got {per_topic}")
    if not root.is_dir():
        raise ConfigError(f"the Python standard library sources are not at {root}")
    train: list[Example] = []
    heldout: list[Example] = []
    seen: set[str] = set()
    for label, (topic, packages) in enumerate(TOPICS.items()):
        candidates: list[Example] = []
        for package in packages:
            for module, path in _sources(root, package):
                for source, doc in _docstrings(module, path):
                    text = _normalise(doc)
                    if len(text) >= MIN_CHARS and text not in seen:
                        seen.add(text)
                        candidates.append(Example(text, label, source))
        if not candidates:
            raise ConfigError(
                f"stdlib-docs found no docstrings for topic {topic!r} under {root}; this Python "
                "ships without its standard-library sources"
            )
        candidates.sort(key=lambda e: _hash(e.text))
        for example in candidates[:per_topic]:
            held = _hash("split:" + example.text) % 100 < HELDOUT_FRACTION * 100
            (heldout if held else train).append(example)
    return train, heldout
