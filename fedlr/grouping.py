"""Which of a round's clients a simulation's batched engine trains together, and in passes of
how many tokens.

A group is the clients one worker trains together, so the round's clients are spread over the
workers. A step runs the group's examples through the frozen base in length-sorted passes of at
most `chunk_tokens` padded tokens: their activations are what a step holds, so the pass size is
what the worker's memory bounds. What each member keeps for the whole round (its adapter, its
optimizer state, under DP-SGD its examples' gradients) bounds the group size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedlr.settings.schema import SimulationConfig

MEMORY_SHARE = 0.5  # of a worker's share of free memory, for what a group holds
MIN_CHUNK_TOKENS = 256
# On a CPU larger passes are slower once their activations leave the caches: measured best at
# 4,096 tokens on the tiny preset and about 1,000 on MiniLM (about 0.4 GB of activations)
CPU_CHUNK_TOKENS = 4096
CPU_CHUNK_BYTES = 512 << 20
CUDA_CHUNK_TOKENS = 1 << 17


@dataclass(frozen=True)
class Grouping:
    """Contiguous groups of a round's clients: one per worker, at most `size` clients each,
    trained in passes of at most `chunk_tokens` tokens."""

    size: int
    engine: str = "batched"
    chunk_tokens: int = CPU_CHUNK_TOKENS

    def split(self, clients: list[str], workers: int) -> list[list[str]]:
        if not clients:
            return []
        per = max(1, min(self.size, math.ceil(len(clients) / max(1, workers))))
        return [clients[i:i + per] for i in range(0, len(clients), per)]


def sequence_bytes(model_config: Any, length: int, dtype_bytes: int = 4) -> int:
    """Activations one sequence keeps for the backward through a transformer: per layer and
    token s h (34 + 5 a s / h) bytes in 16-bit (Korthikanti et al., 2022, "Reducing Activation
    Recomputation in Large Transformer Models", eq. 1), scaled to the model's dtype."""
    layers = int(getattr(model_config, "num_hidden_layers", 1))
    hidden = int(getattr(model_config, "hidden_size", 1))
    heads = int(getattr(model_config, "num_attention_heads", 1))
    per_token = hidden * (34 + 5 * heads * length / hidden) * dtype_bytes / 2
    return int(layers * length * per_token)


def member_bytes(host: Any, config: SimulationConfig) -> int:
    """What one member keeps for the round: its adapter (at the largest rank) and head, their
    AdamW state, and under DP-SGD a batch of per-example gradients, in fp32."""
    rank = max(config.ranks)
    params = sum(rank * (s.d_in + s.d_out) for s in host.shapes.values())
    params += sum(math.prod(shape) for shape in host.head_shapes.values())
    copies = 4 + (config.batch_size if config.dp_config() is not None else 1)
    return 4 * params * copies


def plan_grouping(config: SimulationConfig, host: Any, free_bytes: int, workers: int
                  ) -> Grouping | None:
    """The batched engine's grouping for a worker with `free_bytes / workers` of memory; None
    under the per-client engine. Half of that share bounds a pass's activations, half what the
    members keep."""
    engine = config.training_engine
    if engine == "per-client":
        return None
    share = free_bytes * MEMORY_SHARE / max(1, workers)
    per_token = sequence_bytes(host.base_config(), config.max_length) / config.max_length
    fits = share / 2 // per_token
    if host.device.type != "cuda":
        fits = min(fits, CPU_CHUNK_TOKENS, CPU_CHUNK_BYTES // per_token)
    chunk = int(max(MIN_CHUNK_TOKENS, min(CUDA_CHUNK_TOKENS, fits)))
    size = config.group_size or max(1, int(share / 2 // member_bytes(host, config)))
    return Grouping(size, engine, chunk)
