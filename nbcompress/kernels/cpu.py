"""What this CPU's int8 kernels can do, in one place, with an override for tests.

fbgemm's dynamic int8 product multiplies uint8 activations by int8 weights. With VNNI
(AVX512-VNNI, AVX-VNNI, AMX) the products accumulate in int32. Without it (AVX2, e.g. an
AMD EPYC before Zen 4) two neighbouring u8×s8 products are summed in *saturating int16*
first: 255 × 127 × 2 = 64,770 does not fit, and the sum clips. torch.ao avoids this with
7-bit activations (``reduce_range``), which doubles a layer's error; nbcompress's own
:class:`~nbcompress.engine.quantize.modules.Int8DynamicLinear` keeps 8-bit activations and
stores 7-bit weights instead (255 × 63 × 2 = 32,130 fits), which measured ~2× more
accurate on MiniLM here. Every decision that depends on the CPU asks :func:`int8_cpu`.

The sparse int8 kernels (:mod:`nbcompress.kernels.int8`) sum their products exactly on
both paths (``vpdpbusd``, or widened 16-bit products without VNNI): the path changes
their speed, never their results (:func:`sparse_int8_path`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "ENV_VNNI",
    "Int8Cpu",
    "cpu_has_vnni",
    "forced_int8_cpu",
    "int8_cpu",
    "sparse_int8_path",
]

#: Environment variable overriding the detection: ``1`` (VNNI path) or ``0`` (no VNNI).
ENV_VNNI = "NBCOMPRESS_INT8_VNNI"
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_FORCED: contextvars.ContextVar[bool | None] = contextvars.ContextVar("int8_vnni", default=None)


@dataclass(frozen=True)
class Int8Cpu:
    """The CPU's int8 capabilities, as far as the quantizer's choices depend on them.

    Attributes:
        vnni: int8 dot products accumulate in int32 (no int16 saturation).
        capability: torch's CPU capability string, e.g. ``"AVX2"`` or ``"AVX512"``.
        source: ``"detected"``, ``"forced"`` (:func:`forced_int8_cpu`) or :data:`ENV_VNNI`.
    """

    vnni: bool
    capability: str
    source: str

    @property
    def weight_max(self) -> int:
        """Largest |int8 weight| whose products with uint8 activations cannot saturate."""
        return 127 if self.vnni else 63


@functools.cache
def cpu_has_vnni() -> bool:
    """Whether this CPU has int8 dot products with int32 accumulation (Linux flags).

    The hardware only, ignoring overrides; decisions ask :func:`int8_cpu` instead.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: assume the conservative path (always correct, 1 bit less)
        return False
    return any(flag in flags for flag in _VNNI_FLAGS)


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def sparse_int8_path() -> str:
    """The sparse int8 kernels' instruction path: ``"vnni"`` or ``"portable"``.

    ``"vnni"`` (``vpdpbusd`` on 512-bit vectors) where :func:`int8_cpu` says VNNI *and*
    the CPU has AVX512-VNNI; anything else (AVX-VNNI or AMX only, no VNNI, or VNNI forced
    on a CPU without it) takes the portable path (AVX2 ``vpmaddwd``: any x86-64 CPU since
    2013–2015, AMD EPYC included). Both return bit-identical results, so forcing either
    is always safe. Asked on every batch a sparse int8 layer runs: :func:`int8_cpu`'s
    decision without building its record.
    """
    wanted = _FORCED.get()
    if wanted is None:
        env = os.environ.get(ENV_VNNI, "").strip()
        wanted = env == "1" if env in ("0", "1") else cpu_has_vnni()
    return "vnni" if wanted and _has_avx512_vnni() else "portable"


@functools.cache
def _has_avx512_vnni() -> bool:
    return {"avx512_vnni", "avx512bw", "avx512vl"} <= _cpu_flags()


@functools.cache
def _capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - older torch: the capability is only informative
        return "unknown"


def int8_cpu() -> Int8Cpu:
    """This CPU's int8 capabilities: forced (:func:`forced_int8_cpu`), env, else detected.

    The detection reads the ``/proc/cpuinfo`` flags (torch's capability string says AVX512,
    not whether VNNI is there); :data:`ENV_VNNI` (``0``/``1``) overrides it process-wide.
    """
    forced = _FORCED.get()
    if forced is not None:
        return Int8Cpu(forced, _capability(), "forced")
    env = os.environ.get(ENV_VNNI, "").strip()
    if env in ("0", "1"):
        return Int8Cpu(env == "1", _capability(), ENV_VNNI)
    return Int8Cpu(cpu_has_vnni(), _capability(), "detected")


@contextlib.contextmanager
def forced_int8_cpu(vnni: bool) -> Iterator[Int8Cpu]:
    """Take the VNNI (``True``) or the non-VNNI path for a while, whatever the CPU.

    Modules built inside keep the choice (it is made when their weights are packed), so a
    model quantized on the forced path runs on it afterwards too, until it is reloaded.
    Forcing ``True`` on a CPU without VNNI makes int8 products saturate for real: the
    quantizer's accuracy checks must then catch it.
    """
    token = _FORCED.set(bool(vnni))
    try:
        yield int8_cpu()
    finally:
        _FORCED.reset(token)
