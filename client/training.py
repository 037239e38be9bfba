"""Local training of one client in one round: PEFT LoRA, optionally under Opacus DP-SGD.

The trainer starts from the adapter the server sent (and merges its base update, for FLoRA),
trains what the strategy allows (A and B, or B alone; the head or not) for a fixed number of
steps, and returns the trained adapter with its example count and metrics. Under DP it samples
batches by Poisson sampling, clips every example's gradient to C across all trainable tensors,
adds N(0, sigma^2 C^2) once per step, and records the steps in the client's persistent ledger.

Under DP the batch draws and the noise come from OS entropy on this machine (never from the job's
seed, which the server chose and the run directory records): a server that replays the round with
everything it knows cannot reproduce it. Without DP the job's seed makes a run reproducible.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Required, TypedDict, Unpack

import torch
from torch import Tensor

from fedlr.adapters import Adapter
from fedlr.client.canaries import GradientCanaries
from fedlr.client.samplers import BatchSampler, PoissonBatches, ShuffledBatches
from fedlr.client.step_engines import DPPlan, OpacusEngine, StepEngine
from fedlr.data.batches import Encoded, per_example_loss
from fedlr.errors import ConfigError, FedlrError
from fedlr.models.hosts import LoraHost
from fedlr.precision import autocast
from fedlr.privacy.node import NodeLimits
from fedlr.privacy.sample_level import PrivacyLedger, noise_for_target, private_generator
from fedlr.settings.specs import DPConfig, TrainConfig

# Padded tokens per pass of the base in a CPU step (`LocalTrainer.pass_tokens`): enough for its
# products to stay efficient GEMMs, small enough to cut the padding of a batch of short texts.
CPU_PASS_TOKENS = 384
# Opacus registers full backward hooks on modules whose inputs need no grad (the frozen base).
warnings.filterwarnings("ignore", message="Full backward hook is firing")


class TrainingError(FedlrError):
    """Local training produced something that must not be sent (an adapter that never moved)."""


@dataclass
class TrainResult:
    adapter: Adapter
    num_examples: int
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientRound:
    """One client's round between `LocalTrainer.begin` and `finish`: the rank's PEFT model, the
    adapter's tensors by their names in it (`tensors`: the model's own, or the client's own
    copies, see `begin`), the trainable ones (`params`, named `names`, in the model's order,
    which is the order DP-SGD draws its noise in), the plan and the sampler."""

    client_id: str
    data: Encoded
    rank: int
    seed: int
    model: Any
    tensors: dict[str, Tensor]
    names: list[str]
    params: list[Tensor]
    before: list[Tensor]
    plan: DPPlan | None
    sampler: BatchSampler
    noise_gen: torch.Generator | None
    ledger: PrivacyLedger | None
    started: float
    timings: dict[str, float]
    canaries: GradientCanaries | None = None
    losses: list[float] = field(default_factory=list)


class ClientOptions(TypedDict, total=False):
    """How one client's round runs, besides who and from what (see `LocalTrainer.begin`)."""

    rank: Required[int]
    train_a: bool
    train_head: bool
    ledger: PrivacyLedger | None
    seed: int
    canaries: GradientCanaries | None
    limits: NodeLimits | None
    dp_seed: int | None


def choose_grad_sample_mode(config: TrainConfig, trainable: int, fused_ok: bool) -> str:
    """fused (fedlr.kernels' LoRA layers instantiate per-sample gradients in the ordinary
    backward; measured no slower than hooks) where the layers allow it, else hooks; ghost only
    when per-sample gradients would not fit the memory budget.

    For LoRA, instantiation costs batch x (trainable parameters), small at low rank, while ghost
    clipping needs a second backward pass and batch x T x T Gram matrices per layer; ghost only
    wins when the trainable set is large (a big head, high rank, long batches)."""
    assert config.dp is not None
    if config.dp.grad_sample_mode != "auto":
        return config.dp.grad_sample_mode
    per_sample_bytes = 4 * trainable * config.batch_size
    if per_sample_bytes > config.per_sample_memory_budget:
        return "ghost"
    return "fused" if fused_ok else "hooks"


