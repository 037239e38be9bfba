"""fedlr: federated fine-tuning of language models with LoRA.

The core (this package) knows nothing of Flower: adapter state, aggregation strategies as plain
torch functions, validation. `fedlr.client`, `fedlr.server` and `fedlr.kernels` build on it.
"""

__version__ = "0.1.0"
