"""What this CPU's int8 kernels can do: :mod:`nbcompress.kernels.cpu`, re-exported.

The decision lives with the kernels (which may not import the engine), so that the
quantizer's choices and the sparse int8 kernels' instruction path follow one override.
"""

from __future__ import annotations

from nbcompress.kernels.cpu import ENV_VNNI, Int8Cpu, cpu_has_vnni, forced_int8_cpu, int8_cpu

__all__ = ["ENV_VNNI", "Int8Cpu", "cpu_has_vnni", "forced_int8_cpu", "int8_cpu"]
