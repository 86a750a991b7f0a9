"""Runs of int8 Linear layers and activations in an ``nn.Sequential``, as one ORT graph.

Layer by layer, every ORT call returns to torch and the next layer's call leaves it again;
measured here on BERT-FFN ×2 (768→3072→768, twice; 1 thread, batch 1) the four
:class:`~nbcompress.engine.quantize.ort_int8.OrtInt8Linear` layers took 1,274 µs where
the same four nodes in one graph took 751 µs (torch's calls between ORT runs are slow:
ORT's weight streaming evicts torch's dispatch code and tables from L2). So after the
per-layer choice, :func:`fuse_chains` finds runs of ≥ 2 dense-int8 Linear layers with
supported activations between them inside an ``nn.Sequential``, builds their graph
(:class:`OrtInt8Chain`, over the same int8 weights, 7 bits without VNNI), checks its
output and races it against the run as chosen per layer; only where it is clearly faster
and no less accurate, the run's Linears become ``OrtInt8Linear`` children and the
Sequential's ``forward`` (an instance attribute, :class:`FusedForward`) calls the graph
for the run. Every layer stays in place and addressable by name (its weights, its own
forward); ``state_dict`` keys are unchanged; a run whose children carry hooks (or were
swapped since) is called child by child, so per-layer tools still see every layer; undo
removes the instance ``forward`` with the rest of the step.

On by default; :data:`ENV_FUSE` ``=0`` keeps every layer on its own session.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nbcompress.engine.core.runs import FusedForward, add_run, join_runs
from nbcompress.engine.core.summary import capture_calls
from nbcompress.engine.quantize import ort_int8, ort_scales
from nbcompress.engine.quantize.checks import dense_args
from nbcompress.engine.quantize.choice import ACCURATE, NEGLIGIBLE_ERROR, clearly_faster
from nbcompress.engine.quantize.config import DynamicInt8Config
from nbcompress.engine.quantize.measure import rel_errors
from nbcompress.engine.quantize.ort_int8 import OrtInt8Linear, OrtModule, graph_bytes
from nbcompress.timing import Race, race

if TYPE_CHECKING:
    from nbcompress.engine.quantize.modes import Job

__all__ = [
    "DENSE_INT8",
    "ENV_FUSE",
    "FusedForward",
    "OrtInt8Chain",
    "Judge",
    "fuse_chains",
    "linear_runs",
    "onnx_activation",
]

#: Environment variable switching the fusion off (``0``); on by default.
ENV_FUSE = "NBCOMPRESS_ORT_FUSE"

#: The per-layer backends a chain may stand in for (dense int8 of a Linear: the same
#: product; not sparse CSR, which won on zeros, nor the budget's weight-only fallback).
DENSE_INT8 = ("onnxruntime-int8", "nbcompress-int8", "torch.ao[fbgemm]", "torch.ao[x86]")


def onnx_activation(module: nn.Module) -> tuple[str, str] | None:
    """``(op, domain)`` of the ORT node computing ``module``; ``None`` if none does."""
    if type(module) is nn.GELU:
        return ("Gelu" if module.approximate == "none" else "FastGelu"), "com.microsoft"
    ops = {nn.ReLU: "Relu", nn.Tanh: "Tanh", nn.Sigmoid: "Sigmoid", nn.Identity: "Identity"}
    return (ops[type(module)], "") if type(module) in ops else None


class OrtInt8Chain(OrtModule):
    """Int8 Linear layers and activations, in order, computed by one ORT session.

    Args:
        steps: :class:`~nbcompress.engine.quantize.ort_int8.OrtInt8Linear` layers and
            activations :func:`onnx_activation` supports, the first one a Linear.
    """

    def __init__(self, steps: list[nn.Module]) -> None:
        super().__init__()
        linears = [s for s in steps if isinstance(s, OrtInt8Linear)]
        odd = [type(s).__name__ for s in steps if s not in linears and not onnx_activation(s)]
        if not steps or not isinstance(steps[0], OrtInt8Linear) or odd:
            raise ValueError(
                "steps: expected OrtInt8Linear layers and ReLU/GELU/Tanh/Sigmoid/Identity "
                f"activations, the first a Linear; got {[type(s).__name__ for s in steps]}"
            )
        self.steps = nn.ModuleList(steps)
        self._in = linears[0].in_features
        self._out = linears[-1].out_features

    def session(self, threads: int | None = None) -> Any:  # noqa: D102
        for step in self.steps:
            if isinstance(step, OrtInt8Linear):
                step.listeners.add(self)  # its weights change: this graph is rebuilt too
        return super().session(threads)

    @property
    def out_features(self) -> int:
        """Output width."""
        return self._out

    def graph(self, vnni: bool) -> bytes:  # noqa: D102
        from onnx import helper

        nodes, inits, x = [], [], "x"
        for i, step in enumerate(self.steps):
            y = f"t{i}"
            if isinstance(step, OrtInt8Linear):
                more, weights = step.nodes(f"l{i}", x, y, vnni)
                nodes += more
                inits += weights
            else:
                op, domain = onnx_activation(step)
                nodes.append(helper.make_node(op, [x], [y], domain=domain))
            x = y
        return graph_bytes(nodes, inits, (self._in, self._out), x)

    def extra_repr(self) -> str:  # noqa: D102
        return f"{self._in}→{self._out}, {len(self.steps)} steps in one onnxruntime graph"


def _runs(job: Job) -> Iterator[list[str]]:
    """Qualified names of each fusable run: ≥ 2 dense-int8 Linears, activations between."""
    chosen = {row["layer"]: row["backend"] for row in job.rows}

    def linear(name: str) -> bool:
        return chosen.get(name) in DENSE_INT8 and type(job.selected.get(name)) is nn.Linear

    return linear_runs(job.model, linear)


def linear_runs(model: nn.Module, linear: Callable[[str], bool]) -> Iterator[list[str]]:
    """Qualified names of each run in ``model`` one ORT graph may compute.

    A run: children of one ``nn.Sequential``, ≥ 2 of them Linears ``linear`` accepts (by
    qualified name), nothing but :func:`onnx_activation` activations between them.

    Args:
        model: The model to search.
        linear: Whether the child of this qualified name may join a run as a Linear.
    """
    for parent, seq in model.named_modules():
        if type(seq) is not nn.Sequential:
            continue
        run: list[str] = []
        for child, module in list(seq.named_children()) + [("", None)]:
            name = f"{parent}.{child}" if parent else child
            between = bool(run) and module is not None and onnx_activation(module) is not None
            if between or (module is not None and linear(name)):
                run.append(name)
            else:
                while run and not linear(run[-1]):
                    run.pop()  # a trailing activation stays with torch: nothing to save
                if sum(map(linear, run)) >= 2:
                    yield run
                run = []


def _chain(job: Job, names: list[str]) -> tuple[OrtInt8Chain, list[nn.Module], list[nn.Module]]:
    """The chain of a run, and the run's modules as chosen and as float.

    The chain's steps are the run's children where they already are ``OrtInt8Linear``
    or activations, else new ``OrtInt8Linear`` of the float layers (installed if it wins).
    """
    current = [job.model.get_submodule(n) for n in names]
    steps = [
        m
        if isinstance(m, OrtInt8Linear) or n not in job.selected
        else OrtInt8Linear(job.selected[n])
        for n, m in zip(names, current, strict=True)
    ]
    floats = [job.selected.get(n, m) for n, m in zip(names, current, strict=True)]
    return OrtInt8Chain(steps), current, floats


def _sequence(modules: list[nn.Module]) -> nn.Sequential:
    """The run as it would be called in place: sparse layers in it joined as one run."""
    seq = nn.Sequential(*modules)  # the same module objects, in a new container
    join_runs(seq)
    return seq


#: Decides a run's race: ``{"layers": the run as chosen (the incumbent), "graph": ...}`` and
#: the rounds asked for → the race the graph won, or ``None`` (stays as chosen).
Judge = Callable[[dict[str, Callable[[], object]], int], Race | None]


def _clearly(fns: dict[str, Callable[[], object]], rounds: int) -> Race | None:
    """``quantize_``'s judge: the graph must be clearly faster (:func:`clearly_faster`)."""
    timed = race(fns, rounds=rounds, warmup=1, min_sample=2e-4)
    return timed if clearly_faster(timed, "graph") else None


