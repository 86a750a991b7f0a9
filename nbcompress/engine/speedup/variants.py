"""Whole-model variants of the chosen sparse layers, raced end to end before the verdict.

Once the layers are chosen, what is around them can pay as much as the layers themselves
(resnet18 at batch 1: its 20 BatchNorms and an NCHW max-pool cost a third of the sparse
model's time). ``sparsify_`` therefore races, end to end on the example input, first the
per-layer choice against one sparse format on every chosen layer (:mod:`.uniform`, each
with its activations folded in where it can be; the winner becomes the layers' choice),
then:

* ``compressed``: the chosen sparse layers as they are (the incumbent);
* ``folded``: each eval BatchNorm that alone reads a swapped convolution's output folded
  into it, and each ReLU/GELU module that alone reads a swapped layer's output (or its
  folded BatchNorm's) applied by its kernels, each replaced by ``nn.Identity``
  (:mod:`.bnfold`);
* ``channels-last stem``: the first swapped convolution returning channels-last output
  (torch's max-pool after resnet18's stem: 6.5 ms NCHW, 0.6 ms channels-last here);
* ``folded + channels-last stem``.

A variant must match the dense model's output within the stated tolerance (a variant
that fails to run, such as a ``view`` of a channels-last tensor, is dropped) and is kept
only if it beat ``compressed`` in the median round (its per-round time ratio below 1). The
choice is kept in the tuning record beside the end-to-end verdict (family
``sparsify-variant``) and reused without racing while every layer's key is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.memory import twin
from nbcompress.engine.core.outputs import compare_outputs
from nbcompress.engine.core.validation import call_model
from nbcompress.engine.speedup import bnfold, recorded, uniform
from nbcompress.engine.speedup.analysis import Analysis, SparsifyOptions, tolerance
from nbcompress.kernels.modules import SparseConv2d
from nbcompress.timing import Race

__all__ = ["FAMILY", "PLAIN", "choose"]

#: Record family of the chosen variant; the incumbent's name (that of the verdict race).
FAMILY, PLAIN = "sparsify-variant", "compressed"
FOLDED, STEM = "folded", "channels-last stem"

#: Layer name → (module to install instead, (name, module) of each module folded into it).
Rewrites = dict[str, tuple[nn.Module, tuple[tuple[str, nn.Module], ...]]]


def _folds(model: nn.Module, plain: dict[str, nn.Module], graph: bnfold.ConvGraph) -> Rewrites:
    """The chosen layers with their BatchNorm and then their activation folded in, if any."""
    folds: Rewrites = {}
    for conv, name in graph.pairs.items():
        bn = model.get_submodule(name)
        layer = plain.get(conv)
        if isinstance(layer, SparseConv2d) and bn.num_features == layer.out_channels:
            folds[conv] = (bnfold.folded(layer, bn), ((name, bn),))
    for layer, name in graph.acts.items():
        if layer not in plain or (layer in graph.pairs and layer not in folds):
            continue  # not swapped, or its BatchNorm (between them) stays
        base, removed = folds.get(layer, (plain[layer], ()))
        act = model.get_submodule(name)
        fused = bnfold.activated(base, act)
        if fused is not None:
            folds[layer] = (fused, (*removed, (name, act)))
    return folds


def _variants(
    model: nn.Module, plain: dict[str, nn.Module], graph: bnfold.ConvGraph
) -> dict[str, Rewrites]:
    """Variant name → its rewrites of the chosen layers (``compressed``: none)."""
    convs = {n: m for n, m in plain.items() if isinstance(m, SparseConv2d)}
    out: dict[str, Rewrites] = {PLAIN: {}}
    folds = _folds(model, plain, graph)
    if folds:
        out[FOLDED] = folds
    order = [n for n in graph.order if n in convs] or list(convs)
    if order:
        stem = order[0]
        for name, rewrites in list(out.items()):
            base, removed = rewrites.get(stem, (convs[stem], ()))
            label = STEM if name == PLAIN else f"{name} + {STEM}"
            out[label] = {**rewrites, stem: (bnfold.channels_last(base), removed)}
    return out


def _swaps(plain: dict[str, nn.Module], rewrites: Rewrites) -> dict[str, nn.Module]:
    swaps = dict(plain)
    for name, (module, removed) in rewrites.items():
        swaps[name] = module
        for gone, _ in removed:
            swaps[gone] = nn.Identity().train(False)
    return swaps


def _matching(model: nn.Module, inputs: tuple, ref: Any, limit: Callable, swaps: dict) -> Any:
    """The twin of ``model`` with ``swaps`` if its output matches ``ref`` in tolerance."""
    double = twin(model, swaps)
    try:
        with torch.no_grad():
            diff = compare_outputs(ref, call_model(double, inputs))
    except Exception:  # noqa: BLE001 - e.g. a view of a channels-last tensor: not this one
        return None
    return double if diff.max_abs <= limit(diff.peak) else None


def choose(
    model: nn.Module,
    inputs: tuple,
    ref: Any,
    analysis: Analysis,
    opts: SparsifyOptions,
    graph: bnfold.ConvGraph,
    race: Callable[[dict[str, Callable[[], object]], int], Race],
) -> dict[str, nn.Module]:
    """The swaps of the fastest variant (module docstring), planned for ``bnfold.install``.

    Args:
        model: The dense model (in eval mode, as measured).
        inputs: The example inputs, as ``as_inputs`` returns them.
        ref: The dense model's output on them.
        analysis: The per-layer decisions; chosen layers' reasons get what was rewritten.
        opts: The options (``repeats``, ``remeasure``).
        graph: What folds into which layer (:func:`bnfold.conv_graph`).
        race: Races name → callable in the given rounds (``sparsify``'s, dense-first).

    Returns:
        Qualified name → module, for every chosen layer and every folded BatchNorm.
    """
    _one_format(model, inputs, ref, analysis, opts, graph, race)
    chosen = analysis.chosen
    plain = {n: r.replacement for n, r in chosen.items()}
    for name, why in graph.kept.items():
        if name in chosen:
            chosen[name].reason += f"; {why}"
    variants = _variants(model, plain, graph)
    if len(variants) == 1:
        return plain
    fmts = {r.chosen for r in chosen.values()}

    def limit(peak: float) -> float:
        return max(tolerance(f, peak) for f in fmts)

    twins = {PLAIN: twin(model, plain)}  # its output is checked with the verdict's
    for name, rewrites in list(variants.items())[1:]:
        double = _matching(model, inputs, ref, limit, _swaps(plain, rewrites))
        if double is not None:
            twins[name] = double
    best, gain = _pick(twins, inputs, analysis, opts, race)
    for name, (module, removed) in variants[best].items():
        bnfold.plan(chosen[name].replacement, module, removed)
        chosen[name].reason += "; " + _said(module, removed) + gain
    why = "not faster end to end" if FOLDED in twins else "output outside tolerance so"
    for name, (_, removed) in variants.get(FOLDED, {}).items():
        if not variants[best].get(name, (None, ()))[1]:
            for gone, module in removed:
                chosen[name].reason += f"; {_kind(module)} {gone} not folded: {why}"
    return _swaps(plain, variants[best])


def _one_format(
    model: nn.Module, inputs: tuple, ref: Any, analysis: Analysis, opts: SparsifyOptions,
    graph: bnfold.ConvGraph, race: Callable[[dict[str, Callable[[], object]], int], Race],
) -> None:  # fmt: skip
    """Race the per-layer choice against one format on every chosen layer; adopt the winner.

    Each contender with its activations folded in where it can (:func:`_folds`), as the
    fastest of it would be installed; the per-layer choice is the incumbent and stays on
    a tie (:mod:`.uniform`).
    """
    fmts = uniform.offers(analysis, opts)
    if not fmts:
        return
    chosen = analysis.chosen
    if uniform.graph_pending(model, analysis):
        for res in chosen.values():
            res.reason += f"; {uniform.GRAPH_LEFT}"
        return
    rivals = {
        uniform.PER_LAYER: (
            {r.chosen for r in chosen.values()},
            {n: r.replacement for n, r in chosen.items()},
        )
    }
    for fmt in fmts:
        built = uniform.rebuild(analysis, fmt, {})
        if built is not None:
            rivals[uniform.name_of(fmt)] = ({fmt}, built)
    twins = {}
    for name, (paths, layers) in rivals.items():

        def limit(peak: float, paths: set[str] = paths) -> float:
            return max(tolerance(f, peak) for f in paths)

        double = _matching(model, inputs, ref, limit, _swaps(layers, _folds(model, layers, graph)))
        if double is not None:
            twins[name] = double
    if uniform.PER_LAYER not in twins or len(twins) == 1:
        return
    result = race({n: (lambda d=d: call_model(d, inputs)) for n, d in twins.items()}, opts.repeats)
    best = result.winner(0.0)
    if best != uniform.PER_LAYER:
        fmt = next(iter(rivals[best][0]))
        uniform.adopt(analysis, fmt, rivals[best][1], 1 / result.ratio(best))


def _pick(
    twins: dict[str, Any], inputs: tuple, analysis: Analysis, opts: SparsifyOptions, race: Callable
) -> tuple[str, str]:
    """The variant to keep, and its measured (or recorded) gain over ``compressed`` in words."""
    key = recorded.model_key(analysis)
    entry = recorded.lookup(FAMILY, key, opts)
    if entry is not None and entry.choice in twins:
        return entry.choice, f" (this variant {1 + entry.margin:.2f}× faster, {recorded.WHERE})"
    if len(twins) == 1:
        return PLAIN, ""
    fns = {n: (lambda d=d: call_model(d, inputs)) for n, d in twins.items() if n != PLAIN}
    result = race({PLAIN: lambda d=twins[PLAIN]: call_model(d, inputs), **fns}, opts.repeats)
    # Every variant computes the same within tolerance and the verdict against dense comes
    # after: the median round decides, rather than clear_win's three rounds out of four.
    best = result.winner(0.0)
    gain = 1 / result.ratio(best)
    # A recorded choice refused just now (its output check failed) is replaced too.
    replace = opts.remeasure or entry is not None or not recorded.all_recorded(analysis)
    recorded.remember(FAMILY, key, best, gain, replace)
    return best, f" (this variant {gain:.2f}× faster end to end)"


def _kind(module: nn.Module) -> str:
    return "BatchNorm" if isinstance(module, nn.BatchNorm2d) else type(module).__name__


def _said(module: nn.Module, removed: tuple[tuple[str, nn.Module], ...]) -> str:
    """What a variant changed about one layer, for its reason."""
    what = [f"{_kind(m)} {n} folded into it" for n, m in removed]
    if getattr(module, "channels_last_output", False):
        what.append("output in channels-last strides")
    return " and ".join(what)
