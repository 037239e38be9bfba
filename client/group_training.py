"""The batched engine: a group of one round's clients trained together in one process.

Every client of the group keeps what training it alone would have: its own start adapter (any
rank), its own sampler (its own Poisson draws under DP), its own optimizer state (one optimizer
holds every member's parameters, each with its own state, and steps those that have a gradient:
the members still training), its own noise generator and ledger. Each step concatenates the
clients' batches, runs the frozen base once over all of them, and sends each example through its
own client's LoRA and head (`fedlr.kernels.grouped`). Each client's loss is the mean over its
own examples, and no example depends on another client's adapter, so the backward gives every
client exactly its own gradient; under DP-SGD each example's gradient instead, clipped and
noised per client as Opacus does (`fedlr.kernels.clip_and_noise`). A client that runs out of
steps leaves the group; the others go on.

Setup and closing are `LocalTrainer`'s own (`begin`, `finish`), so checks, ledgers, budgets and
metrics are those of the per-client path. With dropout in the frozen base (MiniLM) the masks are
drawn for the whole group at once: the same distribution as alone, not the same draws.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedlr.adapters import Adapter
from fedlr.client.step_engines import one_batch_in_own_dtype
from fedlr.client.training import ClientOptions, ClientRound, LocalTrainer, TrainResult
from fedlr.data.batches import collate, padded_passes, per_example_loss
from fedlr.errors import ConfigError, FedlrError
from fedlr.grouping import CPU_CHUNK_TOKENS, CUDA_CHUNK_TOKENS
from fedlr.kernels import clip_and_noise
from fedlr.kernels.grouped import grouped_linear, grouped_lora
from fedlr.privacy.sample_level import PrivacyLedger


@dataclass
class GroupJob:
    """One client's part of a group: what `LocalTrainer.train` would be called with."""

    client_id: str
    start: Adapter
    data: Any
    options: ClientOptions

    @property
    def rank(self) -> int:
        return self.options["rank"]

    @property
    def ledger(self) -> PrivacyLedger | None:
        return self.options.get("ledger")


@dataclass
class Member:
    """A client while the group trains: its round (from `begin`, holding its own copies of
    every tensor of its adapter, keyed by the PEFT name)."""

    job: GroupJob
    run: ClientRound
    batches: Iterator[list[int]]
    active: bool = True
    indices: list[int] = field(default_factory=list)


def same_base(a: Adapter, b: Adapter) -> bool:
    """Whether two downlinks carry the same base update (FLoRA): a group shares one base."""
    if set(a.base) != set(b.base):
        return False
    return all(torch.equal(_dense(a.base[m]), _dense(b.base[m])) for m in a.base)


def _dense(delta: Any) -> Tensor:
    return delta if isinstance(delta, Tensor) else delta.dense()


class GroupLayers:
    """While a group step runs, the PEFT model's LoRA layers and head compute every example with
    its own client's tensors: `bind` names the group and the owner of each example."""

    def __init__(self, model: Any) -> None:
        from peft.tuners.lora.layer import Linear
        from peft.utils import ModulesToSaveWrapper

        self.patched: list[torch.nn.Module] = []
        self.members: list[Member] = []
        self.owner: Tensor | None = None
        self.per_sample = False
        for path, module in model.named_modules():
            if isinstance(module, Linear):
                self._patch(module, self._lora_forward(path, module))
            elif isinstance(module, ModulesToSaveWrapper):
                for inner, layer in module.original_module.named_modules():
                    if isinstance(layer, torch.nn.Linear):
                        self._patch(layer, self._head_forward(path, inner, layer))
                    elif any(True for _ in layer.parameters(recurse=False)):
                        self.close()
                        raise ConfigError(
                            f"the batched engine trains heads made of linear layers; {path} has "
                            f"a {type(layer).__name__}; use engine per-client")
                self._patch(module, module.original_module.forward)

    def _patch(self, module: torch.nn.Module, forward: Any) -> None:
        module.forward = forward
        self.patched.append(module)

    def close(self) -> None:
        for module in self.patched:
            del module.forward
        self.patched = []

    def bind(self, members: list[Member], owner: Tensor, per_sample: bool) -> None:
        self.members, self.owner, self.per_sample = members, owner, per_sample

    def _tensors(self, suffix: str) -> list[Tensor]:
        """Each member's tensor whose PEFT name is `prefix.<its adapter>.suffix`."""
        out = []
        for m in self.members:
            name = suffix.replace("{adapter}", f"r{m.run.rank}")
            out.append(m.run.tensors[name])
        return out

    def _lora_forward(self, path: str, module: Any) -> Any:
        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            base = module.base_layer(x, *args, **kwargs)
            A = self._tensors(f"{path}.lora_A.{{adapter}}.weight")
            B = self._tensors(f"{path}.lora_B.{{adapter}}.weight")
            scales = [module.scaling[f"r{m.run.rank}"] for m in self.members]
            assert self.owner is not None
            return base + grouped_lora(x, self.owner, A, B, scales, self.per_sample)
        return forward

    def _head_forward(self, path: str, inner: str, layer: torch.nn.Linear) -> Any:
        where = f"{path}.modules_to_save.{{adapter}}" + (f".{inner}" if inner else "")

        def forward(x: Tensor) -> Tensor:
            W = self._tensors(f"{where}.weight")
            b = self._tensors(f"{where}.bias") if layer.bias is not None else []
            assert self.owner is not None
            return grouped_linear(x, self.owner, W, b, self.per_sample)
        return forward


