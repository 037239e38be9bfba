"""Which app a node agrees to run: only the fedlr it has installed.

A run's FAB (Flower App Bundle: the code `flwr run` packs and the server sends) names the
ClientApp every node should execute. Flower 1.41 installs it and runs it, so whoever can submit a
run (or a compromised server) runs code on the node, with its data, its trainer's key and its
privacy ledger. Flower's own check (`--trusted-entities`) accepts only apps signed by Flower Hub,
which an offline federation cannot use. So a node pins the app to its own installation: a FAB is
accepted only if it is fedlr's app (fedlr's components) and its Python code equals the node's
installed fedlr file for file (by sha256). Even then the node runs its *installed*
`fedlr.client.app` (`fedlr.client.app_runner`): nothing from the FAB is unpacked or imported.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import tomllib
import zipfile
from pathlib import Path, PurePosixPath

from fedlr.errors import FedlrError

CLIENTAPP = "fedlr.client.app:app"
COMPONENTS = {"serverapp": "fedlr.server.app:app", "clientapp": CLIENTAPP}
# fedlr's packages and the source folders `flwr run .` packs them from (pyproject.toml's
# [tool.setuptools.package-dir]); nested packages live inside these
SOURCE_FOLDERS = {"fedlr": "fedlr", "fedlr.client": "client", "fedlr.server": "server",
                  "fedlr.kernels": "kernels"}
# what a FAB built from fedlr carries besides its Python code (Flower's FAB include patterns)
DATA_SUFFIXES = {".toml", ".md", ".yaml", ".yml", ".json", ".jsonl"}
DATA_NAMES = {"LICENSE", ".info/CONTENT"}
MAX_FAB_BYTES = 10 * 1024 * 1024  # Flower's own limit on a FAB (FAB_MAX_SIZE)
SHOWN = 4  # file names listed in a refusal


class AppRefused(FedlrError):
    """The run's app is not the fedlr this node has installed: nothing of it runs."""


def installed_sources() -> dict[str, str]:
    """sha256 of every Python file of the node's installed fedlr, by the path it has in a FAB
    built from fedlr's source tree (`client/app.py` for `fedlr.client.app`). Found through the
    import system (a source checkout, an editable or a regular install alike), running none of
    fedlr's code but `fedlr/__init__.py`."""
    folders = {}
    for package, source in SOURCE_FOLDERS.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FedlrError(f"fedlr's package {package} is not installed on this node; "
                             "reinstall fedlr (pip install -e .)")
        folders[Path(next(iter(spec.submodule_search_locations))).resolve()] = source
    sources = {}
    for folder, source in folders.items():
        # a regular install nests fedlr.client in fedlr's folder: its files are its own
        nested = [f for f in folders if f != folder and f.is_relative_to(folder)]
        for path in sorted(folder.rglob("*.py")):
            inner = path.relative_to(folder)
            if "__pycache__" in inner.parts or any(path.is_relative_to(f) for f in nested):
                continue
            sources[f"{source}/{inner.as_posix()}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return sources


def check_fab(content: bytes, installed: dict[str, str] | None = None) -> None:
    """Accept the FAB `content` only if it is fedlr's app with exactly `installed`'s Python
    code (default: this node's installed fedlr); AppRefused with the reason otherwise. Nothing
    of the FAB is extracted or executed: it is read as data."""
    installed = installed_sources() if installed is None else installed
    files = read_fab(content)
    check_project(files["pyproject.toml"])
    code = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()
            if name.endswith(".py")}
    other = sorted(name for name in files if not name.endswith(".py") and not is_data(name))
    if other:
        raise AppRefused(f"it carries {shown(other)}, which no fedlr app has")
    extra = sorted(code.keys() - installed.keys())
    missing = sorted(installed.keys() - code.keys())
    changed = sorted(name for name in code.keys() & installed.keys()
                     if code[name] != installed[name])
    problems = [f"{what} {shown(names)}" for what, names in (
        ("changed:", changed), ("not in this node's fedlr:", extra), ("missing:", missing))
        if names]
    if problems:
        raise AppRefused(f"its code is not this node's fedlr {fedlr_version()} ("
                         f"{'; '.join(problems)}); submit runs from the fedlr release the "
                         "nodes have installed")


def read_fab(content: bytes) -> dict[str, bytes]:
    """The FAB's files by name, read in memory; refused if it is not a plain, bounded zip."""
    if len(content) > MAX_FAB_BYTES:
        raise AppRefused(f"its FAB is {len(content)} bytes, over Flower's {MAX_FAB_BYTES}")
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            entries = [e for e in fab.infolist() if not e.is_dir()]
            names = [e.filename for e in entries]
            if len(set(names)) != len(names):
                raise AppRefused("its FAB holds a file name twice")
            if sum(e.file_size for e in entries) > 4 * MAX_FAB_BYTES:
                raise AppRefused("its FAB unpacks to more than "
                                 f"{4 * MAX_FAB_BYTES} bytes")
            files = {e.filename: fab.read(e) for e in entries}
    except AppRefused:
        raise
    except Exception as exc:  # corrupt, encrypted or odd archives (zlib.error, RuntimeError...)
        raise AppRefused(f"its FAB is not a readable zip archive ({exc!r})") from None
    odd = sorted(n for n in files if PurePosixPath(n).is_absolute() or ".." in n.split("/"))
    if odd:
        raise AppRefused(f"its FAB has paths outside the app: {shown(odd)}")
    if "pyproject.toml" not in files:
        raise AppRefused("its FAB has no pyproject.toml")
    return files


def check_project(pyproject: bytes) -> None:
    """fedlr's app, in this node's version, with fedlr's ServerApp and ClientApp."""
    try:
        config = tomllib.loads(pyproject.decode())
        name, version = config["project"]["name"], config["project"]["version"]
        components = config["tool"]["flwr"]["app"]["components"]
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise AppRefused(f"its pyproject.toml is not a Flower app's ({exc!r})") from None
    if name != "fedlr":
        raise AppRefused(f"it is the app {str(name)[:80]!r}, not fedlr")
    if components != COMPONENTS:
        raise AppRefused(f"its components are {str(components)[:200]}, not fedlr's "
                         f"{COMPONENTS}")
    if version != fedlr_version():
        raise AppRefused(f"it is fedlr {str(version)[:40]}, this node runs fedlr "
                         f"{fedlr_version()}")


def is_data(name: str) -> bool:
    return name in DATA_NAMES or PurePosixPath(name).suffix in DATA_SUFFIXES


def fedlr_version() -> str:
    return importlib.metadata.version("fedlr")


def shown(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(n[:120] for n in names[:SHOWN]) + more
