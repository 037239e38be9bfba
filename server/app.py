"""The Flower ServerApp for `flwr run`: the same coordinator and run directory as `fedlr simulate`.

Settings come from the run config (`[tool.flwr.app.config]` in pyproject.toml, or
`flwr run --run-config "key=value ..."`): the names of `fedlr.settings.schema.SimulationConfig` with
dashes or underscores; `ranks` and `targets` as comma-separated strings, since Flower's run config
holds scalars only; `resume = true` continues the run in `out`.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlr.errors import ConfigError
from fedlr.server.coordinator import Coordinator
from fedlr.server.simulation import finish, open_run
from fedlr.settings.schema import PLACEMENT_SETTINGS, SimulationConfig
from fedlr.settings.text import SETTINGS, default_of, from_text

app = ServerApp()


def config_from_run_config(run_config: dict[str, Any]) -> tuple[SimulationConfig, bool]:
    values = {key.replace("-", "_"): value for key, value in run_config.items()}
    resume = bool(values.pop("resume", False))
    typed = {key: from_text(SETTINGS[key], value) if key in SETTINGS else value
             for key, value in values.items()}  # unknown names: the schema says which
    config = SimulationConfig.load(None, typed)
    placed = [name for name in PLACEMENT_SETTINGS
              if getattr(config, name) != default_of(SETTINGS[name])]
    if placed:
        raise ConfigError(f"{placed} apply to `fedlr simulate` only; under `flwr run` the "
                          "federation's options place the clients (e.g. options.backend."
                          "client-resources); remove them from the run config")
    return config, resume


def show_fedlr_log() -> None:
    """fedlr's own messages (who is which client, who was left out and why) in the run's log."""
    log = logging.getLogger("fedlr")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s fedlr: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


@app.main()
def main(grid: Grid, context: Context) -> None:
    show_fedlr_log()
    config, resume = config_from_run_config(dict(context.run_config))
    run, fed = open_run(config, resume)
    coordinator = Coordinator(fed, run)
    finish(coordinator, coordinator.run_rounds(grid, resume))
