"""Issue 36, finding 1: the server's public address served Flower's Control API, which
authenticates nobody, so anyone holding the public ca.crt could list, submit and stop runs and
register their own node key. `fedlr server` now serves the Fleet API alone there
(`fedlr.server.fleet_front`); the Control and runtime APIs listen on loopback only.

The attacker here is another machine: its own FLWR_HOME with only `ca.crt` and the public
address, and any HTTP request it likes."""

from __future__ import annotations

import datetime
import json
import os
import subprocess

import httpx
import pytest
from deployment import BIN, ROOT, Deployment
from hypothesis import given
from hypothesis import strategies as st

from fedlr.certs import LOOPBACK, covers_loopback, create
from fedlr.errors import ConfigError
from fedlr.server.fleet_front import FLEET_CALLS, FLEET_PATHS, refusal
from fedlr.server.launch import ServerPlan

FRONT_SAYS = "this address serves SuperNodes only"


def scope(path: str, method: str = "POST", query: bytes = b"", raw: bytes | None = None) -> dict:
    return {"type": "http", "method": method, "path": path, "query_string": query,
            "raw_path": path.encode() if raw is None else raw, "headers": []}


def test_exactly_the_fleet_calls_pass():
    for call in FLEET_CALLS:
        assert refusal(scope(f"/v1/fleet/{call}")) is None
    assert refusal(scope("/v1/fleet/get-run", method="GET"))[0] == 405
    for path in ("/v1/control/list-runs", "/v1/control/register-node",
                 "/v1/runtime/pull-messages", "/v1/fleet/get-run/", "//v1/fleet/get-run",
                 "/V1/FLEET/GET-RUN", "/v1/fleet", "/docs", "/openapi.json", "/health"):
        assert refusal(scope(path))[0] == 404, path
    assert refusal(scope("/v1/fleet/get-run", query=b"x=1"))[0] == 404
    # what the router would see after decoding is not what is matched: the raw target is
    assert refusal(scope("/v1/fleet/get-run", raw=b"/v1/fleet%2Fget-run"))[0] == 404


@given(st.text(max_size=60))
def test_no_other_path_passes(tail):
    path = "/v1/" + tail
    assert (refusal(scope(path)) is None) == (path.encode() in FLEET_PATHS)


def test_the_superlink_listens_on_loopback_only_and_its_certificate_names_it(tmp_path):
    keys = create(tmp_path / "keys", ["fl.example.org"], [])  # no 127.0.0.1 asked for
    assert covers_loopback(keys.server_cert)
    plan = ServerPlan(keys.folder, "0.0.0.0", 8000, 9093, tmp_path / "db", insecure=False)
    argv = plan.superlink()
    assert argv[argv.index("--host") + 1] == LOOPBACK and "--enable-supernode-auth" in argv
    with pytest.raises(ConfigError, match="need a port each"):
        ServerPlan(keys.folder, "0.0.0.0", 8000, 8000, tmp_path / "db", insecure=False)


def test_a_certificate_without_loopback_is_refused_before_anything_starts(tmp_path):
    """One made before the front (or by hand): the hop to the SuperLink would fail its check."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    keys = create(tmp_path / "keys", ["fl.example.org"], [])
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "fl.example.org")])
    old = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
           .public_key(key.public_key()).serial_number(1)
           .not_valid_before(datetime.datetime(2026, 1, 1))
           .not_valid_after(datetime.datetime(2027, 1, 1))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName("fl.example.org")]),
                          critical=False)
           .sign(key, hashes.SHA256()))
    keys.server_cert.write_bytes(old.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match=r"does not name 127\.0\.0\.1"):
        ServerPlan(keys.folder, "0.0.0.0", 8000, 9093, tmp_path / "db", insecure=False)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    dep = Deployment(tmp_path_factory.mktemp("control-plane"), num_nodes=1).start()
    yield dep
    dep.close()


def flwr(home, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_HOME": str(home)}
    return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True,
                          timeout=120)


def registered(deployment) -> list[dict]:
    """The nodes the SuperLink knows, as its operator lists them on the server machine."""
    done = flwr(deployment.folder / "home", "supernode", "list", "dep", "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)["nodes"]


@pytest.fixture(scope="module")
def elsewhere(deployment, tmp_path_factory):
    """Another machine's FLWR_HOME: the public address and ca.crt, nothing else."""
    home = tmp_path_factory.mktemp("attacker-home")
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "public"\n\n[superlink.public]\n'
        f'address = "127.0.0.1:{deployment.port}"\n'
        f'root-certificates = "{deployment.keys.ca_cert}"\n')
    return home


@pytest.mark.e2e  # a real server and node
def test_another_machine_can_neither_list_nor_submit_nor_register(deployment, elsewhere,
                                                                  tmp_path):
    before = registered(deployment)
    evil = create(tmp_path / "evil", ["localhost"], ["evil"]).node_keys["evil"][1]
    attempts = {
        "ls": flwr(elsewhere, "ls", "public"),
        "register": flwr(elsewhere, "supernode", "register", str(evil), "public"),
        "list nodes": flwr(elsewhere, "supernode", "list", "public"),
        "run": flwr(elsewhere, "run", str(ROOT), "public", "--run-config", "rounds=1"),
    }
    for what, done in attempts.items():  # refused by the front, not failed on the way
        assert done.returncode != 0 and "404 Not Found" in done.stdout + done.stderr, (
            what, done.stdout, done.stderr)
    def ids(nodes):
        return sorted(n["node-id"] for n in nodes)

    assert len(before) == 1 and ids(registered(deployment)) == ids(before)  # no evil key


@pytest.mark.e2e  # a real server and node
@pytest.mark.parametrize("path", [
    "/v1/control/list-runs", "/v1/control/register-node", "/v1/control/start-run",
    "/v1/control/stop-run",
    "/v1/runtime/pull-messages", "/v1/fleet/../control/list-runs",
    "/v1/fleet/%2e%2e/control/list-runs", "/docs"])
def test_every_other_request_is_answered_by_the_front_without_reaching_the_superlink(
        deployment, path):
    with httpx.Client(verify=str(deployment.keys.ca_cert)) as client:
        answer = client.send(client.build_request(
            "POST", f"https://127.0.0.1:{deployment.port}{path}", content=b"",
            headers={"content-type": "application/protobuf"}))
    assert answer.status_code == 404
    assert FRONT_SAYS in answer.text


@pytest.mark.e2e  # a real server and node
def test_the_fleet_api_still_answers_through_the_front(deployment):
    """Flower's own answer to a malformed Fleet call (its error format, not the front's): the
    call reached the SuperLink; the deployment's node joined through the same front."""
    with httpx.Client(verify=str(deployment.keys.ca_cert)) as client:
        answer = client.post(f"https://127.0.0.1:{deployment.port}/v1/fleet/get-run",
                             content=b"", headers={"content-type": "text/plain"})
    assert answer.status_code == 415 and FRONT_SAYS not in answer.text
    assert "Content-Type" in answer.json()["detail"]
    assert registered(deployment)[0]["status"] == "online"
