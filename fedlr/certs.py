"""Key material for a deployment: a CA, a TLS certificate for the server, and node key pairs.

The server certificate carries the given hosts as subject alternative names (DNS names or IP
addresses), so clients verify the server against the CA. Each node gets an ECDSA P-384 key pair in
OpenSSH format, the form Flower's SuperNode authentication uses: the public key is registered with
the SuperLink, the private key stays on the node. Private keys are written with mode 0600, and
nothing existing is ever overwritten.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlr.errors import ConfigError

CURVE = ec.SECP384R1()
LOOPBACK = "127.0.0.1"  # the SuperLink's address, behind `fedlr server`'s Fleet front


@dataclass
class CertificateSet:
    folder: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # name -> (key, pub)


def covers_loopback(server_pem: Path) -> bool:
    """Whether the server certificate names LOOPBACK (certificates made before fedlr's Fleet
    front may not, and the hop to the SuperLink then fails its TLS check)."""
    cert = x509.load_pem_x509_certificate(server_pem.read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return ipaddress.ip_address(LOOPBACK) in names.get_values_for_type(x509.IPAddress)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        if not host or any(c.isspace() for c in host):
            raise ConfigError(f"invalid host name for the server certificate: {host!r}") from None
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool) -> None:
    """Create a new file (never replace one); private keys readable by the owner only."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def create(
    folder: str | Path, hosts: Sequence[str], nodes: Sequence[str], days: int = 365
) -> CertificateSet:
    """Write ca.crt (+ ca.key), server.pem and server.key for `hosts` (and always for LOOPBACK,
    where the SuperLink itself listens behind `fedlr server`'s Fleet front), and one OpenSSH
    key pair per node name (`<name>` and `<name>.pub`) under `folder`."""
    folder = Path(folder)
    if not hosts:
        raise ConfigError("the server certificate needs at least one host (name or IP address)")
    if days < 1:
        raise ConfigError(f"certificate lifetime must be at least one day, got {days}")
    bad = [n for n in nodes if not n or "/" in n or n.startswith(".") or n in ("ca", "server")]
    if bad or len(set(nodes)) != len(nodes):
        raise ConfigError(f"node names must be distinct plain file names, got {list(nodes)}")
    names = ["ca.crt", "ca.key", "server.pem", "server.key"]
    names += [f for n in nodes for f in (n, f"{n}.pub")]
    existing = [n for n in names if (folder / n).exists()]
    if existing:
        raise ConfigError(
            f"{folder} already holds {existing[:3]}; refusing to overwrite keys, use a new folder"
        )
    sans = [_san(h) for h in dict.fromkeys([*hosts, LOOPBACK])]
    folder.mkdir(parents=True, exist_ok=True)

    now = datetime.datetime.now(datetime.UTC)
    until = now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(CURVE)
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("fedlr CA"))
        .issuer_name(_name("fedlr CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(CURVE)
    server = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    _write(folder / "ca.crt", ca.public_bytes(pem), private=False)
    _write(folder / "ca.key", _pem_key(ca_key, serialization.PrivateFormat.PKCS8), private=True)
    _write(folder / "server.pem", server.public_bytes(pem), private=False)
    _write(folder / "server.key", _pem_key(server_key, serialization.PrivateFormat.PKCS8),
           private=True)
    result = CertificateSet(folder, folder / "ca.crt", folder / "server.pem", folder / "server.key")
    for node in nodes:
        key = ec.generate_private_key(CURVE)
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(folder / node, _pem_key(key, serialization.PrivateFormat.OpenSSH), private=True)
        _write(folder / f"{node}.pub", public + f" {node}\n".encode(), private=False)
        result.node_keys[node] = (folder / node, folder / f"{node}.pub")
    return result
