"""Client-level differential privacy: DP-FedAvg (McMahan et al., ICLR 2018) for LoRA strategies.

Why client level: in federated fine-tuning one client holds many examples, often about one person
or organisation, so the unit worth protecting is a client's whole contribution (all its examples
in all rounds), not one example. Sample-level DP-SGD (`fedlr.privacy.sample_level`) does not
bound that.

Mechanism: each client's update, taken as the change from the adapter it started from in the
effective (scaling-folded) space zero-padded to the federation's max rank, is clipped to L2 norm
S over all modules and trained head tensors together; the clipped deltas are summed with equal
weights, Gaussian noise N(0, (z S)^2) is added to every coordinate of the padded space, and the
sum is divided by a fixed denominator (the expected number of clients per round). Everything the
server does afterwards (adding to the global adapter, FedSVD's re-orthogonalisation) is
post-processing.

Trust model: a trusted server samples clients, clips and noises. The guarantee covers what the
server releases (global adapters, checkpoints, exports), not the server's own view of individual
updates. Amplification by sampling needs the sample to stay secret: clients are drawn from the
OS's random source (`draw_clients`), and a run publishes only counts of sampled, accepted and
rejected clients. Outside the guarantee: those counts, example counts, client training losses and
metrics, the per-client norms in `ClientDPReport`. The noise comes from a torch.Generator seeded
from the OS (not a cryptographic RNG) in floating point; the accounting is that of the ideal
Gaussian mechanism.

Accounting (`client_level_epsilon`): Poisson client sampling with add/remove-one-client adjacency
(sensitivity S), or fixed-size sampling without replacement with replace-one-client adjacency
(sensitivity 2 S), by dp-accounting's RDP or PLD accountant. A run that publishes who took part
gets no amplification: each client's epsilon is the Gaussian mechanism composed over the rounds
its update was in (`published_sample_epsilon`).
"""

from __future__ import annotations

import importlib.metadata
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fedlr.adapters import Adapter, LoraFactors
from fedlr.errors import ConfigError
from fedlr.lora.lowrank import LowRank
from fedlr.lora.strategies.base import AggregationReport, ClientUpdate, GlobalState, Strategy
from fedlr.lora.sums import SecureSum, SumSpec
from fedlr.settings.specs import ClientDPConfig

if TYPE_CHECKING:
    import dp_accounting

PRIVACY_UNIT = "one client's whole contribution: all its examples in all rounds"

@dataclass(frozen=True)
class ClientDPReport:
    """What one private aggregation did. Per-client norms are private: the caller decides what
    to publish."""

    pre_clip_norms: dict[str, float]
    post_clip_norms: dict[str, float]
    clipped_fraction: float
    noise_std: float  # on the sum, per coordinate: z * S
    denominator: float


# -- the release space ------------------------------------------------------------------------


def padded_tensors(adapter: Adapter, shapes: Mapping[str, tuple[int, ...]]
                   ) -> dict[str, Tensor]:
    """The adapter's tensors under the keys and shapes of `Strategy.trained_tensors`: effective
    B (A) with zero columns (rows) up to the release's rank, trained head tensors as they are."""
    out: dict[str, Tensor] = {}
    for key, shape in shapes.items():
        kind, _, name = key.partition("::")
        if kind == "extra":
            out[key] = adapter.extras[name]
            continue
        x = adapter.lora[name].effective()
        if kind == "lora_B":
            out[key] = x.B.new_zeros(shape)
            out[key][:, : x.rank] = x.B
        else:
            out[key] = x.A.new_zeros(shape)
            out[key][: x.rank] = x.A
    return out


def client_delta(
    strategy: Strategy, state: GlobalState, update: ClientUpdate, start: Adapter
) -> dict[str, Tensor]:
    """The update minus its own start, in the padded effective space of the trained tensors."""
    shapes = {key: tuple(t.shape) for key, t in strategy.trained_tensors(state).items()}
    new, old = padded_tensors(update.adapter, shapes), padded_tensors(start, shapes)
    return {key: new[key] - old[key] for key in shapes}


