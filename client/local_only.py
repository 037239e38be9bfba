"""The local-only reference of `fedlr compare`: each client trains alone on its own shard for
the whole run (every round's local steps, as if it joined every round) and never shares
anything; its adapter is evaluated on the same held-out set as the federation's.

Under sample-level DP each client runs DP-SGD at the comparison's target epsilon over those
steps, with its draws from OS entropy as in a federated round. Results land in `local.json`
after every client, so a killed comparison continues with the next client."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedlr.atomic import write_json
from fedlr.client.training import LocalTrainer
from fedlr.comparison.results import LOCAL_RESULTS
from fedlr.evaluation import evaluate_as_trained
from fedlr.federation import Federation
from fedlr.peft_layout import load_into_peft_model
from fedlr.privacy.sample_level import PrivacyLedger
from fedlr.settings.schema import SimulationConfig


def train_local_only(config: SimulationConfig, out: Path,
                     on_client: Callable[[str], None] = lambda client: None) -> dict[str, Any]:
    """Train and evaluate every client alone (those `out/local.json` already holds are kept);
    returns the document written there. `on_client` is called after each client, trained now
    or before."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCAL_RESULTS
    done: dict[str, Any] = json.loads(path.read_text())["clients"] if path.exists() else {}
    fed = Federation.build(config)
    host, strategy = fed.model.host, fed.strategy
    train = replace(config.train_config(), local_steps=config.rounds * config.local_steps,
                    planned_rounds=1)
    trainer = LocalTrainer(host, train)
    state = strategy.init_state(host.initial_head)
    for client, rank in config.client_ranks().items():
        if client in done:
            on_client(client)
            continue
        ledger = PrivacyLedger(accountant=train.dp.accountant) if train.dp else None
        result = trainer.train(client, strategy.starting_adapter(state, client),
                               fed.data.shard(int(client)), rank=rank,
                               train_a=strategy.trains_a, train_head=strategy.trains_head,
                               ledger=ledger, seed=config.client_seed(0, client))
        model = host.model(rank)
        load_into_peft_model(model, result.adapter, host.adapter_name(rank))
        quality = evaluate_as_trained(host, model, fed.data.heldout, config.task,
                                      config.precision)
        done[client] = {"rank": rank, "examples": len(fed.data.shard(int(client))),
                        "steps": train.local_steps, **quality,
                        "epsilon": None if ledger is None else result.metrics["epsilon"]}
        write_json(path, document(config, done))
        on_client(client)
    return document(config, done)


def document(config: SimulationConfig, clients: dict[str, Any]) -> dict[str, Any]:
    """local.json: each client's own result, and their mean (what the comparison shows)."""
    metric = "accuracy" if config.task == "classification" else "perplexity"
    values = [c[metric] for c in clients.values()]
    epsilons = [c["epsilon"] for c in clients.values() if c["epsilon"] is not None]
    return {
        "what": "each client trained alone on its own shard for rounds x local_steps steps, "
                "evaluated on the federation's held-out set",
        "metric": metric,
        "complete": len(clients) == config.num_clients,
        f"mean_{metric}": statistics.fmean(values) if values else None,
        "epsilon_max": max(epsilons) if epsilons else None,
        "clients": dict(sorted(clients.items(), key=lambda kv: int(kv[0]))),
    }