def fuse_chains(job: Job, tx: Any, judge: Judge = _clearly) -> None:
    """Replace runs of dense int8 Linears in ``nn.Sequential`` parents by one ORT graph.

    Unless :data:`ENV_FUSE` is ``0``, and only where measured: the chain's output must
    be within the mode's tolerance and its rms error within
    :data:`~nbcompress.engine.quantize.choice.ACCURATE` × the run's (or negligible), and
    it must race clearly faster than the run as chosen per layer. Its Linears take
    per-tensor weight scales where measured no less accurate
    (:mod:`~nbcompress.engine.quantize.ort_scales`).
    """
    config = job.config
    if os.environ.get(ENV_FUSE, "").strip() == "0":
        return
    if not isinstance(config, DynamicInt8Config) or job.inputs is None:
        return
    if job.family not in ("auto", "onnxruntime", "onnxruntime-int8"):
        return
    if ort_int8.ort_problem() is not None:
        return
    runs = list(_runs(job))
    if not runs:
        return
    firsts = {names[0]: job.model.get_submodule(names[0]) for names in runs}
    calls = capture_calls(job.model, firsts, job.inputs)
    for names in runs:
        if names[0] in calls:
            _try(job, tx, names, dense_args(calls[names[0]][0])[0], judge)


def _scales(
    job: Job, chain: OrtInt8Chain, floats: list[nn.Module], x: torch.Tensor, ref: Any, rms: float
) -> tuple[OrtInt8Chain, int]:
    """The chain with per-tensor scales where no less accurate; how many Linears took them.

    Chosen per layer (:func:`~nbcompress.engine.quantize.ort_scales.per_tensor_steps`),
    then kept only if the whole graph is within tolerance and its rms error is at most the
    per-row graph's.
    """
    steps = ort_scales.per_tensor_steps(floats, list(chain.steps), x)
    if steps is None:
        return chain, 0
    other = OrtInt8Chain(steps)
    with torch.inference_mode():
        peak, rms_tensor = ort_scales.graph_errors(ref, other(x))
    if peak > job.config.tolerance or rms_tensor > rms:
        return chain, 0
    return other, sum(a is not b for a, b in zip(steps, chain.steps, strict=True))


