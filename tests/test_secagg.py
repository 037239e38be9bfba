"""Secure aggregation (SecAgg+) without Flower: the sum equals the plain aggregation within the
reported encoding error, the server's view hides every single update, dropouts and malformed
messages are handled, and too few shares fail the round with the state unchanged."""

from __future__ import annotations

import contextlib
import json
import random

import numpy as np
import pytest
import torch
from federation import client_updates, random_spec
from scipy import stats
from secagg_clients import InProcessClients, dense, digit_ids, round_inputs, widest

from fedlr.errors import ConfigError, RoundFailedError
from fedlr.lora.rounds import aggregate_round, failed_round
from fedlr.lora.strategies import make_strategy
from fedlr.lora.sums import SumSpec
from fedlr.privacy.client_level import DPFedAvg
from fedlr.privacy.secagg import crypto
from fedlr.privacy.secagg.client import ProtocolError, unmask
from fedlr.privacy.secagg.encoding import Encoding, decode
from fedlr.privacy.secagg.graph import degree, neighbourhoods, threshold
from fedlr.privacy.secagg.server import secure_round
from fedlr.privacy.secagg.settings import SecAggSettings
from fedlr.settings.specs import ClientDPConfig

RANKS = [2, 4, 8, 2, 4, 8]


def federation(name: str, seed: int, ranks=RANKS, hetero: str = "hetlora-fedavg",
               extras: bool = True, head: str = "train"):
    gen = torch.Generator().manual_seed(seed)
    spec = random_spec(gen, list(ranks), extras=extras)
    strategy = digit_ids(lambda s: make_strategy(name, s, hetero=hetero, head=head, seed=seed),
                         spec)
    state = strategy.init_state({n: torch.zeros(s, dtype=torch.float64)
                                 for n, s in strategy.spec.extras.items()})
    updates = client_updates(strategy, state, gen, scale=0.1)
    return strategy, state, updates


def run(strategy, state, updates, tamper=None, settings=None, **options):
    plan, by_id, starts = round_inputs(strategy, state, updates)
    clients = InProcessClients(by_id, starts, tamper)
    settings = settings or SecAggSettings(value_range=1.5 * widest(updates), max_weight=1000)
    return secure_round(strategy, state, plan, clients, settings, **options), clients


def assert_within(secure, plain, bound: float) -> None:
    for name in plain.lora:
        for x, y in ((secure.lora[name].A, plain.lora[name].A),
                     (secure.lora[name].B, plain.lora[name].B)):
            assert float((x - y).abs().max()) <= bound
    for name in plain.extras:
        assert float((secure.extras[name] - plain.extras[name]).abs().max()) <= bound


@pytest.mark.parametrize("name,hetero,ranks", [
    ("fedit", "hetlora-fedavg", RANKS), ("fedit", "hetlora", [4] * 5),
    ("ffa", "hetlora", RANKS), ("ffa", "flexlora", RANKS), ("fedsvd", "hetlora", RANKS)])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_secure_sum_gives_the_plain_aggregate_within_the_reported_error(name, hetero, ranks,
                                                                             seed):
    strategy, state, updates = federation(name, seed, ranks, hetero)
    result, _ = run(strategy, state, updates)
    plain = aggregate_round(strategy, state, updates).state
    error = result.facts["secagg_quantization_error"]
    assert 0 < error < 1e-5 and result.facts["secagg_clipped_values"] == 0
    assert sorted(result.accepted, key=int) == [u.client_id for u in updates]
    if name == "fedsvd":  # the SVD of B_bar A: compare products, |d(B A)| <= err * max row-sum |A|
        bound = error * float(state.lora[next(iter(state.lora))].A.abs().sum(0).max()) * 1.01
        for n, dw in dense(plain).items():
            assert float((dense(result.state)[n] - dw).abs().max()) <= bound + 1e-12
        return
    assert_within(result.state, plain, error * 1.01 + 1e-12)
    assert result.state.round == state.round + 1


