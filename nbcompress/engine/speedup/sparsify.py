"""Measure each layer dense vs on the sparse kernels, and swap in what is really faster.

The analysis runs the model once with forward hooks to capture every eligible layer's real
input, builds the sparse candidates from copies of the weights (the model is untouched
until the decision is made), checks their outputs against the dense layer, and times
dense and sparse side by side (interleaved). :func:`sparsify_` then installs the winners
inside one history transaction, so ``undo_`` restores the dense modules bit-exactly.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.history import Transaction, transaction
from nbcompress.engine.core.layers import select_layers
from nbcompress.engine.core.summary import capture_calls
from nbcompress.engine.core.validation import as_inputs, check_module, run_forward
from nbcompress.engine.prune.masks import BLOCK
from nbcompress.kernels.modules import SparseConv2d, SparseLinear
from nbcompress.timing import Timing, measure, measure_interleaved, summarise

__all__ = ["Analysis", "LayerResult", "analyse", "sparsify_"]

#: Stated output tolerance per path, relative to the largest dense output magnitude:
#: float32 kernels differ from dense only by summation order; int8 also by rounding.
RTOL = {"csr": 1e-4, "bsr": 1e-4, "csr_int8": 2e-2}
ATOL = 1e-5
#: Below this sparsity CSR (4-byte value + 2-byte index per nonzero) moves at least as
#: many bytes as the dense weight, so it cannot win; such layers are not even proposed.
MIN_SPARSITY = 1 / 3
_BUILDERS = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}


@dataclass
class LayerResult:
    """What was measured for one layer and what was chosen.

    Attributes:
        name: Qualified layer name.
        module: The dense layer.
        input_shape: Shape of its input in the example run.
        sparsity: Fraction of exactly-zero weights.
        times: Path → measured timing (``dense``, ``csr``, ``csr_int8``, ``bsr``, ``torch_int8``).
        errors: Path → max |sparse − dense| output difference.
        tolerances: Path → the tolerance that difference must stay within.
        chosen: ``"dense"`` or the chosen sparse format.
        reason: Why it was chosen (or why the layer stays dense).
        break_even: Estimated sparsity at which the sparse fp32 kernel matches dense.
        candidates: Path → built sparse module.
        sure: Path → 25th percentile of its per-round speed-up over dense.
    """

    name: str
    module: nn.Module
    input_shape: tuple = ()
    sparsity: float = 0.0
    times: dict[str, Timing] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)
    chosen: str = "dense"
    reason: str = ""
    break_even: float | None = None
    candidates: dict[str, nn.Module] = field(default_factory=dict)
    sure: dict[str, float] = field(default_factory=dict)

    @property
    def replacement(self) -> nn.Module | None:
        """The sparse module to install, or ``None`` to keep the dense layer."""
        return self.candidates.get(self.chosen)


@dataclass
class Analysis:
    """Per-layer results plus the end-to-end comparison of dense vs compressed."""

    layers: list[LayerResult]
    dense: Timing | None = None
    compressed: Timing | None = None
    max_abs_diff: float = 0.0
    tolerance: float = 0.0
    verdict: str = ""
    warnings: dict[str, int] = field(default_factory=dict)
    sure: float = 0.0

    @property
    def chosen(self) -> dict[str, LayerResult]:
        """Layers that get a sparse module."""
        return {r.name: r for r in self.layers if r.replacement is not None}


def _formats(module: nn.Module, allow_bsr: bool) -> list[str]:
    weight = module.weight.detach().reshape(module.weight.shape[0], -1)
    fmts = ["csr", "csr_int8"]
    if allow_bsr and weight.shape[0] % BLOCK == 0:
        # Block-sparse pays only when kept weights come in 4-row groups: fill must be high.
        blocks = weight.reshape(-1, BLOCK, weight.shape[1]).ne(0).any(dim=1).sum().item()
        nnz = int(weight.ne(0).sum())
        if nnz and BLOCK * blocks <= 1.25 * nnz:
            fmts.append("bsr")
    return fmts


def _torch_int8(module: nn.Module, seen: dict[str, int]) -> nn.Module | None:
    if not isinstance(module, nn.Linear):
        return None
    from nbcompress.engine.quantize.backends import quiet

    with quiet(seen):
        try:
            return torch.ao.quantization.quantize_dynamic(
                nn.Sequential(copy.deepcopy(module)), {nn.Linear}, dtype=torch.qint8
            )
        except (RuntimeError, AttributeError, ImportError):
            return None


def _tolerance(fmt: str, reference: torch.Tensor) -> float:
    peak = float(reference.abs().max()) if reference.numel() else 0.0
    return RTOL[fmt] * peak + ATOL


def _break_even(module: nn.Module, x: torch.Tensor, result: LayerResult) -> float | None:
    """Sparsity where the fp32 kernel would match dense, assuming time linear in nonzeros."""
    if "csr" not in result.times:
        return None
    weight = module.weight.detach()
    size = weight.numel()
    probe = copy.deepcopy(module)
    with torch.no_grad():
        probe.weight.zero_()
    empty = _BUILDERS[type(module)].from_dense(probe)
    t0 = measure(lambda: empty(x), warmup=2, repeats=7).median
    nnz, t_sparse = int(weight.ne(0).sum()), result.times["csr"].median
    if nnz < 0.01 * size:
        # Too few nonzeros to fit a slope: time a random 10%-dense weight of this shape.
        with torch.no_grad():
            probe.weight.copy_(torch.randn_like(weight) * (torch.rand_like(weight) < 0.1))
        nnz = int(probe.weight.ne(0).sum())
        dense10 = _BUILDERS[type(module)].from_dense(probe)
        t_sparse = measure(lambda: dense10(x), warmup=2, repeats=7).median
    per_nnz = max(t_sparse - t0, 1e-12) / max(nnz, 1)
    density = (result.times["dense"].median - t0) / (per_nnz * size)
    return float(min(1.0, max(0.0, 1.0 - density)))


def _paired(fns: dict, repeats: int) -> tuple[dict[str, Timing], dict[str, float]]:
    """Interleaved rounds: each candidate's timing, and how reliably it beats ``dense``.

    Every round times all candidates back to back, so the per-round ratio to dense
    compares samples taken under the same machine load. Returns the timings and, per
    candidate, the 25th percentile of its per-round speed-up over dense: a value above 1
    means it was faster in at least three rounds out of four.
    """
    measure_interleaved(fns, warmup=2, repeats=1)  # warm-up: compile, caches
    rounds = [measure_interleaved(fns, warmup=0, repeats=1) for _ in range(repeats)]
    times = {k: summarise([r[k].median for r in rounds]) for k in fns}
    sure = {}
    for k in fns:
        gains = sorted(r["dense"].median / r[k].median for r in rounds)
        sure[k] = gains[len(gains) // 4]
    return times, sure


def _measure_layer(name: str, module: nn.Module, call: tuple, opts: dict) -> LayerResult:
    args, kwargs, output = call
    x = args[0]
    weight = module.weight.detach()
    res = LayerResult(name, module, tuple(x.shape), float(weight.eq(0).sum()) / weight.numel())
    fns = {"dense": lambda: module(*args, **kwargs)}
    for fmt in _formats(module, opts["allow_bsr"]):
        try:
            cand = _BUILDERS[type(module)].from_dense(module, format=fmt)
        except ValueError as err:
            res.reason = str(err).removeprefix("module: ")
            return res
        with torch.no_grad():
            res.errors[fmt] = float((cand(x) - output).abs().max()) if output.numel() else 0.0
        res.tolerances[fmt] = _tolerance(fmt, output)
        res.candidates[fmt] = cand
        fns[fmt] = lambda cand=cand: cand(x)
    qmod = _torch_int8(module, opts["seen"])
    if qmod is not None:
        fns["torch_int8"] = lambda: qmod(x)
    res.times, res.sure = _paired(fns, opts["repeats"])
    _decide(res, opts)
    res.break_even = _break_even(module, x, res)
    return res


def _faster(fast: Timing, slow: Timing, sure: float, min_gain: float) -> bool:
    # Robust to a noisy machine: the median must win by min_gain, and the candidate must
    # have been faster in at least three interleaved rounds out of four (sure > 1), so a
    # lucky stretch of samples cannot flip a decision.
    return slow.median >= (1 + min_gain) * fast.median and sure > 1


def _decide(res: LayerResult, opts: dict) -> None:
    dense = res.times["dense"]
    allowed = [f for f in res.candidates if f != "csr_int8" or opts["allow_int8"]]
    ok = [f for f in allowed if res.errors[f] <= res.tolerances[f]]
    if not ok:
        res.reason = "sparse output outside tolerance; kept dense"
        return
    best = min(ok, key=lambda f: res.times[f].median)
    gain = dense.median / res.times[best].median
    if res.sparsity < MIN_SPARSITY:
        res.reason = f"only {res.sparsity:.0%} sparse: CSR moves more bytes than dense; kept dense"
    elif not _faster(res.times[best], dense, res.sure[best], opts["min_gain"]):
        res.reason = f"dense is as fast or faster here (best sparse {best}: {gain:.2f}×)"
    else:
        res.chosen = best
        res.reason = f"{best} measured {gain:.2f}× faster than dense"


def _shadow(model: nn.Module, swaps: dict[str, nn.Module]) -> nn.Module:
    """A structural copy of ``model`` sharing its tensors, with ``swaps`` installed."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    twin = copy.deepcopy(model, memo)
    for name, module in swaps.items():
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent), child, module)
    return twin


