"""In-process SecAgg+ clients for tests: each answers the server's stages through
`fedlr.privacy.secagg.client.respond`, as the Flower ClientApp does, and everything the server
receives is recorded, so a test can play the server."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from fedlr.adapters import Adapter
from fedlr.lora.rounds import Rejection, RoundPlan, plan_round
from fedlr.lora.strategies import ClientUpdate, GlobalState, Strategy
from fedlr.privacy.secagg.client import respond
from fedlr.privacy.secagg.encoding import Encoding, encode

Fields = dict
Tamper = Callable[[str, str, Fields], Fields | None]  # (stage, client, reply) -> reply or None


class InProcessClients:
    """The round's clients; `tamper` may change or drop (None) any reply before the server."""

    def __init__(self, updates: dict[str, ClientUpdate], starts: dict[str, Adapter],
                 tamper: Tamper | None = None) -> None:
        self.updates, self.starts, self.tamper = updates, starts, tamper
        self.kept: dict[str, dict] = {}
        self.received: list[tuple[str, str, Fields]] = []  # everything the server got
        self.parts: dict[str, np.ndarray] = {}  # each client's encoded part, before masking
        self.rng = np.random.default_rng()

    def part(self, client: str, encoding: Encoding) -> np.ndarray:
        self.parts[client] = encode(encoding, self.updates[client], self.starts[client], self.rng)
        return self.parts[client]

    def __call__(self, stage: str, messages: dict[str, Fields]) -> dict[str, Fields | Rejection]:
        replies: dict[str, Fields | Rejection] = {}
        for client, message in messages.items():
            reply, self.kept[client] = respond(
                message, self.kept.get(client, {}),
                lambda enc, c=client: self.part(c, enc))
            if self.tamper is not None:
                reply = self.tamper(stage, client, reply)
            if reply is not None:
                replies[client] = reply
                self.received.append((stage, client, reply))
        return replies


def digit_ids(strategy_factory, spec):
    """fedlr's client ids are partition numbers; test specs name clients c0, c1, ..."""
    ranks = {str(i): r for i, r in enumerate(spec.ranks.values())}
    return strategy_factory(dataclasses.replace(spec, ranks=ranks))


def round_inputs(strategy: Strategy, state: GlobalState, updates: list[ClientUpdate]
                 ) -> tuple[RoundPlan, dict[str, ClientUpdate], dict[str, Adapter]]:
    plan = plan_round(strategy, state, [u.client_id for u in updates])
    return plan, {u.client_id: u for u in updates}, plan.starts


def widest(updates: list[ClientUpdate]) -> float:
    """The largest absolute value any client encodes (a value range that clips nothing)."""
    return max(float(t.abs().max()) for u in updates
               for t in [*(x for f in u.adapter.lora.values()
                           for x in (f.effective().A, f.effective().B)),
                         *u.adapter.extras.values()])


def dense(state: GlobalState) -> dict[str, torch.Tensor]:
    return {name: x.dense() for name, x in state.lora.items()}