class GroupTrainer:
    """Trains the clients of a group together on a `LocalTrainer`'s host; each client's result
    is what `LocalTrainer.train` gives it alone (or the error it would raise). `chunk_tokens`:
    padded tokens per pass of the base (a micro-batch), which bounds a step's activations."""

    def __init__(self, trainer: LocalTrainer, chunk_tokens: int | None = None) -> None:
        self.trainer = trainer
        cuda = trainer.host.device.type == "cuda"
        self.chunk_tokens = chunk_tokens or (CUDA_CHUNK_TOKENS if cuda else CPU_CHUNK_TOKENS)

    def train(self, jobs: Sequence[GroupJob]) -> list[TrainResult | FedlrError]:
        """Clients whose downlinks carry different base updates train in separate groups."""
        if any(job.options.get("canaries") is not None for job in jobs):
            raise ConfigError("canaries need the per-client engine: run the audit with "
                              "--engine per-client")
        results: dict[int, TrainResult | FedlrError] = {}
        pending = list(range(len(jobs)))
        while pending:
            first = jobs[pending[0]].start
            together = [i for i in pending if same_base(jobs[i].start, first)]
            pending = [i for i in pending if i not in together]
            for i, result in zip(together, self._train([jobs[i] for i in together]),
                                 strict=True):
                results[i] = result
        return [results[i] for i in range(len(jobs))]

    def _join(self, job: GroupJob) -> Member:
        trainer = self.trainer
        run = trainer.begin(job.client_id, job.start, job.data, **job.options, own_copy=True)
        return Member(job, run, iter(run.sampler))

    def _train(self, jobs: Sequence[GroupJob]) -> list[TrainResult | FedlrError]:
        members: list[Member | FedlrError] = []
        for job in jobs:
            try:
                members.append(self._join(job))
            except FedlrError as exc:  # this client's own refusal: the others go on
                members.append(exc)
        live = [m for m in members if isinstance(m, Member)]
        if live:
            seconds = self._steps(live)
            for m in live:
                m.run.timings["step_seconds"] = seconds / len(live)
        return [m if isinstance(m, FedlrError) else self._close(m) for m in members]

    def _close(self, member: Member) -> TrainResult | FedlrError:
        """Closed as training alone closes."""
        timings = member.run.timings
        tic, joining = time.perf_counter(), timings["setup_seconds"] + timings["accountant_seconds"]
        try:
            result = self.trainer.finish(member.run)
        except FedlrError as exc:
            return exc
        # its own share of the group's time, not the wall time since it joined
        result.metrics["seconds"] = joining + timings["step_seconds"] + time.perf_counter() - tic
        return result

    def _steps(self, members: list[Member]) -> float:
        trainer = self.trainer
        plan = members[0].run.plan
        model = members[0].run.model
        tic = time.perf_counter()
        layers = GroupLayers(model)
        # foreach: one pass over a group's hundreds of small tensors, not a Python loop
        optimizer = trainer.optimizer([t for m in members for t in m.run.params], foreach=True)
        model.train()
        try:
            seed = members[0].job.options.get("seed", 0) if plan is None else None
            with trainer.dropout_rng(seed):
                while True:
                    active = [m for m in members if self._next(m)]
                    if not active:
                        break
                    optimizer.zero_grad(set_to_none=True)  # who has left is not stepped
                    self._step(active, layers, plan is not None)
                    optimizer.step()
        finally:
            layers.close()
            model.eval()
        for m in members:
            m.run.timings["group_size"] = float(len(members))
        return time.perf_counter() - tic

    @staticmethod
    def _next(member: Member) -> bool:
        if member.active:
            try:
                member.indices = next(member.batches)
            except StopIteration:
                member.active = False
        return member.active

    def _step(self, active: list[Member], layers: GroupLayers, private: bool) -> None:
        """The gradients of one step of every active member: the group's examples in
        micro-batches of similar length (so that few tokens are padding; each holds about
        `chunk_tokens`), each sorted by member, their gradients accumulated."""
        trainer, device = self.trainer, self.trainer.host.device
        examples = [(c, m.run.data[i]) for c, m in enumerate(active) for i in m.indices]
        for positions in padded_passes([len(ids) for _, (ids, _) in examples],
                                       self.chunk_tokens):
            chunk = sorted((examples[k] for k in positions), key=lambda example: example[0])
            # only the members with examples in this pass: the others would get zero gradients
            present = sorted({c for c, _ in chunk})
            local = {c: i for i, c in enumerate(present)}
            owner = torch.tensor([local[c] for c, _ in chunk], device=device)
            batch = collate([item for _, item in chunk], active[0].run.data.pad_id).to(device)
            layers.bind([active[c] for c in present], owner, per_sample=private)
            with trainer.autocast(active[0].run.plan):
                losses = per_example_loss(active[0].run.model, batch, trainer.host.task)
            if private:
                losses.sum().backward()
            else:  # each member's loss is the mean over its whole batch
                weights = losses.new_tensor([1.0 / len(active[c].indices) for c, _ in chunk])
                (losses * weights).sum().backward()
            for (c, _), value in zip(chunk, losses.detach().float().tolist(), strict=True):
                active[c].run.losses.append(value)
        for m in active if private else ():
            plan = m.run.plan
            assert plan is not None
            for t in m.run.params:
                if getattr(t, "grad_sample", None) is None:  # no example in the group: noise
                    t.grad_sample = t.new_zeros((0, *t.shape))
                one_batch_in_own_dtype(t)  # one batch, whatever the micro-batches were
            clip_and_noise(m.run.params, plan.max_grad_norm, plan.noise_multiplier,
                           plan.sample_rate * m.run.sampler.n, m.run.noise_gen)
