"""``sparsify_``'s measured decisions, kept in the tuning record and reused by later runs.

Racing every layer dense against sparse is most of a ``sparsify_`` call (9 of 11 s on a
90%-pruned BERT-FFN ×2), and it was repeated in every new process; near ties flipped
between runs (``speedup`` said 1.24×, the next ``sparsify_`` "not faster, 1.23×"). Each
decision is therefore kept in the persistent tuning record
(:mod:`nbcompress.kernels.tuning`, per CPU): per layer under its weight pattern, input
shape bucket, thread count and options (family ``sparsify``), and end to end under the
layers' keys and choices (family ``sparsify-model``). A later run with the same keys
builds only the recorded choice and still checks its output against dense: correctness
is never taken from the record, only speed. A recorded choice whose output check fails is
refused and the layer measured again, its new decision replacing the record.

``speedup`` (the measuring verb) always measures, and records what it measured over
earlier entries, so that a ``sparsify_`` after it follows the very figures it showed.
``remeasure=True`` does the same for ``sparsify_``; ``NBCOMPRESS_TUNING=refresh``
re-measures every key once per process, ``off`` never records.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from torch import nn

from nbcompress.engine.speedup.analysis import Analysis, LayerResult, SparsifyOptions
from nbcompress.engine.speedup.candidates import choosable
from nbcompress.kernels import tuning
from nbcompress.kernels.threads import get_threads

__all__ = [
    "LAYER",
    "MODEL",
    "all_recorded",
    "layer_key",
    "lookup",
    "measured_gain",
    "model_key",
    "remember",
    "reuse",
    "WHERE",
]

#: Record families: one layer's dense-vs-sparse choice; the whole model's verdict.
LAYER, MODEL = "sparsify", "sparsify-model"
#: Where a reused figure was measured, said wherever it is shown (reasons, verdicts).
WHERE = "recorded earlier on this CPU"
#: A convolution's geometry decides its kernel as much as its weight does.
_CONV = ("kernel_size", "stride", "padding", "dilation", "groups")


def layer_key(module: nn.Module, input_shape: tuple, opts: SparsifyOptions) -> tuple:
    """The record key of one layer's decision: weight pattern, input bucket, threads, options.

    The paths the choice could take are part of it (:func:`.candidates.choosable`): a new
    format, or ONNX Runtime installed since, re-opens the race.
    """
    geometry = [str(getattr(module, a)) for a in _CONV if hasattr(module, a)]
    return tuning.layer_key(
        module.weight.detach(),
        tuple(input_shape),
        get_threads(),
        type(module).__name__,
        *geometry,
        f"int8={opts.allow_int8}",
        f"bsr={opts.allow_bsr}",
        f"gain={opts.min_gain:g}",
        "paths=" + ",".join(choosable(opts)),
    )


def lookup(family: str, key: tuple | None, opts: SparsifyOptions) -> tuning.Entry | None:
    """The recorded entry for ``key``, or ``None`` (none, record off, or ``remeasure``)."""
    if key is None or opts.remeasure:
        return None
    return tuning.lookup(family, key)


def remember(family: str, key: tuple | None, choice: str, gain: float, replace: bool) -> None:
    """Record a decision just measured; ``replace`` overrides an entry another run made.

    Without ``replace`` an entry another process recorded meanwhile is kept (the first
    measurement wins, so that every process agrees); this process keeps its own result.
    """
    record = tuning.active()
    if key is None or record is None:
        return
    record.put(family, key, tuning.Entry(choice, gain - 1), replace=replace or record.refresh)


def measured_gain(res: LayerResult) -> float:
    """The gain a layer's decision rests on: the chosen path's, or the best one within tolerance."""
    if res.chosen != "dense":
        return res.times["dense"].median / res.times[res.chosen].median
    ok = res.accurate
    if not ok:
        return 0.0  # no sparse path was usable: recorded as "no gain at all"
    return res.times["dense"].median / min(res.times[f].median for f in ok)


def reuse(res: LayerResult, entry: tuning.Entry, check: Callable[[list[str]], object]) -> bool:
    """Take ``entry``'s choice into ``res`` once its output checks out; False: measure instead.

    The recorded format is built as it is, without asking whether it would be proposed
    now (for block-sparse, a scan of the whole weight): the key holds the block fill it
    was measured at, and a format that no longer fits fails to build and is refused.

    Args:
        res: The layer's result, untouched so far.
        entry: Its recorded decision.
        check: Builds the given formats into ``res`` and checks their output against dense
            (``None`` when the layer cannot be packed).
    """
    gain = 1 + entry.margin
    if entry.choice == "dense":
        res.recorded = entry
        res.reason = (
            f"dense is as fast or faster here (best sparse {gain:.2f}×, {WHERE})"
            if gain > 0
            else f"no sparse output within tolerance ({WHERE}); kept dense"
        )
        return True
    # Refused: it no longer builds (format does not fit, ONNX Runtime gone) or its output
    # is outside tolerance.
    if check([entry.choice]) is None or not res.within(entry.choice):
        return _refuse(res)
    res.recorded, res.chosen, res.allowed = entry, entry.choice, (entry.choice,)
    res.reason = f"{entry.choice} measured {gain:.2f}× faster than dense ({WHERE})"
    return True


def _refuse(res: LayerResult) -> bool:
    # The recorded choice no longer fits this layer (or its output is outside tolerance):
    # forget what the check built; the caller measures the layer afresh.
    res.candidates.clear()
    res.errors.clear()
    res.tolerances.clear()
    res.reason = ""
    return False


def model_key(analysis: Analysis) -> tuple | None:
    """The record key of the end-to-end verdict: every layer's key and choice (or None)."""
    keys = [(r.name, r.key, r.chosen) for r in analysis.layers if r.key is not None]
    if not keys:
        return None
    digest = hashlib.sha1(repr(keys).encode()).hexdigest()[:16]
    return (len(keys), digest, get_threads())


def all_recorded(analysis: Analysis) -> bool:
    """Whether every timed layer's decision came from the record (none was raced now)."""
    keyed = [r for r in analysis.layers if r.key is not None]
    return bool(keyed) and all(r.recorded is not None for r in keyed)
