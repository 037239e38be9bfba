"""What a strategy sums under secure aggregation, and the sum the server gets back.

Under secure aggregation the server never sees one client's update, only a weighted sum over the
round's clients, so a strategy that allows it says which tensors it sums (`SumSpec`, from
`Strategy.secure_sum`) and builds its next state from their sum (`Strategy.aggregate_sum`).
How a client encodes and masks its part is `fedlr.privacy.secagg`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class SumSpec:
    """The padded tensors summed, by key (as `Strategy.trained_tensors` names them) and shape;
    `components`: each rank component's total weight is summed too (an average over the clients
    that hold it); `clip_norm` (client-level DP): clients send their change from the start,
    clipped to this L2 norm and unweighted, instead of their weighted adapter."""

    shapes: dict[str, tuple[int, ...]]
    rank: int
    components: bool = False
    clip_norm: float | None = None


@dataclass
class SecureSum:
    """The decoded sum over the `clients` whose parts were unmasked: the weighted tensors, the
    total weight (per rank component where summed), how many values clients clipped to the
    encoding's range, and a bound on the encoding error of each summed value."""

    tensors: dict[str, Tensor]
    weight: float
    components: Tensor | None
    clients: int
    clipped: int
    value_error: float
