"""`fedlr server`: Flower's SuperLink with TLS and node authentication on by default."""

from __future__ import annotations

from pathlib import Path

from fedlr.errors import ConfigError

INSECURE_WARNING = (
    "WARNING: --insecure: the SuperLink accepts plain-text connections from any node. Updates, "
    "privacy ledgers and metrics travel unencrypted and unauthenticated. Use it on a private test "
    "network only."
)


def superlink_argv(
    certs: Path | None, *, host: str, port: int, database: Path, insecure: bool
) -> list[str]:
    """The flower-superlink command line: TLS from `certs` (ca.crt, server.pem, server.key) and
    SuperNode authentication, or plain text with `insecure`."""
    argv = ["flower-superlink", "--host", host, "--port", str(port), "--database", str(database),
            "--disable-runtime-dependency-installation"]
    if insecure:
        return [*argv, "--insecure"]
    if certs is None:
        raise ConfigError("give --certs DIR (made by `fedlr certs`) or, for tests only, --insecure")
    files = {name: certs / name for name in ("ca.crt", "server.pem", "server.key")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ConfigError(f"missing TLS files {missing}; create them with `fedlr certs {certs}`")
    return [*argv, "--ssl-ca-certfile", str(files["ca.crt"]), "--ssl-certfile",
            str(files["server.pem"]), "--ssl-keyfile", str(files["server.key"]),
            "--enable-supernode-auth"]
