"""The server's side of a SecAgg+ round: four exchanges with the round's clients, then the
unmasking of the sum. Transport-free: `secure_round` is given an `Exchange` that carries one
stage's messages and brings the answers back (Flower's Grid in `fedlr.server.coordinator`, direct
calls in tests), so what the server receives is exactly what passes through it.

Who takes part shrinks stage by stage: U1 advertised keys, U2 sent shares, U3 sent a well-formed
masked part whose shares all opened. The sum covers U3. A client of U2 that is not in U3 dropped
after its neighbours masked with it: its mask key is rebuilt from its neighbours' shares and their
pairwise masks with it removed. Each U3 client's self mask is rebuilt from shares, so a U3 client
that vanishes in the last stage still counts. A secret with fewer than t shares fails the round
(the state unchanged); nobody ever gets both secrets of one client.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any, NoReturn

import numpy as np

from fedlr.client_ids import client_order
from fedlr.errors import RoundFailedError
from fedlr.lora.rounds import Rejection, RoundPlan, RoundResult, checked_state
from fedlr.lora.strategies.base import GlobalState, Strategy
from fedlr.privacy.secagg import crypto
from fedlr.privacy.secagg.encoding import Encoding, decode
from fedlr.privacy.secagg.graph import degree, neighbourhoods, threshold
from fedlr.privacy.secagg.settings import SecAggSettings
from fedlr.wire_fields import STAGE_FIELD

Fields = dict[str, Any]
Exchange = Callable[[str, dict[str, Fields]], dict[str, Fields | Rejection]]
STAGES = ("train", "share", "mask", "unmask")


class _Stage:
    """One exchange: send, then sort the answers into good ones and rejections."""

    def __init__(self, exchange: Exchange, round_: int, rejected: list[Rejection]) -> None:
        self.exchange, self.round, self.rejected = exchange, round_, rejected
        self.seconds: dict[str, float] = {}  # each stage's exchange, then the unmasking

    def run(self, stage: str, messages: dict[str, Fields],
            check: Callable[[str, Fields], str | None]) -> dict[str, Fields]:
        started = time.perf_counter()
        replies = self.exchange(stage, {c: {**m, STAGE_FIELD: stage, "round": self.round}
                                         for c, m in messages.items()})
        self.seconds[stage] = time.perf_counter() - started
        good = {}
        for client in sorted(messages, key=client_order):
            reply = replies.get(client)
            if reply is None:
                self.rejected.append(Rejection(client, f"no reply in the secure-aggregation "
                                               f"{stage} stage (dropped or timed out)",
                                               "no reply"))
            elif isinstance(reply, Rejection):
                self.rejected.append(reply)
            elif (problem := _problem(check, client, reply)) is not None:
                self.rejected.append(Rejection(client, f"malformed {stage} reply: {problem}",
                                               "malformed reply"))
            else:
                good[client] = reply
        return good


def _problem(check: Callable[[str, Fields], str | None], client: str, reply: Fields
             ) -> str | None:
    try:
        return check(client, reply)
    except Exception as exc:  # the client's input alone (a deep JSON raises RecursionError)
        return f"{type(exc).__name__}: {str(exc)[:300]}"


def _json_of(reply: Fields, key: str, kind: type) -> Any:
    value = json.loads(str(reply[key]))
    if not isinstance(value, kind):
        raise ValueError(f"{key} is not a {kind.__name__}")
    return value


def secure_round(strategy: Strategy, state: GlobalState, plan: RoundPlan, exchange: Exchange,
                 settings: SecAggSettings, *, min_valid_updates: int = 1,
                 max_update_norm: float | None = None,
                 rng: random.Random | None = None) -> RoundResult:
    """Run one secure round for `plan`'s reachable clients; the `train` stage's messages are
    completed by the transport with each client's job. Raises RoundFailedError (state unchanged)
    when too few clients are left or a secret cannot be rebuilt."""
    round_ = plan.round
    clients = list(plan.downlinks)
    spec = strategy.secure_sum(state)
    encoding = Encoding(spec, spec.clip_norm or settings.value_range, settings.max_weight,
                        settings.bits, max(len(clients), 1), max_update_norm)
    graph = neighbourhoods(clients, settings.neighbours, rng or random.SystemRandom())
    k = degree(len(clients), settings.neighbours) if clients else 0
    t = threshold(k + 1, settings.threshold)
    rejected: list[Rejection] = list(plan.unreachable)
    stage = _Stage(exchange, round_, rejected)

    def keys_ok(_: str, r: Fields) -> str | None:
        sizes = [len(r["c_pk"]), len(r["s_pk"])] if all(
            isinstance(r.get(k), bytes) for k in ("c_pk", "s_pk")) else []
        return None if sizes == [32, 32] else "public keys must be 32 bytes each"

    setup = {c: {"secagg": json.dumps({"round": round_, "client": c, "neighbours": graph[c],
                                       "threshold": t, "encoding": encoding.to_json()})}
             for c in clients}
    keys = stage.run("train", setup, keys_ok)
    u1 = set(keys)

    order = {u: [v for v in graph[u] if v in u1] for u in u1}

    def shares_ok(c: str, r: Fields) -> str | None:
        crypto.unpack(r["shares"], order[c], crypto.SEALED_BYTES)
        ok = isinstance(r["b_digest"], bytes) and len(r["b_digest"]) == 32
        return None if ok else "the digest of b must be 32 bytes"

    shares = stage.run("share", {u: {
        "peers": json.dumps(order[u]),
        "keys": b"".join(keys[v]["c_pk"] + keys[v]["s_pk"] for v in order[u])}
        for u in sorted(u1, key=client_order)}, shares_ok)
    u2 = set(shares)
    sealed = {u: crypto.unpack(r["shares"], order[u], crypto.SEALED_BYTES)
              for u, r in shares.items()}
    peers = {u: [v for v in graph[u] if v in u2] for u in u2}
    length = encoding.size * encoding.dtype.itemsize

    def masked_ok(c: str, r: Fields) -> str | None:
        if not isinstance(r["masked"], bytes) or len(r["masked"]) != length:
            size = len(r["masked"]) if isinstance(r["masked"], bytes) else type(r["masked"])
            return f"masked part of {size} bytes, expected {length}"
        bad = _json_of(r, "bad_shares", list)
        return None if set(bad) <= set(peers[c]) else "bad shares named from non-neighbours"

    masked = stage.run("mask", {u: {
        "from": json.dumps(peers[u]),
        "shares": crypto.pack({v: sealed[v][u] for v in peers[u]}, peers[u],
                              crypto.SEALED_BYTES)}
        for u in sorted(u2, key=client_order)}, masked_ok)
    for reporter, reply in list(masked.items()):
        for culprit in json.loads(reply["bad_shares"]):
            if culprit in masked:
                rejected.append(Rejection(culprit, f"malformed shares: client {reporter} could "
                                          "not open the shares it sent", "malformed reply"))
                del masked[culprit]
    u3 = sorted(masked, key=client_order)
    # without noise on it, a sum over one client is that client's update
    needed = 0 if strategy.every_round_released else max(min_valid_updates, 2)
    if len(u3) < needed:
        _fail(round_, f"{len(u3)} client(s) sent a valid masked part, at least {needed} needed "
              "(a sum over one client would be its update)", rejected)
    if not u3:
        new_state = strategy.carry_over(state)
        report = strategy.sum_report(new_state.round, decode(encoding, np.zeros(
            encoding.size, encoding.dtype), 0), 1.0)
        return RoundResult(new_state, report, [], rejected,
                           _facts(report, 0, k, t, stage.seconds))
    dropped = sorted(u2 - set(u3), key=client_order)

    revealed = stage.run("unmask", {u: {
        "survivors": json.dumps([v for v in [u, *peers[u]] if v in masked]),
        "dropped": json.dumps([v for v in peers[u] if v not in masked])} for u in u3},
        _revealed_ok)
    held = _shares_by_owner(revealed)
    started = time.perf_counter()
    total = np.zeros(encoding.size, encoding.dtype)
    for u in u3:
        total += np.frombuffer(masked[u]["masked"], dtype=encoding.dtype)
        b = _rebuild(round_, u, "self-mask seed", held["b"].get(u, []), t, rejected)
        if crypto.digest(b) != shares[u]["b_digest"]:
            _fail(round_, f"client {u}'s self-mask seed does not match its digest (a client "
                  "sent a false share)", rejected)
        total -= crypto.expand(b, encoding.size, encoding.dtype)
    for d in dropped:
        survivors = [u for u in peers[d] if u in masked]
        if not survivors:
            continue
        s_sk = _rebuild(round_, d, "mask key", held["sk"].get(d, []), t, rejected)
        if crypto.public_of(s_sk) != keys[d]["s_pk"]:
            _fail(round_, f"client {d}'s mask key does not match its public key (a client sent "
                  "a false share)", rejected)
        for u in survivors:
            seed = crypto.agree(s_sk, keys[u]["s_pk"], crypto.label("masks", round_))
            pairwise = crypto.expand(seed, encoding.size, encoding.dtype)
            # u added +PRG when its id is the smaller: take back what it added
            total = total - pairwise if client_order(u) < client_order(d) else total + pairwise
    decoded = decode(encoding, total, len(u3), strategy.spec.dtype)
    new_state, report = strategy.aggregate_sum(state, decoded)
    checked_state(new_state, strategy, rejected)
    stage.seconds["unmasking"] = time.perf_counter() - started
    return RoundResult(new_state, report, u3, rejected,
                       _facts(report, len(dropped), k, t, stage.seconds))


def _revealed_ok(_: str, r: Fields) -> str | None:
    for kind in ("b", "sk"):
        crypto.unpack(r[f"{kind}_shares"], _json_of(r, f"{kind}_of", list), crypto.SHARE_BYTES)
    return None


def _shares_by_owner(revealed: dict[str, Fields]) -> dict[str, dict[str, list[bytes]]]:
    """Every revealed share, by kind ("b" or "sk") and by the client whose secret it is."""
    out: dict[str, dict[str, list[bytes]]] = {"b": {}, "sk": {}}
    for reply in revealed.values():
        for kind in out:
            owners = json.loads(reply[f"{kind}_of"])
            shares = crypto.unpack(reply[f"{kind}_shares"], owners, crypto.SHARE_BYTES)
            for owner, share in shares.items():
                out[kind].setdefault(owner, []).append(share)
    return out


def _rebuild(round_: int, owner: str, what: str, shares: list[bytes], t: int,
             rejected: list[Rejection]) -> bytes:
    if len(shares) < t:
        _fail(round_, f"client {owner}'s {what} has {len(shares)} share(s), the threshold is "
              f"{t}: too few clients answered the unmask stage", rejected)
    try:
        return crypto.combine(shares[:t])
    except ValueError as exc:
        _fail(round_, f"client {owner}'s {what} does not rebuild ({exc}): a client sent a "
              "false share", rejected)


def _fail(round_: int, why: str, rejected: list[Rejection]) -> NoReturn:
    left = "; ".join(f"{r.client_id}: {r.reason}" for r in rejected)
    raise RoundFailedError(f"round {round_}: secure aggregation failed: {why}; the global state "
                           f"is unchanged" + (f" (left out: {left})" if left else ""), rejected)


def _facts(report: Any, dropped_after_masking: int, k: int, t: int,
           seconds: dict[str, float]) -> dict[str, Any]:
    return {"secagg_quantization_error": report.details.get("secagg_quantization_error"),
            "secagg_clipped_values": report.details.get("secagg_clipped_values", 0),
            "secagg_dropped_after_masking": dropped_after_masking,
            "secagg_neighbours": k, "secagg_threshold": t,
            "secagg_seconds": {name: round(s, 4) for name, s in seconds.items()}}
