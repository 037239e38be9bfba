"""The round loop on Flower's Grid: the core plans each round (`fedlr.lora.rounds`), this module
sends each client its own downlink and brings the replies back, the core closes the round, and
this module evaluates and writes the run directory.

It is our own loop rather than `Strategy.start` because fedlr needs per-client payloads (ranks,
FLoRA base updates, privacy ledgers), validation with reasons, and resume from a checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.serverapp import Grid

from fedlr.adapters import Adapter, LoraFactors
from fedlr.client_ids import client_order
from fedlr.errors import RoundFailedError
from fedlr.evaluation import evaluate_as_trained
from fedlr.federation import Federation
from fedlr.grouping import Grouping
from fedlr.lora.rounds import (
    Rejection,
    RoundPlan,
    RoundResult,
    close_round,
    failed_round,
    plan_round,
    sample_clients,
)
from fedlr.lora.strategies import GlobalState
from fedlr.lora.strategies.base import ClientUpdate
from fedlr.lora.validation import ValidationPolicy
from fedlr.peft_layout import load_into_peft_model
from fedlr.privacy.report import RunPrivacy
from fedlr.privacy.sample_level import PrivacyLedger
from fedlr.privacy.secagg.server import Exchange, secure_round
from fedlr.server.grouping import count_workers
from fedlr.server.nodes import NodeDirectory
from fedlr.server.records import evaluates, round_record
from fedlr.server.rundir import RunDir
from fedlr.server.transport import InFlight, Transport
from fedlr.session import ModelSession
from fedlr.settings.schema import SimulationConfig
from fedlr.wire import (
    Job,
    Parts,
    Preload,
    Refusal,
    TrainJob,
    WireError,
    job_settings,
    reply_from_parts,
)

log = logging.getLogger("fedlr")


def malformed(client: str, exc: Exception) -> Rejection:
    """A reply that could not be decoded, checked or accounted, as that client's rejection."""
    reason = str(exc) if isinstance(exc, WireError) else (
        f"malformed reply ({type(exc).__name__}: {exc})")
    return Rejection(client, reason[:500], "malformed reply")


def refusal_of(client: str, reason: object) -> Rejection:
    """A node's refusal, its reason (the node's own words) cut to a line's length."""
    return Rejection(client, f"refused: {str(reason)[:500]}", "refused")


