"""Issue 36, finding 2: a node runs only the fedlr it has installed, whatever app a run sends;
and finding 8's last item: the SuperNode's local runtime API serves no other local user.

The adversary is whoever submits a run (a compromised server, or anyone who reaches its Control
API): it chooses the FAB (Flower App Bundle), the code Flower would install and run on every
node. The local adversary is another process on the node without the node's secret."""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import shutil
import stat
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
from deployment import BIN, ROOT, Deployment, run_config

from fedlr.client.app_runner import SECRET, prepare
from fedlr.client.app_trust import AppRefused, check_fab, installed_sources
from fedlr.client.launch import supernode_argv

SETTINGS = dict(strategy="ffa", model="tiny", num_clients=2, rounds=1, ranks=[2],
                local_steps=2, batch_size=8, eval_examples=32, seed=3)


@pytest.fixture(scope="module")
def fab() -> dict[str, bytes]:
    """fedlr's own FAB, built from this repository as `flwr run .` builds it, by file name."""
    from flwr.cli.build import build_fab_from_disk

    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))) as z:
        return {name: z.read(name) for name in z.namelist()}


def pack(files: dict[str, bytes]) -> bytes:
    """A FAB as a hostile server can send one: any zip it likes."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return out.getvalue()


def refusal(files: dict[str, bytes]) -> str:
    with pytest.raises(AppRefused) as refused:
        check_fab(pack(files))
    return str(refused.value)


# -- the check ---------------------------------------------------------------------------------


def test_fedlrs_own_fab_is_accepted_and_is_the_installed_code(fab):
    check_fab(pack(fab))
    code = {n: hashlib.sha256(d).hexdigest() for n, d in fab.items() if n.endswith(".py")}
    assert code == installed_sources()
    assert "client/app.py" in code and "fedlr/__init__.py" in code


def test_one_changed_line_of_the_clientapp_is_refused(fab):
    evil = fab["client/app.py"].replace(b'log = logging.getLogger("fedlr")',
                                        b'log = __import__("os").system("id")')
    assert evil != fab["client/app.py"]
    reason = refusal({**fab, "client/app.py": evil})
    assert "its code is not this node's fedlr" in reason and "changed: client/app.py" in reason


def test_an_extra_module_is_refused(fab):
    reason = refusal({**fab, "client/evil.py": b"import os\nos.system('id')\n"})
    assert "not in this node's fedlr: client/evil.py" in reason


def test_a_missing_module_is_refused(fab):
    reason = refusal({n: d for n, d in fab.items() if n != "fedlr/privacy/node.py"})
    assert "missing: fedlr/privacy/node.py" in reason


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda t: t.replace('name = "fedlr"', 'name = "evil"', 1), "it is the app 'evil', not fedlr"),
    (lambda t: t.replace('clientapp = "fedlr.client.app:app"', 'clientapp = "client.evil:app"'),
     "its components are"),
    (lambda t: t.replace('version = "0.1.0"', 'version = "0.0.9"', 1), "it is fedlr 0.0.9"),
])
def test_a_foreign_app_is_refused(fab, edit, expected):
    text = fab["pyproject.toml"].decode()
    assert edit(text) != text
    assert expected in refusal({**fab, "pyproject.toml": edit(text).encode()})


@pytest.mark.parametrize(("extra", "expected"), [
    ({"client/app.cpython-311.pyc": b"\0"}, "it carries client/app.cpython-311.pyc"),
    ({"evil.pth": b"import os"}, "it carries evil.pth"),
    ({"../outside.py": b""}, "paths outside the app"),
])
def test_code_in_other_forms_is_refused(fab, extra, expected):
    assert expected in refusal({**fab, **extra})


def test_a_fab_that_is_no_zip_or_a_corrupt_one_is_refused(fab):
    with pytest.raises(AppRefused, match="not a readable zip"):
        check_fab(b"PK\x03\x04 not really")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("pyproject.toml", fab["pyproject.toml"])
    data = bytearray(out.getvalue())
    start = data.index(b"pyproject.toml") + len("pyproject.toml")  # the compressed bytes
    data[start:start + 40] = bytes(40)
    with pytest.raises(AppRefused, match="not a readable zip"):
        check_fab(bytes(data))


# -- how the node is started -------------------------------------------------------------------


def test_the_supernode_runs_no_app_itself_and_guards_its_loopback_api(tmp_path):
    runner = prepare()
    try:
        assert stat.S_IMODE(runner.stat().st_mode) == 0o700
        assert stat.S_IMODE((runner / SECRET).stat().st_mode) == 0o600
        assert len((runner / SECRET).read_bytes()) == 32
        argv = supernode_argv("127.0.0.1:1", ca=None, key=None, partition_id=0,
                              num_partitions=1, port=9, insecure=True,
                              state_dir=tmp_path / "state", runner=runner)
    finally:
        shutil.rmtree(runner)
    pairs = dict(itertools.pairwise(argv))
    assert pairs["--isolation"] == "process"  # Flower's SuperExec would install and run the FAB
    assert pairs["--host"] == "127.0.0.1"
    assert pairs["--superexec-auth-secret-file"] == str(runner / SECRET)


# -- on a real deployment ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Two registered nodes: node 0 with its warm trainer, node 1 `--no-warm`."""
    dep = Deployment(tmp_path_factory.mktemp("app-trust"), num_nodes=2,
                     node_extra={1: ["--no-warm"]}).start()
    yield dep
    dep.close()