def l2_norm(tensors: Mapping[str, Tensor]) -> float:
    """One L2 norm over all tensors together, in float64 so huge updates do not overflow."""
    if not tensors:
        return 0.0
    norms = [torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors.values()]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def clip(
    delta: Mapping[str, Tensor], clip_norm: float, who: str
) -> tuple[dict[str, Tensor], float, float]:
    """The delta scaled by min(1, S / norm), its norm before and after."""
    norm = l2_norm(delta)
    if not math.isfinite(norm):
        raise ValueError(
            f"client {who}: the update has a non-finite norm and cannot be clipped; reject it "
            "before aggregation (fedlr.lora.validation.validate_update)"
        )
    if norm <= clip_norm:
        return dict(delta), norm, norm
    factor = clip_norm / norm
    clipped = {k: t * factor for k, t in delta.items()}
    return clipped, norm, l2_norm(clipped)


def _add_noise(total: dict[str, Tensor], std: float, generator: torch.Generator) -> None:
    """N(0, std^2) on every coordinate, in place on the server's own sum."""
    if std == 0:
        return
    for t in total.values():
        noise = torch.randn(t.shape, generator=generator, dtype=t.dtype, device=generator.device)
        t.add_(noise.to(t.device), alpha=std)


def _apply(strategy: Strategy, state: GlobalState, mean: Mapping[str, Tensor]) -> GlobalState:
    """The new global state from the privatised mean delta (post-processing only)."""
    lora = {}
    for name, g in state.lora.items():
        B = g.B + mean[f"lora_B::{name}"]
        A = g.A + mean[f"lora_A::{name}"] if strategy.trains_a else g.A
        lora[name] = strategy.after_noise(LowRank(B, A))
    extras = dict(state.extras)
    if strategy.trains_head:
        extras = {name: t + mean[f"extra::{name}"] for name, t in state.extras.items()}
    return GlobalState(round=state.round + 1, lora=lora, extras=extras)


def dp_fedavg(
    strategy: Strategy,
    state: GlobalState,
    updates: Sequence[ClientUpdate],
    config: ClientDPConfig,
    expected_clients: float,
    generator: torch.Generator,
) -> tuple[GlobalState, ClientDPReport]:
    """One DP-FedAvg round: clip each delta to S, sum with equal weights, add N(0, (z S)^2),
    divide by the fixed `expected_clients` (q N for Poisson sampling, the sample size for
    fixed-size sampling), so that dropped clients lower the signal but never the privacy.

    `updates` must have passed validation; each one's `start` is the adapter it trained from
    (recomputed from `state` when absent). Example counts are ignored: they are private. Zero
    updates release pure noise. Inputs are never modified.
    """
    _check_wrappable(strategy, config, expected_clients)
    total = {key: torch.zeros_like(t) for key, t in strategy.trained_tensors(state).items()}
    pre, post = {}, {}
    for update in updates:
        cid = update.client_id
        if cid in pre:
            raise ValueError(f"client {cid}: two updates in one round break the per-client bound")
        start = update.start or strategy.starting_adapter(state, cid)
        clipped, pre[cid], post[cid] = clip(
            client_delta(strategy, state, update, start), config.clip_norm, cid
        )
        for key, t in clipped.items():
            total[key].add_(t)
    clipped_count = sum(pre[c] > config.clip_norm for c in pre)
    report = ClientDPReport(
        pre_clip_norms=pre,
        post_clip_norms=post,
        clipped_fraction=clipped_count / len(pre) if pre else 0.0,
        noise_std=config.noise_multiplier * config.clip_norm,
        denominator=float(expected_clients),
    )
    return privatise(strategy, state, total, config, expected_clients, generator), report


def privatise(strategy: Strategy, state: GlobalState, total: dict[str, Tensor],
              config: ClientDPConfig, expected_clients: float, generator: torch.Generator
              ) -> GlobalState:
    """The next state from the sum of clipped deltas: N(0, (z S)^2) added to the sum, which is
    then divided by the fixed `expected_clients` and applied. `total` becomes the noised sum."""
    _add_noise(total, config.noise_multiplier * config.clip_norm, generator)
    return _apply(strategy, state, {key: t / expected_clients for key, t in total.items()})


