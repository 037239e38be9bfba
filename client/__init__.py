"""fedlr.client: local LoRA training (PEFT + Opacus DP-SGD) and the Flower ClientApp."""