def malicious_copy(folder: Path, marker: Path, how: str) -> Path:
    """This repository with code that writes `marker` where a node would run it: one line
    added to its ClientApp ("changed"), or its own ClientApp module beside fedlr's, which
    then hands over to fedlr's so that the run looks normal ("foreign")."""
    app = folder / "fedlr"
    shutil.copytree(ROOT, app, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"))
    payload = f"__import__('pathlib').Path({str(marker)!r}).write_text('ran')\n"
    if how == "changed":
        clientapp = app / "client" / "app.py"
        clientapp.write_text(clientapp.read_text() + payload)
    else:
        (app / "evil_app.py").write_text(payload + "import fedlr.client.app\n\n"
                                         "app = fedlr.client.app.app\n")
        pyproject = app / "pyproject.toml"
        pyproject.write_text(pyproject.read_text().replace(
            'clientapp = "fedlr.client.app:app"', 'clientapp = "evil_app:app"'))
    return app


@pytest.mark.e2e
@pytest.mark.parametrize(("how", "reason"), [
    ("changed", "its code is not this node's fedlr 0.1.0 (changed: client/app.py)"),
    ("foreign", "its components are {'serverapp': 'fedlr.server.app:app', 'clientapp': "
                "'evil_app:app'}, not fedlr's"),
])
def test_every_node_refuses_a_changed_app_and_runs_none_of_it(deployment, tmp_path, how,
                                                              reason):
    marker = tmp_path / "the-apps-code-ran"
    app = malicious_copy(tmp_path, marker, how)
    out = tmp_path / "evil-run"
    settings = {**SETTINGS, "out": str(out), "connect_timeout": 15.0}
    done = subprocess.run([str(BIN / "flwr"), "run", str(app), "dep", "--run-config",
                           run_config(settings), "--stream"], env=deployment.env, cwd=app,
                          capture_output=True, text=True, timeout=300)
    server = done.stdout + done.stderr  # the ServerApp's log, streamed
    assert not marker.exists()
    for k in range(2):
        refusal = f"did not identify itself: node {k} refuses the run's app: {reason}"
        assert refusal in server, server[-3000:]
        assert f"node {k} refuses the run's app: {reason}" in deployment.log(f"client{k}.log")
    assert "0 of 2 clients connected" in server
    assert not (out / "metrics.jsonl").exists()  # not one round ran


@pytest.mark.e2e
def test_an_honest_run_still_trains_on_the_checked_nodes(deployment, tmp_path):
    out = tmp_path / "honest"
    deployment.run({**SETTINGS, "out": str(out)}, timeout=300)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds[0]["accepted"] == ["0", "1"], rounds[0]
    assert "warm trainer: client 0, round 1 trained" in deployment.log("client0.log")
    assert "warm trainer" not in deployment.log("client1.log")


@pytest.mark.e2e
@pytest.mark.parametrize("secret", [None, b"a guessed secret"])
def test_another_local_user_cannot_take_the_nodes_tasks(deployment, secret):
    """Another local user reaches the node's loopback runtime API with Flower's own client, but
    not its secret (its folder is 0700): no task is handed out, so no token (which every other
    call needs), and a made-up token is refused too."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullTaskInputRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.runtime import RuntimeHttpClient

    from fedlr.client.app_runner import ACQUIRE

    address = deployment.log("client0.log").split("Uvicorn running on http://", 1)[1].split()[0]
    extra = [] if secret is None else [
        SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE})]
    client = RuntimeHttpClient.from_server_address(  # no retries: it fails, or it does not
        address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"), *extra])
    with pytest.raises(httpx.HTTPStatusError) as refused:
        client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    assert refused.value.response.status_code == 401
    guess = RuntimeHttpClient.from_server_address(
        address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor("0" * 64)])
    with pytest.raises(httpx.HTTPStatusError) as refused:
        guess.PullTaskInput(PullTaskInputRequest())
    assert refused.value.response.status_code in (401, 403)


def runner_processes(address: str) -> list[int]:
    """Pids of this node's runner and task processes (their command lines name its API)."""
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            line = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "fedlr.client.app_runner" in line and address in line:
                pids.append(int(proc.name))
    return pids


@pytest.mark.e2e
def test_the_runner_and_its_secret_leave_with_the_supernode(deployment):
    """Run last: it stops node 1 (its process group, as a kill of `fedlr client` would)."""
    log = deployment.log("client1.log")
    address = log.split("Uvicorn running on http://", 1)[1].split()[0]
    secret = Path(log.split("--superexec-auth-secret-file", 1)[1].split()[0])
    assert runner_processes(address) and secret.exists()
    deployment.kill_node(1)
    deadline = time.monotonic() + 10
    while (runner_processes(address) or secret.exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not runner_processes(address)
    assert not secret.parent.exists()
