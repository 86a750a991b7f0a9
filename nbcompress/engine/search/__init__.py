"""Search of per-layer pruning ratios: whole allocations measured by optuna samplers."""
