"""The peer of `benchmarks/peer.py`: fedlr's benchmark job written the way Flower's own examples
write a federated job, so that the two can be timed side by side.

A Message-API ClientApp and ServerApp with Flower's FedAvg. Each `train()` call does what the
examples do per call: it builds the model (MiniLM for sequence classification with a PEFT LoRA
adapter, r=8 on query and value, the classifier trained as `modules_to_save`), tokenises its
shard, builds the optimiser and, with DP, Opacus's PrivacyEngine (Poisson sampling) whose PRV
accountant gives the round's epsilon; it trains a few steps and returns the adapter and head.
The ServerApp evaluates the global weights centrally on the held-out examples every round, as
fedlr does by default. Nothing of fedlr is used but its data loader, so that both sides train
and evaluate on identical examples (the same shards, the same held-out subset).

Run by benchmarks/peer.py: python benchmarks/peer_app.py --clients 20 --rounds 2 --dp
(prints one JSON line: the strategy's per-round metrics).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from opacus import PrivacyEngine
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedlr.data.sources import evaluation_subset, load_data, partition
from fedlr.models.sources import resolve_source

warnings.filterwarnings("ignore", category=UserWarning)
logging.getLogger("opacus").setLevel(logging.ERROR)

# the job; benchmarks/peer.py gives fedlr the same values
MODEL = "minilm"
RANK, ALPHA, TARGETS = 8, 16, ["query", "value"]
BATCH_SIZE, LOCAL_STEPS, LR, MAX_LENGTH = 16, 5, 3e-3, 64
NOISE_MULTIPLIER, MAX_GRAD_NORM, DELTA = 1.0, 1.0, 1e-5
EVAL_EXAMPLES, SEED = 400, 0
TIMES = ("seconds", "setup_seconds", "step_seconds", "accountant_seconds")

_data: dict[int, Any] = {}  # like the examples' cached FederatedDataset: loaded once a process


def dataset(num_partitions: int) -> dict[str, Any]:
    """fedlr's built-in task, split as fedlr splits it (its loader, iid, seed 0)."""
    if num_partitions not in _data:
        data = load_data()
        _data[num_partitions] = {
            "labels": len(data.label_names),
            "shards": partition(data.train, num_partitions, "iid", seed=SEED),
            "heldout": evaluation_subset(data.heldout, EVAL_EXAMPLES, SEED),
        }
    return _data[num_partitions]


def build_model(num_labels: int) -> torch.nn.Module:
    model = AutoModelForSequenceClassification.from_pretrained(resolve_source(MODEL),
                                                               num_labels=num_labels)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                        modules_to_save=["classifier"], task_type="SEQ_CLS")
    return get_peft_model(model, config)


def tensors(rows: Any) -> TensorDataset:
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(MODEL))
    encoded = tokenizer(list(rows["text"]), padding="max_length", truncation=True,
                        max_length=MAX_LENGTH, return_tensors="pt")
    return TensorDataset(encoded["input_ids"], encoded["attention_mask"],
                         torch.tensor(rows["label"]))


# -- ClientApp --------------------------------------------------------------------------------

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    config = msg.content["config"]
    data = dataset(int(context.node_config["num-partitions"]))
    model = build_model(data["labels"])
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
    shard = tensors(data["shards"][int(context.node_config["partition-id"])])
    loader = DataLoader(shard, batch_size=BATCH_SIZE, shuffle=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine = None
    if config["dp"]:
        engine = PrivacyEngine(accountant="prv")
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM)
    set_up = time.perf_counter()

    model.train()
    losses: list[float] = []
    while len(losses) < LOCAL_STEPS:
        for input_ids, attention_mask, labels in loader:
            optimizer.zero_grad()
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) == LOCAL_STEPS:
                break
    stepped = time.perf_counter()

    metrics = {"train_loss": sum(losses) / len(losses), "num-examples": len(shard)}
    if engine is not None:
        metrics["epsilon"] = engine.get_epsilon(DELTA)
        model = model._module  # the PEFT model inside Opacus's GradSampleModule
    accounted = time.perf_counter()
    weights = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    metrics.update(setup_seconds=set_up - started, step_seconds=stepped - set_up,
                   accountant_seconds=accounted - stepped,
                   seconds=time.perf_counter() - started)
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=weights),
                          "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


# -- ServerApp --------------------------------------------------------------------------------

server = ServerApp()
job: dict[str, Any] = {}  # set by main() before the simulation starts, read by the server
results: dict[str, Any] = {}


def aggregate_train_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Example-weighted train loss, the largest epsilon, and the clients' times summed."""
    metrics = [r["metrics"] for r in records]
    total = sum(m[weighting_key] for m in metrics)
    out = {"train_loss": sum(m["train_loss"] * m[weighting_key] for m in metrics) / total}
    out.update({f"client_{k}": sum(m[k] for m in metrics) for k in TIMES})
    if "epsilon" in metrics[0]:
        out["epsilon_max"] = max(m["epsilon"] for m in metrics)
    return MetricRecord(out)


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Loss and accuracy of the global weights on the held-out examples fedlr evaluates on."""
    started = time.perf_counter()
    data = dataset(job["clients"])
    model = build_model(data["labels"])
    set_peft_model_state_dict(model, arrays.to_torch_state_dict())
    model.eval()
    loss, correct, heldout = 0.0, 0, tensors(data["heldout"])
    with torch.no_grad():
        for input_ids, attention_mask, labels in DataLoader(heldout, batch_size=64):
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            loss += out.loss.item() * len(labels)
            correct += int((out.logits.argmax(-1) == labels).sum())
    return MetricRecord({"eval_loss": loss / len(heldout), "eval_accuracy": correct / len(heldout),
                         "eval_seconds": time.perf_counter() - started})


@server.main()
def main_server(grid: Grid, context: Context) -> None:
    torch.manual_seed(SEED)  # the classifier's initial weights
    model = build_model(dataset(job["clients"])["labels"])
    initial = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=job["clients"],
                      min_available_nodes=job["clients"],
                      train_metrics_aggr_fn=aggregate_train_metrics)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(torch_state_dict=initial),
                            num_rounds=job["rounds"], train_config=ConfigRecord({"dp": job["dp"]}),
                            evaluate_fn=central_evaluate)
    results["train"] = {r: dict(m) for r, m in result.train_metrics_clientapp.items()}
    results["evaluate"] = {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dp", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    job.update(clients=args.clients, rounds=args.rounds, dp=args.dp)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per client, as fedlr runs them
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_simulation(
        server_app=server, client_app=app, num_supernodes=args.clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": os.cpu_count() or 1, "logging_level": "error",
                                      "include_dashboard": False, "log_to_driver": False}})
    if "train" not in results:
        raise SystemExit("the peer's simulation ended without a result; see the log above")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
