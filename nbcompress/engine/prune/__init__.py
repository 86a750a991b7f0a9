"""Weight pruning: mask strategies (importance × granularity) and the in-place verbs."""
