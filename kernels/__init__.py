"""fedlr.kernels: fused low-rank ops, each with a plain-torch reference that defines its meaning."""