def _end_to_end(model: nn.Module, inputs: tuple, result: Analysis, repeats: int) -> None:
    chosen = result.chosen
    twin = _shadow(model, {n: r.replacement for n, r in chosen.items()})
    with torch.no_grad():
        ref, out = model(*inputs), twin(*inputs)
    if isinstance(ref, torch.Tensor) and isinstance(out, torch.Tensor):
        result.max_abs_diff = float((ref - out).abs().max()) if ref.numel() else 0.0
        fmts = {r.chosen for r in chosen.values()} or {"csr"}
        result.tolerance = max(_tolerance(f, ref) for f in fmts)
    timings, sure = _paired(
        {"dense": lambda: model(*inputs), "compressed": lambda: twin(*inputs)}, repeats
    )
    result.dense, result.compressed = timings["dense"], timings["compressed"]
    result.sure = sure["compressed"]


def analyse(
    model: nn.Module,
    example_inputs: Any,
    *,
    layers: str | Sequence[str] | None = None,
    types: Any = None,
    allow_int8: bool = False,
    allow_bsr: bool = True,
    repeats: int = 15,
    min_gain: float = 0.05,
) -> Analysis:
    """Measure every eligible layer dense vs sparse and decide; the model is not changed.

    Args: see :func:`sparsify_`.

    Returns:
        Per-layer results and the end-to-end comparison.
    """
    check_module(model)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 3:
        raise ValueError(f"repeats: expected an integer ≥ 3, got {repeats!r}.")
    inputs = as_inputs(example_inputs)
    run_forward(model, inputs)
    selected, _ = select_layers(model, layers, types or (nn.Linear, nn.Conv2d), include_output=True)
    selected = {n: m for n, m in selected.items() if type(m) in _BUILDERS}
    if not selected:
        raise ValueError("types: sparse kernels exist for nn.Linear and nn.Conv2d only.")
    calls = capture_calls(model, selected, inputs)
    opts = {"allow_int8": allow_int8, "allow_bsr": allow_bsr, "repeats": repeats,
            "min_gain": min_gain, "seen": {}}  # fmt: skip
    results = []
    for name, module in selected.items():
        call = calls.get(name)
        if call is None or not isinstance(call[0][0], torch.Tensor):
            results.append(LayerResult(name, module, reason="not called in the example run"))
            continue
        results.append(_measure_layer(name, module, call, opts))
    analysis = Analysis(results, warnings=opts["seen"])
    _end_to_end(model, inputs, analysis, repeats)
    _final_verdict(analysis, min_gain)
    return analysis


