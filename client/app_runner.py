"""A deployed node's ClientApp runner: the only process that executes a run's messages.

`fedlr client` starts the SuperNode with `--isolation process`, so Flower itself never installs
a run's FAB or imports its code, and starts this runner beside it (a child that leaves, with its
folder, when the SuperNode ends). The runner takes each pending task from the SuperNode's
runtime API, as Flower's SuperExec does, and hands it to a fresh process (`python -P -m
fedlr.client.app_runner task`: a message per process, as Flower runs them, so a `--no-warm`
node keeps nothing between rounds). That process pulls the task's inputs (FAB, message,
context) with Flower's own functions, checks the FAB (`fedlr.client.app_trust`: fedlr's app,
with exactly the node's installed Python code) and only then calls the node's *installed*
`fedlr.client.app` ClientApp, which still relays jobs to the warm trainer. A refused FAB is
answered with an error reply naming the reason (the server records it) and logged; nothing of
it is unpacked or run.

The runtime API listens on loopback only, and taking a task needs the SuperNode's SuperExec
secret (`--superexec-auth-secret-file`, Flower's HMAC): a file of 32 random bytes, mode 0600, in
a private folder (0700) that this node's processes alone can read. A task's token goes to its
process on stdin, never on a command line another local user could read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("fedlr")
SECRET = "superexec.secret"
POLL_SECONDS = 0.1  # between looks for a task (Flower's SuperExec: 1 s unless configured)
START_SECONDS = 120.0  # for the SuperNode's runtime API to listen
ACQUIRE = "/flwr.proto.Runtime/AcquireTask"


def prepare() -> Path:
    """A new private folder holding a fresh SuperExec secret, for the SuperNode and the runner."""
    folder = Path(tempfile.mkdtemp(prefix="fedlr-runner-"))  # mode 0700, this user's only
    secret = folder / SECRET
    with os.fdopen(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
        out.write(secrets.token_bytes(32))
    return folder


def start(folder: Path, runtime_api_address: str) -> None:
    """Start the runner, a child of this process (about to become the SuperNode), in its own
    session: it follows the SuperNode out within a second (`node_trainer.watch_parent`)."""
    subprocess.Popen([sys.executable, "-P", "-m", "fedlr.client.app_runner", "serve",
                      str(folder), runtime_api_address], start_new_session=True)


# -- the runner ------------------------------------------------------------------------------


def runtime_client(address: str, component: str, interceptor: object):
    """Flower's HTTP client of the SuperNode's runtime API (plain HTTP on loopback), as
    `component` (the Flower process whose part it plays)."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name=component),
                      interceptor],
        retry_invoker=make_simple_http_retry_invoker())


def wait_for_api(address: str) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 1):
            return
        time.sleep(0.1)
    raise TimeoutError(f"the SuperNode's runtime API at {address} did not start")


def serve(folder: Path, address: str) -> None:
    """Take the SuperNode's tasks, one process each, until the SuperNode ends."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

    from fedlr.client.node_trainer import watch_parent

    watch_parent(os.getppid(), folder)
    wait_for_api(address)
    client = runtime_client(address, "SuperExec", SuperExecAuthHttpInterceptor(
        master_secret=(folder / SECRET).read_bytes(), protected_methods={ACQUIRE}))
    tasks: list[subprocess.Popen] = []
    while True:
        got = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if got.HasField("task") and got.token:
            task = subprocess.Popen([sys.executable, "-P", "-m", "fedlr.client.app_runner",
                                     "task", address], stdin=subprocess.PIPE)
            assert task.stdin is not None
            with task.stdin:
                task.stdin.write(got.token.encode())
            tasks.append(task)
        tasks = [t for t in tasks if t.poll() is None]  # reaps the finished ones
        time.sleep(POLL_SECONDS)


# -- one task --------------------------------------------------------------------------------


def leave_with(runner: int) -> None:
    """End this task once the runner is gone (it follows its SuperNode): Flower's client would
    otherwise retry a vanished runtime API forever, and nothing could take the answer."""
    def loop() -> None:
        while os.getppid() == runner:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=loop, daemon=True, name="fedlr-task-runner").start()


def run_task(address: str, token: str) -> None:
    """One message: its inputs pulled, its FAB checked, then the installed ClientApp's answer
    (or an error reply with the reason) pushed, all with Flower's own protocol functions."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    from fedlr.client.app_trust import AppRefused, check_fab

    leave_with(os.getppid())
    client = runtime_client(address, "flwr-clientapp", RuntimeTokenHttpInterceptor(token))
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "the ClientApp task failed"
    try:
        message, context, _, fab = pull_task_input(client)
        try:
            check_fab(fab.content)
        except AppRefused as exc:
            details = (f"node {context.node_config.get('partition-id', '?')} refuses the run's "
                       f"app: {exc}")
            log.error("%s", details)
            reply = Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=details),
                            reply_to=message)
        else:
            from fedlr.client.app import app

            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # answered as Flower's ClientApp process answers a failure
        log.exception("the ClientApp failed")
        details = f"{type(exc)}:<'{exc}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                            reply_to=message)
    finally:
        if reply is not None and context is not None:
            try:
                push_message(client, reply, context)
            except Exception:  # the server sees a missing reply
                log.exception("the reply could not be pushed")
        push_task_output(client, context, status, details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()


def main() -> None:
    """`python -P -m fedlr.client.app_runner serve FOLDER ADDRESS` (the runner, from `start`)
    or `... task ADDRESS` with the task's token on stdin (one message, from the runner)."""
    logging.basicConfig(format="%(message)s")  # warnings of other libraries (httpx's INFO
    log.setLevel(logging.INFO)                  # logs every request)
    if sys.argv[1] == "serve":
        serve(Path(sys.argv[2]), sys.argv[3])
    else:
        run_task(sys.argv[2], sys.stdin.read().strip())


if __name__ == "__main__":
    main()