def test_client_level_dp_sums_clipped_changes_and_the_server_adds_the_noise():
    strategy, state, updates = federation("ffa", 3)
    config = ClientDPConfig(noise_multiplier=0.0, clip_norm=0.05)
    private = DPFedAvg(strategy, config, expected_clients=len(updates),
                       generator=torch.Generator().manual_seed(0))
    result, _ = run(private, state, updates)
    plain = aggregate_round(private, state, updates).state  # clipped on the server
    assert_within(result.state, plain, result.facts["secagg_quantization_error"] * 1.01 + 1e-12)
    noisy = DPFedAvg(strategy, ClientDPConfig(noise_multiplier=1.0, clip_norm=0.05),
                     expected_clients=len(updates), generator=torch.Generator().manual_seed(0))
    moved = run(noisy, state, updates)[0].state
    name = next(iter(state.lora))
    spread = float((moved.lora[name].B - plain.lora[name].B).std())
    assert spread == pytest.approx(0.05 / len(updates), rel=0.2)  # z S / m per coordinate


def test_values_outside_the_range_are_clipped_and_counted():
    strategy, state, updates = federation("ffa", 4)
    settings = SecAggSettings(value_range=widest(updates) / 4)
    result, _ = run(strategy, state, updates, settings=settings)
    assert result.facts["secagg_clipped_values"] > 0


def chi_square_uniform(words: np.ndarray, bits: int) -> float:
    """p-value of the top 4 bits of `words` being uniform over their 16 values."""
    counts = np.bincount((words >> np.uint64(bits - 4)).astype(np.int64), minlength=16)
    return float(stats.chisquare(counts).pvalue)


def test_what_the_server_receives_hides_every_update():
    strategy, state, updates = federation("fedit", 5, [4] * 6, "hetlora")
    result, clients = run(strategy, state, updates, settings=SecAggSettings(
        value_range=1.5 * widest(updates), neighbours=2))  # SecAgg+: 2 neighbours of 5
    received = clients.received
    masked = {c: np.frombuffer(r["masked"], np.uint32) for s, c, r in received if s == "mask"}
    revealed = [r for s, _, r in received if s == "unmask"]
    b_owners = {c for r in revealed for c in json.loads(r["b_of"])}
    sk_owners = {c for r in revealed for c in json.loads(r["sk_of"])}
    assert not b_owners & sk_owners  # never both secrets of one client
    assert len(result.accepted) == len(updates) and not sk_owners
    for client, words in masked.items():
        part = clients.parts[client]
        assert chi_square_uniform(part.astype(np.uint64), 32) < 1e-6  # a part is not uniform
        assert chi_square_uniform(words.astype(np.uint64), 32) > 1e-4
        # strip all the server can (the client's self mask, rebuilt from the revealed shares):
        # the pairwise masks, whose keys the server never gets, still hide the part
        shares = [crypto.unpack(r["b_shares"], json.loads(r["b_of"]), crypto.SHARE_BYTES)[client]
                  for r in revealed if client in json.loads(r["b_of"])]
        stripped = words - crypto.expand(crypto.combine(shares), words.size, np.uint32)
        assert chi_square_uniform(stripped.astype(np.uint64), 32) > 1e-4
        assert np.count_nonzero(stripped == part) < 0.01 * part.size


def test_fewer_than_t_shares_leave_a_secret_undetermined():
    """Any t - 1 shares are consistent with every secret: for any other secret there is a t-th
    share that, with them, rebuilds it (Shamir over GF(2^130 - 5), on each 16-byte half)."""
    secret, other, t = crypto.fresh_seed(), crypto.fresh_seed(), 3
    shares = crypto.split(secret, t, 5)
    assert crypto.combine(shares[:t]) == secret and crypto.combine(shares[2:]) == secret
    assert crypto.combine([shares[4], shares[0], shares[2]]) == secret
    few = shares[: t - 1]
    with contextlib.suppress(ValueError):  # or a wrong secret
        assert crypto.combine(few) != secret
    p, width = crypto.PRIME, crypto.VALUE_BYTES
    xs = [int.from_bytes(s[:2], "little") for s in few] + [5]

    def basis_at_zero(j: int) -> int:  # independent of fedlr's combine: plain Lagrange
        num = den = 1
        for m, xm in enumerate(xs):
            if m != j:
                num, den = num * xm % p, den * (xm - xs[j]) % p
        return num * pow(den, p - 2, p) % p

    forged = (5).to_bytes(2, "little")
    for h in range(2):
        ys = [int.from_bytes(s[2 + h * width:2 + (h + 1) * width], "little") for s in few]
        target = int.from_bytes(other[16 * h:16 * (h + 1)], "little")
        partial = sum(y * basis_at_zero(j) for j, y in enumerate(ys)) % p
        forged += ((target - partial) * pow(basis_at_zero(2), p - 2, p) % p).to_bytes(width,
                                                                                      "little")
    assert crypto.combine([*few, forged]) == other


