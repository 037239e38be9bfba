"""A deployed node's warm trainer: one process, beside the node's SuperNode, that keeps the model
and the data loaded from round to round.

Flower (1.41) runs every message a node receives in a fresh `flwr-clientapp` process, so a
ClientApp that trained itself imported torch and transformers, loaded the model and partitioned
the data again in every round: about 9 CPU-seconds per round of the tiny preset on a 2-core
machine, for 1 s of training (on an edge GPU also a CUDA context and the model's upload).
`fedlr client` starts this trainer first; the ClientApp hands it each round's job (and the
preload that comes with the node's identification) over a Unix socket in a private folder
(mode 0700, with a random key: `multiprocessing.connection`'s HMAC handshake, so only this
node's own processes can ask it anything), and returns its answer to the server.

It trains exactly as the ClientApp would (`fedlr.client.jobs.run_job`, with the node's own
configuration from `fedlr client`: its state directory, ledger, limits and data; never from the
request), one job at a time, and answers what the ClientApp sends back to the server. Frames
carry the message's fields as JSON and its arrays as safetensors (numpy): nothing is unpickled,
and the asking side (this module and `fedlr.client.app`) never imports torch. The trainer
leaves, removing its folder, when `fedlr client`'s process (the SuperNode) is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import (
    AuthenticationError,
    Client,
    Connection,
    Listener,
    answer_challenge,
    deliver_challenge,
)
from pathlib import Path
from typing import Any

import numpy as np

from fedlr.errors import FedlrError

log = logging.getLogger("fedlr")
SOCKET = "trainer.sock"
KEY = "trainer.key"
READY = "trainer.ready"  # written once the socket listens (it exists, refusing, a moment before)
START_SECONDS = 60.0  # for the trainer to listen: its imports come after, with its first job
# Flower gives a node one message at a time; a request that arrives while the trainer is busy
# (its asker was stopped and the next message came) waits its turn, never trains beside it
BACKLOG = 8
# from a connection to its request read in full: a local peer that connects and says nothing (or
# stops halfway) is cut off after this, and the trainer serves the next one
REQUEST_SECONDS = 120.0


class TrainerUnavailable(FedlrError):
    """The node's trainer does not answer (not started, or gone): the ClientApp trains itself."""


Arrays = dict[str, np.ndarray]


def write_frames(conn: Connection, fields: dict[str, Any], arrays: Arrays) -> None:
    from safetensors.numpy import save

    conn.send_bytes(json.dumps(fields).encode())
    conn.send_bytes(save({k: np.ascontiguousarray(a) for k, a in arrays.items()}))


def read_frames(conn: Connection) -> tuple[dict[str, Any], Arrays]:
    from safetensors.numpy import load

    fields = json.loads(conn.recv_bytes().decode())
    return fields, load(conn.recv_bytes())


# -- the trainer's side ----------------------------------------------------------------------


def answer(fields: dict[str, Any], arrays: Arrays, node_config: dict[str, Any]
           ) -> tuple[dict[str, Any], Arrays]:
    """One request: a preload (the model loaded now; the answer names the device it trains
    on), or a `train` message's job, answered as the ClientApp answers it (B alone where A is
    frozen; a refusal, for the budget, limits or data, is an answer too)."""
    import torch

    from fedlr.client import jobs
    from fedlr.wire import Parts, TrainJob, TrainReply

    if fields.get("kind") == "preload":
        jobs.preload(str(fields["json"]), node_config)
        return {"kind": "preloaded", "device": jobs.device_name()}, {}

    def trained(down: TrainJob) -> TrainReply:
        reply = jobs.run_job(down.job, down.downlink, *jobs.train_here_config(node_config))
        log.info("warm trainer: client %s, round %s trained", down.job.client_id,
                 down.job.round)
        return reply

    out = jobs.job_answer(Parts({k: torch.from_numpy(a.copy()) for k, a in arrays.items()},
                                fields), trained)
    return out.fields, {k: t.detach().cpu().numpy() for k, t in out.arrays.items()}


