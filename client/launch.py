"""`fedlr client`: a Flower SuperNode on an edge machine, verifying the server and signing in
with its own key."""

from __future__ import annotations

from pathlib import Path

from fedlr.errors import ConfigError


def supernode_argv(
    superlink: str, *, ca: Path | None, key: Path | None, partition_id: int,
    num_partitions: int, port: int, insecure: bool,
) -> list[str]:
    """The flower-supernode command line for one client of the federation."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"partition id {partition_id} must be in [0, {num_partitions}); it selects this "
            "client's share of the data"
        )
    argv = ["flower-supernode", "--superlink", superlink, "--node-config",
            f"partition-id={partition_id} num-partitions={num_partitions}",
            "--port", str(port)]
    if insecure:
        return [*argv, "--insecure"]
    for what, path in (("--ca", ca), ("--key", key)):
        if path is None or not path.is_file():
            raise ConfigError(f"{what} file not found: {path}; create keys with `fedlr certs`")
    return [*argv, "--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]