def _try(job: Job, tx: Any, names: list[str], x: torch.Tensor, judge: Judge) -> None:
    # Built outside inference mode: its buffers must stay ordinary tensors (load_state_dict
    # copies into them in place later); only the checks and the race run inside.
    chain, current_modules, float_modules = _chain(job, names)
    current, floats = _sequence(current_modules), _sequence(float_modules)
    with torch.inference_mode():
        ref = floats(x)
        peak, rms = rel_errors(ref, chain(x))
        _, rms_run = rel_errors(ref, current(x))
        accurate = rms <= max(ACCURATE * rms_run + 1e-6, NEGLIGIBLE_ERROR)
    if peak > job.config.tolerance or not accurate:
        return
    chain, tensors = _scales(job, chain, float_modules, x, ref, rms)
    with torch.inference_mode():
        fns = {"layers": lambda: current(x), "graph": lambda: chain(x)}
        timed = judge(fns, max(job.repeats, 6))
    if timed is None:
        return
    _install(job, tx, names, chain)
    gain = 1 / timed.ratio("graph")
    scales = f"; {tensors} Linear(s) with per-tensor weight scales" if tensors else ""
    rows = {row["layer"]: row for row in job.rows}
    for name in names:
        if name in job.new:
            job.new[name] = job.model.get_submodule(name)
            rows[name]["backend"] = "onnxruntime-int8"
            rows[name]["note"] = (
                f"one ORT graph {names[0]}…{names[-1]} ({len(names)} modules): "
                f"{gain:.2f}× the layers run one by one{scales}"
            )


def _install(job: Job, tx: Any, names: list[str], chain: OrtInt8Chain) -> None:
    """The chain's new Linears as children, and the parent's forward calling the graph."""
    parent, _, _ = names[0].rpartition(".")
    seq = job.model.get_submodule(parent)
    tx.save(seq)  # the instance ``forward`` set below goes with undo
    for name, step in zip(names, chain.steps, strict=True):
        if job.model.get_submodule(name) is not step:
            tx.replace(name, step)
    start = list(seq._modules).index(names[0].rpartition(".")[2])
    add_run(seq, start, chain)
