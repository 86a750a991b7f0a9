"""Quantization backends behind one interface: torch.ao, torchao, numba, ONNX Runtime, nbcompress.

A :class:`Backend` says whether it is installed, whether it can convert a given layer
for a given mode config (and why not), and builds the replacement module from the layer
without editing it (from a :func:`~nbcompress.engine.core.memory.twin` where the
backend edits module attributes: the twin shares the weights, so nothing of their size
is copied; the original is never touched, which is what makes undo bit-exact). Which backend
wins for a layer is decided by measurement in :mod:`nbcompress.engine.quantize.modes`.
Deprecation warnings that backends emit are collected by :func:`quiet` and summarised
once in the report instead of being printed on every call.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import textwrap
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from nbcompress.engine.core.memory import twin
from nbcompress.engine.quantize import ort_int8
from nbcompress.engine.quantize.config import DynamicInt8Config, HalfConfig, WeightInt8Config
from nbcompress.engine.quantize.embedding_int8 import int8_table, table_supports
from nbcompress.engine.quantize.modules import (
    HalfCompute,
    HalfWeight,
    Int8DynamicLinear,
    Int8WeightOnly,
    weight_kind,
)

__all__ = [
    "BACKENDS",
    "FAMILIES",
    "Backend",
    "backends_for",
    "quantized_engine",
    "quiet",
    "register",
]

_RNN = (nn.LSTM, nn.GRU)


@dataclass(frozen=True)
class Backend:
    """One way of quantizing a layer for one kind of mode config.

    Attributes:
        name: Shown in reports, e.g. ``"torch.ao[fbgemm]"``.
        family: What ``backend=`` selects: ``torch``, ``torchao``, ``numba``, ``onnxruntime``
            or ``nbcompress``.
        config: The mode config class this backend handles.
        supports: ``(config, layer) -> None`` if it can convert ``layer``, else the reason.
        build: ``(config, layer) -> module`` building the replacement; never edits ``layer``.
        available: ``() -> None`` if installed and working here, else the reason.
    """

    name: str
    family: str
    config: type
    supports: Callable[[object, nn.Module], str | None]
    build: Callable[[object, nn.Module], nn.Module]
    available: Callable[[], str | None] = lambda: None


FAMILIES = ("torch", "torchao", "numba", "onnxruntime", "nbcompress")
BACKENDS: list[Backend] = []
_WARNED: dict[str, int] = {}


@contextlib.contextmanager
def quiet(seen: dict[str, int] | None = None) -> Iterator[dict[str, int]]:
    """Collect backend deprecation/user warnings (first line → count) instead of printing."""
    seen = _WARNED if seen is None else seen
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield seen
    for w in caught:
        # One line, cut at a word (never mid-word) and marked as cut.
        first = textwrap.shorten(str(w.message).strip().splitlines()[0], 160, placeholder=" …")
        seen[first] = seen.get(first, 0) + 1


@contextlib.contextmanager
def quantized_engine(name: str) -> Iterator[None]:
    """Make ``name`` torch's active quantized engine for a while, then restore the old one.

    Weights are packed for the engine active at conversion, so conversions run inside.
    """
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def backends_for(config: object, family: str = "auto") -> list[Backend]:
    """Backends registered for ``type(config)`` (of one family unless ``auto``)."""
    return [
        b
        for b in BACKENDS
        if isinstance(config, b.config) and (family == "auto" or family in (b.family, b.name))
    ]


def register(backend: Backend) -> Backend:
    """Add a backend to the registry (third parties may add their own)."""
    BACKENDS.append(backend)
    return backend


# --- torch.ao (eager) dynamic int8 -------------------------------------------------------


def _ao_dynamic_supports(config: object, layer: nn.Module) -> str | None:
    if type(layer) is nn.Linear or type(layer) in _RNN:
        return None
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "dynamic int8 has no Conv kernel; use mode='static' (calibrated) or 'weight'"
    return f"dynamic int8 handles Linear, LSTM and GRU, not {type(layer).__name__}"


def _ao_dynamic(engine: str) -> Callable[[object, nn.Module], nn.Module]:
    def build(config: object, layer: nn.Module) -> nn.Module:
        import torch.ao.nn.quantized.dynamic as nnqd
        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

        mod = twin(layer)  # from_float reads the float weight; a copy would double it
        linear = type(layer) is nn.Linear
        per_channel = linear and getattr(config, "per_channel", False) is True
        mod.qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
        cls = nnqd.Linear if linear else getattr(nnqd, type(layer).__name__)
        with quantized_engine(engine):
            return cls.from_float(mod)

    return build


def _engine_available(engine: str) -> Callable[[], str | None]:
    def check() -> str | None:
        ok = engine in torch.backends.quantized.supported_engines
        return None if ok else f"quantized engine {engine!r} is not built into this torch"

    return check


# --- torchao -----------------------------------------------------------------------------


def _torchao_available() -> str | None:
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install torchao)"
    return None


def _torchao_supports(config: object, layer: nn.Module) -> str | None:
    return None if type(layer) is nn.Linear else "torchao int8 here handles Linear only"


def _torchao(config_name: str) -> Callable[[object, nn.Module], nn.Module]:
    def build(config: object, layer: nn.Module) -> nn.Module:
        # torchao logs registration chatter on import; keep the notebook output clean.
        log = logging.getLogger("torch.utils._pytree")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            import torchao.quantization as tq
        finally:
            log.setLevel(level)
        # torchao swaps the twin's weight attribute for a new tensor; the layer's stays.
        wrapper = nn.Sequential(twin(layer))
        tq.quantize_(wrapper, getattr(tq, config_name)())
        return wrapper[0]

    return build


# --- numba sparse int8 (nbcompress.kernels) ----------------------------------------------


def _numba_available() -> str | None:
    try:
        from nbcompress.kernels.modules import SparseConv2d, SparseLinear  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means "not here"
        return f"nbcompress.kernels int8 CSR modules not available ({type(err).__name__})"
    return None


def _numba_supports(config: object, layer: nn.Module) -> str | None:
    if type(layer) is not nn.Linear and not (
        type(layer) is nn.Conv2d and isinstance(config, WeightInt8Config)
    ):
        return "the numba int8 CSR kernels handle Linear (and Conv2d weight-only)"
    density = float((layer.weight != 0).float().mean())
    # Below ~50% zeros a CSR kernel cannot beat dense int8 here (see notes/environment.md).
    return None if density <= 0.5 else f"only {1 - density:.0%} zeros (CSR pays from ~50%)"


def _numba(config: object, layer: nn.Module) -> nn.Module:
    from nbcompress.kernels.modules import SparseConv2d, SparseLinear

    cls = SparseLinear if type(layer) is nn.Linear else SparseConv2d
    return cls.from_dense(layer, format="csr_int8")


# --- nbcompress's own modules ------------------------------------------------------------


def _weight_only_supports(config: object, layer: nn.Module) -> str | None:
    return weight_kind(layer)


def _half_compute_supports(config: object, layer: nn.Module) -> str | None:
    if weight_kind(layer) is None or type(layer) in _RNN or table_supports(config, layer) is None:
        return None
    return f"{type(layer).__name__} is not cast (Linear, Conv, LSTM, GRU and embeddings are)"


def _linear_only(config: object, layer: nn.Module) -> str | None:
    if type(layer) is nn.Linear:
        return None
    return _ao_dynamic_supports(config, layer) or "this backend handles Linear only"


def _register_all() -> None:
    # The order is the order of the report's candidates; the measured choice decides.
    kinds = [
        ("nbcompress-int8", "nbcompress", DynamicInt8Config, _linear_only,
         lambda c, m: Int8DynamicLinear(m), None),
        *[(f"torch.ao[{e}]", "torch", DynamicInt8Config, _ao_dynamic_supports, _ao_dynamic(e),
           _engine_available(e)) for e in ("fbgemm", "x86")],
        ("torchao", "torchao", DynamicInt8Config, _torchao_supports,
         _torchao("Int8DynamicActivationInt8WeightConfig"), _torchao_available),
        ("numba-csr-int8", "numba", DynamicInt8Config, _numba_supports, _numba, _numba_available),
        # Optional (extra ``ort``): ORT's prepacked u8×s8 kernel, one session per layer.
        ("onnxruntime-int8", "onnxruntime", DynamicInt8Config, _linear_only,
         lambda c, m: ort_int8.OrtInt8Linear(m), _ort_available),
        ("numba-csr-int8", "numba", WeightInt8Config, _numba_supports, _numba, _numba_available),
        ("nbcompress-dequant", "nbcompress", WeightInt8Config, _weight_only_supports,
         lambda c, m: Int8WeightOnly(m), None),
        ("torchao", "torchao", WeightInt8Config, _torchao_supports,
         _torchao("Int8WeightOnlyConfig"), _torchao_available),
        # A lookup has no activations to quantize: both int8 modes store the rows in int8.
        *[("nbcompress-int8-rows", "nbcompress", c, table_supports, int8_table, None)
          for c in (DynamicInt8Config, WeightInt8Config)],
        ("half-compute", "torch", HalfConfig, _half_compute_supports,
         lambda c, m: HalfCompute(m, c.dtype), None),
        ("half-storage", "nbcompress", HalfConfig, _weight_only_supports,
         lambda c, m: HalfWeight(m, c.dtype), None),
    ]  # fmt: skip
    for name, family, config, supports, build, available in kinds:
        register(Backend(name, family, config, supports, build, available or _installed))


def _installed() -> str | None:
    return None


def _ort_available() -> str | None:
    # Looked up on every call, so tests can take the "not installed" path by monkeypatching.
    return ort_int8.ort_problem()


_register_all()