def _check_wrappable(strategy: Strategy, config: ClientDPConfig, expected_clients: float) -> None:
    strategy.traits.check_client_dp(strategy.hetero)
    if not (math.isfinite(expected_clients) and expected_clients > 0):
        raise ConfigError(
            f"expected clients per round must be a number > 0, got {expected_clients!r}; "
            "pass q * N for Poisson sampling or the sample size for fixed-size sampling"
        )


class DPFedAvg(Strategy):
    """Client-level DP-FedAvg around a strategy that allows it, as Flower wraps its strategies
    for DP: the wrapped strategy's downlinks, state and validation, with `aggregate` replaced by
    clip, sum, noise and divide by the fixed `expected_clients`. Every round is released, also one
    in which no valid update arrived (pure noise), so the accounting's round count is the truth.
    """

    every_round_released = True

    def __init__(self, inner: Strategy, config: ClientDPConfig, *, expected_clients: float,
                 generator: torch.Generator) -> None:
        _check_wrappable(inner, config, expected_clients)
        self.inner, self.config = inner, config
        self.expected_clients, self.generator = expected_clients, generator
        self.traits = inner.traits
        self.spec, self.hetero, self.head = inner.spec, inner.hetero, inner.head
        self.seed = inner.seed

    def init_state(self, extras: Mapping[str, Tensor] | None = None) -> GlobalState:
        return self.inner.init_state(extras)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def downlink(self, state: GlobalState, client_id: str, since_round: int = 0) -> Adapter:
        return self.inner.downlink(state, client_id, since_round)

    def starting_adapter(self, state: GlobalState, client_id: str) -> Adapter:
        return self.inner.starting_adapter(state, client_id)

    def round_release(self, state: GlobalState) -> dict[str, LowRank]:
        return self.inner.round_release(state)

    def global_update(self, state: GlobalState) -> dict[str, LowRank]:
        return self.inner.global_update(state)

    def export_lora(self, state: GlobalState, export_rank: int | None
                    ) -> tuple[dict[str, LoraFactors], dict[str, Any]]:
        return self.inner.export_lora(state, export_rank)

    def audited_form(self) -> Strategy:
        return self.inner.audited_form()

    def secure_sum(self, state: GlobalState) -> SumSpec:
        """Each client's change from its start, clipped to S on the client, unweighted."""
        shapes = {k: tuple(t.shape) for k, t in self.inner.trained_tensors(state).items()}
        return SumSpec(shapes, self.spec.max_rank, clip_norm=self.config.clip_norm)

    def aggregate_sum(self, state: GlobalState, total: SecureSum
                      ) -> tuple[GlobalState, AggregationReport]:
        """The server's noise on the unmasked sum of clipped changes: what `aggregate` releases,
        with the clipping done by each client before it masked its part."""
        new_state = privatise(self.inner, state, dict(total.tensors), self.config,
                              self.expected_clients, self.generator)
        return new_state, self.sum_report(new_state.round, total, self.expected_clients)

    def carry_over(self, state: GlobalState) -> GlobalState:
        """No valid update: the round still releases, the noise alone."""
        return self.aggregate(state, [])[0]

    def aggregate(self, state: GlobalState, updates: Sequence[ClientUpdate]
                  ) -> tuple[GlobalState, AggregationReport]:
        new_state, report = dp_fedavg(self.inner, state, updates, self.config,
                                      self.expected_clients, self.generator)
        bound = self.config.clip_norm * (1 + 1e-6)
        if any(norm > bound for norm in report.post_clip_norms.values()):
            raise AssertionError("client-level DP: a clipped update exceeds the clip norm")
        weights = {u.client_id: 1 / self.expected_clients for u in updates}
        return new_state, AggregationReport(self.name, new_state.round, weights, math.nan,
                                            math.nan, {})


def draw_clients(ids: Sequence[str], per_round: float, sampling: str, rng: random.Random
                 ) -> list[str]:
    """A round's clients: each independently with q = per_round / len(ids) (Poisson), or exactly
    `per_round` of them without replacement (fixed). `rng` is the OS's (random.SystemRandom) in
    a run, so that nobody can predict or replay the sample its amplification relies on."""
    if sampling == "poisson":
        q = per_round / len(ids)
        return [c for c in ids if rng.random() < q]
    return rng.sample(list(ids), int(per_round))


# -- accounting -------------------------------------------------------------------------------


