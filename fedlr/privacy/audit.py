"""`fedlr audit RUN_DIR`: the privacy report of a finished (or running) run.

It re-derives every epsilon from the mechanism the run recorded (per client: sigma, q and steps
of every segment; client level: z, S, sampling, rounds), with the run's own accountant and with
dp-accounting's PLD and RDP as an independent cross-check, and says what the guarantee covers and
what it does not. Accountants that disagree by more than 1 % (beyond the PRV accountant's stated
numerical error of 0.01) and clients over budget are flagged: a report that cannot be checked
is not a privacy claim.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
from pathlib import Path
from typing import Any

from fedlr.atomic import atomic_write
from fedlr.errors import ConfigError
from fedlr.privacy.client_level import (
    ClientDPConfig,
    client_level_epsilon,
    published_sample_epsilon,
)
from fedlr.privacy.sample_level import dp_accounting_epsilon, opacus_epsilon
from fedlr.run_metrics import METRICS_FILE, read_metrics

DISAGREEMENT = 0.01  # relative, on top of the numerical error the PRV accountant states
COMPARED = ("the run's accountant agrees within 1 % (+0.01 for PRV's stated error) with "
            "dp-accounting's accountant of the same kind (PRV with PLD, RDP with RDP); the other "
            "RDP figure is an upper bound, looser than PRV/PLD by design, and is not compared")
PRV_EPS_ERROR = 0.01  # Opacus's PRV accountant: epsilon is exact to about this, absolutely
OUTSIDE_SAMPLE_LEVEL = [
    "each client's example count (the FedAvg weight), training loss and other metrics",
    "which rounds each client took part in, its rank, and rejection reasons",
    "the held-out evaluation (server-side data, not the clients')",
]
RNG = ("Sample level: each client draws its Poisson batches and its Gaussian noise from torch "
       "generators seeded with 63 bits of OS entropy (Python's secrets) on the client, fresh "
       "every round; the job's seed, which the server chooses and run.json records, seeds only "
       "non-private training. Client level: the server draws the clients from the OS's random "
       "source (random.SystemRandom) and the noise from a torch generator seeded with OS "
       "entropy. torch's generators (Mersenne Twister on CPU, Philox on CUDA) are not "
       "cryptographically secure (Opacus's secure_mode needs torchcsprng, which has no build "
       "for this torch); floating-point attacks on the Gaussian sampler are out of scope.")
TRUST = [
    ("sample level (DP-SGD)", "a client's examples",
     "the server and everyone after it (released adapters, the run directory)",
     "the client's own code and machine: it samples, clips, noises and keeps its ledger and "
     "limits; the server need not be honest"),
    ("client level (DP-FedAvg)", "a client's whole contribution",
     "everyone who sees what the server releases (global adapters, checkpoints, the export, "
     "the run directory)",
     "the server: it sees each update, samples the clients in secret, clips and noises"),
]


def _versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in ("opacus", "dp-accounting")}


def _relative_gap(a: float, b: float) -> float:
    if math.isinf(a) and math.isinf(b):
        return 0.0
    return abs(a - b) / max(abs(b), 1e-12)


def sample_level(privacy: dict[str, Any]) -> dict[str, Any]:
    """Every client's epsilon from its recorded history: the run's accountant, PLD and RDP."""
    delta, accountant = privacy["delta"], privacy["accountant"]
    budget = privacy.get("budget")
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 < delta < 1:
        raise ValueError(f"delta {delta!r} is not a number in (0, 1)")
    if accountant not in ("prv", "rdp"):
        raise ValueError(f"unknown accountant {accountant!r}")
    if budget is not None and not isinstance(budget, int | float):
        raise ValueError(f"budget {budget!r} is not a number")
    clients, flags = {}, []
    for cid, info in privacy["clients"].items():
        history = [(float(s), float(q), int(n)) for s, q, n in info["history"]]
        sampling = info.get("sampling", "not recorded")
        if sampling != "poisson":
            flags.append(f"client {cid}: batch sampling {sampling}; its epsilon assumes Poisson "
                         "sampling and is not a guarantee")
        accounted = opacus_epsilon(history, delta, accountant)
        pld = dp_accounting_epsilon(history, delta, "pld")
        rdp = dp_accounting_epsilon(history, delta, "rdp")
        second = pld if accountant == "prv" else rdp  # same method family, other library
        gap = _relative_gap(accounted, second)
        slack = PRV_EPS_ERROR if accountant == "prv" else 0.0
        over = budget is not None and accounted > budget * (1 + 1e-9)
        if abs(accounted - second) > DISAGREEMENT * abs(second) + slack:
            flags.append(f"client {cid}: {accountant} {accounted:.4f} and dp-accounting "
                         f"{second:.4f} differ by {gap:.1%}")
        if over:
            flags.append(f"client {cid}: epsilon {accounted:.4f} is over its budget {budget}")
        if abs(accounted - float(info["epsilon"])) > 1e-6 * max(1.0, accounted):
            flags.append(f"client {cid}: privacy.json says {info['epsilon']}, the audit "
                         f"computes {accounted:.6f}")
        clients[cid] = {
            "history": [list(s) for s in history],
            "steps": sum(n for _, _, n in history),
            "rounds": info["rounds"],
            "sampling": sampling,
            "epsilon": accounted,
            "epsilon_pld": pld,
            "epsilon_rdp": rdp,
            "relative_gap": gap,
            "over_budget": over,
        }
    worst = max(clients.values(), key=lambda c: c["epsilon"], default=None)
    return {
        "privacy_unit": privacy["privacy_unit"],
        "adjacency": "add or remove one example of one client",
        "sampling": privacy["sampling"],
        "delta": delta,
        "accountant": accountant,
        "budget": budget,
        "epsilon_accounted": worst["epsilon"] if worst else 0.0,
        "epsilon_cross_check": max((c["epsilon_pld"] for c in clients.values()), default=0.0),
        "clients": clients,
        "flags": flags,
        "outside_guarantee": OUTSIDE_SAMPLE_LEVEL,
        "amplification_by_client_sampling": "not claimed",
    }


def client_level(facts: dict[str, Any]) -> dict[str, Any]:
    """The client-level epsilon, recomputed, with the other accountant where one applies. A run
    that published its clients is recomputed per client, without amplification by sampling."""
    sampling = facts["sampling"]
    method = "poisson" if sampling["method"] == "poisson" else "fixed"
    population = {"num_clients": sampling["num_clients"], "per_round": sampling["per_round"],
                  "rounds": facts["rounds"]}
    published = bool(facts.get("client_ids_published"))

    def epsilon(accountant: str) -> float:
        config = ClientDPConfig(facts["noise_multiplier"], facts["clip_norm"], method,
                               facts["delta"], accountant)
        if not published:
            return client_level_epsilon(config, **population)
        return max((published_sample_epsilon(config, int(c["rounds"]))
                    for c in facts["clients"].values()), default=0.0)

    accounted = epsilon(facts["accountant"])
    other = None if method == "fixed" else epsilon(
        "pld" if facts["accountant"] == "rdp" else "rdp")
    flags = []
    if abs(accounted - facts["epsilon"]) > 1e-6 * max(1.0, accounted):
        flags.append(f"client level: privacy.json says {facts['epsilon']}, the audit computes "
                     f"{accounted:.6f}")
    return {**facts, "epsilon": accounted, "epsilon_other_accountant": other, "flags": flags,
            "cross_check_note": "RDP is an upper bound, looser than PLD by design, so the two "
                                "are not expected to agree; fixed-size sampling has no PLD "
                                "accountant in dp-accounting"}


EMPIRICAL_KEYS = {"sample_level": "empirical", "client_level": "empirical_client_level"}


def read_privacy(run: Path) -> dict[str, Any]:
    """privacy.json of a run, or a ConfigError that names the file and the problem: an audit
    never certifies what it could not read."""
    if not run.is_dir():
        raise ConfigError(f"{run} does not exist or is not a directory; give a run directory")
    path = run / "privacy.json"
    if not path.is_file():
        raise ConfigError(f"{run} has no privacy.json: the run was not differentially private, "
                          "there is nothing to audit")
    try:
        privacy = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); nothing was audited") from None
    if not isinstance(privacy, dict) or not ({"clients", "client_level"} & set(privacy)):
        raise ConfigError(f"{path} holds no privacy facts (neither 'clients' nor "
                          "'client_level'); nothing was audited")
    return privacy


def audit_run(run: Path, empirical: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The whole report as one JSON-able dict; `empirical` maps a level (sample_level,
    client_level) to its canary audit's result."""
    privacy = read_privacy(run)
    report: dict[str, Any] = {"run": str(run), "versions": _versions(), "rng": RNG}
    try:
        if "clients" in privacy:
            report["sample_level"] = sample_level(privacy)
        if "client_level" in privacy:
            report["client_level"] = client_level(privacy["client_level"])
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        name = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ConfigError(f"{run / 'privacy.json'} is malformed ({type(exc).__name__}: {name}); "
                          "nothing was audited") from None
    levels = [report[k] for k in ("sample_level", "client_level") if k in report]
    report["flags"] = [f for level in levels for f in level["flags"]]
    for level, found in (empirical or {}).items():
        report[EMPIRICAL_KEYS[level]] = found
        if found["epsilon_lower_bound"] > found["epsilon_claimed"]:
            report["flags"].append(
                f"empirical ({level.replace('_', ' ')}): the canaries certify epsilon >= "
                f"{found['epsilon_lower_bound']:.3f}, above the {found['epsilon_claimed']:.3f} "
                "the same mechanism is accounted at: the mechanism or its accounting is broken")
    sample = report.get("sample_level", {})
    report["epsilon_accounted"] = sample.get("epsilon_accounted")
    report["epsilon_cross_check"] = sample.get("epsilon_cross_check")
    return report


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def markdown(report: dict[str, Any]) -> str:
    """audit.md: the same numbers as audit.json, readable on its own."""
    lines = [f"# Privacy audit of `{report['run']}`", ""]
    lines += ["Every epsilon below is recomputed from the mechanism the run recorded, not copied "
              "from it.", ""]
    if report["flags"]:
        lines += ["## Flags", "", *[f"- **{f}**" for f in report["flags"]], ""]
    else:
        lines += ["No flags: " + COMPARED + ", no client is over budget, and the run's own "
                  "figures match.", ""]
    sample = report.get("sample_level")
    if sample:
        lines += [
            "## Sample level (DP-SGD on each client)", "",
            f"- Privacy unit: {sample['privacy_unit']}; adjacency: {sample['adjacency']}.",
            f"- Sampling: {sample['sampling']}; amplification by client sampling: "
            f"{sample['amplification_by_client_sampling']}.",
            f"- delta = {sample['delta']:g}; accountant: {sample['accountant']} (Opacus "
            f"{report['versions']['opacus']}); cross-check: dp-accounting "
            f"{report['versions']['dp-accounting']} PLD and RDP.",
            f"- Claim: **epsilon = {_fmt(sample['epsilon_accounted'])}** (max over clients); "
            f"PLD cross-check {_fmt(sample['epsilon_cross_check'])}; budget "
            f"{sample['budget'] if sample['budget'] is not None else 'none'}.", "",
            "| client | rounds | steps | segments (sigma, q, steps) | sampling | epsilon | PLD "
            "| RDP | gap |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for cid, c in sorted(sample["clients"].items(), key=lambda kv: int(kv[0])):
            segments = "; ".join(f"({s:g}, {q:.4g}, {n})" for s, q, n in c["history"])
            lines.append(f"| {cid} | {c['rounds']} | {c['steps']} | {segments} | {c['sampling']} | "
                         f"{_fmt(c['epsilon'])} | {_fmt(c['epsilon_pld'])} | "
                         f"{_fmt(c['epsilon_rdp'])} | {c['relative_gap']:.2%} |")
        lines += ["", "Released outside this guarantee: "
                  + "; ".join(sample["outside_guarantee"]) + ".", ""]
    client = report.get("client_level")
    if client:
        lines += [
            "## Client level (DP-FedAvg on the server)", "",
            f"- Privacy unit: {client['privacy_unit']}; adjacency: {client['adjacency']} "
            f"(sensitivity {client['sensitivity']:g}).",
            f"- Sampling: {client['sampling']}; z = {client['noise_multiplier']:g}, "
            f"S = {client['clip_norm']:g}, noise std on the sum {client['noise_std_on_sum']:g}.",
            f"- {client['rounds']} rounds, delta = {client['delta']:g}, accountant "
            f"{client['accountant']} ({client['accountant_library']}).",
            f"- Claim: **epsilon = {_fmt(client['epsilon'])}**; other accountant: "
            f"{_fmt(client['epsilon_other_accountant'])} ({client['cross_check_note']}).",
            f"- Outside: {client['outside_guarantee']}.", "",
        ]
        if client.get("client_ids_published"):
            lines += [f"- **Client ids are published** (opt-in): {client['accounting']}.", "",
                      "| client | rounds joined | epsilon |", "|---|---|---|",
                      *[f"| {cid} | {c['rounds']} | {_fmt(c['epsilon'])} |"
                        for cid, c in client["clients"].items()], ""]
        else:
            lines += ["- The client sample is kept secret: the run directory holds only counts "
                      "of sampled, accepted and rejected clients.", ""]
    for level, key in EMPIRICAL_KEYS.items():
        if key in report:
            lines += _empirical_section(level.replace("_", " "), report[key])
    lines += ["## Trust model", "",
              "| guarantee | protects | against | who must be honest |", "|---|---|---|---|",
              *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in TRUST], "",
              "## Randomness", "", report["rng"], ""]
    return "\n".join(lines)