class LocalTrainer:
    """Trains clients one after another on a shared `LoraHost` (one frozen base per process)."""

    def __init__(self, host: LoraHost, config: TrainConfig) -> None:
        self.host, self.config = host, config

    # -- setup -----------------------------------------------------------------------------

    def _prepare(self, start: Adapter, rank: int, train_a: bool, train_head: bool,
                 own_copy: bool) -> tuple[Any, dict[str, Tensor]]:
        """The rank's PEFT model on the start's base, and the adapter's tensors holding the
        start: the model's own (loaded into it), or, with `own_copy`, the client's own copies
        (the model untouched), as the batched engine trains them. Another rank's adapter
        stays frozen (PEFT's active adapter)."""
        model = self.host.model(rank)
        self.host.set_base_delta(start.base)
        layout = self.host.layout(rank)  # LoRA and extras; the base update is set above
        if own_copy:
            tensors = layout.tensors(start)
        else:
            layout.load(start)
            tensors = dict(layout.live)
        trains = {"A": train_a, "B": True, "extra": train_head}
        for slot in layout.slots:
            tensors[slot.param].requires_grad_(trains[slot.kind] and slot.parameter)
        return model, tensors

    def plan_dp(self, dp: DPConfig, n: int, trainable: int) -> DPPlan:
        """sigma, C, q and steps of this round; a target epsilon is solved for the whole planned
        run at this client's q (deterministic, so every round gets the same sigma)."""
        q = min(1.0, self.config.batch_size / n)
        steps = self.config.local_steps
        sigma = dp.noise_multiplier
        if sigma is None:
            assert dp.target_epsilon is not None
            sigma = noise_for_target(dp.target_epsilon, dp.delta, q,
                                     steps * self.config.planned_rounds, dp.accountant)
        return DPPlan(sigma, dp.max_grad_norm, q, steps,
                      choose_grad_sample_mode(self.config, trainable,
                                              fused_ok=self.host.dropout == 0))

    def batches(self, n: int, plan: DPPlan | None, generator: torch.Generator) -> BatchSampler:
        """Poisson sampling at the plan's q under DP (what the accountant assumes), shuffled
        fixed-size batches otherwise. Indices run over the training examples and, in an audit,
        the canaries after them."""
        if plan is not None:
            return PoissonBatches(n, plan.sample_rate, plan.steps, generator)
        return ShuffledBatches(n, self.config.batch_size, self.config.local_steps, generator)

    def optimizer(self, params: list[Tensor], foreach: bool | None = None
                  ) -> torch.optim.Optimizer:
        if self.config.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.config.lr, weight_decay=self.config.weight_decay,
                                   foreach=foreach)
        return torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay,
                                 foreach=foreach)

    # -- training ------------------------------------------------------------------------------

    def begin(
        self,
        client_id: str,
        start: Adapter,
        data: Encoded,
        *,
        rank: int,
        train_a: bool = True,
        train_head: bool = True,
        ledger: PrivacyLedger | None = None,
        seed: int = 0,
        canaries: GradientCanaries | None = None,
        limits: NodeLimits | None = None,
        dp_seed: int | None = None,
        own_copy: bool = False,
    ) -> ClientRound:
        """Everything before the first step: the checks (data, ledger, budget, the node's own
        limits), the adapter loaded into the rank's PEFT model, the DP plan and the sampler.

        `seed` makes non-private training reproducible (data order, dropout, FLoRA's fresh
        factors). Under DP the batch draws and the noise come from OS entropy; `dp_seed` replaces
        it in tests only. `limits` are the node's own (checked before the first step, with the
        job's budget). `canaries` (DP with per-sample gradients only) join the training set as
        extra indices after the real examples, drawn by the same sampler, for an audit.
        `own_copy`: the client trains its own copies of the adapter's tensors, not the model's
        (`_prepare`)."""
        n = len(data)
        if n == 0:
            raise FedlrError(f"client {client_id} has no training examples; repartition the data")
        dp = self.config.dp
        if limits is not None:
            limits.check_job(dp, client_id)
        if dp is not None and ledger is None:
            raise FedlrError(f"client {client_id}: DP training needs the client's privacy ledger")
        started = time.perf_counter()
        if not start.lora:  # FLoRA: a fresh LoRA every round, on the merged base
            start = Adapter(self.host.fresh_lora(rank, seed), start.base, start.extras, start.meta)
        model, tensors = self._prepare(start, rank, train_a, train_head, own_copy)
        named = [(name, t) for name, t in tensors.items() if t.requires_grad]
        params = [p for _, p in named]
        universe = n + (canaries.count if canaries is not None else 0)

        plan, accountant_seconds = None, 0.0
        if dp is not None:
            assert ledger is not None
            tic = time.perf_counter()
            plan = self.plan_dp(dp, universe, sum(p.numel() for p in params))
            ledger.check_budget(plan.segment, dp.delta, dp.budget, client_id)
            if limits is not None:
                limits.check_round(plan.noise_multiplier, plan.segment, ledger, client_id)
            accountant_seconds = time.perf_counter() - tic
        if canaries is not None:
            if plan is None or plan.mode not in ("hooks", "fused"):
                raise ConfigError("gradient canaries need DP-SGD with per-sample gradients "
                                  "(grad_sample_mode hooks or fused)")
            canaries.bind(params)

        if plan is None:
            batch_gen, noise_gen = torch.Generator().manual_seed(seed), None
        else:
            batch_gen = private_generator("cpu", dp_seed)
            noise_gen = private_generator(self.host.device,
                                          None if dp_seed is None else dp_seed + 1)
        return ClientRound(
            client_id=client_id, data=data, rank=rank, seed=seed, model=model, tensors=tensors,
            names=[name for name, _ in named], params=params,
            before=[p.detach().clone() for p in params], plan=plan,
            sampler=self.batches(universe, plan, batch_gen), noise_gen=noise_gen, ledger=ledger,
            canaries=canaries,
            started=started, timings={"setup_seconds": time.perf_counter() - started
                                      - accountant_seconds,
                                      "accountant_seconds": accountant_seconds})

    def train(self, client_id: str, start: Adapter, data: Encoded,
              **options: Unpack[ClientOptions]) -> TrainResult:
        """One round of local training (the options are `begin`'s); the ledger (DP only) is
        updated in place on success."""
        run = self.begin(client_id, start, data, **options)
        canaries = run.canaries
        n, plan, model, device = len(data), run.plan, run.model, self.host.device
        tic = time.perf_counter()
        optimizer = self.optimizer(run.params)
        model.train()
        # dropout draws from torch's global generator: forked, and seeded without DP, so that a
        # non-private round is reproducible from its seed whatever ran before in this process
        with self.dropout_rng(run.seed if plan is None else None), \
                self._dp_engine(model, optimizer, plan, run.noise_gen,
                                run.sampler.n, canaries) as engine:
            tokens = self.pass_tokens(plan)
            for indices in run.sampler:
                real = [i for i in indices if i < n]
                engine.zero_grad()
                for part in data.passes(real, tokens):
                    batch = data.batch(part).to(device)
                    with self.autocast(plan):
                        loss = per_example_loss(model, batch, self.host.task)
                    run.losses.extend(loss.detach().float().tolist())
                    engine.backward(loss, len(real))
                if not real:
                    engine.no_examples(run.params)
                engine.step([i - n for i in indices if i >= n])
        model.eval()
        run.timings["step_seconds"] = time.perf_counter() - tic
        return self.finish(run)

    def pass_tokens(self, plan: DPPlan | None) -> int:
        """Padded tokens per pass of the base: a CPU step runs its batch as passes of similar
        length (MiniLM on stdlib-docs: 1.85 padded tokens per real one in one pass of 16, 1.32 in
        passes of CPU_PASS_TOKENS); a GPU step and ghost clipping (which takes its norms from one
        backward) run it in one."""
        if self.host.device.type != "cpu" or (plan is not None and plan.mode == "ghost"):
            return 1 << 62
        return CPU_PASS_TOKENS

    def dropout_rng(self, seed: int | None) -> contextlib.AbstractContextManager[Any]:
        """torch's global generator forked (dropout draws from it), and seeded when `seed` is
        given (non-private training), so that whatever ran before in this process does not
        change the round."""
        device = self.host.device

        @contextlib.contextmanager
        def forked() -> Iterator[None]:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if seed is not None:
                    torch.manual_seed(seed)
                yield

        return forked()

    def finish(self, run: ClientRound) -> TrainResult:
        """After the last step: refuse an adapter that never moved, read the trained adapter
        from the round's tensors, record the DP steps in the ledger, and report."""
        changed = any(not torch.equal(b, p.detach())
                      for b, p in zip(run.before, run.params, strict=True))
        if not changed:
            raise TrainingError(
                f"client {run.client_id}: no trainable weight changed after "
                f"{self.config.local_steps} steps; the optimizer is not updating the adapter "
                "(see opacus#820: move the model to its device before attaching LoRA and DP)"
            )
        n = len(run.data)
        adapter = self.host.layout(run.rank).adapter(run.tensors)
        adapter.meta = {"client_id": run.client_id, "num_examples": n, "rank": run.rank}
        metrics: dict[str, Any] = {
            "train_loss": sum(run.losses) / len(run.losses) if run.losses else math.nan,
            "steps": self.config.local_steps,
            "examples_seen": len(run.losses),
            "device": str(self.host.device),
        }
        plan, ledger, dp = run.plan, run.ledger, self.config.dp
        if plan is not None and ledger is not None and dp is not None:
            tic = time.perf_counter()
            ledger.record(plan.segment, poisson=run.sampler.poisson)
            metrics.update(
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=plan.max_grad_norm,
                sample_rate=plan.sample_rate,
                grad_sample_mode=plan.mode,
                poisson=run.sampler.poisson,
                epsilon=ledger.epsilon(dp.delta),
                delta=dp.delta,
            )
            run.timings["accountant_seconds"] += time.perf_counter() - tic
        metrics.update(run.timings, seconds=time.perf_counter() - run.started)
        return TrainResult(adapter, n, metrics)

    def autocast(self, plan: DPPlan | None) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast as `precision` says (fedlr.precision). Under DP only where per-sample
        gradients are instantiated (hooks, fused): they are taken in fp32 before clipping
        (`OpacusEngine.step`, fedlr.kernels), so clipping stays exact; ghost clipping's norms
        come from the products themselves, so it runs in fp32."""
        if plan is not None and plan.mode == "ghost":
            return contextlib.nullcontext()
        return autocast(self.config.precision, self.host.device, self.host.dtype, self.host.width)

    @contextlib.contextmanager
    def _dp_engine(
        self, model: Any, optimizer: torch.optim.Optimizer, plan: DPPlan | None,
        noise_gen: torch.Generator | None, n: int, canaries: GradientCanaries | None,
    ) -> Iterator[StepEngine]:
        if plan is None:
            engine = StepEngine(optimizer)
        else:
            assert noise_gen is not None
            engine = OpacusEngine(model, optimizer, plan, noise_gen, plan.sample_rate * n,
                                  canaries)
        try:
            yield engine
        finally:
            engine.close()
