"""Random federations for tests: specs, client updates and dense references."""

from __future__ import annotations

import torch

from fedlr.adapters import Adapter, LoraFactors
from fedlr.lora.strategies import ClientUpdate, FederationSpec, GlobalState, ModuleShape, Strategy

MIXED_RANKS = (2, 4, 8, 16)


def random_spec(
    gen: torch.Generator,
    ranks: list[int],
    n_modules: int = 2,
    extras: bool = False,
    rslora: bool = False,
) -> FederationSpec:
    modules = {}
    for i in range(n_modules):
        d_out, d_in = (int(x) for x in torch.randint(16, 40, (2,), generator=gen))
        modules[f"layer.{i}.proj"] = ModuleShape(d_out, d_in)
    return FederationSpec(
        modules=modules,
        ranks={f"c{k}": r for k, r in enumerate(ranks)},
        alpha=float(torch.randint(1, 33, (1,), generator=gen)),
        rslora=rslora,
        extras={"classifier.weight": (3, 8)} if extras else {},
        dtype=torch.float64,
    )


def client_updates(
    strategy: Strategy, state: GlobalState, gen: torch.Generator, scale: float = 1.0
) -> list[ClientUpdate]:
    """One trained-looking update per client: random factors of its rank (A kept as sent when the
    strategy freezes A), random example counts."""
    spec = strategy.spec
    updates = []
    for cid, rank in spec.ranks.items():
        sent = strategy.starting_adapter(state, cid)
        lora = {}
        for name, shape in spec.modules.items():
            if strategy.trains_a:
                A = torch.randn(rank, shape.d_in, generator=gen, dtype=torch.float64) * scale
            else:
                A = sent.lora[name].A
            B = torch.randn(shape.d_out, rank, generator=gen, dtype=torch.float64) * scale
            lora[name] = LoraFactors(A, B, spec.scaling(rank))
        extras = {
            n: torch.randn(*s, generator=gen, dtype=torch.float64) for n, s in spec.extras.items()
        }
        n = int(torch.randint(1, 1000, (1,), generator=gen))
        updates.append(ClientUpdate(cid, Adapter(lora=lora, extras=extras), n))
    return updates


def dense_ideal(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    """sum_k p_k s_k B_k A_k computed densely, independently of fedlr.lora.lowrank."""
    total = sum(u.num_examples for u in updates)
    out: dict[str, torch.Tensor] = {}
    for u in updates:
        for name, f in u.adapter.lora.items():
            term = (u.num_examples / total) * f.scaling * (f.B @ f.A)
            out[name] = out[name] + term if name in out else term
    return out


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x - ref) / torch.linalg.matrix_norm(ref))
