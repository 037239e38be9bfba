"""The Flower ClientApp: it routes each message to what answers it.

On a deployed node with a warm trainer (`fedlr client`'s default), a round's job goes to the
trainer as it came (fields and arrays) and its answer goes back as it is: Flower runs every
message in a fresh process, and this one then imports Flower and nothing of torch. Everything
else (a simulation's worker, a node without its trainer, a secure-aggregation stage, a batched
group) is answered in this process by `fedlr.client.jobs`, imported when first needed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlr.client.node_trainer import TrainerUnavailable, ask, preload_remotely
from fedlr.wire_fields import GROUP_FIELD, PRELOAD_FIELD, STAGE_FIELD

app = ClientApp()
log = logging.getLogger("fedlr")


def warm_trainer(context: Context) -> Path | None:
    """The folder of this node's warm trainer, where `fedlr client` started one."""
    folder = context.node_config.get("trainer")
    return Path(str(folder)) if folder else None


def relayed(content: RecordDict, trainer: Path) -> RecordDict:
    """A job's message answered by the node's trainer, carried both ways as it is."""
    fields, arrays = ask(trainer, dict(content["fields"]),
                         {name: array.numpy() for name, array in content["arrays"].items()})
    return RecordDict({
        "arrays": ArrayRecord(array_dict={k: Array.from_numpy_ndarray(a) for k, a in
                                          arrays.items()}),
        "fields": ConfigRecord(fields),
    })


@app.train()
def train(msg: Message, context: Context) -> Message:
    trainer = warm_trainer(context)
    fields = msg.content["fields"]
    if trainer is not None and STAGE_FIELD not in fields and GROUP_FIELD not in fields:
        try:
            return Message(content=relayed(msg.content, trainer), reply_to=msg)
        except TrainerUnavailable as exc:
            log.warning("%s; training in this process", exc)
            trainer = None
    from fedlr.client.jobs import answer_message

    return Message(content=answer_message(msg.content, context, trainer), reply_to=msg)


def preloaded_device(text: str, trainer: Path | None, node_config: dict) -> str:
    """Load the run's model where the jobs will run (the node's warm trainer, else this
    process: a simulation's worker serves every round from it); the device it trains on."""
    if trainer is not None:
        try:
            return preload_remotely(trainer, text)
        except TrainerUnavailable as exc:
            log.warning("%s; preloading in this process", exc)
    from fedlr.client.jobs import device_name, preload

    preload(text, node_config)
    return device_name()


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Which client this node is (its partition id, set when it was started) and the device it
    trains on; first the model the server said every job will use is loaded (`Preload`)."""
    if PRELOAD_FIELD in msg.content:
        device = preloaded_device(str(msg.content[PRELOAD_FIELD]["json"]),
                                  warm_trainer(context), dict(context.node_config))
    else:
        from fedlr.client.jobs import device_name

        device = device_name()
    node = context.node_config
    identity = ConfigRecord({
        "partition-id": int(node["partition-id"]),
        "num-partitions": int(node["num-partitions"]),
        "device": device,
        "data": str(node.get("data-path", "its partition of the run's dataset")),
    })
    return Message(content=RecordDict({"identity": identity}), reply_to=msg)