def _final_verdict(analysis: Analysis, min_gain: float) -> None:
    if not analysis.chosen:
        analysis.verdict = "no layer measured faster on the sparse kernels; model left dense"
        return
    gain = analysis.dense.median / analysis.compressed.median
    faster = _faster(analysis.compressed, analysis.dense, analysis.sure, min_gain)
    if not faster or analysis.max_abs_diff > analysis.tolerance:
        why = "outputs differ beyond tolerance" if faster else f"{gain:.2f}×"
        for r in analysis.layers:
            if r.chosen != "dense":
                r.reason += "; dropped: whole model not faster end to end"
                r.chosen = "dense"
        analysis.verdict = f"not faster end to end ({why}); model left dense"
        return
    analysis.verdict = f"{len(analysis.chosen)} layer(s) sparse: {gain:.2f}× end to end"


def _install(tx: Transaction, name: str, module: nn.Module) -> None:
    tx.replace(name, module)


def apply(model: nn.Module, analysis: Analysis) -> nn.Module:
    """Install the chosen sparse modules in one undoable history step."""
    chosen = analysis.chosen
    if not chosen:
        warnings.warn(f"sparsify_: {analysis.verdict}.", stacklevel=3)
        return model
    detail = f"{len(chosen)} layer(s) on sparse kernels ({analysis.verdict.split(': ')[-1]})"
    with transaction(model, "sparsify", detail) as tx:
        for name, res in chosen.items():
            _install(tx, name, res.replacement)
        tx.info["chosen"] = {n: r.chosen for n, r in chosen.items()}
        tx.info["reasons"] = {r.name: r.reason for r in analysis.layers}
        tx.info["end_to_end"] = {"dense": analysis.dense, "compressed": analysis.compressed}
    return model


