"""Structural removal: channels, neurons and heads physically removed (Torch-Pruning underneath)."""
