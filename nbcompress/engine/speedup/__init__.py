"""Pruned and faster: measured dense vs sparse-kernel comparison and ``sparsify_``."""