def sparsify_(
    model: nn.Module,
    example_inputs: Any,
    *,
    layers: str | Sequence[str] | None = None,
    types: Any = None,
    allow_int8: bool = False,
    allow_bsr: bool = True,
    repeats: int = 15,
    min_gain: float = 0.05,
) -> nn.Module:
    """Run each eligible layer on the sparse kernels where that measured faster, in place.

    Every ``nn.Linear``/``nn.Conv2d`` (or those matching ``layers``/``types``) is timed
    dense and sparse on its real input from ``example_inputs``; a layer is replaced only
    if a sparse module was at least ``min_gain`` faster and its output matched within the
    stated tolerance, and only if the whole model is then faster end to end. The change
    is one history step (``undo_`` restores the dense layers bit-exactly); a failure
    part-way leaves the model as it was.

    Args:
        model: The (pruned) model.
        example_inputs: A tensor or tuple of tensors shaped like a real batch.
        layers: Glob pattern(s) on qualified layer names; ``None`` = all eligible.
        types: Layer types to consider (default Linear and Conv2d).
        allow_int8: Also consider int8 values (changes results by rounding; off by default).
        allow_bsr: Consider block-sparse storage when weights come in 4-row blocks.
        repeats: Timed samples per candidate.
        min_gain: Required relative speed-up, e.g. 0.05 = 5% faster than dense.

    Returns:
        The model (modified in place).
    """
    analysis = analyse(
        model, example_inputs, layers=layers, types=types, allow_int8=allow_int8,
        allow_bsr=allow_bsr, repeats=repeats, min_gain=min_gain,
    )  # fmt: skip
    return apply(model, analysis)
