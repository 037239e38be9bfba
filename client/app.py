"""The Flower ClientApp: one round of local training per `train` message.

Everything a client needs arrives in the message (see `fedlr.payload.Job`), and the frozen base
and the tokenised data are loaded once per process (`fedlr.session`), so one app serves both a
simulation of hundreds of virtual clients and a deployed edge machine.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlr.adapters import adapter_from_tensors
from fedlr.client.training import LocalTrainer
from fedlr.payload import Job, adapter_payload
from fedlr.privacy import BudgetExhaustedError, PrivacyLedger
from fedlr.session import data_session, model_session

app = ClientApp()


def run_job(job: Job, downlink: dict[str, torch.Tensor]) -> RecordDict:
    """Train as the job says and package the reply: the trained factors (B alone when A is
    frozen), the head, the example count and metrics, and the updated ledger."""
    model = job.model_spec()
    session = model_session(model, job.alpha, job.train["device"])
    data = data_session(job.data_spec(), model)
    start = adapter_from_tensors(downlink, job.scalings)
    ledger = PrivacyLedger.from_dict(job.ledger) if job.ledger is not None else None
    config = job.train_config()
    if config.dp is not None and ledger is None:
        ledger = PrivacyLedger(accountant=config.dp.accountant)
    result = LocalTrainer(session.host, config).train(
        job.client_id,
        start,
        data.shard(int(job.client_id)),
        rank=job.rank,
        train_a=job.train_a,
        train_head=job.train_head,
        ledger=ledger,
        seed=job.seed,
    )
    trained, scalings = adapter_payload(result.adapter)
    flat = {k: t for k, t in trained.items() if job.train_a or not k.startswith("lora_A::")}
    numbers = {k: float(v) for k, v in result.metrics.items() if isinstance(v, int | float)}
    info = {
        "client_id": job.client_id,
        "scalings": json.dumps(scalings),
        "ledger": json.dumps(ledger.to_dict()) if ledger is not None else "",
        "grad_sample_mode": str(result.metrics.get("grad_sample_mode", "")),
    }
    return RecordDict(
        {
            "adapter": ArrayRecord(torch_state_dict=flat),
            "metrics": MetricRecord({"num-examples": result.num_examples, **numbers}),
            "info": ConfigRecord(info),
        }
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    job = Job.from_json(str(msg.content["config"]["job"]))
    downlink = msg.content["adapter"].to_torch_state_dict()
    try:
        content = run_job(job, downlink)
    except BudgetExhaustedError as exc:  # a refusal, not a crash: the server logs the reason
        content = RecordDict({"info": ConfigRecord({"client_id": job.client_id,
                                                    "refused": str(exc)})})
    return Message(content=content, reply_to=msg)
