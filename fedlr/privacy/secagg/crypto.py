"""The cryptographic pieces of SecAgg+, each from a maintained library, and their byte layout.

- Key agreement: X25519 from `cryptography`, the shared secret run through HKDF-SHA256 with a
  label per purpose and round (pairwise mask seeds, keys that encrypt shares), so one agreement
  never serves two purposes.
- Mask expansion: the ChaCha20 keystream of a 32-byte seed (`cryptography`).
- Shamir's secret sharing over the prime field of p = 2^130 - 5, on the two 16-byte halves of a
  32-byte secret, with coefficients from `secrets`; a share is a 2-byte holder index and two
  17-byte values. (pycryptodome's GF(2^128) sharing, pure Python, took 28 ms to rebuild one
  secret at t = 10 and 10 ms to split one for 19 holders, most of a 50-client round's cost;
  Python's integers do the same in well under a millisecond.)
- Shares travel between clients through the server encrypted and authenticated with AES-GCM
  (`cryptography`), the sender and receiver bound as associated data.
Every secret and nonce comes from the OS's entropy.

Why not Flower's `flwr.common.secure_aggregation`, which its own SecAgg+ driver uses: its mask
PRG folds its seed into 32 bits for numpy's Mersenne Twister (a server could search the seeds);
its Shamir wrapper (pycryptodome's, above) pads a 32-byte secret to three blocks and starts a
thread pool per call (24 ms per secret here); its base64 Fernet token of two padded shares takes
248 bytes per neighbour, where AES-GCM's raw bytes take 100.
"""

from __future__ import annotations

import hashlib
import os
import secrets

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECRET_BYTES = 32
PRIME = 2**130 - 5  # a 16-byte half of a secret is below it
VALUE_BYTES = 17
SHARE_BYTES = 2 + 2 * VALUE_BYTES  # holder index, then the share of each half
NONCE_BYTES = 12
SEALED_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + 16  # nonce, two shares, GCM tag
_RAW = serialization.Encoding.Raw


def keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair (private, public), 32 raw bytes each."""
    private = X25519PrivateKey.generate()
    return (private.private_bytes(_RAW, serialization.PrivateFormat.Raw,
                                  serialization.NoEncryption()),
            private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))


def public_of(private: bytes) -> bytes:
    """The public key of an X25519 private key: how a rebuilt mask key is checked."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        _RAW, serialization.PublicFormat.Raw)


def label(purpose: str, round_: int) -> bytes:
    """HKDF's info for one purpose ("shares" or "masks") in one round."""
    return f"fedlr secagg {purpose} round {round_}".encode()


def agree(private: bytes, public: bytes, purpose: bytes) -> bytes:
    """A 32-byte key both ends derive, one per `purpose` (HKDF-SHA256 of the X25519 secret)."""
    secret = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(secret)


def fresh_seed() -> bytes:
    return os.urandom(SECRET_BYTES)


def digest(secret: bytes) -> bytes:
    """SHA-256 of a 256-bit random secret: reveals nothing of it, lets a rebuilt one be checked."""
    return hashlib.sha256(secret).digest()


def expand(seed: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """`length` uniform integers of `dtype` (uint32 or uint64) from the ChaCha20 keystream."""
    itemsize = np.dtype(dtype).itemsize
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(b"\0" * (length * itemsize)), dtype=dtype)


def _evaluate(coefficients: list[int], x: int) -> int:
    value = 0
    for c in reversed(coefficients):  # Horner
        value = (value * x + c) % PRIME
    return value


def split(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir shares of a 32-byte secret, any `threshold` of which rebuild it; share i goes to
    holder i (x = i + 1). Fewer than `threshold` shares are consistent with every secret."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= holders < 2**16:
        raise ValueError(f"need 1 <= threshold {threshold} <= holders {holders} < 65536")
    polynomials = [[int.from_bytes(secret[h:h + 16], "little"),
                    *(secrets.randbelow(PRIME) for _ in range(threshold - 1))] for h in (0, 16)]
    return [x.to_bytes(2, "little") + b"".join(
        _evaluate(poly, x).to_bytes(VALUE_BYTES, "little") for poly in polynomials)
        for x in range(1, holders + 1)]


def combine(shares: list[bytes]) -> bytes:
    """The secret the shares interpolate at 0 (a wrong one, silently, if they are too few or
    false: check it against its digest or public key)."""
    if any(len(s) != SHARE_BYTES for s in shares):
        raise ValueError(f"a share must be {SHARE_BYTES} bytes")
    xs = [int.from_bytes(s[:2], "little") for s in shares]
    if len(set(xs)) != len(xs) or 0 in xs:
        raise ValueError("shares must come from distinct holders")
    weights = []
    for j, xj in enumerate(xs):  # the Lagrange basis at 0
        num = den = 1
        for m, xm in enumerate(xs):
            if m != j:
                num, den = num * xm % PRIME, den * (xm - xj) % PRIME
        weights.append(num * pow(den, -1, PRIME) % PRIME)
    halves = []
    for h in range(2):
        start = 2 + h * VALUE_BYTES
        value = sum(w * int.from_bytes(s[start:start + VALUE_BYTES], "little")
                    for w, s in zip(weights, shares, strict=True)) % PRIME
        if value >= 2**128:
            raise ValueError("the shares do not rebuild a secret (too few or false)")
        halves.append(value.to_bytes(16, "little"))
    return b"".join(halves)


def _bound(src: str, dst: str, round_: int) -> bytes:
    return f"{src}>{dst}@{round_}".encode()


def seal(key: bytes, src: str, dst: str, round_: int, b_share: bytes, sk_share: bytes) -> bytes:
    """Two shares from `src` for `dst`, encrypted and authenticated with their agreed key."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, b_share + sk_share, _bound(src, dst, round_))


def open_sealed(key: bytes, sealed: bytes, src: str, dst: str, round_: int
                ) -> tuple[bytes, bytes]:
    """(b share, sk share); ValueError when forged, damaged, or not from `src` to `dst` in
    `round_`."""
    try:
        plain = AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:],
                                    _bound(src, dst, round_))
    except (InvalidTag, ValueError):
        raise ValueError("the shares do not authenticate") from None
    return plain[:SHARE_BYTES], plain[SHARE_BYTES:]


def pack(items: dict[str, bytes], order: list[str], size: int) -> bytes:
    """Fixed-size items in `order`, as one byte string."""
    if any(len(items[k]) != size for k in order):
        raise ValueError(f"every item must be {size} bytes")
    return b"".join(items[k] for k in order)


def unpack(blob: bytes, order: list[str], size: int) -> dict[str, bytes]:
    """The inverse of `pack`; ValueError when the length does not match."""
    if not isinstance(blob, bytes) or len(blob) != size * len(order):
        raise ValueError(f"expected {len(order)} items of {size} bytes")
    return {k: blob[i * size:(i + 1) * size] for i, k in enumerate(order)}