def _empirical_section(level: str, audit: dict[str, Any]) -> list[str]:
    return [
        f"## Empirical lower bound, {level} (canary audit)", "",
        f"- Method: {audit['kind']} (Steinke, Nasr, Jagielski 2023).",
        f"- Threat model: {audit['threat_model']}.",
        f"- Rerun: {audit['setup']}.",
        f"- Canaries: {audit['canaries']}, each included with probability "
        f"{audit['inclusion_probability']} ({audit['included']} included, "
        f"{audit['sampled_at_least_once']} drawn at least once). Score: {audit['score']}.",
        f"- Guesses: {audit['guesses']}, correct: {audit['correct']}; significance "
        f"{audit['significance']} split over {audit['pairs_tried']} abstention levels.",
        f"- **epsilon lower bound = {audit['epsilon_lower_bound']:.4f}** next to the claimed "
        f"**{audit['epsilon_claimed']:.4f}** (delta {audit['delta']:g}, {audit['accountant']}); "
        f"the most {audit['canaries']} canaries could certify: {audit['ceiling']:.4f}.",
        "- A lower bound is evidence, not a proof of privacy: one below the claim says the audit "
        "found no violation, one above it means a bug.", "",
    ]


def plot(report: dict[str, Any], metrics: list[dict[str, Any]], path: Path) -> None:
    """Epsilon over rounds (max over clients, and client level) and each client's epsilon."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    rounds = [m["round"] for m in metrics]
    for key, label in (("epsilon_max", "sample level (max over clients)"),
                       ("client_epsilon", "client level")):
        if any(key in m for m in metrics):
            left.plot(rounds, [m.get(key) for m in metrics], marker="o", label=label)
    budget = report.get("sample_level", {}).get("budget")
    if budget is not None:
        left.axhline(budget, color="red", linestyle="--", label=f"budget {budget:g}")
    left.set(xlabel="round", ylabel="epsilon", title="epsilon over rounds")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    if left.lines:
        left.legend()
    clients = report.get("sample_level", {}).get("clients", {})
    ids = sorted(clients, key=int)
    right.bar(ids, [clients[c]["epsilon"] for c in ids])
    right.set(xlabel="client", ylabel="epsilon", title="sample-level epsilon per client")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_audit(run: Path, empirical: dict[str, dict[str, Any]] | None = None
                ) -> dict[str, Any]:
    """audit.json, audit.md and audit.png in the run directory (each replaced atomically)."""
    report = audit_run(run, empirical)
    metrics = read_metrics(run / METRICS_FILE)
    text = json.dumps(report, indent=2, sort_keys=True) + "\n"
    atomic_write(run / "audit.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    atomic_write(run / "audit.md",
                 lambda tmp: Path(tmp).write_text(markdown(report), encoding="utf-8"))
    plot(report, metrics, run / "audit.png")
    return report

