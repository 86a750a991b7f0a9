"""One sparse format for every chosen layer: the per-layer choice's rival, raced end to end.

Why. Each layer's path is chosen on its own input, in isolation, and there the best
sparse formats of a pruned layer often lie within a few percent of each other (BERT-FFN ×2
at 95%, batch 1, 2 threads: CSR int8 44–59 µs, with int8 inputs 43–54 µs, per layer). A
near tie flips between runs and leaves a mix of formats, or a dense int8 twin between
sparse layers, whose cost inside the model no isolated race sees: a twin cannot take
the activation after it into its kernels (:mod:`.bnfold`: at 2 threads each torch GELU
call woke torch's sleeping workers, ~125 µs), and a layer's weights compete for the
caches with its neighbours'. Which is fastest in the model is measured in the model.

What. :func:`offers` names the sparse formats worth trying on every chosen layer at once:
each within its tolerance and allowed on every chosen layer, and timed there; the
:data:`TRIED` fastest by their summed per-layer times, unless the choice is that format
already. :func:`rebuild` builds them; :mod:`.variants` races the model with each against
the per-layer choice, activations folded into all of them where they can be, and
:func:`adopt` takes the winner into the analysis (each layer's path, reason and
recorded decision), so that later runs reuse it as their per-layer choice.
"""

from __future__ import annotations

import os

from torch import nn

from nbcompress.engine.speedup import recorded
from nbcompress.engine.speedup.analysis import Analysis, LayerResult, SparsifyOptions
from nbcompress.engine.speedup.candidates import build
from nbcompress.engine.speedup.fused import PATH, fusable
from nbcompress.kernels import modules as kernel_modules

__all__ = [
    "GRAPH_LEFT",
    "PER_LAYER",
    "TRIED",
    "adopt",
    "graph_pending",
    "name_of",
    "offers",
    "rebuild",
]

#: The incumbent's name in the race: each layer on the path its own race chose.
PER_LAYER = "per layer"
#: At most this many uniform formats are raced (the fastest by summed per-layer times).
TRIED = 2
#: Said in the reasons where the race is left to the install's ONNX Runtime graph race.
GRAPH_LEFT = (
    "one format on every layer not raced: layers chose ONNX Runtime int8 in a run that "
    "may become one ORT graph (raced at install)"
)


def name_of(fmt: str) -> str:
    """The race name of the variant with every chosen layer on ``fmt``."""
    return f"all {fmt}"


def _fits(res: LayerResult, fmt: str, opts: SparsifyOptions) -> bool:
    return opts.allows(fmt) and res.within(fmt) and fmt in res.times


def offers(analysis: Analysis, opts: SparsifyOptions) -> list[str]:
    """The sparse formats to race on every chosen layer at once, fastest summed time first.

    None where a chosen layer was not raced now (a recorded decision: the record holds
    what an earlier race of this kind chose), or was also checked on ``other_inputs``
    (:mod:`.shapes`: only its own choice was timed on those shapes).
    """
    chosen = list(analysis.chosen.values())
    if not chosen or any(r.recorded is not None or r.race is None or r.others for r in chosen):
        return []
    fmts = [f for f in kernel_modules.FORMATS if all(_fits(r, f, opts) for r in chosen)]
    fmts.sort(key=lambda f: sum(r.times[f].median for r in chosen))
    mix = {r.chosen for r in chosen}
    return [f for f in fmts[:TRIED] if mix != {f}]


def graph_pending(model: nn.Module, analysis: Analysis) -> bool:
    """Whether ≥ 2 layers of one run chose ONNX Runtime int8 (the install may fuse them).

    :mod:`.fused` then races that run as one ORT graph against its other paths at
    install; a layer it would join must not have an activation folded into it, so one
    sparse format with the activations folded (:func:`offers`) would take that race
    away. At 2 threads, batch 8, BERT-FFN ×2 at 90% ran 3.61× torch fp32 as one graph
    and 2.96× on sparse int8 with its GELUs folded (one run each here).
    """
    from nbcompress.engine.quantize.ort_chain import ENV_FUSE, linear_runs
    from nbcompress.engine.quantize.ort_int8 import ort_problem

    if os.environ.get(ENV_FUSE, "").strip() == "0" or ort_problem() is not None:
        return False
    chosen = analysis.chosen
    ok = {r.name for r in analysis.layers if fusable(r)}
    for run in linear_runs(model, ok.__contains__):
        if sum(n in chosen and chosen[n].chosen == PATH for n in run) >= 2:
            return True
    return False


def rebuild(analysis: Analysis, fmt: str, seen: dict[str, int]) -> dict[str, nn.Module] | None:
    """Every chosen layer's module on ``fmt`` (its chosen one where that is ``fmt``).

    ``None`` if a layer cannot be built on it after all.
    """
    out = {}
    for name, res in analysis.chosen.items():
        if res.chosen == fmt:
            out[name] = res.replacement
            continue
        try:
            module = build(fmt, res.module, seen)
        except ValueError:
            return None
        if module is None:
            return None
        out[name] = module.train(False)
    return out


def _gain(res: LayerResult, path: str) -> float:
    return res.times["dense"].median / res.times[path].median


def adopt(analysis: Analysis, fmt: str, modules: dict[str, nn.Module], gain: float) -> None:
    """Put every chosen layer on ``fmt`` (its module from ``modules``), saying why.

    Each layer's recorded decision becomes ``fmt`` too (over the one its race recorded a
    moment ago), so that a later run builds ``fmt`` at once and races nothing again.

    Args:
        analysis: The analysis; its chosen layers are changed in place.
        fmt: The format that won.
        modules: Layer name → its module on ``fmt`` (:func:`rebuild`).
        gain: The model's end-to-end speed-up with ``fmt`` over the per-layer choice.
    """
    for name, res in analysis.chosen.items():
        was = res.chosen
        res.candidates = {fmt: modules[name]}
        res.chosen = fmt
        if was != fmt:
            res.reason = (
                f"{fmt} measured {_gain(res, fmt):.2f}× faster than dense (its own race "
                f"chose {was}, {_gain(res, was):.2f}×)"
            )
        res.reason += f"; {fmt} on every chosen layer: {gain:.2f}× faster end to end"
        recorded.remember(recorded.LAYER, res.key, fmt, recorded.measured_gain(res), True)
