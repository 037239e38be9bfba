"""A real deployment on loopback for tests: `fedlr server` with TLS and node authentication,
registered `fedlr client` SuperNodes, and `flwr run` against it, each in its own process group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedlr.certs import CertificateSet, create

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {port}")


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL a process and everything it started (Flower leaves SuperExec children)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_config(settings: dict) -> str:
    """`flwr run --run-config` text: strings quoted, lists comma-separated."""
    parts = []
    for key, value in settings.items():
        if isinstance(value, list):
            value = ",".join(map(str, value))
        text = repr(value) if isinstance(value, str) else str(value).lower() if isinstance(
            value, bool) else str(value)
        parts.append(f"{key.replace('_', '-')}={text}")
    return " ".join(parts)


@dataclass
class Deployment:
    folder: Path
    num_nodes: int
    port: int = field(default_factory=free_port)  # the public Fleet front: nodes only
    control_port: int = field(default_factory=free_port)  # the SuperLink on loopback: `flwr`
    processes: list[subprocess.Popen] = field(default_factory=list)
    nodes: dict[int, subprocess.Popen] = field(default_factory=dict)
    server_proc: subprocess.Popen | None = None
    keys: CertificateSet | None = None
    node_extra: dict[int, list[str]] = field(default_factory=dict)  # more `fedlr client` args

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "FLWR_HOME": str(self.folder / "home"), "HF_HUB_OFFLINE": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def spawn(self, *args: str, log: str) -> subprocess.Popen:
        handle = open(self.folder / log, "a")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen([sys.executable, "-m", "fedlr.cli", *args], env=self.env,
                                cwd=self.folder, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.processes.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.folder / name
        return path.read_text() if path.exists() else ""

    # -- the server ------------------------------------------------------------------------------

    def start(self) -> Deployment:
        """Keys, the server, the connection config for `flwr`, registered node keys, nodes."""
        names = [f"node{k}" for k in range(self.num_nodes)]
        self.keys = create(self.folder / "keys", ["localhost", "127.0.0.1"], names)
        self.start_server()
        home = self.folder / "home"
        home.mkdir(exist_ok=True)
        home.joinpath("config.toml").write_text(
            f'[superlink]\ndefault = "dep"\n\n[superlink.dep]\n'
            f'address = "127.0.0.1:{self.control_port}"'
            f'\nroot-certificates = "{self.keys.ca_cert}"\n'
        )
        done = subprocess.run(["bash", str(ROOT / "scripts" / "register-nodes.sh"),
                               str(self.keys.folder), "dep"], env=self.env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count("registered node") == self.num_nodes
        for k in range(self.num_nodes):
            self.start_node(k)
        return self

    def start_server(self) -> None:
        assert self.keys is not None
        self.server_proc = self.spawn(
            "server", "--certs", str(self.keys.folder), "--host", "127.0.0.1", "--port",
            str(self.port), "--control-port", str(self.control_port), "--database",
            str(self.folder / "state.db"), log="server.log")
        wait_for_port(self.control_port)
        wait_for_port(self.port)

    def kill_server(self) -> None:
        assert self.server_proc is not None
        stop(self.server_proc)

    # -- nodes -----------------------------------------------------------------------------------

    def node_args(self, k: int, *, key: Path | None = None, ca: Path | None = None) -> list[str]:
        assert self.keys is not None
        return ["client", "--superlink", f"127.0.0.1:{self.port}",
                "--ca", str(ca or self.keys.ca_cert),
                "--key", str(key or self.keys.node_keys[f"node{k}"][0]),
                "--partition-id", str(k), "--num-partitions", str(self.num_nodes),
                "--port", str(free_port()), "--state-dir", str(self.state_dir(k)),
                *self.node_extra.get(k, [])]

    def state_dir(self, k: int) -> Path:
        """Node k's own state (its privacy ledger), never the user's home in a test."""
        return self.folder / f"node-state-{k}"

    def start_node(self, k: int) -> None:
        self.nodes[k] = self.spawn(*self.node_args(k), log=f"client{k}.log")

    def kill_node(self, k: int) -> None:
        stop(self.nodes.pop(k))

    # -- runs ------------------------------------------------------------------------------------

    def submit(self, settings: dict, *, timeout: float = 600) -> subprocess.Popen:
        """`flwr run . dep --stream` in the background."""
        handle = open(self.folder / "run.log", "a")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [str(BIN / "flwr"), "run", str(ROOT), "dep", "--run-config", run_config(settings),
             "--stream"], env=self.env, stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.processes.append(proc)
        return proc

    def run(self, settings: dict, *, timeout: float = 600) -> None:
        proc = self.submit(settings)
        code = proc.wait(timeout=timeout)
        assert code == 0, self.log("run.log") + self.log("server.log")[-5000:]

    def close(self) -> None:
        for proc in self.processes:
            stop(proc)
