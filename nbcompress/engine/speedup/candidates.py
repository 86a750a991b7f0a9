"""What one layer could run as besides dense, and where its sparse kernel would break even.

The sparse formats worth building for a layer (every one registered in
:data:`nbcompress.kernels.modules.FORMATS`: a new format joins the race by being
registered), its dense int8 twins (torch's, and ONNX Runtime's where installed:
:func:`dense_int8`, :func:`build_twin`) and the break-even estimate shown in the speedup
report ("break-even (est.)": the sparsity at which the fp32 kernel would match dense,
assuming its time is linear in the nonzeros).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nbcompress.engine.core.memory import twin
from nbcompress.engine.prune.masks import BLOCK
from nbcompress.engine.speedup.analysis import LayerResult, SparsifyOptions, is_int8
from nbcompress.engine.speedup.coverage import BUILDERS
from nbcompress.engine.speedup.shapes import MIN_SPARSITY, zeros
from nbcompress.kernels import modules as kernel_modules
from nbcompress.timing import Timing, measure

__all__ = [
    "ORT_SKIPPED",
    "TWINS",
    "break_even",
    "build",
    "build_twin",
    "choosable",
    "dense_int8",
    "formats_of",
    "ort_int8",
    "paths_of",
    "probe",
    "torch_int8",
]

#: The dense int8 twins of a Linear, by path name, raced beside the sparse formats.
TWINS = ("torch_int8", "ort_int8")
#: Start of the note saying ONNX Runtime's twin was left out, and why (once per report).
ORT_SKIPPED = "ONNX Runtime int8 not raced"


def formats_of(module: nn.Module, allow_bsr: bool) -> list[str]:
    """The sparse formats worth building for ``module``: every registered one that fits.

    Block formats (``bsr…``) only with ``allow_bsr`` and if the kept weights fill 4-row
    blocks (they pay only when the fill is high).
    """
    weight = module.weight.detach().reshape(module.weight.shape[0], -1)
    blocks_fill = None
    fmts = []
    for fmt in kernel_modules.FORMATS:  # read now: a format registered later joins
        if fmt.startswith("bsr"):
            if blocks_fill is None:
                blocks_fill = allow_bsr and _blocks_fill(weight)
            if not blocks_fill:
                continue
        fmts.append(fmt)
    return fmts


def _blocks_fill(weight: torch.Tensor) -> bool:
    if weight.shape[0] % BLOCK:
        return False
    blocks = weight.reshape(-1, BLOCK, weight.shape[1]).ne(0).any(dim=1).sum().item()
    nnz = int(weight.ne(0).sum())
    return bool(nnz) and BLOCK * blocks <= 1.25 * nnz


def paths_of(module: nn.Module, opts: SparsifyOptions, sparsity: float | None = None) -> list[str]:
    """Every path to race for ``module`` besides dense: its sparse formats, then its twins.

    The int8 paths (sparse formats and dense twins) only where int8 may be chosen or
    figures are asked for (``remeasure``: ``speedup`` shows them), the sparse int8 ones
    only on a layer sparse enough to be chosen; otherwise they could only cost time.
    ``sparsity``: the layer's fraction of zeros where the caller has it already.
    """
    int8 = opts.allow_int8 or opts.remeasure
    # Below MIN_SPARSITY the choice is dense whatever the times: a sparse int8 figure would
    # only cost time (unpruned MiniLM at batch 64: 201 s for speedup's report with them).
    sparse8 = int8 and (zeros(module) if sparsity is None else sparsity) >= MIN_SPARSITY
    fmts = [f for f in formats_of(module, opts.allow_bsr) if sparse8 or not is_int8(f)]
    return fmts + (list(TWINS) if int8 else [])


def choosable(opts: SparsifyOptions) -> tuple[str, ...]:
    """Every path the choice may take under ``opts`` here (a key of the tuning record).

    Registered formats and twins, int8 ones with ``allow_int8`` only, ONNX Runtime's where
    it is installed: a decision recorded without a path must not be reused once it exists.
    """
    paths = tuple(p for p in (*kernel_modules.FORMATS, *TWINS) if opts.allows(p))
    if "ort_int8" not in paths:
        return paths  # without int8 allowed: never ask (ort_problem imports onnx, ~0.7 s)
    from nbcompress.engine.quantize.ort_int8 import ort_problem

    return paths if ort_problem() is None else tuple(p for p in paths if p != "ort_int8")


def build(path: str, module: nn.Module, seen: dict[str, int]) -> nn.Module | None:
    """The module of ``path`` for ``module``: a sparse format or a dense int8 twin.

    Raises:
        ValueError: The sparse format cannot pack this layer (the reason says why).
    """
    if path in TWINS:
        return build_twin(path, module, seen)
    return BUILDERS[type(module)].from_dense(module, format=path)


def build_twin(path: str, module: nn.Module, seen: dict[str, int]) -> nn.Module | None:
    """The dense int8 twin ``path`` (one of :data:`TWINS`) of ``module``, or ``None``.

    ``None`` where it cannot be built here (not a Linear; ONNX Runtime not installed,
    counted in ``seen`` under a note starting with :data:`ORT_SKIPPED`, shown once).
    """
    if path == "torch_int8":
        return torch_int8(module, seen)
    from nbcompress.engine.quantize.ort_int8 import ort_problem

    problem = ort_problem()
    if problem is not None and type(module) is nn.Linear:
        note = f"{ORT_SKIPPED}: {problem}"
        seen[note] = seen.get(note, 0) + 1
        return None
    return ort_int8(module)


def torch_int8(module: nn.Module, seen: dict[str, int]) -> nn.Module | None:
    """Torch's dynamic int8 twin of a Linear (``torch.ao``'s quantized Linear, else ``None``)."""
    if not isinstance(module, nn.Linear):
        return None
    from nbcompress.engine.quantize.backends import quiet

    with quiet(seen):
        try:
            # In place on a twin of the layer (quantizing reads the float weight, never
            # writes it): a deep copy would cost the layer's float weight twice over.
            return torch.ao.quantization.quantize_dynamic(
                nn.Sequential(twin(module)), {nn.Linear}, dtype=torch.qint8, inplace=True
            )[0]
        except (RuntimeError, AttributeError, ImportError):
            return None


def ort_int8(module: nn.Module) -> nn.Module | None:
    """ONNX Runtime's dense int8 twin of a Linear (``None``: not a Linear, or not installed).

    The module ``%quantize model int8`` installs where it races fastest
    (:class:`~nbcompress.engine.quantize.ort_int8.OrtInt8Linear`); built from the layer
    without editing it, int8 weights per the CPU path (7 bits without VNNI).
    """
    from nbcompress.engine.quantize import ort_int8 as ort

    if type(module) is not nn.Linear or ort.ort_problem() is not None:
        return None
    return ort.OrtInt8Linear(module)


def dense_int8(module: nn.Module, seen: dict[str, int]) -> dict[str, nn.Module]:
    """The layer's dense int8 candidates by path name: ``torch_int8`` and ``ort_int8``.

    Each present only where it can be built here (:func:`build_twin`); ``sparsify_`` races
    them beside the sparse paths and may choose one where int8 is allowed.
    """
    found = {path: build_twin(path, module, seen) for path in TWINS}
    return {path: m for path, m in found.items() if m is not None}


def probe(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """The sparse module of ``module`` with ``weight`` in place of its own (left untouched)."""
    double = twin(module)  # shares the layer's tensors: only the swapped weight is new
    double.weight = nn.Parameter(weight, requires_grad=False)
    return BUILDERS[type(module)].from_dense(double)


def break_even(
    module: nn.Module, x: torch.Tensor, result: LayerResult, timer: Callable[..., Timing] = measure
) -> float | None:
    """Sparsity where the fp32 kernel would match dense, assuming time linear in nonzeros.

    Args:
        module: The dense layer.
        x: Its input.
        result: Its measurements (``None`` unless the fp32 kernel was timed).
        timer: Times a call (:func:`nbcompress.timing.measure`, or the caller's).
    """
    if "csr" not in result.times:
        return None
    weight = module.weight.detach()
    size = weight.numel()
    # An all-zero weight from one broadcast zero (from_dense still copies it once to check
    # it; the probe is freed before the next layer).
    empty = probe(module, weight.new_zeros(()).expand_as(weight))
    t0 = timer(lambda: empty(x), warmup=2, repeats=7).median
    nnz, t_sparse = int(weight.ne(0).sum()), result.times["csr"].median
    if nnz < 0.01 * size:
        # Too few nonzeros to fit a slope: time a random 10%-dense weight of this shape
        # (drawn as before: the values, then the mask; multiplied in place).
        random = torch.randn_like(weight).mul_(torch.rand_like(weight) < 0.1)
        nnz = int(random.ne(0).sum())
        dense10 = probe(module, random)
        del random
        t_sparse = timer(lambda: dense10(x), warmup=2, repeats=7).median
    per_nnz = max(t_sparse - t0, 1e-12) / max(nnz, 1)
    density = (result.times["dense"].median - t0) / (per_nnz * size)
    return float(min(1.0, max(0.0, 1.0 - density)))
