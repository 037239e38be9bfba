"""LoRA-aware federated aggregation, Flower-free: low-rank math (`lowrank`), the strategies
(`strategies`), what a client update must pass (`validation`) and the round (`rounds`)."""