def test_a_client_refuses_to_reveal_both_secrets_of_one_client():
    kept = {"client": "0", "peers": json.dumps(["1", "2", "3"]), "held": json.dumps({})}
    assert unmask(kept, survivors=["0", "1"], dropped=["2"]) == {
        "b_of": "[]", "b_shares": b"", "sk_of": "[]", "sk_shares": b""}
    with pytest.raises(ProtocolError, match="both survivor and dropped"):
        unmask(kept, survivors=["1", "2"], dropped=["2"])
    with pytest.raises(ProtocolError, match="not my mask peers"):
        unmask(kept, survivors=["1"], dropped=["7"])
    with pytest.raises(ProtocolError, match="not my mask peers"):
        unmask(kept, survivors=["1"], dropped=["0"])


def drop(stage_name: str, who: set[str]):
    def tamper(stage, client, reply):
        return None if stage == stage_name and client in who else reply
    return tamper


def within_error(result, plain) -> None:
    assert_within(result.state, plain, result.facts["secagg_quantization_error"] * 1.01 + 1e-12)


def test_a_client_that_drops_while_masking_is_unmasked_from_its_neighbours_shares():
    strategy, state, updates = federation("ffa", 7, [2, 4, 8, 2, 4])
    result, _ = run(strategy, state, updates, tamper=drop("mask", {"2"}))
    within_error(result, aggregate_round(strategy, state,
                                         [u for u in updates if u.client_id != "2"]).state)
    assert result.facts["secagg_dropped_after_masking"] == 1
    assert [(r.client_id, r.kind) for r in result.rejected] == [("2", "no reply")]


def test_a_client_that_drops_after_sending_its_masked_part_still_counts():
    strategy, state, updates = federation("fedit", 8, [2, 4, 8, 2, 4])
    result, _ = run(strategy, state, updates, tamper=drop("unmask", {"1"}))
    within_error(result, aggregate_round(strategy, state, updates).state)
    assert len(result.accepted) == 5


def test_below_the_threshold_the_round_fails_and_the_state_is_unchanged():
    strategy, state, updates = federation("ffa", 9, [4] * 5)  # complete graph: t = 3 of 5
    before = {n: x.B.clone() for n, x in state.lora.items()}
    with pytest.raises(RoundFailedError, match="the threshold is 3") as failure:
        run(strategy, state, updates, tamper=drop("unmask", {"0", "1", "2"}))
    assert all(torch.equal(state.lora[n].B, b) for n, b in before.items())
    recorded = failed_round(strategy, state, failure.value)  # what a run records, then goes on
    assert recorded.state.round == state.round + 1 and recorded.accepted == []
    assert all(torch.equal(recorded.state.lora[n].B, b) for n, b in before.items())
    assert "the threshold is 3" in recorded.facts["round_failed"]


def test_a_sum_over_one_client_is_never_unmasked_without_noise():
    strategy, state, updates = federation("ffa", 13, [4] * 3)
    with pytest.raises(RoundFailedError, match="a sum over one client would be its update"):
        run(strategy, state, updates, tamper=drop("mask", {"1", "2"}), min_valid_updates=1)


def test_a_masked_part_of_the_wrong_length_is_excluded_and_the_round_goes_on():
    strategy, state, updates = federation("ffa", 10, [2, 4, 8, 4])

    def short(stage, client, reply):
        if stage == "mask" and client == "3":
            return {**reply, "masked": reply["masked"][:-4]}
        return reply

    result, _ = run(strategy, state, updates, tamper=short)
    within_error(result, aggregate_round(strategy, state, updates[:3]).state)
    assert [(r.client_id, r.kind) for r in result.rejected] == [("3", "malformed reply")]
    assert "masked part of" in result.rejected[0].reason