def _check_population(num_clients: int, per_round: int, rounds: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"client-DP accounting needs at least one client, got {num_clients}")
    if not 1 <= per_round <= num_clients:
        raise ConfigError(
            f"clients per round must be between 1 and the number of clients {num_clients}, "
            f"got {per_round}"
        )
    if rounds < 0:
        raise ConfigError(f"the number of rounds must be >= 0, got {rounds}")


def _round_event(
    config: ClientDPConfig, num_clients: int, per_round: int
) -> tuple[dp_accounting.DpEvent, dp_accounting.PrivacyAccountant]:
    """One round's event and a fresh accountant with the matching adjacency.

    Replace-one: the sum moves by up to 2 S when one client is swapped for another. dp-accounting
    reads a noise multiplier as std / (sensitivity under the accountant's relation): its
    sampled-without-replacement RDP is alpha / (2 sigma^2) at q = 1, the plain Gaussian's. So the
    multiplier it needs is z S / (2 S) = z / 2.
    """
    import dp_accounting
    from dp_accounting import pld, rdp

    z = config.noise_multiplier
    if config.sampling == "fixed":
        event = dp_accounting.SampledWithoutReplacementDpEvent(
            num_clients, per_round, dp_accounting.GaussianDpEvent(z / 2)
        )
        relation = dp_accounting.NeighboringRelation.REPLACE_ONE
        return event, rdp.RdpAccountant(neighboring_relation=relation)
    q = per_round / num_clients
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    accountant = rdp.RdpAccountant() if config.accountant == "rdp" else pld.PLDAccountant()
    return event, accountant


def client_level_epsilon(
    config: ClientDPConfig, *, num_clients: int, per_round: int, rounds: int
) -> float:
    """Epsilon at `config.delta` of `rounds` DP-FedAvg rounds; `per_round` is the expected
    (Poisson) or exact (fixed-size) number of clients sampled from `num_clients` each round."""
    import dp_accounting

    _check_population(num_clients, per_round, rounds)
    if rounds == 0:
        return 0.0
    if config.noise_multiplier == 0:
        return math.inf  # the clipped sum is released as it is
    event, accountant = _round_event(config, num_clients, per_round)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(config.delta))


def published_sample_epsilon(config: ClientDPConfig, rounds_joined: int) -> float:
    """A client's epsilon when the run publishes who took part: nothing is amplified by sampling,
    so it is the Gaussian mechanism (sensitivity S, or 2S under replace-one adjacency for
    fixed-size sampling) composed over the `rounds_joined` rounds its update was in."""
    import dp_accounting
    from dp_accounting import pld, rdp

    if rounds_joined < 0:
        raise ConfigError(f"the number of rounds must be >= 0, got {rounds_joined}")
    if rounds_joined == 0:
        return 0.0
    if config.noise_multiplier == 0:
        return math.inf
    z = config.noise_multiplier / (2 if config.sampling == "fixed" else 1)
    accountant = rdp.RdpAccountant() if config.accountant == "rdp" else pld.PLDAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z),
                                                         rounds_joined))
    return float(accountant.get_epsilon(config.delta))


def client_level_description(
    config: ClientDPConfig, num_clients: int, per_round: int
) -> dict[str, Any]:
    """The facts privacy.json states next to the epsilon."""
    _check_population(num_clients, per_round, 0)
    fixed = config.sampling == "fixed"
    sampling: dict[str, Any] = (
        {
            "method": "fixed-size, without replacement",
            "num_clients": num_clients,
            "per_round": per_round,
        }
        if fixed
        else {"method": "poisson", "q": per_round / num_clients, "num_clients": num_clients,
              "per_round": per_round}  # the expected number: q = per_round / num_clients
    )
    return {
        "privacy_unit": PRIVACY_UNIT,
        "adjacency": "replace one client" if fixed else "add or remove one client",
        "sensitivity": (2 if fixed else 1) * config.clip_norm,
        "sampling": sampling,
        "noise_multiplier": config.noise_multiplier,
        "clip_norm": config.clip_norm,
        "noise_std_on_sum": config.noise_multiplier * config.clip_norm,
        "accountant": config.accountant,
        "accountant_library": f"dp-accounting {importlib.metadata.version('dp-accounting')}",
        "delta": config.delta,
    }
