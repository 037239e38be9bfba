"""fedlr.server: the Flower ServerApp, its strategy adapter onto fedlr aggregation, checkpoints."""