def finite_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A client's metrics, each a finite number under a short name (they reach metrics.jsonl,
    which holds JSON numbers only)."""
    for name, value in metrics.items():
        if len(str(name)) > 64 or not math.isfinite(value):
            raise WireError(f"malformed reply: metric {str(name)[:64]!r} = {value!r} is not a "
                            "finite number under a short name")
    return metrics


def preload_for(config: SimulationConfig, model: ModelSession) -> Preload:
    """What every job of this run asks its node to load (`Preload`)."""
    return Preload.for_run(model.spec, list(model.host.targets), config.alpha,
                           config.train_config())


@dataclass
class Coordinator:
    fed: Federation
    run: RunDir
    on_round: Callable[[dict[str, Any]], None] = lambda record: None
    grouping: Grouping | None = None  # a simulation's batched engine; deployed: None
    in_flight: InFlight | None = None  # a simulation's (`fedlr.server.transport.InFlight`)
    privacy: RunPrivacy = field(init=False)
    preload: Preload = field(init=False)  # what every job asks its node to load

    def __post_init__(self) -> None:
        self.privacy = RunPrivacy(self.fed.config)
        self.preload = preload_for(self.fed.config, self.fed.model)

    # -- state ---------------------------------------------------------------------------------

    def initial(self, resume: bool) -> GlobalState:
        """Round 0, or on resume the last checkpoint (round 0 if the run was killed before its
        first), with whatever later rounds left behind discarded."""
        checkpoint = self.run.load_checkpoint() if resume else None
        if checkpoint is None:
            if resume:
                self.run.discard_after(0)
            return self.fed.strategy.init_state(self.fed.model.host.initial_head)
        tensors, info = checkpoint
        self.privacy.restore(info)
        self.run.discard_after(info["round"])
        return GlobalState.from_tensors(tensors, info["state"])

    def checkpoint(self, state: GlobalState) -> None:
        tensors, info = state.to_tensors()
        self.run.save_checkpoint(
            state.round, tensors,
            {"state": info, **self.privacy.to_checkpoint(),
             "strategy": self.fed.strategy.describe()},
        )

    # -- the loop ------------------------------------------------------------------------------

    def run_rounds(self, grid: Grid, resume: bool, directory: NodeDirectory | None = None
                   ) -> GlobalState:
        """The rounds, with the nodes identified first unless `directory` already has them."""
        config = self.fed.config
        state = self.initial(resume)
        if directory is None:
            directory = NodeDirectory(config.num_clients, preload=self.preload)
            directory.wait(grid, seconds=config.connect_timeout,
                           at_least=config.min_valid_updates)
        for round_ in range(state.round + 1, config.rounds + 1):
            directory.refresh(grid)  # who left, who came back
            state = self.round(grid, directory.clients, state, round_)
        return state

    def job(self, client: str, round_: int) -> Job:
        config, strategy = self.fed.config, self.fed.strategy
        train, dp = job_settings(config.train_config())
        ledger = self.privacy.ledgers.get(client)
        return Job(
            client_id=client,
            round=round_,
            rank=strategy.spec.ranks[client],
            train_a=strategy.trains_a,
            train_head=strategy.trains_head,
            seed=config.client_seed(round_, client),
            alpha=config.alpha,
            model=self.preload.model,
            data=self.fed.data_spec.__dict__,
            train=train,
            dp=dp,
            ledger=ledger.to_dict() if ledger is not None else None,
            labels=list(self.fed.data.data.label_names),
        )

    def sample(self, round_: int) -> list[str]:
        """The round's clients: from the run's seed and the round, or, under client-level DP,
        from the OS's entropy (a sample anyone who reads run.json could replay would void the
        amplification by sampling)."""
        config = self.fed.config
        dp = config.client_dp_config()
        return sample_clients(config.client_ids(), config.sampled_per_round, round_,
                              seed=config.seed, private_sampling=dp and dp.sampling)

    def round(self, grid: Grid, nodes: dict[str, int], state: GlobalState, round_: int
              ) -> GlobalState:
        """Plan the round in the core, carry each downlink to its node and the replies back,
        close the round in the core, then write what it released. The record times each part:
        waiting for the nodes (`exchange_seconds`), the server's own work up to the new state
        (`aggregate_seconds`: sampling, planning, encoding jobs, decoding replies, closing), the
        evaluation, the accountant, and the files written before the record (its metrics line
        and the checkpoint come after it, which must stay last)."""
        started = time.perf_counter()
        config, strategy = self.fed.config, self.fed.strategy
        clients = self.sample(round_)
        plan = plan_round(strategy, state, clients, reachable=nodes)
        transport = Transport(grid, nodes, config.round_timeout, self.grouping,
                              in_flight=self.in_flight)
        if self.grouping is not None:
            transport.groups = self.grouping.split(sorted(plan.downlinks, key=client_order),
                                                   count_workers(config))
        jobs = {c: TrainJob(self.job(c, round_), d).to_parts() for c, d in plan.downlinks.items()}
        updates: list[ClientUpdate] = []  # individual updates: none under secure aggregation
        metrics: list[dict[str, float]] = []
        try:
            if config.secure_aggregation:
                exchange = self.secure_exchange(transport, jobs, metrics)
                result = secure_round(strategy, state, plan, exchange, config.secagg_settings(),
                                      min_valid_updates=config.min_valid_updates,
                                      max_update_norm=config.max_update_norm)
            else:
                result = self.plain_round(transport, jobs, plan, state, updates, metrics)
        except RoundFailedError as exc:  # recorded; the adapter carries over, the run goes on
            result = failed_round(strategy, state, exc)
            if not config.client_ids_public:  # its reason names clients
                result.facts["round_failed"] = "the round failed (its reason names clients)"
            log.warning("%s", result.facts["round_failed"])
        bytes_up, bytes_down = transport.bytes_up, transport.bytes_down
        self.log_rejections(round_, result.rejected)
        new_state = result.state
        accepted = sorted(result.accepted, key=int)

        closed = time.perf_counter()
        evaluation = (self.evaluate(new_state)
                      if evaluates(round_, config.rounds, config.eval_every) else None)
        evaluated = time.perf_counter()
        epsilons = self.privacy.epsilons()
        self.privacy.joined(accepted)
        client_level = self.privacy.client_level(round_)
        accounted = time.perf_counter()
        self.run.save_global(round_, self.global_adapter(new_state))
        if config.save_client_updates:
            for update in updates:
                if update.client_id in accepted:
                    self.run.save_client(round_, update.client_id, update.adapter)
        self.privacy.write(self.run.root / "privacy.json", epsilons, client_level)
        written = time.perf_counter()
        record = round_record(config, round_, clients, accepted, result.rejected, metrics,
                              evaluation, epsilons, result.report.residual,
                              result.report.residual_max, bytes_up, bytes_down, written - started)
        record.update(exchange_seconds=transport.seconds,
                      aggregate_seconds=closed - started - transport.seconds,
                      eval_seconds=evaluated - closed if evaluation else 0.0,
                      accountant_seconds=accounted - evaluated,
                      checkpoint_seconds=written - accounted)
        record["aggregation_exact"] = result.exact
        record.update(result.facts)
        if client_level:
            record["client_epsilon"] = client_level["epsilon"]
        self.run.append_metrics(record)
        self.checkpoint(new_state)
        self.on_round(record)
        return new_state

    def plain_round(self, transport: Transport, jobs: dict[str, Parts], plan: RoundPlan,
                    state: GlobalState, updates: list[ClientUpdate],
                    metrics: list[dict[str, float]]) -> RoundResult:
        """One exchange: every update comes back whole and `close_round` validates and
        aggregates them (`updates` and `metrics` receive what arrived)."""
        refused = []
        for client, reply in transport.send(jobs).items():
            update, refusal, numbers = self.parse(client, reply, plan.downlinks[client])
            if refusal is not None:
                refused.append(refusal)
                continue
            updates.append(update)
            metrics.append(numbers)
        return close_round(self.fed.strategy, state, plan, updates, policy=self.policy(),
                           refused=refused)

    # -- replies -------------------------------------------------------------------------------

    def policy(self) -> ValidationPolicy:
        config = self.fed.config
        return ValidationPolicy(max_update_norm=config.max_update_norm,
                                min_valid_updates=config.min_valid_updates,
                                max_examples=config.max_examples_per_client)

    def parse(self, client: str, reply: Parts | Rejection, downlink: Adapter
              ) -> tuple[ClientUpdate | None, Rejection | None, dict[str, float]]:
        """A reply as a ClientUpdate, or why it cannot be one (never raises: whatever decoding,
        checking or accounting one client's reply raises is that client's rejection, never the
        run's end). A ledger in the reply is the client's own: the server records it as
        reported, once the run's accountant has counted it."""
        if isinstance(reply, Rejection):
            return None, reply, {}
        try:
            answer = reply_from_parts(reply, downlink)
            if isinstance(answer, Refusal):
                return None, refusal_of(client, answer.reason), {}
            metrics = finite_metrics(answer.metrics)
            if answer.ledger is not None:
                self.privacy.admit(client, answer.ledger)
        except Exception as exc:  # the client's input alone: its rejection
            return None, malformed(client, exc), {}
        n = answer.num_examples  # weighs the round's train loss as it weighs the update
        numbers = {**metrics, "num-examples": float(self.policy().weight_of(n) if n > 0 else 0)}
        return ClientUpdate(client, answer.adapter, answer.num_examples), None, numbers

    def secure_exchange(self, transport: Transport, jobs: dict[str, Parts],
                        metrics: list[dict[str, float]]) -> Exchange:
        """Carries one secure-aggregation stage: the `train` stage with each client's job. Its
        replies bring the node's ledger and training metrics (not its example count, which is
        summed securely) beside the public keys; a refusal at any stage is a rejection."""

        def exchange(stage: str, messages: dict[str, dict[str, Any]]
                     ) -> dict[str, dict[str, Any] | Rejection]:
            out: dict[str, dict[str, Any] | Rejection] = {}
            sent = {c: Parts(jobs[c].arrays if stage == "train" else {},
                             {**(jobs[c].fields if stage == "train" else {}), **m})
                    for c, m in messages.items()}
            for client, reply in transport.send(sent, training=stage == "train").items():
                if isinstance(reply, Rejection):
                    out[client] = reply
                    continue
                try:
                    fields = reply.fields
                    if fields.get("kind") == "refusal":
                        out[client] = refusal_of(client, fields["reason"])
                        continue
                    if stage == "train":
                        metrics.append(self.secure_metrics(client, fields))
                except Exception as exc:  # the client's input alone: its rejection
                    out[client] = malformed(client, exc)
                    continue
                out[client] = fields
            return out

        return exchange

    def secure_metrics(self, client: str, fields: dict[str, Any]) -> dict[str, float]:
        """A secure train stage's metrics and ledger (raises on either malformed)."""
        metrics = json.loads(str(fields.get("metrics", "{}")))
        if not isinstance(metrics, dict):
            raise WireError(f"metrics must be a JSON object, got {type(metrics).__name__}")
        numbers = finite_metrics({k: float(v) for k, v in metrics.items()})
        ledger = fields.get("ledger")
        if ledger:
            self.privacy.admit(client, PrivacyLedger.from_dict(json.loads(str(ledger))))
        return numbers

    def log_rejections(self, round_: int, rejected: list[Rejection]) -> None:
        """Who was left out and why; only how many of each kind where ids are secret."""
        if self.fed.config.client_ids_public:
            for r in rejected:
                log.warning("round %d: client %s left out: %s", round_, r.client_id, r.reason)
            return
        for kind, count in sorted(Counter(r.kind for r in rejected).items()):
            log.warning("round %d: %d client(s) left out: %s", round_, count, kind)

    # -- global adapter, evaluation, records ---------------------------------------------------

    def global_adapter(self, state: GlobalState) -> Adapter:
        """The round's file: effective factors with scaling 1, so dW = B A exactly. For FLoRA the
        exact stacked update of the round."""
        lora = {name: LoraFactors(x.A, x.B, 1.0)
                for name, x in self.fed.strategy.round_release(state).items()}
        meta = {"round": state.round, "strategy": self.fed.strategy.name}
        return Adapter(lora=lora, extras=dict(state.extras), meta=meta)

    def eval_model(self, state: GlobalState) -> Any:
        """The host's model at the largest rank, holding the global adapter (and FLoRA's merged
        base): what the server evaluates and what the PEFT export must reproduce."""
        host, client = self.fed.model.host, self.fed.eval_client
        rank = self.fed.strategy.spec.ranks[client]
        downlink = self.fed.strategy.downlink(state, client)
        lora = downlink.lora or host.fresh_lora(rank, seed=0)
        host.set_base_delta(downlink.base)
        model = host.model(rank)
        load_into_peft_model(model, Adapter(lora=lora, extras=downlink.extras),
                             host.adapter_name(rank))
        return model

    def evaluate(self, state: GlobalState) -> dict[str, float]:
        return evaluate_as_trained(self.fed.model.host, self.eval_model(state),
                                   self.fed.data.heldout, self.fed.config.task,
                                   self.fed.config.precision)
