"""Per-layer model summary: parameters, sparsity, MACs, measured latency and sizes.

:func:`capture_calls`, which records each layer's real call for the summary, is shared
with ``sparsify_`` and ``quantize_`` (they measure every layer on its real input).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.costs import layer_bytes, macs
from nbcompress.engine.core.heads import remember_inputs
from nbcompress.engine.core.history import history
from nbcompress.engine.core.layers import output_layers, weighted_layers
from nbcompress.engine.core.report import Table, TableReport, fmt_bytes, fmt_count, fmt_pct
from nbcompress.engine.core.summary_timing import time_rows
from nbcompress.engine.core.validation import (
    as_inputs,
    check_module,
    describe_inputs,
    eval_mode,
    run_forward,
)
from nbcompress.timing import Timing, format_seconds

__all__ = ["REMOVE_STEP", "Summary", "capture_calls", "removal_note", "size_change", "summary"]

#: Name of the history step that physically removes channels (``remove_``).
REMOVE_STEP = "remove"

_COLUMNS = {
    "layer": None,
    "type": None,
    "output": lambda s: "—" if s is None else "×".join(map(str, s)),
    "params": fmt_count,
    "nonzeros": fmt_count,
    "sparsity": fmt_pct,
    "MACs (est.)": fmt_count,
    "latency": lambda t: "—" if t is None else format_seconds(t),
    "fp32 (est.)": fmt_bytes,
    "CSR (est.)": fmt_bytes,
    "int8 (est.)": fmt_bytes,
}


@dataclass(repr=False)
class Summary(TableReport):
    """Result of :func:`summary`.

    Attributes:
        rows: One dict per weighted layer (keys as in the table header; latency in
            seconds, sizes in bytes, ``None`` where not measured).
        totals: The same keys summed over the rows.
        latency: Measured whole-model latency, or ``None`` without an example input.
        inputs: Description of the example input.
        notes: Explanations shown under the table.
    """

    rows: list[dict[str, Any]]
    totals: dict[str, Any]
    latency: Timing | None
    inputs: str = ""
    notes: list[str] = field(default_factory=list)

    def layer(self, name: str) -> dict[str, Any]:
        """The row of layer ``name``."""
        for row in self.rows:
            if row["layer"] == name:
                return row
        raise KeyError(f"name: no layer {name!r} in this summary.")

    def _title(self) -> str:
        lat = f"; model latency {self.latency}" if self.latency else ""
        inp = f" on input {self.inputs}" if self.inputs else ""
        return f"Model summary{inp}{lat}"

    def _table(self) -> Table:
        rows = [*self.rows, self.totals]  # totals last, bold in HTML
        return Table(rows, _COLUMNS, self._title(), self.notes, [len(self.rows)])


def capture_calls(
    model: nn.Module, layers: dict[str, nn.Module], inputs: tuple
) -> dict[str, tuple]:
    """Run the model once; record each layer's first call ``(args, kwargs, output)``.

    Args:
        model: The model to run (without gradients; its mode is the caller's choice).
        layers: Qualified name → module whose call to record.
        inputs: Inputs as :func:`~nbcompress.engine.core.validation.as_inputs` returns them
            (a mapping is passed as :func:`~nbcompress.engine.core.validation.call_model`
            decides).

    Returns:
        Name → ``(args, kwargs, output)`` for each layer the forward pass called; layers
        it did not call are missing.
    """
    seen: dict[str, tuple] = {}
    handles = []
    for name, module in layers.items():

        def hook(mod, args, kwargs, output, name=name):
            seen.setdefault(name, (args, kwargs, output))

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        run_forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


#: Normalisation layers: their shift (bias) starts at zero, which is not pruning.
_NORMS = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def _containers(names: list[str]) -> set[str]:
    """Rows whose module holds other rows' modules (``""`` is the model itself)."""
    return {n for n in names if any(o != n and (not n or o.startswith(n + ".")) for o in names)}


def _sparsity(module: nn.Module, nnz: int, n: int) -> float:
    if isinstance(module, _NORMS) and getattr(module, "weight", None) is not None:
        w = module.weight.detach()  # the scale only: a zero shift is where norms start
        return 1 - int(torch.count_nonzero(w)) / w.numel() if w.numel() else 0.0
    return 1 - nnz / n if n else 0.0


def _row(name: str, module: nn.Module, call: tuple | None) -> dict[str, Any]:
    atomic = not any(True for _ in module.parameters(recurse=False)) or isinstance(
        module, (nn.MultiheadAttention, nn.RNNBase)
    )
    params = [p for p in module.parameters(recurse=atomic)]
    n = sum(p.numel() for p in params)
    nnz = sum(int(torch.count_nonzero(p.detach())) for p in params)
    sizes = layer_bytes(module, recurse=atomic)
    row: dict[str, Any] = {
        "layer": name,
        "type": type(module).__name__,
        "output": None,
        "params": n,
        "nonzeros": nnz,
        "sparsity": _sparsity(module, nnz, n),
        "MACs (est.)": None,
        "latency": None,
        "fp32 (est.)": sizes["dense"],
        "CSR (est.)": sizes["csr"],
        "int8 (est.)": sizes["int8"],
    }
    if call is not None:
        args, kwargs, output = call
        out = output[0] if isinstance(output, (tuple, list)) else output
        row["output"] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        row["MACs (est.)"] = macs(module, args, output)
    return row


def _totals(rows: list[dict[str, Any]], latency: Timing | None) -> dict[str, Any]:
    def total(key: str) -> Any:
        values = [r[key] for r in rows if r[key] is not None]
        return sum(values) if values else None

    params, nnz = total("params") or 0, total("nonzeros") or 0
    return {
        "layer": "total",
        "type": "",
        "output": None,
        "params": params,
        "nonzeros": nnz,
        "sparsity": 1 - nnz / params if params else 0.0,
        "MACs (est.)": total("MACs (est.)"),
        # The whole model measured end to end: summing rows would count a container's
        # children twice and miss the layers that hold no weights.
        "latency": None if latency is None else latency.median,
        "fp32 (est.)": total("fp32 (est.)"),
        "CSR (est.)": total("CSR (est.)"),
        "int8 (est.)": total("int8 (est.)"),
    }


def summary(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    repeats: int = 10,
    measure_latency: bool = True,
) -> Summary:
    """Summarise ``model`` layer by layer, measuring latency on ``example_inputs``.

    Args:
        model: Any ``nn.Module``; it is not changed (it runs in eval mode and without
            gradients, and training flags are restored).
        example_inputs: A tensor, tuple or dict of tensors shaped like a real batch. Without
            one, output shapes, MACs and latencies are left out.
        repeats: Timed repeats per layer and for the whole model, at most: a slow call is
            repeated only while it fits a small time budget (at least 3 times). Layers
            that contain other rows (e.g. a ViT's encoder holding the position embedding)
            are not timed alone; the total latency is the whole model measured end to end.
        measure_latency: Set False to skip timing (shapes and MACs are still filled in).

    Returns:
        A :class:`Summary` with one row per layer that holds weights, and totals.
    """
    check_module(model)
    layers = weighted_layers(model)
    notes = [
        "MACs and sizes are estimates from shapes and nonzero counts (est.); "
        "latencies are measured medians on this machine."
    ]
    calls: dict[str, tuple] = {}
    latency = None
    inputs_text = ""
    with eval_mode(model), torch.no_grad():
        if example_inputs is not None:
            inputs = as_inputs(example_inputs)
            inputs_text = describe_inputs(inputs)
            calls = capture_calls(model, layers, inputs)
            remember_inputs(model, inputs)  # so every command finds the same output layer
        else:
            notes.append("No example input: pass one (--input x) for MACs and latency.")
        rows = [_row(n or "(model)", m, calls.get(n)) for n, m in layers.items()]
        nested = _containers(list(layers))
        if example_inputs is not None and measure_latency:
            timed = {n: m for n, m in layers.items() if n not in nested}
            latency, times = time_rows(model, inputs, timed, calls, repeats)
            for row, name in zip(rows, layers, strict=True):
                row["latency"] = times.get(name)
    notes.extend(_notes(any(isinstance(m, _NORMS) for m in layers.values()), nested, latency))
    heads = output_layers(model)
    if heads.names:
        notes.append(
            f"{heads.describe().capitalize()}: left alone by %prune and %sensitivity unless "
            "--include-output."
        )
    unused = [r["layer"] for r in rows if example_inputs is not None and r["output"] is None]
    if unused:
        notes.append(f"Not called by forward on this input: {', '.join(unused)}.")
    removed = removal_note(model)
    if removed:
        notes.append(removed)
    return Summary(rows, _totals(rows, latency), latency, inputs_text, notes)


def _notes(norms: bool, nested: set[str], latency: Timing | None) -> list[str]:
    """What the latency total and the sparsity of norm layers mean, when it matters."""
    notes = []
    if latency is not None:
        notes.append(
            "Total latency: the whole model measured end to end (layers without weights "
            "included), not a sum of the rows."
        )
    if latency is not None and nested:
        names = ", ".join(n or "(model)" for n in sorted(nested))
        notes.append(
            f"Not timed alone: {names} (they hold weights of their own and contain other rows; "
            "their time would count those rows twice)."
        )
    if norms:
        notes.append(
            "Sparsity of normalisation layers counts their scale only: a zero-initialised "
            "shift (bias) is not pruning."
        )
    return notes


def removal_note(model: nn.Module) -> str:
    """One line if channels were physically removed from ``model`` (a ``remove`` step), else ``""``.

    After removal the layers are smaller dense layers: their parameter counts and MACs
    are those of the new shapes, and sparsity says nothing about what was removed.
    """
    steps = [s for s in history(model) if s.name == REMOVE_STEP]
    if not steps:
        return ""
    what = "; ".join(s.detail for s in steps if s.detail) or "channels removed"
    return (
        f"Channels were physically removed ({what}): the layers are smaller dense layers, and "
        "params and MACs are those of the new shapes; %undo restores the original."
    )


def size_change(before: Summary, after: Summary) -> str:
    """One line: parameters and estimated MACs before → after, with the ratio of each.

    Args:
        before: Summary of the model before a change.
        after: Summary of it after the change.

    Returns:
        E.g. ``"Parameters 11.7M → 5.9M (1.98× fewer); MACs (est.) 1.8G → 0.6G (2.9×
        fewer)."``; MACs are left out when either summary has none (no example input).
    """

    def part(label: str, key: str) -> str | None:
        b, a = before.totals.get(key), after.totals.get(key)
        if b is None or a is None:
            return None
        ratio = f"{b / a:.2f}× fewer" if a else "all removed"
        return f"{label} {fmt_count(b)} → {fmt_count(a)} ({ratio})"

    parts = [p for p in (part("Parameters", "params"), part("MACs (est.)", "MACs (est.)")) if p]
    return "; ".join(parts) + "."
