"""`fedlr server`: Flower's SuperLink on loopback (TLS and node authentication on by default)
behind the Fleet front on the public address (`fedlr.server.fleet_front`)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedlr.certs import LOOPBACK, covers_loopback
from fedlr.errors import ConfigError, FedlrError

INSECURE_WARNING = (
    "WARNING: --insecure: the SuperLink accepts plain-text connections from any node. Updates, "
    "privacy ledgers and metrics travel unencrypted and unauthenticated. Use it on a private test "
    "network only."
)
START_SECONDS = 120.0  # for the SuperLink to listen on its control address
# Flower's SuperExec looks for work every second by default; each run the server starts
# waited half of that on average before its ServerApp process was launched
SUPEREXEC_POLL_SECONDS = 0.1


def superlink_argv(
    certs: Path | None, *, host: str, port: int, database: Path, insecure: bool
) -> list[str]:
    """The flower-superlink command line: TLS from `certs` (ca.crt, server.pem, server.key) and
    SuperNode authentication, or plain text with `insecure`."""
    argv = ["flower-superlink", "--host", host, "--port", str(port), "--database", str(database),
            "--disable-runtime-dependency-installation"]
    if insecure:
        return [*argv, "--insecure"]
    files = tls_files(certs)
    return [*argv, "--ssl-ca-certfile", str(files["ca.crt"]), "--ssl-certfile",
            str(files["server.pem"]), "--ssl-keyfile", str(files["server.key"]),
            "--enable-supernode-auth"]


def tls_files(certs: Path | None) -> dict[str, Path]:
    """ca.crt, server.pem and server.key from `fedlr certs`, checked before anything starts."""
    if certs is None:
        raise ConfigError("give --certs DIR (made by `fedlr certs`) or, for tests only, --insecure")
    files = {name: certs / name for name in ("ca.crt", "server.pem", "server.key")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ConfigError(f"missing TLS files {missing}; create them with `fedlr certs {certs}`")
    if not covers_loopback(files["server.pem"]):
        raise ConfigError(f"{files['server.pem']} does not name {LOOPBACK}, where the SuperLink "
                          "listens behind the Fleet front; make new keys with `fedlr certs` "
                          "(it always adds it) or add it to --hosts")
    return files


@dataclass(frozen=True)
class ServerPlan:
    """Which address serves what: nodes reach `host:port` (Fleet only); runs are submitted,
    listed and stopped, and node keys registered, on `LOOPBACK:control_port` alone."""

    certs: Path | None
    host: str
    port: int
    control_port: int
    database: Path
    insecure: bool

    def __post_init__(self) -> None:
        if self.port == self.control_port:
            raise ConfigError(f"--port and --control-port are both {self.port}; the Fleet front "
                              "and the SuperLink need a port each")
        if not self.insecure:
            tls_files(self.certs)

    @property
    def control(self) -> str:
        return f"{LOOPBACK}:{self.control_port}"

    def superlink(self) -> list[str]:
        return superlink_argv(self.certs, host=LOOPBACK, port=self.control_port,
                              database=self.database, insecure=self.insecure)

    def rows(self) -> list[tuple[str, str, str]]:
        scheme = "plain text" if self.insecure else "TLS, registered node keys only"
        return [
            (f"{self.host}:{self.port}", "Fleet API: SuperNodes (`fedlr client --superlink`)",
             f"public, {scheme}"),
            (self.control, "Control API (`flwr run`, `ls`, `stop`, `supernode register`) and "
             "the ServerApp's runtime API", "this machine only; from elsewhere through an SSH "
             f"tunnel (ssh -L {self.control_port}:{self.control} ...)"),
        ]


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 1):
        return True
    return False


def start_superlink(plan: ServerPlan) -> subprocess.Popen:
    """The SuperLink as this process's child (in its process group: a signal to the group
    reaches both), returned once it listens on the control address."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": os.environ.get(
               "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(SUPEREXEC_POLL_SECONDS))}
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    argv = plan.superlink()
    local = Path(bin_dir) / argv[0]
    proc = subprocess.Popen([str(local) if local.is_file() else argv[0], *argv[1:]], env=env)
    deadline = time.monotonic() + START_SECONDS
    while not listening(plan.control_port):
        if proc.poll() is not None:
            raise FedlrError(f"the SuperLink stopped (exit code {proc.returncode}) before it "
                             f"listened on {plan.control}; see its log above")
        if time.monotonic() > deadline:
            proc.kill()
            raise FedlrError(f"the SuperLink did not listen on {plan.control} within "
                             f"{START_SECONDS:.0f} s")
        time.sleep(0.2)
    return proc


def serve(plan: ServerPlan) -> None:
    """The SuperLink, then the Fleet front in this process until a signal (Ctrl-C) or the
    SuperLink's end; the SuperLink never outlives the front."""
    import uvicorn

    from fedlr.server.fleet_front import FleetFront

    superlink = start_superlink(plan)
    scheme = "http" if plan.insecure else "https"
    ca = None if plan.insecure else tls_files(plan.certs)["ca.crt"]
    tls = {} if plan.insecure else {"ssl_certfile": str(tls_files(plan.certs)["server.pem"]),
                                    "ssl_keyfile": str(tls_files(plan.certs)["server.key"])}
    front = uvicorn.Server(uvicorn.Config(
        FleetFront(f"{scheme}://{plan.control}", ca), host=plan.host, port=plan.port,
        log_level="warning", lifespan="on", **tls))

    stopping = threading.Event()
    ended: list[int] = []  # the SuperLink's exit code, where it ended on its own

    def watch() -> None:
        code = superlink.wait()
        if not stopping.is_set():
            ended.append(code)
            front.should_exit = True

    threading.Thread(target=watch, daemon=True, name="fedlr-superlink-watch").start()
    try:
        front.run()  # until SIGINT or SIGTERM (uvicorn's handlers) or the watch above
    finally:
        stopping.set()
        if superlink.poll() is None:
            superlink.terminate()
            try:
                superlink.wait(timeout=10)
            except subprocess.TimeoutExpired:
                superlink.kill()
    if ended:
        raise FedlrError(f"the SuperLink stopped (exit code {ended[0]}); see its log above")
    if not front.started:
        raise FedlrError(f"the Fleet front could not listen on {plan.host}:{plan.port}; is the "
                         "port taken?")
