"""`fedlr certs`: a CA that signs a server certificate for the given hosts, and node key pairs."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlr.certs import create
from fedlr.errors import ConfigError


@pytest.fixture
def certs(tmp_path):
    return create(tmp_path / "certs", ["localhost", "127.0.0.1"], ["node1", "node2"])


def test_the_server_certificate_is_signed_by_the_ca_for_every_host(certs):
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key(certs.server_key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_another_ca_does_not_verify_the_server(certs, tmp_path):
    other = create(tmp_path / "other", ["localhost"], [])
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    foreign = x509.load_pem_x509_certificate(other.ca_cert.read_bytes())
    with pytest.raises(InvalidSignature):  # same CA name, different key
        server.verify_directly_issued_by(foreign)


def test_node_keys_are_openssh_p384_pairs_and_private_keys_are_owner_only(certs):
    for name, (private, public) in certs.node_keys.items():
        key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
        pub = serialization.load_ssh_public_key(public.read_bytes())
        assert isinstance(key.curve, ec.SECP384R1)
        assert key.public_key().public_numbers() == pub.public_numbers()
        signature = key.sign(b"challenge", ec.ECDSA(hashes.SHA384()))
        pub.verify(signature, b"challenge", ec.ECDSA(hashes.SHA384()))  # raises if not a pair
        assert public.read_text().rstrip().endswith(name)
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(certs.server_key.stat().st_mode) == 0o600
    assert len({p.read_bytes() for _, p in certs.node_keys.values()}) == 2


def test_existing_keys_are_never_overwritten(certs):
    before = certs.ca_cert.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        create(certs.folder, ["localhost"], ["node3"])
    assert certs.ca_cert.read_bytes() == before
    assert not (certs.folder / "node3").exists()


@pytest.mark.parametrize(
    ("hosts", "nodes", "message"),
    [([], ["a"], "at least one host"), (["bad host"], [], "invalid host"),
     (["localhost"], ["a", "a"], "distinct"), (["localhost"], ["../x"], "distinct")],
)
def test_bad_requests_fail_before_writing_anything(tmp_path, hosts, nodes, message):
    with pytest.raises(ConfigError, match=message):
        create(tmp_path / "c", hosts, nodes)
    assert not (tmp_path / "c").exists()
