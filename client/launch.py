"""`fedlr client`: a Flower SuperNode on an edge machine, verifying the server and signing in
with its own key, and keeping its privacy ledger and limits on its own disk."""

from __future__ import annotations

from pathlib import Path

from fedlr.errors import ConfigError
from fedlr.node_policy import NodePolicy
from fedlr.privacy.node import NodeLimits, NodeState


def check_carried(what: str, path: Path | None) -> None:
    """A path Flower's node config carries in double quotes: a quote would end it early (the
    node would read another path), a backslash or control character would change it."""
    text = str(path or "")
    if '"' in text or "\\" in text or not text.isprintable():
        raise ConfigError(f"{what} {text!r} has a quote, backslash or control character, "
                          "which Flower's node config cannot carry; choose another path")


def node_config_text(partition_id: int, num_partitions: int, state_dir: Path,
                     limits: NodeLimits | None = None, data: Path | None = None,
                     policy: NodePolicy | None = None) -> str:
    """The node's own configuration as Flower's `--node-config` (what the ClientApp and the
    node's trainer read): its client id, data, state, limits and job policy (the default one
    unless given: a node `fedlr client` starts always bounds its jobs). The node's ledger in
    `state_dir` is read once here, so a corrupt one stops the node before it starts."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"partition id {partition_id} must be in [0, {num_partitions}); it selects this "
            "client's share of the data"
        )
    for what, path in (("--data", data), ("--state-dir", state_dir)):
        check_carried(what, path)
    node_config = f"partition-id={partition_id} num-partitions={num_partitions}"
    if data is not None:  # this machine's own examples, used instead of the run's dataset
        if not data.is_file():
            raise ConfigError(f"--data file not found: {data}")
        node_config += f' data-path="{data.resolve()}"'
    NodeState(state_dir).load()
    node_config += f' state-dir="{state_dir.expanduser().resolve()}"'
    for name, value in (limits or NodeLimits()).node_config().items():
        node_config += f" {name}={value!r}"
    for name, value in (policy or NodePolicy()).node_config().items():
        node_config += f' {name}="{value}"' if isinstance(value, str) else f" {name}={value}"
    return node_config


def supernode_argv(
    superlink: str, *, ca: Path | None, key: Path | None, partition_id: int,
    num_partitions: int, port: int, insecure: bool, state_dir: Path,
    limits: NodeLimits | None = None, give_up_after: float | None = None,
    data: Path | None = None, trainer: Path | None = None, runner: Path | None = None,
    policy: NodePolicy | None = None,
) -> list[str]:
    """The flower-supernode command line for one client of the federation. It reconnects after
    a lost connection (a server restart) forever, or for `give_up_after` seconds. `trainer`:
    the folder of the node's warm trainer (`fedlr.client.node_trainer`), which the ClientApp
    hands its jobs to. The SuperNode never runs a run's app itself (`--isolation process`):
    the node's ClientApp runner (`fedlr.client.app_runner`, whose folder `runner` holds the
    secret that guards the loopback runtime API; `fedlr client` always starts one) checks each
    run's app and runs the node's installed fedlr."""
    node_config = node_config_text(partition_id, num_partitions, state_dir, limits, data, policy)
    if trainer is not None:
        check_carried("the trainer's folder (under TMPDIR)", trainer)
        node_config += f' trainer="{trainer}"'
    argv = ["flower-supernode", "--superlink", superlink, "--node-config", node_config,
            "--isolation", "process", "--host", "127.0.0.1", "--port", str(port)]
    if runner is not None:
        from fedlr.client.app_runner import SECRET

        argv += ["--superexec-auth-secret-file", str(runner / SECRET)]
    if give_up_after is not None:
        argv += ["--max-wait-time", str(give_up_after)]
    if insecure:
        return [*argv, "--insecure"]
    for what, path in (("--ca", ca), ("--key", key)):
        if path is None or not path.is_file():
            raise ConfigError(f"{what} file not found: {path}; create keys with `fedlr certs`")
    return [*argv, "--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]
