"""Compression during training: sparsity schedules, gradual pruning, fine-tuning, L1, low rank."""
