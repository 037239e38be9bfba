"""Who shares secrets with whom: a random k-regular graph (SecAgg+, Bell et al. 2020) or, when
k reaches n - 1, the complete graph (SecAgg, Bonawitz et al. 2017).

A client's masks cancel only against its neighbours, and its secrets are split among its
neighbours and itself, so each client's cost grows with k, not with n. Against a server that
follows the protocol, any connected graph hides every single update; against a server colluding
with some clients, Bell et al. bound the k it takes (it grows with log n and the fraction of
corrupt clients); `secagg_neighbours` sets it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from fedlr.client_ids import client_order
from fedlr.errors import ConfigError


def degree(n: int, neighbours: int) -> int:
    """The graph's degree for n clients: `neighbours` (0: automatic, every other client up to
    16 clients, above that the smallest even k >= 3 log2 n), rounded up to even, at most n - 1."""
    if neighbours < 0:
        raise ConfigError(f"secagg_neighbours must be >= 0, got {neighbours}")
    if neighbours == 0:
        neighbours = n - 1 if n <= 16 else math.ceil(3 * math.log2(n))
    k = neighbours + neighbours % 2
    return min(k, n - 1)


def neighbourhoods(clients: Sequence[str], neighbours: int, rng: random.Random
                   ) -> dict[str, list[str]]:
    """Each client's neighbours: a Harary graph (position i joined to i +- 1 .. i +- k/2) over a
    random order of the clients, so nobody chooses their neighbours."""
    order = list(clients)
    rng.shuffle(order)
    n = len(order)
    k = degree(n, neighbours)
    out: dict[str, list[str]] = {}
    for i, client in enumerate(order):
        if k >= n - 1:
            near = [c for c in order if c != client]
        else:
            near = [order[(i + d) % n] for step in range(1, k // 2 + 1) for d in (step, -step)]
        out[client] = sorted(set(near), key=client_order)
    return out


def threshold(holders: int, fraction: float) -> int:
    """Shares needed to rebuild a secret held by `holders` clients: more than `fraction` of them."""
    if not 0.5 <= fraction < 1:
        raise ConfigError(f"secagg_threshold must be in [0.5, 1), got {fraction}")
    return min(holders, math.floor(fraction * holders) + 1)

