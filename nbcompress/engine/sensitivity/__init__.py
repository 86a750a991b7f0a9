"""Which layers, and how much: sweeps, results, allocation, staged pruning and refinement."""
