"""Whole submodules of int8 Linears as one ORT graph, where measured faster and as accurate.

After the per-layer choice (and :mod:`~nbcompress.engine.quantize.ort_chain`'s runs),
:func:`fuse_blocks` visits, outermost first, every submodule holding ≥ 2 Linears chosen as
dense int8 (not an ``nn.Sequential``: those are chains, nor a container without a forward),
exports it on the inputs it is really called with
(:class:`~nbcompress.engine.quantize.ort_block.OrtInt8Block`) and checks the graph on them
and on a second shape (one more row, one token less where there is a sequence axis). It
is installed only where its output is within the mode's tolerance of the float block, its
rms error at most :data:`~nbcompress.engine.quantize.choice.ACCURATE` × the per-layer
run's (or negligible), and it races clearly faster than the block as chosen per layer;
otherwise its children are tried. A block the exporter cannot trace stays per layer, with
one notice for all such blocks. :data:`ENV_BLOCKS` ``=0`` switches this off, as does
:data:`~nbcompress.engine.quantize.ort_chain.ENV_FUSE` ``=0`` (every layer on its own).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nbcompress.engine.core.summary import capture_calls
from nbcompress.engine.quantize import ort_int8
from nbcompress.engine.quantize.choice import ACCURATE, NEGLIGIBLE_ERROR, clearly_faster
from nbcompress.engine.quantize.config import DynamicInt8Config
from nbcompress.engine.quantize.measure import rel_errors
from nbcompress.engine.quantize.ort_block import (
    BlockForward,
    OrtInt8Block,
    plain_twin,
    seq_length,
)
from nbcompress.engine.quantize.ort_chain import DENSE_INT8, ENV_FUSE
from nbcompress.engine.quantize.ort_int8 import OrtInt8Linear
from nbcompress.engine.quantize.ort_rewrite import outlier_channels, split_candidates
from nbcompress.engine.quantize.ort_threads import settle_threads
from nbcompress.timing import race

if TYPE_CHECKING:
    from nbcompress.engine.quantize.modes import Job

__all__ = ["ENV_BLOCKS", "fuse_blocks"]

#: Environment variable switching whole-block graphs off (``0``); on by default.
ENV_BLOCKS = "NBCOMPRESS_ORT_BLOCKS"

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class _Untraceable(Exception):
    """The exporter or ORT could not build the block's graph."""


def _int8_linears(job: Job) -> set[str]:
    chosen = {row["layer"]: row["backend"] for row in job.rows}
    return {
        n for n, b in chosen.items() if b in DENSE_INT8 and type(job.selected.get(n)) is nn.Linear
    }


def _candidates(job: Job, linears: set[str]) -> dict[str, nn.Module]:
    """Submodules with ≥ 2 of ``linears`` inside, outermost first (``named_modules`` order)."""
    found = {}
    for name, module in job.model.named_modules():
        if isinstance(module, _CONTAINERS):
            continue
        inside = [n for n in linears if not name or n.startswith(name + ".")]
        if len(inside) >= 2:
            found[name] = module
    return found


