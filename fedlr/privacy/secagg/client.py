"""A client's side of a SecAgg+ round, in four stages, as pure functions of the message and of
what the client kept from its earlier stages (`kept`, plain bytes and strings, which the Flower
glue stores in the node's own context and never sends).

1. `advertise`: after training, the client encodes its part (`encoding.encode`), draws two fresh
   X25519 key pairs from the OS (one to encrypt shares, one for pairwise masks) and sends the
   public keys.
2. `share`: given its neighbours' public keys, it draws a self-mask seed b, splits b and its
   mask private key into Shamir shares for its neighbours and itself, and sends each neighbour's
   shares encrypted to that neighbour, with SHA-256(b) so that a rebuilt b can be checked.
3. `mask`: given the shares its neighbours sent it, it checks and keeps them, then sends its part
   plus PRG(b) plus, for each neighbour v, +-PRG(s_uv) (+ when its id is the smaller), mod 2^bits.
4. `unmask`: told which neighbours survived and which dropped, it reveals its shares of the
   survivors' self-mask seeds and of the dropped clients' mask keys, never both for one client.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from fedlr.client_ids import client_order
from fedlr.privacy.secagg import crypto
from fedlr.privacy.secagg.encoding import Encoding
from fedlr.wire_fields import STAGE_FIELD

Kept = dict[str, Any]


class ProtocolError(ValueError):
    """A stage message this client must not answer: it would break the protocol's guarantee."""


def respond(message: dict[str, Any], kept: Kept, part: Callable[[Encoding], np.ndarray]
            ) -> tuple[dict[str, Any], Kept]:
    """Answer one stage message; `part` trains and encodes (called in the `train` stage only).
    Raises ProtocolError for a message that does not belong to the round this client is in."""
    stage = message[STAGE_FIELD]
    if stage == "train":
        setup = json.loads(message["secagg"])
        # before training: a round this client would refuse later spends none of its budget
        neighbours = set(map(str, setup["neighbours"])) - {str(setup["client"])}
        check_threshold(setup["threshold"], len(neighbours) + 1)
        return advertise(setup, part(Encoding.from_json(setup["encoding"])))
    if kept.get("round") != message.get("round"):
        raise ProtocolError(f"a {stage} message for round {message.get('round')}, but this "
                            f"client is in round {kept.get('round')}")
    if stage == "share":
        return share(kept, json.loads(message["peers"]), message["keys"])
    if stage == "mask":
        return mask(kept, json.loads(message["from"]), message["shares"])
    if stage == "unmask":
        return unmask(kept, json.loads(message["survivors"]), json.loads(message["dropped"])), {}
    raise ProtocolError(f"unknown secure-aggregation stage {stage!r}")


def check_threshold(threshold: int, holders: int) -> None:
    """Refuse a threshold the protocol's guarantee does not hold under: with t <= half of a
    secret's holders, two disjoint sets of honest holders (one asked for shares of b, the other
    for shares of the mask key) could each rebuild one secret, and the server would unmask this
    client's update (t = 1: one neighbour each); with t above the holders nobody could."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not (
            holders < 2 * threshold and threshold <= holders):
        raise ProtocolError(f"threshold {threshold!r} for {holders} share holders: SecAgg+ needs "
                            f"more than half of them and at most all ({holders // 2 + 1} to "
                            f"{holders}); this client does not take part")


def advertise(setup: dict[str, Any], part: np.ndarray) -> tuple[dict[str, Any], Kept]:
    """Stage 1: the public keys; keeps the round's secrets and the encoded part."""
    c_sk, c_pk = crypto.keypair()
    s_sk, s_pk = crypto.keypair()
    kept = {"round": int(setup["round"]), "client": str(setup["client"]),
            "neighbours": json.dumps(setup["neighbours"]), "threshold": int(setup["threshold"]),
            "encoding": setup["encoding"], "c_sk": c_sk, "s_sk": s_sk, "part": part.tobytes()}
    return {"c_pk": c_pk, "s_pk": s_pk}, kept


def _agree(kept: Kept, private: str, public: bytes, purpose: str) -> bytes:
    return crypto.agree(kept[private], public, crypto.label(purpose, kept["round"]))