def test_a_client_whose_shares_do_not_open_is_excluded_and_the_round_goes_on():
    strategy, state, updates = federation("fedit", 11, [2, 4, 8, 4, 2])

    def damage(stage, client, reply):
        if stage == "share" and client == "4":  # flip one byte of its first neighbour's shares
            blob = bytearray(reply["shares"])
            blob[crypto.NONCE_BYTES + 3] ^= 0xFF
            return {**reply, "shares": bytes(blob)}
        return reply

    result, _ = run(strategy, state, updates, tamper=damage)
    within_error(result, aggregate_round(strategy, state, updates[:4]).state)
    assert [r.client_id for r in result.rejected] == ["4"]
    assert "could not open" in result.rejected[0].reason


def test_a_false_share_is_caught_and_fails_the_round_cleanly():
    strategy, state, updates = federation("ffa", 12, [4] * 5)

    def lie(stage, client, reply):
        if stage == "unmask" and client == "0":  # a false share of every self-mask seed
            blob = bytearray(reply["b_shares"])
            for i in range(0, len(blob), crypto.SHARE_BYTES):
                blob[i + 5] ^= 0x01
            return {**reply, "b_shares": bytes(blob)}
        return reply

    with pytest.raises(RoundFailedError, match="false share"):
        run(strategy, state, updates, tamper=lie)


@pytest.mark.parametrize("name,hetero,ranks", [
    ("flora", "hetlora", RANKS), ("fair", "hetlora", RANKS), ("fedit", "flexlora", [4] * 4),
    ("fedit", "hetlora", RANKS)])
def test_strategies_that_need_individual_updates_are_refused(name, hetero, ranks):
    strategy, state, _ = federation(name, 0, ranks, hetero)
    with pytest.raises(ConfigError, match="secure aggregation does not compose"):
        strategy.secure_sum(state)


@pytest.mark.parametrize("bits", [32, 64])
def test_the_extreme_sums_never_wrap(bits):
    encoding = Encoding(SumSpec({"x": (3,)}, rank=1), value_range=2.0, max_weight=10, bits=bits,
                        clients=7)
    for sign in (1, -1):
        part = np.full(encoding.size, sign * encoding.levels, np.int64).astype(encoding.dtype)
        total = np.zeros(encoding.size, encoding.dtype)
        for _ in range(7):
            total += part
        decoded = decode(encoding, total, 7, torch.float64)
        assert decoded.tensors["x"].tolist() == pytest.approx([sign * 14.0] * 3)


def test_the_graph_is_regular_symmetric_and_connected():
    clients = [str(i) for i in range(40)]
    graph = neighbourhoods(clients, 6, random.Random(0))
    assert all(len(v) == 6 for v in graph.values())
    assert all(a in graph[b] for a in graph for b in graph[a])
    seen, todo = {"0"}, ["0"]
    while todo:
        for b in graph[todo.pop()]:
            if b not in seen:
                seen.add(b)
                todo.append(b)
    assert seen == set(clients)
    assert degree(10, 0) == 9 and degree(100, 0) == 20 and degree(50, 5) == 6
    assert threshold(5, 0.5) == 3 and threshold(21, 0.5) == 11 and threshold(2, 0.5) == 2


def kept_after(stage: str, fed, neighbours: int) -> tuple[dict[str, dict], InProcessClients]:
    """One honest secure round of `fed` (strategy, state, updates): what each client kept right
    after its `stage` reply (its secrets, as a referee test sees them), and the clients, whose
    `received` is what the server got."""
    strategy, state, updates = fed
    kept: dict[str, dict] = {}

    def capture(at, client, reply):
        if at == stage:
            kept[client] = dict(clients.kept[client])
        return reply

    plan, by_id, starts = round_inputs(strategy, state, updates)
    clients = InProcessClients(by_id, starts, capture)
    secure_round(strategy, state, plan, clients,
                 SecAggSettings(value_range=1.5 * widest(updates), neighbours=neighbours))
    return kept, clients


