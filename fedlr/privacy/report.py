"""What a run knows and publishes about privacy: each client's ledger as the client reports
it, the rounds each client joined where ids are published, each client's epsilon, the
client-level guarantee, and privacy.json. The coordinator feeds it; nothing here knows Flower."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlr.atomic import write_json
from fedlr.privacy.client_level import (
    client_level_description,
    client_level_epsilon,
    published_sample_epsilon,
)
from fedlr.privacy.plan import quiet_absl
from fedlr.privacy.sample_level import PrivacyLedger, opacus_epsilon
from fedlr.settings.schema import SimulationConfig


@dataclass
class RunPrivacy:
    config: SimulationConfig
    ledgers: dict[str, PrivacyLedger] = field(default_factory=dict)  # as the clients report
    client_rounds: dict[str, int] = field(default_factory=dict)  # published ids: rounds joined

    def to_checkpoint(self) -> dict[str, Any]:
        return {"ledgers": {c: led.to_dict() for c, led in self.ledgers.items()},
                "client_rounds": self.client_rounds}

    def restore(self, info: dict[str, Any]) -> None:
        self.ledgers = {c: PrivacyLedger.from_dict(d) for c, d in info["ledgers"].items()}
        self.client_rounds = dict(info.get("client_rounds", {}))

    def admit(self, client: str, ledger: PrivacyLedger) -> None:
        """Record the ledger a client reports, once the run's own accountant has counted it:
        the report is only evidence of steps (`PrivacyLedger.from_dict` has refused an unknown
        accountant label or too many mechanisms; the label never decides how the run counts),
        and one that cannot be counted raises here, for
        that client's reply alone (its rejection), never later in the round, ending the run."""
        dp = self.config.dp_config()
        if dp is not None:
            epsilon = opacus_epsilon(ledger.history, dp.delta, dp.accountant)
            if math.isnan(epsilon):
                raise ValueError("its ledger's epsilon is not a number")
        self.ledgers[client] = ledger

    def joined(self, accepted: list[str]) -> None:
        """Count each accepted client's round, where who joined is public."""
        if self.config.publish_client_ids:
            for client in accepted:
                self.client_rounds[client] = self.client_rounds.get(client, 0) + 1

    def epsilons(self) -> dict[str, float]:
        """Each client's epsilon so far: the accountant is the costly part of a round with
        hundreds of clients, so only histories no process has seen are computed
        (`opacus_epsilon` keeps every value; the clients have computed most already, and
        `admit` each reported one). The run's accountant counts every ledger."""
        dp = self.config.dp_config()
        if dp is None:
            return {}
        return {c: opacus_epsilon(led.history, dp.delta, dp.accountant)
                for c, led in self.ledgers.items()}

    @quiet_absl()  # dp-accounting's notes on each RDP order it drops, every round
    def client_level(self, round_: int) -> dict[str, Any]:
        """Client-level DP after `round_` released rounds: the facts and the epsilon. With
        published client ids, each client's own unamplified epsilon over the rounds it joined."""
        config, dp = self.config, self.config.client_dp_config()
        if dp is None:
            return {}
        n, m = config.num_clients, config.sampled_per_round
        facts = {
            **client_level_description(dp, n, m),
            "rounds": round_,
            "client_ids_published": config.publish_client_ids,
            "outside_guarantee": "example counts, client losses and metrics, the number of "
                                 "sampled, accepted and rejected clients per round and the kinds "
                                 "of rejections, and the server's view of each update (a trusted "
                                 "server samples, clips and noises)",
        }
        if config.secure_aggregation:
            facts.update(
                clipping="by each client, before it masks its part",
                noise_added_by="the server, to the unmasked sum of the clipped updates: it sees "
                               "that sum before the noise, never one client's update",
                outside_guarantee="client losses and metrics, the number of sampled, accepted "
                                  "and rejected clients per round and the kinds of rejections, "
                                  "and the server's view of each round's un-noised sum (a "
                                  "trusted server samples and noises; secure aggregation hides "
                                  "the individual updates)")
        if not config.publish_client_ids:
            epsilon = client_level_epsilon(dp, num_clients=n, per_round=m, rounds=round_)
            return {**facts, "epsilon": epsilon}
        clients = {c: {"rounds": k, "epsilon": published_sample_epsilon(dp, k)}
                   for c, k in sorted(self.client_rounds.items(), key=lambda kv: int(kv[0]))}
        return {
            **facts,
            "accounting": "client ids are published, so nothing is amplified by sampling: each "
                          "client's epsilon is the Gaussian mechanism composed over the rounds "
                          "its update was in",
            "clients": clients,
            "epsilon": max((c["epsilon"] for c in clients.values()), default=0.0),
        }

    def write(self, path: Path, epsilons: dict[str, float], client_level: dict[str, Any]) -> None:
        """privacy.json: sample-level DP per client (top level) and client-level DP, if on."""
        dp = self.config.dp_config()
        document: dict[str, Any] = {}
        if dp is not None:
            clients = {}
            for client, ledger in sorted(self.ledgers.items(), key=lambda kv: int(kv[0])):
                sigma, q, _ = ledger.history[-1] if ledger.history else (math.nan, math.nan, 0)
                clients[client] = {
                    "noise_multiplier": sigma,
                    "max_grad_norm": dp.max_grad_norm,
                    "sample_rate": q,
                    "sampling": ledger.sampling,
                    "steps": ledger.steps,
                    "rounds": ledger.rounds,
                    "epsilon": epsilons[client],
                    "history": [list(s) for s in ledger.history],
                }
            eps = [c["epsilon"] for c in clients.values()]
            not_poisson = sorted((c for c, led in self.ledgers.items() if led.non_poisson_steps),
                                 key=int)
            document.update({
                "delta": dp.delta,
                "accountant": dp.accountant,
                "privacy_unit": "one training example of one client (sample-level DP-SGD)",
                "sampling": "Poisson (as every client reports), q = batch_size / client examples"
                if not not_poisson else f"NOT Poisson for clients {not_poisson}: their epsilon "
                "assumes Poisson sampling and is not a guarantee",
                "randomness": "batch sampling and noise from OS entropy on each client",
                "ledger": "as each client reports it (its own, kept on the node)",
                "max_epsilon": max(eps) if eps else 0.0,
                "budget": dp.budget,
                "clients": clients,
            })
        if client_level:
            document["client_level"] = client_level
        if document:
            write_json(path, document)
