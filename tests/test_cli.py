"""The `fedlr` command line as a user runs it: help everywhere, the demo, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fedlr.adapters import Adapter, LoraFactors, save_adapter

COMMANDS = [[], ["demo"], ["inspect"], ["simulate"], ["certs"], ["server"], ["client"], ["audit"],
            ["privacy", "plan"]]


def fedlr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedlr.cli", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "fedlr")
def test_every_command_has_help(command):
    result = fedlr(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout and "--help" in result.stdout


@pytest.mark.e2e
def test_demo_writes_metrics_and_rejects_the_corrupted_upload(tmp_path):
    out = tmp_path / "demo"
    result = fedlr(
        "demo",
        "--strategies",
        "fedit,ffa",
        "--num-clients",
        "4",
        "--clients-per-round",
        "3",
        "--ranks",
        "2,4",
        "--rounds",
        "2",
        "--local-steps",
        "2",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["strategy"], r["round"]) for r in rows] == [
        ("fedit", 1),
        ("fedit", 2),
        ("ffa", 1),
        ("ffa", 2),
    ]
    for r in rows:  # round 2 loses exactly the corrupted client, the others are aggregated
        assert len(r["rejected"]) == (r["round"] == 2)
        assert len(r["clients"]) == 3 - (r["round"] == 2)
    assert "non-finite" in rows[1]["rejected"][0]["reason"]
    assert rows[2]["residual"] < 1e-5 < rows[0]["residual"]  # ffa exact, fedit not
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, message",
    [
        (["demo", "--strategies", "fedprox"], "unknown strategies ['fedprox']"),
        (["demo", "--num-clients", "2", "--clients-per-round", "3"], "exceeds --num-clients"),
        (["demo", "--ranks", "4,x"], "--ranks must be comma-separated integers"),
        (["demo", "--ranks", "0"], "rank must be a positive integer"),
        (["inspect", "/nonexistent/adapter.safetensors"], "adapter file not found"),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, message, tmp_path):
    result = fedlr(*args, "--out", str(tmp_path / "out")) if args[0] == "demo" else fedlr(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_inspect_shows_modules_and_meta(tmp_path):
    path = tmp_path / "a.safetensors"
    f = LoraFactors(torch.ones(2, 3), torch.ones(4, 2), 0.5)
    save_adapter(Adapter(lora={"layer.q": f}, meta={"num_examples": 9}), path)
    result = fedlr("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert "layer.q" in result.stdout and "num_examples" in result.stdout
    assert f"{float(f.delta().norm()):.4g}" in result.stdout


def test_certs_writes_a_ca_server_certificate_and_node_keys_once(tmp_path):
    folder = tmp_path / "keys"
    made = fedlr("certs", str(folder), "--hosts", "fl.example.org,10.0.0.5", "--nodes", "3")
    assert made.returncode == 0, made.stderr
    expected = {"ca.crt", "ca.key", "server.pem", "server.key"} | {
        f"node{i}{ext}" for i in (1, 2, 3) for ext in ("", ".pub")
    }
    assert {p.name for p in folder.iterdir()} == expected
    again = fedlr("certs", str(folder))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    assert "Traceback" not in again.stderr


def test_privacy_plan_prints_the_dp_fedavg_golden_values():
    """DP-FedAvg q = 0.01, z = 1, 1000 rounds, delta 1e-5: RDP 2.1014, PLD 1.8282, PRV 1.8384."""
    done = fedlr("privacy", "plan", "--level", "client", "--noise", "1.0", "--rounds", "1000",
                 "--num-clients", "1000", "--clients-per-round", "10")
    assert done.returncode == 0, done.stderr
    for value in ("2.1014", "1.8282", "1.8384"):
        assert value in done.stdout


def test_privacy_plan_refuses_a_target_and_a_noise_together():
    done = fedlr("privacy", "plan", "--target-epsilon", "1", "--noise", "1", "--sample-rate",
                 "0.01")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "error:" in done.stderr


@pytest.mark.parametrize("args", [["simulate", "--strategy", "fedprox"],
                                  ["simulate", "--num-clients", "2", "--clients-per-round", "5"],
                                  ["demo", "--strategies", "fedprox"]])
def test_argument_errors_come_before_any_heavy_import(args):
    """Checked first, imported after: an error needs neither torch nor Flower (well under a
    second), and names the flag the user typed."""
    code = ("import sys\nfrom fedlr.cli import main\nsys.argv = ['fedlr', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as exit_:\n    code = exit_.code\n"
            "heavy = sorted(m for m in ('torch', 'flwr', 'transformers') if m in sys.modules)\n"
            "print(code, heavy)")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "2 []", done.stdout + done.stderr
    if "--clients-per-round" in args:
        assert "--clients-per-round 5" in " ".join(done.stderr.split())


def test_delta_must_be_a_probability_even_without_dp(tmp_path):
    result = fedlr("simulate", "--model", "tiny", "--delta", "5", "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "delta must be in (0, 1), got 5.0" in result.stderr
    assert not (tmp_path / "r").exists()


def test_simulate_help_shows_the_defaults():
    out = " ".join(fedlr("simulate", "--help").stdout.split())
    for default in ("(ffa)", "(8)", "(4,8,16)", "(hetlora)", "(stdlib-docs)"):
        assert default in out, default


EXIT_PROBE = """
import atexit, sys, threading, time
from fedlr.cli import entry
atexit.register(lambda: print("exit handler ran", flush=False))
def late():
    time.sleep(0.3)
    print("thread finished", flush=False)
threading.Thread(target=late).start()
sys.argv = ["fedlr", *sys.argv[1:]]
entry()
print("not reached")
"""


@pytest.mark.parametrize(("args", "code"), [(["--version"], 0), (["simulate", "--rounds", "0"], 2),
                                            (["no-such-command"], 2)])
def test_the_command_exits_at_once_yet_as_a_normal_exit_would(args, code):
    """`entry` leaves without tearing the interpreter down, but with the exit status `main`
    gave, after other threads finished and the exit handlers ran, and with buffered output
    (a pipe here) written out."""
    done = subprocess.run([sys.executable, "-c", EXIT_PROBE, *args], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == code, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-2:] == ["thread finished", "exit handler ran"], done.stdout
    assert "not reached" not in done.stdout
    if args == ["--version"]:
        assert lines[0].startswith("fedlr ")
    else:
        assert done.stderr.strip(), "the error is reported"


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (3, 3), ("a message", 1)])
def test_exit_status_is_what_sys_exit_would_exit_with(code, status, capsys):
    from fedlr.cli import exit_status

    assert exit_status(code) == status
    assert capsys.readouterr().err == ("a message\n" if isinstance(code, str) else "")