def test_fewer_shares_than_the_threshold_never_rebuild_a_clients_self_mask_seed():
    """The holders of client k's shares, colluding (the test opens every sealed share with the
    holders' keys): any t of them rebuild k's self-mask seed b and its mask key, and t - 1 never
    do, for every client. A client that split b with a lower threshold than the round's would
    let fewer holders (or the server with them) unmask its update."""
    at_share, clients = kept_after("share", federation("fedit", 5, [4] * 6, "hetlora"), 4)
    replies = {c: r for s, c, r in clients.received if s == "share"}
    for k, mine in at_share.items():
        peers, t, round_ = json.loads(mine["peers_keyed"]), mine["threshold"], mine["round"]
        sealed = crypto.unpack(replies[k]["shares"], peers, crypto.SEALED_BYTES)
        own = json.loads(mine["held"])[k]
        b_shares, sk_shares = [bytes.fromhex(own[0])], [bytes.fromhex(own[1])]
        for h in peers:
            key = crypto.agree(mine["c_sk"], crypto.public_of(at_share[h]["c_sk"]),
                               crypto.label("shares", round_))
            b_share, sk_share = crypto.open_sealed(key, sealed[h], k, h, round_)
            b_shares.append(b_share)
            sk_shares.append(sk_share)
        assert 2 <= t <= len(b_shares)
        for shares, secret in ((b_shares, mine["b"]), (sk_shares, mine["s_sk"])):
            assert crypto.combine(random.sample(shares, t)) == secret
            with contextlib.suppress(ValueError):  # too few: a wrong value, or none at all
                assert crypto.combine(random.sample(shares, t - 1)) != secret, k


def test_a_mask_stream_depends_on_every_byte_of_its_seed():
    """Masks are ChaCha20 keystreams of 256-bit seeds; a stream keyed by fewer bits (a
    truncated seed) could be found by a server trying them all. The stream is ChaCha20's keyed
    by the seed itself (the RFC's test vector), and changing any one byte of the seed changes
    it."""
    # RFC 7539, A.1, test vector 1: the ChaCha20 block of the all-zero key, nonce and counter
    assert crypto.expand(bytes(32), 16, np.uint32).tobytes().hex() == (
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586")
    seed = crypto.fresh_seed()
    stream = crypto.expand(seed, 64, np.uint64)
    for i in range(len(seed)):
        changed = seed[:i] + bytes([seed[i] ^ 0x01]) + seed[i + 1:]
        assert not np.array_equal(crypto.expand(changed, 64, np.uint64), stream), i


def test_pairwise_masks_need_a_private_key_the_server_never_holds():
    """Each client's masked part is its part + PRG(b) +- PRG(s_uv) with s_uv keyed by the X25519
    secret of its own mask key and the neighbour's public key (checked here against
    `cryptography`'s X25519 and HKDF, the test holding the private keys as a referee would). The
    server holds the public keys and, after unmasking, every survivor's b: masks it builds from
    those alone (the keys hashed together with the round's label, either order) leave a stripped
    update uniform. A pairwise seed derived from public keys alone would let it unmask anyone."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    from fedlr.client_ids import client_order

    at_mask, clients = kept_after("mask", federation("fedit", 6, [4] * 6, "hetlora"), 2)
    masked = {c: r["masked"] for s, c, r in clients.received if s == "mask"}
    public = {c: r["s_pk"] for s, c, r in clients.received if s == "train"}

    def hkdf(secret: bytes, round_: int) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=crypto.label("masks", round_)).derive(secret)

    for u, kept in at_mask.items():
        part, peers = clients.parts[u], json.loads(kept["peers"])
        words = np.frombuffer(masked[u], part.dtype)
        mine = X25519PrivateKey.from_private_bytes(kept["s_sk"])
        expected = part + crypto.expand(kept["b"], part.size, part.dtype)
        for v in peers:
            secret = mine.exchange(X25519PublicKey.from_public_bytes(public[v]))
            pairwise = crypto.expand(hkdf(secret, kept["round"]), part.size, part.dtype)
            expected = expected + pairwise if client_order(u) < client_order(v) else \
                expected - pairwise
        assert np.array_equal(words, expected), u
        for order in (sorted, lambda pair: pair):  # the server's best guesses at s_uv
            guessed = words - crypto.expand(kept["b"], part.size, part.dtype)  # b: revealed
            for v in peers:
                seed = hkdf(b"".join(order([public[u], public[v]])), kept["round"])
                pairwise = crypto.expand(seed, part.size, part.dtype)
                guessed = guessed - pairwise if client_order(u) < client_order(v) else \
                    guessed + pairwise
            assert np.count_nonzero(guessed == part) < 0.01 * part.size, u
