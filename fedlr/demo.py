"""The aggregation core end to end on a synthetic federation shaped like the default model.

Each client owns a private target update T_k for every LoRA module of all-MiniLM-L6-v2 (query and
value of its 6 layers): a shared low-rank direction plus client-specific drift. Local training is
a few Adam steps of its LoRA (of the client's own rank, on the factors the strategy trains) towards
T_k from the downlink it received. Every strategy then runs the same rounds, with mixed ranks,
partial participation and one corrupted upload, so the residual of each aggregation and the gap to
the federated optimum sum_k p_k T_k can be compared side by side. No language model is trained: that
is `fedlr simulate`'s job once the client exists.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fedlr.adapters import Adapter, LoraFactors
from fedlr.atomic import atomic_write
from fedlr.lora.lowrank import kaiming_uniform_a
from fedlr.lora.rounds import close_round, plan_round, sample_clients
from fedlr.lora.strategies import STRATEGIES, ClientUpdate, FederationSpec, Strategy, make_strategy
from fedlr.lora.validation import ValidationPolicy
from fedlr.models.hosts import skeleton, target_module_shapes
from fedlr.models.sources import minilm_path


@dataclass
class DemoConfig:
    strategies: list[str] = field(default_factory=lambda: sorted(STRATEGIES))
    num_clients: int = 10
    clients_per_round: int = 6
    ranks: list[int] = field(default_factory=lambda: [4, 8, 16])
    rounds: int = 6
    local_steps: int = 20
    lr: float = 2e-3
    alpha: float = 16.0
    hetero: str = "hetlora"
    targets: list[str] = field(default_factory=lambda: ["query", "value"])
    drift: float = 0.5
    corrupt_round: int = 2
    seed: int = 0


@dataclass
class RoundRecord:
    strategy: str
    round: int
    clients: list[str]
    residual: float
    exact: bool  # the residual is zero by construction, not measured
    gap_to_optimum: float
    bytes_up: int
    bytes_down: int
    seconds: float
    rejected: list[dict[str, str]]


class SyntheticFederation:
    """Private targets per client and the local optimiser that chases them."""

    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        shapes = target_module_shapes(skeleton(minilm_path()), config.targets)
        gen = torch.Generator().manual_seed(config.seed)
        self.clients = [f"client{k:03d}" for k in range(config.num_clients)]
        ranks = {c: config.ranks[k % len(config.ranks)] for k, c in enumerate(self.clients)}
        self.spec = FederationSpec(shapes, ranks, alpha=config.alpha)
        self.examples = {c: int(torch.randint(50, 500, (1,), generator=gen)) for c in self.clients}
        self.targets: dict[str, dict[str, Tensor]] = {c: {} for c in self.clients}
        for name, s in shapes.items():
            shared = torch.randn(s.d_out, 8, generator=gen) @ torch.randn(8, s.d_in, generator=gen)
            for c in self.clients:
                own = torch.randn(s.d_out, 4, generator=gen) @ torch.randn(4, s.d_in, generator=gen)
                self.targets[c][name] = (shared + config.drift * own) * 0.01
        total = sum(self.examples.values())
        self.optimum = {
            name: sum(self.examples[c] / total * self.targets[c][name] for c in self.clients)
            for name in shapes
        }

    def train(
        self,
        strategy: Strategy,
        client: str,
        start: Adapter,
        base: dict[str, Tensor],
        gen: torch.Generator,
    ) -> Adapter:
        """Local Adam steps on 0.5 ||base + s B A - T_k||^2 from the downlink (or a fresh LoRA)."""
        rank, lora = self.spec.ranks[client], {}
        scaling = self.spec.scaling(rank)
        for name, shape in self.spec.modules.items():
            sent = start.lora.get(name)
            A = sent.A.clone() if sent else kaiming_uniform_a(rank, shape.d_in, gen, torch.float32)
            B = sent.B.clone() if sent else torch.zeros(shape.d_out, rank)
            params = [B.requires_grad_()] + ([A.requires_grad_()] if strategy.trains_a else [])
            opt = torch.optim.Adam(params, lr=self.config.lr)
            residual_target = self.targets[client][name] - base.get(name, 0)
            for _ in range(self.config.local_steps):
                opt.zero_grad()
                loss = 0.5 * (scaling * B @ A - residual_target).pow(2).sum()
                loss.backward()
                opt.step()
            lora[name] = LoraFactors(A.detach(), B.detach(), scaling)
        return Adapter(lora=lora, extras={})

    def global_delta(self, strategy: Strategy, state) -> dict[str, Tensor]:
        return {name: x.dense() for name, x in strategy.global_update(state).items()}

    def gap(self, delta: dict[str, Tensor]) -> float:
        num = sum(float((delta[n] - o).pow(2).sum()) for n, o in self.optimum.items())
        den = sum(float(o.pow(2).sum()) for o in self.optimum.values())
        return (num / den) ** 0.5


def run_strategy(fed: SyntheticFederation, name: str, progress=None) -> list[RoundRecord]:
    """All rounds of one strategy through the core's round (plan, train, close); each client
    keeps its merged base and the round it last synced."""
    cfg = fed.config
    strategy = make_strategy(name, fed.spec, hetero=cfg.hetero, seed=cfg.seed)
    state = strategy.init_state()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    base = {c: {} for c in fed.clients}
    synced = dict.fromkeys(fed.clients, 0)
    policy = ValidationPolicy(max_update_norm=100.0, min_valid_updates=1)
    records = []
    for rnd in range(1, cfg.rounds + 1):
        tic = time.perf_counter()
        chosen = sample_clients(fed.clients, cfg.clients_per_round, rnd, seed=cfg.seed)
        plan = plan_round(strategy, state, chosen, synced=synced)
        updates, bytes_up, bytes_down = [], 0, 0
        for c, down in plan.downlinks.items():
            bytes_down += down.nbytes()
            for module, delta in down.delta_weights().items() if down.base else ():
                base[c][module] = base[c].get(module, 0) + delta
            synced[c] = state.round
            trained = fed.train(strategy, c, down, base[c], gen)
            if rnd == cfg.corrupt_round and c == chosen[0]:  # a faulty upload, to be rejected
                first = next(iter(trained.lora))
                bad = trained.lora[first].B.clone()
                bad[0, 0] = float("nan")
                trained.lora[first] = LoraFactors(
                    trained.lora[first].A, bad, trained.lora[first].scaling
                )
            uploaded = (
                trained.nbytes()
                if strategy.trains_a
                else sum(f.B.numel() * f.B.element_size() for f in trained.lora.values())
            )
            bytes_up += uploaded
            updates.append(ClientUpdate(c, trained, fed.examples[c]))
        result = close_round(strategy, state, plan, updates, policy=policy)
        state = result.state
        records.append(
            RoundRecord(
                strategy=name,
                round=rnd,
                clients=result.accepted,
                residual=result.report.residual,
                exact=result.exact,
                gap_to_optimum=fed.gap(fed.global_delta(strategy, state)),
                bytes_up=bytes_up,
                bytes_down=bytes_down,
                seconds=time.perf_counter() - tic,
                rejected=[{"client": r.client_id, "reason": r.reason} for r in result.rejected],
            )
        )
        if progress is not None:
            progress()
    return records


def write_results(records: list[RoundRecord], config: DemoConfig, out: Path) -> None:
    """metrics.jsonl (one object per strategy and round), config.json and a PNG plot."""
    out.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(asdict(r)) + "\n" for r in records)
    atomic_write(out / "metrics.jsonl", lambda tmp: Path(tmp).write_text(lines))
    atomic_write(
        out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(asdict(config), indent=2))
    )
    plot(records, out / "demo.png")


def plot(records: list[RoundRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r.strategy for r in records):
        rows = [r for r in records if r.strategy == name]
        rounds = [r.round for r in rows]
        left.plot(rounds, [max(r.residual, 1e-17) for r in rows], marker="o", label=name)
        right.plot(rounds, [r.gap_to_optimum for r in rows], marker="o", label=name)
    left.set(
        yscale="log",
        xlabel="round",
        ylabel="||dW_global - sum p_k dW_k|| / ||sum p_k dW_k||",
        title="aggregation residual",
    )
    right.set(
        xlabel="round",
        ylabel="||dW_global - optimum|| / ||optimum||",
        title="gap to the federated optimum",
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
