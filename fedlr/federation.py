"""The federation a run is about, built in one place for every use (the Flower coordinator, the
empirical audit, the benchmarks): the model and its LoRA host, the partitioned data, the strategy
(wrapped in client-level DP-FedAvg when the settings ask for it). Building it validates the data
and the model before any round."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedlr.lora.strategies import FederationSpec, Strategy, make_strategy
from fedlr.privacy.client_level import DPFedAvg
from fedlr.privacy.sample_level import private_generator
from fedlr.session import DataSession, ModelSession, data_session, data_source, model_session
from fedlr.settings.schema import SimulationConfig
from fedlr.settings.specs import DataSpec


@dataclass
class Federation:
    """Everything the server builds before round 1; building it validates the data and model."""

    config: SimulationConfig
    model: ModelSession
    data: DataSession
    data_spec: DataSpec
    strategy: Strategy

    @classmethod
    def build(cls, config: SimulationConfig, device: str = "auto",
              on_model: Callable[[ModelSession], None] = lambda model: None) -> Federation:
        """`on_model` gets the model session as soon as it is loaded, before the data are
        partitioned and tokenised (a simulation's nodes load theirs meanwhile)."""
        labels = data_source(config.dataset, config.task).num_labels
        spec = config.model_spec(labels)
        model = model_session(spec, config.alpha, device)
        on_model(model)
        data_spec = config.data_spec()
        data = data_session(data_spec, spec)
        federation = FederationSpec(
            modules=model.host.shapes,
            ranks=config.client_ranks(),
            alpha=config.alpha,
            extras=model.host.head_shapes,
        )
        strategy = make_strategy(
            config.strategy, federation, hetero=config.hetero, head=config.head, seed=config.seed
        )
        dp = config.client_dp_config()
        if dp is not None:  # noise seeded from the OS, never from the run
            strategy = DPFedAvg(strategy, dp, expected_clients=config.sampled_per_round,
                                generator=private_generator())
        return cls(config, model, data, data_spec, strategy)

    @property
    def eval_client(self) -> str:
        """A client of the largest rank: its downlink is the whole global adapter."""
        ranks = self.strategy.spec.ranks
        return max(ranks, key=lambda c: (ranks[c], -int(c)))
