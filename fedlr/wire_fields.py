"""The names of the message fields a ClientApp routes by, apart from `fedlr.wire` (which needs
torch): a deployed node's per-round ClientApp process that hands its job to the node's warm
trainer reads them without importing torch."""

GROUP_FIELD = "group"  # a simulation's batched group: its members' jobs bundled into one message
PRELOAD_FIELD = "preload"  # the identify query's record that carries a `Preload`
STAGE_FIELD = "stage"  # a secure-aggregation stage