@contextlib.contextmanager
def cut_off_after(conn: Connection, seconds: float) -> Iterator[None]:
    """Past `seconds`, shut the connection down: a read blocked on a silent peer then ends
    (EOFError) instead of holding the trainer."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))

    def shut() -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(seconds, shut)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        sock.close()


def serve(folder: Path, node_config: dict[str, Any], stop: threading.Event | None = None
          ) -> None:
    """Answer the node's requests, one at a time, until `stop` is set (or the process ends).
    An error of a request goes back to its asker (as `{"kind": "error"}`); the trainer goes on.
    The HMAC handshake runs here, not in `accept`, so that it has a deadline too."""
    key = (folder / KEY).read_bytes()
    listener = Listener(str(folder / SOCKET), family="AF_UNIX", backlog=BACKLOG)
    (folder / READY).touch()
    try:
        while stop is None or not stop.is_set():
            try:
                conn = listener.accept()
            except OSError as exc:
                log.warning("warm trainer: accept failed (%s)", exc)
                continue
            with conn:
                try:
                    with cut_off_after(conn, REQUEST_SECONDS):
                        deliver_challenge(conn, key)
                        answer_challenge(conn, key)
                        fields, arrays = read_frames(conn)
                except AuthenticationError as exc:  # a process without the key
                    log.warning("warm trainer: refused a connection (%s)", exc)
                    continue
                except (OSError, EOFError, ValueError) as exc:
                    log.warning("warm trainer: unreadable request (%s)", exc)
                    continue
                try:
                    reply = answer(fields, arrays, node_config)
                except Exception as exc:  # its asker reports it; the next round may go on
                    log.exception("warm trainer: the request failed")
                    reply = {"kind": "error", "reason": f"{type(exc).__name__}: {exc}"}, {}
                try:
                    write_frames(conn, *reply)
                except OSError as exc:  # the asker left (its process was stopped)
                    log.warning("warm trainer: the answer was not delivered (%s)", exc)
    finally:
        listener.close()


def watch_parent(parent: int, folder: Path) -> None:
    """Leave (and take the folder along) once the process that started the trainer is gone."""
    def loop() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        shutil.rmtree(folder, ignore_errors=True)
        os._exit(0)

    threading.Thread(target=loop, daemon=True, name="fedlr-trainer-parent").start()


def main() -> None:
    """`python -m fedlr.client.node_trainer FOLDER NODE_CONFIG` (started by `start`; the node
    config as `flower-supernode --node-config` takes it, read as Flower reads it)."""
    from flwr.common.config import parse_config_args

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = Path(sys.argv[1])
    watch_parent(os.getppid(), folder)
    serve(folder, parse_config_args([sys.argv[2]]))


# -- the node's side -----------------------------------------------------------------------------


def start(node_config: str) -> Path:
    """Start this node's trainer (a child of this process, which is about to become the
    SuperNode) with the node's configuration (`fedlr.client.launch.node_config_text`) in a new
    private folder; returned once it listens."""
    folder = Path(tempfile.mkdtemp(prefix="fedlr-trainer-"))  # mode 0700, this user's only
    key = folder / KEY
    key.touch(mode=0o600)
    key.write_bytes(secrets.token_bytes(32))
    # its own session: a signal to the node's process group (Ctrl-C, a kill of the group) ends
    # the SuperNode, and the trainer follows it within a second, cleaning up (`watch_parent`)
    subprocess.Popen([sys.executable, "-m", "fedlr.client.node_trainer", str(folder),
                      node_config], start_new_session=True)
    deadline = time.monotonic() + START_SECONDS
    while not (folder / READY).exists():
        if time.monotonic() > deadline:
            raise FedlrError(f"the node's trainer did not start within {START_SECONDS:.0f} s; "
                             "start the node with --no-warm to train in each round's process")
        time.sleep(0.05)
    return folder


def ask(folder: Path, fields: dict[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
    """One request to the trainer in `folder`; TrainerUnavailable when it cannot be reached
    (the ClientApp then does the work itself), RuntimeError when it failed the request."""
    try:
        conn = Client(str(folder / SOCKET), family="AF_UNIX",
                      authkey=(folder / KEY).read_bytes())
    except (OSError, EOFError, AuthenticationError) as exc:
        raise TrainerUnavailable(f"no trainer at {folder} ({exc!r})") from None
    with conn:
        try:
            write_frames(conn, fields, arrays)
            reply, out = read_frames(conn)
        except (OSError, EOFError) as exc:
            raise TrainerUnavailable(f"the trainer at {folder} left ({exc})") from None
    if reply.get("kind") == "error":
        raise RuntimeError(f"the node's warm trainer failed: {reply['reason']}")
    return reply, out


def preload_remotely(folder: Path, text: str) -> str:
    """The run's model loaded in the trainer; the device it trains on."""
    return str(ask(folder, {"kind": "preload", "json": text}, {})[0]["device"])


if __name__ == "__main__":
    main()
