"""Base models: where a model comes from (`sources`, torch-free) and the LoRA host that serves
every rank of one frozen base (`hosts`)."""