def fuse_blocks(job: Job, tx: Any) -> None:
    """Run whole submodules as one ORT graph where measured faster and no less accurate."""
    switches = (os.environ.get(ENV_BLOCKS, ""), os.environ.get(ENV_FUSE, ""))
    if "0" in (s.strip() for s in switches) or job.inputs is None:  # either one off
        return
    if not isinstance(job.config, DynamicInt8Config):
        return
    if job.family not in ("auto", "onnxruntime", "onnxruntime-int8"):
        return
    candidates = _candidates(job, _int8_linears(job))
    problem = ort_int8.ort_problem()
    if candidates and problem is not None:
        job.notes.append(f"Blocks kept per layer, not one ONNX Runtime graph: {problem}.")
    if not candidates or problem is not None:
        return
    linears = _int8_linears(job)  # the same set _candidates counted
    calls = capture_calls(job.model, candidates, job.inputs)
    done: list[str] = []
    untraceable: dict[str, str] = {}
    for name, block in candidates.items():
        if name not in calls or any(_within(name, d) for d in done):
            continue
        try:
            found = _try(job, name, block, calls[name], linears)
        except _Untraceable as err:
            untraceable[name] = str(err)
        except Exception as err:  # noqa: BLE001 - the block stays per layer, and says why
            untraceable[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
        else:
            if found is not None:  # outside the try: a failure here rolls the step back
                _install(job, tx, name, block, *found)
                _settle(job, name, block, found[0], calls[name])
                done.append(name)
    left = [n for n in untraceable if not any(_within(d, n) for d in done)]
    if left:
        job.notes.append(
            f"Kept per layer ({len(left)} submodule(s) not exportable to one ONNX Runtime "
            f"graph, e.g. {left[-1] or 'the model'!r}: {untraceable[left[-1]]})."
        )


def _settle(job: Job, name: str, block: nn.Module, graph: OrtInt8Block, call: tuple) -> None:
    """Inputs up to the captured size on one thread where that races faster (``ort_threads``)."""
    args, kwargs, _ = call
    tensors = graph.spec.tensors(args, kwargs)
    if tensors is None:
        return
    gain = settle_threads(graph, lambda: block(*args, **kwargs), tensors[0].numel(), job.repeats)
    if graph.one_thread_upto:
        prefix = f"{name}." if name else ""
        for row in job.rows:
            if row["layer"].startswith(prefix) and row.get("backend") == "onnxruntime-int8":
                row["note"] += f"; inputs this small on 1 thread ({gain:.2f}× faster)"


def _within(name: str, outer: str) -> bool:
    return name == outer or not outer or name.startswith(outer + ".")


def _steps(job: Job, name: str, block: nn.Module, linears: set[str]) -> dict[str, OrtInt8Linear]:
    """The block's int8 Linears (names relative to it) as ``OrtInt8Linear``: kept or new."""
    prefix = f"{name}." if name else ""
    steps = {}
    for full in sorted(n for n in linears if _within(n, name) and n != name):
        current = job.model.get_submodule(full)
        rel = full[len(prefix) :]
        steps[rel] = (
            current if isinstance(current, OrtInt8Linear) else OrtInt8Linear(job.selected[full])
        )
    return steps


def _float_twin(job: Job, name: str, block: nn.Module) -> nn.Module:
    """The block with every quantized module inside it swapped back to its float layer."""
    prefix = f"{name}." if name else ""
    swaps = {n[len(prefix) :]: job.selected[n] for n in job.new if _within(n, name) and n != name}
    return plain_twin(block, swaps)


def _variant(tensors: list[torch.Tensor], seq: int | None) -> list[torch.Tensor]:
    """One more row, and one token less on every sequence axis (the dynamic axes' test)."""
    batch = tensors[0].shape[0]
    out = []
    for t in tensors:
        if t.dim() and t.shape[0] == batch:
            t = torch.cat([t, t[:1]])
        for d in range(1, t.dim()):
            if seq is not None and seq > 1 and t.shape[d] == seq:
                t = t.narrow(d, 0, seq - 1)
        out.append(t.contiguous())
    return out


def _errors(graph: OrtInt8Block, floats: nn.Module, current: nn.Module, tensors: list) -> tuple:
    """``(peak, rms)`` of the graph and rms of the per-layer run, against the float block."""
    args, kwargs = graph.spec.rebuild(tuple(tensors))
    ref = floats(*args, **kwargs)
    try:
        out = graph.run(tensors)
    except Exception as err:  # noqa: BLE001 - the exporter baked a shape in, or ORT refused
        raise _Untraceable(f"{type(err).__name__}: {str(err).splitlines()[0][:100]}") from err
    peak, rms = rel_errors(ref, out)
    return peak, rms, rel_errors(ref, current(*args, **kwargs))[1]


def _accurate(job: Job, graph: OrtInt8Block, block: nn.Module, name: str) -> bool:
    """Within tolerance and no less accurate than per layer, on the capture and a variant."""
    tensors = graph.example_call
    floats = _float_twin(job, name, block)
    shapes = [tensors, _variant(tensors, seq_length(tensors))]
    for i, batch in enumerate(shapes):
        try:
            peak, rms, rms_run = _errors(graph, floats, block, batch)
        except _Untraceable:
            raise
        except Exception:  # noqa: BLE001 - torch refused the variant shape: not an input
            if i == 0:
                raise
            continue
        if peak > job.config.tolerance or rms > max(ACCURATE * rms_run + 1e-6, NEGLIGIBLE_ERROR):
            return False
    return True


def _try(job: Job, name: str, block: nn.Module, call: tuple, linears: set) -> tuple | None:
    """Build, check and race the block's graph: ``(graph, steps, gain)`` if it wins."""
    args, kwargs, output = call
    steps = _steps(job, name, block, linears)
    candidate = plain_twin(block, steps)  # the block with its int8 Linears on ORT
    try:
        graph = OrtInt8Block(candidate, args, kwargs, output)
    except ValueError as err:
        raise _Untraceable(str(err)) from err
    graph.example_call = graph.spec.tensors(args, kwargs)
    with torch.inference_mode():
        graph.outliers = _outliers(block, args, kwargs)
        accurate = _accurate(job, graph, block, name)
        if not accurate and graph.outliers:
            graph.outliers = {}  # weight-only layers as fp32 MatMuls, as chosen per layer
            graph._forget_sessions()
            accurate = _accurate(job, graph, block, name)
        if not accurate:
            return None
        forward = BlockForward(candidate, graph)  # what a call will cost, checks included
        fns = {"layers": lambda: block(*args, **kwargs), "graph": lambda: forward(*args, **kwargs)}
        timed = race(fns, rounds=max(job.repeats, 6), warmup=1, min_sample=2e-4)
    del graph.example_call
    if not clearly_faster(timed, "graph"):
        return None
    return graph, steps, 1 / timed.ratio("graph")


def _outliers(block: nn.Module, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """Weight-only int8 Linears inside ``block`` → their inputs' outlier channels."""
    layers = split_candidates(block)
    if not layers:
        return {}
    found: dict[str, torch.Tensor] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple) -> None:
            found.setdefault(name, outlier_channels(inputs[0]))

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in layers.items()]
    try:
        block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return found


def _install(
    job: Job,
    tx: Any,
    name: str,
    block: nn.Module,
    graph: OrtInt8Block,
    steps: dict[str, OrtInt8Linear],
    gain: float,
) -> None:
    """The steps as the block's children, and its forward calling the graph."""
    prefix = f"{name}." if name else ""
    tx.save(block)  # the instance ``forward`` set below goes with undo
    for rel, step in steps.items():
        if block.get_submodule(rel) is not step:
            tx.replace(prefix + rel, step)
    graph.__dict__["block"] = block  # same tensors as the candidate: its sessions stay valid
    graph.watch()
    block.forward = BlockForward(block, graph)
    rows = {row["layer"]: row for row in job.rows}
    for rel, step in steps.items():
        job.new[prefix + rel] = step
        rows[prefix + rel]["backend"] = "onnxruntime-int8"
        rows[prefix + rel]["note"] = (
            f"one ORT graph with {name or 'the model'} ({len(steps)} int8 Linears): "
            f"{gain:.2f}× the per-layer run"
        )