def share(kept: Kept, peers: list[str], keys: bytes) -> tuple[dict[str, Any], Kept]:
    """Stage 2: `keys` holds each listed neighbour's (c_pk, s_pk), 64 bytes each in `peers`
    order. Replies with the sealed shares in the same order and the digest of b."""
    me, neighbours = kept["client"], set(json.loads(kept["neighbours"]))
    if not set(peers) <= neighbours:
        raise ProtocolError(f"keys of clients that are not my neighbours: "
                            f"{sorted(set(peers) - neighbours)}")
    holders = sorted({me, *peers}, key=client_order)
    check_threshold(kept["threshold"], len(holders))
    public = crypto.unpack(keys, peers, 64)
    b = crypto.fresh_seed()
    b_shares = crypto.split(b, kept["threshold"], len(holders))
    sk_shares = crypto.split(kept["s_sk"], kept["threshold"], len(holders))
    sealed, held = {}, {}
    for holder, b_share, sk_share in zip(holders, b_shares, sk_shares, strict=True):
        if holder == me:
            held[me] = [b_share.hex(), sk_share.hex()]
            continue
        key = _agree(kept, "c_sk", public[holder][:32], "shares")
        sealed[holder] = crypto.seal(key, me, holder, kept["round"], b_share, sk_share)
    kept = {**kept, "b": b, "keys": keys, "peers_keyed": json.dumps(peers),
            "held": json.dumps(held)}
    return {"shares": crypto.pack(sealed, peers, crypto.SEALED_BYTES),
            "b_digest": crypto.digest(b)}, kept


def mask(kept: Kept, senders: list[str], sealed: bytes) -> tuple[dict[str, Any], Kept]:
    """Stage 3: the masked part, and the neighbours whose shares did not open (the server then
    treats them as dropped). Masks cover every neighbour that sent shares."""
    me, keyed = kept["client"], json.loads(kept["peers_keyed"])
    if not set(senders) <= set(keyed):
        raise ProtocolError(f"shares from clients whose keys I was not given: "
                            f"{sorted(set(senders) - set(keyed))}")
    public = crypto.unpack(kept["keys"], keyed, 64)
    tokens = crypto.unpack(sealed, senders, crypto.SEALED_BYTES)
    held, bad = json.loads(kept["held"]), []
    for src, token in tokens.items():
        key = _agree(kept, "c_sk", public[src][:32], "shares")
        try:
            b_share, sk_share = crypto.open_sealed(key, token, src, me, kept["round"])
        except ValueError:
            bad.append(src)
            continue
        held[src] = [b_share.hex(), sk_share.hex()]
    encoding = Encoding.from_json(kept["encoding"])
    masked = np.frombuffer(kept["part"], dtype=encoding.dtype).copy()
    masked += crypto.expand(kept["b"], masked.size, encoding.dtype)
    for peer in senders:
        seed = _agree(kept, "s_sk", public[peer][32:], "masks")
        pairwise = crypto.expand(seed, masked.size, encoding.dtype)
        masked = masked + pairwise if client_order(me) < client_order(peer) else masked - pairwise
    kept = {**kept, "held": json.dumps(held), "peers": json.dumps(senders)}
    return {"masked": masked.tobytes(), "bad_shares": json.dumps(bad)}, kept


def unmask(kept: Kept, survivors: list[str], dropped: list[str]) -> dict[str, Any]:
    """Stage 4: shares of the survivors' self-mask seeds and of the dropped clients' mask keys.
    Refuses a request that would reveal both secrets of one client (its update would be exposed)
    or name clients it never masked with."""
    me, peers = kept["client"], set(json.loads(kept["peers"]))
    if set(survivors) & set(dropped):
        raise ProtocolError(f"clients named both survivor and dropped: "
                            f"{sorted(set(survivors) & set(dropped))}")
    if me in dropped or not set(survivors) | set(dropped) <= peers | {me}:
        raise ProtocolError("survivors or dropped clients that are not my mask peers")
    held = json.loads(kept["held"])
    b_of = [c for c in survivors if c in held]
    sk_of = [c for c in dropped if c in held]
    return {"b_of": json.dumps(b_of),
            "b_shares": b"".join(bytes.fromhex(held[c][0]) for c in b_of),
            "sk_of": json.dumps(sk_of),
            "sk_shares": b"".join(bytes.fromhex(held[c][1]) for c in sk_of)}
