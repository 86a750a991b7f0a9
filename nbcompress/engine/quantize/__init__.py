"""Quantization: mode configs, backends, int8 modules, static int8 and the measured report."""
