"""A real deployment on loopback: `fedlr server` (TLS + node authentication), three `fedlr client`
SuperNodes with registered keys (an unregistered one is refused), and `flwr run`; the result
equals `fedlr simulate`'s."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedlr.adapters import load_delta_weights
from fedlr.certs import create
from fedlr.client.app import app as client_app
from fedlr.errors import ConfigError
from fedlr.server.launch import superlink_argv
from fedlr.server.simulation import simulate
from fedlr.simconfig import SimulationConfig

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
SETTINGS = dict(strategy="ffa", model="tiny", num_clients=3, rounds=2, ranks=[2, 4],
                local_steps=2, batch_size=8, eval_examples=32, seed=11)


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


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:  # each in its own session: stop its whole group (SuperExec children too)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_tls_deployment_gives_the_same_adapter_as_the_simulation(tmp_path, processes):
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    keys = create(tmp_path / "keys", ["localhost", "127.0.0.1"], ["node1", "node2", "node3"])
    port = free_port()

    def spawn(*args: str, log: str) -> subprocess.Popen:
        handle = open(tmp_path / log, "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen([sys.executable, "-m", "fedlr.cli", *args], env=env,
                                cwd=tmp_path, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        processes.append(proc)
        return proc

    spawn("server", "--certs", str(keys.folder), "--host", "127.0.0.1", "--port", str(port),
          "--database", str(tmp_path / "state.db"), log="server.log")
    wait_for_port(port)
    (tmp_path / "home").mkdir(exist_ok=True)  # the SuperLink may have made it
    (tmp_path / "home" / "config.toml").write_text(
        f'[superlink]\ndefault = "dep"\n\n[superlink.dep]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{keys.ca_cert}"\n'
    )
    for name, (_, public) in keys.node_keys.items():
        done = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public), "dep"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (name, done.stdout, done.stderr)
    for k, (private, _) in enumerate(keys.node_keys.values()):
        spawn("client", "--superlink", f"127.0.0.1:{port}", "--ca", str(keys.ca_cert),
              "--key", str(private), "--partition-id", str(k), "--num-partitions", "3",
              "--port", str(free_port()), log=f"client{k}.log")

    # a node whose key was never registered is refused and stops
    stranger = create(tmp_path / "stranger", ["localhost"], ["node9"]).node_keys["node9"][0]
    rogue = spawn("client", "--superlink", f"127.0.0.1:{port}", "--ca", str(keys.ca_cert),
                  "--key", str(stranger), "--partition-id", "0", "--num-partitions", "3",
                  "--port", str(free_port()), log="rogue.log")
    assert rogue.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in (tmp_path / "rogue.log").read_text()

    out = tmp_path / "deployed"
    flags = " ".join(f"{k.replace('_', '-')}={v!r}" if isinstance(v, str) else
                     f"{k.replace('_', '-')}={v}" for k, v in SETTINGS.items() if k != "ranks")
    run_config = f"{flags} ranks='2,4' out='{out}'"
    done = subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "dep", "--run-config", run_config,
                           "--stream"], env=env, capture_output=True, text=True, timeout=600)
    logs = "".join((tmp_path / f).read_text() for f in ("server.log", "client0.log"))
    assert done.returncode == 0, done.stdout + done.stderr + logs
    deployed = load_delta_weights(out / "rounds" / "0002" / "global.safetensors")

    simulated_out = tmp_path / "simulated"
    simulate(SimulationConfig.load(None, {**SETTINGS, "out": str(simulated_out)}), client_app)
    simulated = load_delta_weights(simulated_out / "rounds" / "0002" / "global.safetensors")
    assert deployed.keys() == simulated.keys()
    for name, dw in simulated.items():
        torch.testing.assert_close(deployed[name], dw, rtol=1e-5, atol=1e-6)


def test_the_server_refuses_to_start_without_tls_files_unless_insecure(tmp_path):
    with pytest.raises(ConfigError, match="--certs"):
        superlink_argv(None, host="127.0.0.1", port=1, database=tmp_path / "db", insecure=False)
    with pytest.raises(ConfigError, match="missing TLS files"):
        superlink_argv(tmp_path, host="127.0.0.1", port=1, database=tmp_path / "db",
                       insecure=False)
    argv = superlink_argv(None, host="h", port=1, database=tmp_path / "db", insecure=True)
    assert "--insecure" in argv and "--enable-supernode-auth" not in argv
