"""A whole submodule (a transformer block, an encoder) as one ORT graph with int8 Linears.

Per layer, int8 cannot match a runtime that runs a whole encoder as one graph: on MiniLM
(1 thread) every Linear on its own ORT session left attention, softmax, LayerNorm and GELU
to torch, with a trip between runtimes per layer (ours 0.97–1.18× torch fp32 against ONNX
Runtime's whole-model int8 at 2.2–3.7×). :class:`OrtInt8Block` exports a submodule with
``torch.onnx.export`` on the inputs it is really called with (captured by a forward hook),
then replaces each of its int8 Linears' ``MatMul`` (+ bias ``Add``) by the same
``DynamicQuantizeMatMul`` node :class:`~nbcompress.engine.quantize.ort_int8.OrtInt8Linear`
runs, over the same int8 weights (:mod:`~nbcompress.engine.quantize.ort_rewrite`);
attention, softmax and LayerNorm stay fp32 (ONNX Runtime's
own quantizer also quantizes the activation×activation MatMuls of attention, which is where
its cosine fell to 0.95). So the graph is as accurate as the per-layer int8.

:class:`BlockForward` is the block's instance ``forward``: it runs the graph while the block
is intact (no hook on any module inside it, no submodule, parameter or buffer swapped or
edited since; then the graph is exported again, lazily, as it is per thread count) and the
call matches the captured one (same argument structure and constants, tensors of the same
dtype and rank; batch and sequence axes are dynamic); anything else runs the block's own
forward over its per-layer int8 children. ``state_dict`` keys are unchanged, undo removes
the instance ``forward`` with the rest of the step. Installed by
:mod:`~nbcompress.engine.quantize.ort_fuse` only where measured faster and no less accurate.
"""

from __future__ import annotations

import contextlib
import io
import operator
import threading
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from nbcompress.engine.core.memory import twin
from nbcompress.engine.quantize.ort_int8 import OrtInt8Linear, OrtModule, runner
from nbcompress.engine.quantize.ort_rewrite import float_swaps, int8_graph

__all__ = [
    "BlockForward",
    "CallSpec",
    "OrtInt8Block",
    "Watch",
    "export_block",
    "plain_twin",
    "seq_length",
]

_SIGNATURE = operator.attrgetter("dtype", "ndim", "is_cpu")
_GRAD = operator.attrgetter("requires_grad")


def plain_twin(block: nn.Module, swaps: dict[str, nn.Module] | None = None) -> nn.Module:
    """:func:`~nbcompress.engine.core.memory.twin` with every instance ``forward`` dropped.

    A twin copies ``FusedForward``/``BlockForward`` attributes pointing at ORT graphs; the
    twin must compute with its own (swapped) children.
    """
    double = twin(block, swaps)
    for module in double.modules():
        module.__dict__.pop("forward", None)
    return double


def _same(value: Any, const: Any) -> bool:
    if value is const:
        return True
    try:
        return type(value) is type(const) and bool(value == const)
    except Exception:  # noqa: BLE001 - an object that cannot compare is not the same
        return False


class CallSpec:
    """The structure of a captured call: which leaves are tensors, which are constants.

    Args:
        args: The positional arguments of the captured call.
        kwargs: Its keyword arguments.

    Raises:
        ValueError: A constant is not ``None``/bool/int/float/str (it could not be compared,
            and the exporter would bake it in).
    """

    def __init__(self, args: tuple, kwargs: dict[str, Any]) -> None:
        leaves, self.tree = pytree.tree_flatten((tuple(args), dict(kwargs)))
        self.slots: list[tuple[torch.dtype, int] | None] = []
        self.consts: list[Any] = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                self.slots.append((leaf.dtype, leaf.dim()))
                self.consts.append(None)
            elif leaf is None or isinstance(leaf, (bool, int, float, str)):
                self.slots.append(None)
                self.consts.append(leaf)
            else:
                raise ValueError(f"a {type(leaf).__name__} argument cannot be exported")
        if not any(self.slots):
            raise ValueError("the call has no tensor argument")
        #: ``(dtype, ndim, is_cpu)`` per argument where the call was positional tensors
        #: only (the common case, checked without flattening: see :meth:`tensors`).
        plain = not kwargs and len(leaves) == len(args) and all(self.slots)
        self.plain = tuple((*slot, True) for slot in self.slots if slot) if plain else None

    def tensors(self, args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor] | None:
        """The call's tensors in slot order; ``None`` if it does not match the capture."""
        plain = getattr(self, "plain", None)  # None also in a spec pickled before it existed
        if plain is not None and not kwargs:
            try:  # positional tensors: C-level attribute reads, no pytree (80 µs cold)
                same = tuple(map(_SIGNATURE, args)) == plain
            except AttributeError:  # not a tensor: the general check says so
                same = False
            if same and not (torch.is_grad_enabled() and any(map(_GRAD, args))):
                return list(args)
        leaves, tree = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if tree != self.tree:
            return None
        found = []
        for leaf, slot, const in zip(leaves, self.slots, self.consts, strict=True):
            if slot is None:
                if not _same(leaf, const):
                    return None
            elif (
                not isinstance(leaf, torch.Tensor)
                or (leaf.dtype, leaf.dim()) != slot
                or leaf.device.type != "cpu"
                or (leaf.requires_grad and torch.is_grad_enabled())
            ):
                return None
            else:
                found.append(leaf)
        return found

    def rebuild(self, tensors: tuple[torch.Tensor, ...]) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` of a call with these tensors and the captured constants."""
        it = iter(tensors)
        leaves = [next(it) if slot else c for slot, c in zip(self.slots, self.consts, strict=True)]
        return pytree.tree_unflatten(leaves, self.tree)


class _Flat(nn.Module):
    """The block as a function of its tensors only, returning its output's tensors."""

    def __init__(self, block: nn.Module, spec: CallSpec) -> None:
        super().__init__()
        self.block = block
        self.spec = spec

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: D102
        args, kwargs = self.spec.rebuild(tensors)
        leaves = pytree.tree_leaves(self.block(*args, **kwargs))
        return tuple(t for t in leaves if isinstance(t, torch.Tensor))


def _axes(tensor: torch.Tensor, seq: int | None) -> dict[int, str]:
    dims = range(1, tensor.dim())
    return {0: "batch", **{d: "seq" for d in dims if seq is not None and tensor.shape[d] == seq}}


def seq_length(tensors: list[torch.Tensor]) -> int | None:
    """The sequence length: dim 1 of the first tensor if it is ≥ 3-D or integer (token ids)."""
    first = tensors[0]
    if first.dim() >= 3 or (first.dim() == 2 and not first.is_floating_point()):
        return int(first.shape[1])
    return None


def export_block(block: nn.Module, spec: CallSpec, tensors: list[torch.Tensor]) -> Any:
    """The float ONNX model of ``block`` (its int8 Linears dequantized) on these inputs.

    Batch (dim 0) and sequence axes (every dim of the first input's dim-1 size) are dynamic.
    """
    import onnx

    flat = _Flat(plain_twin(block, float_swaps(block)), spec).eval()
    seq = seq_length(tensors)
    with torch.inference_mode(False), torch.no_grad():
        example = tuple(t.clone() for t in tensors)  # ordinary tensors: the tracer records them
        outputs = flat(*example)
        names = [f"in{i}" for i in range(len(example))]
        outs = [f"out{i}" for i in range(len(outputs))]
        axes = {n: _axes(t, seq) for n, t in zip(names + outs, example + outputs, strict=True)}
        buffer = io.BytesIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            # The TorchScript exporter: 0.35–0.6 s for a MiniLM layer or the whole encoder
            # here, against 1.5–1.7 s for the dynamo one.
            torch.onnx.export(
                flat,
                example,
                buffer,
                dynamo=False,
                input_names=names,
                output_names=outs,
                dynamic_axes=axes,
            )
    return onnx.load_from_string(buffer.getvalue())


#: Held while a block graph is exported for a new session (rare: once per thread count).
_EXPORTING = threading.Lock()


class OrtInt8Block(OrtModule):
    """A submodule computed by one ORT graph: int8 Linears as ``DynamicQuantizeMatMul``.

    Not a submodule of anything (held by the block's :class:`BlockForward`); the graph is
    exported again from the block (:func:`export_block`) whenever a session is built after
    :meth:`forget`, on the call's own inputs.

    Args:
        block: The submodule; its int8 Linears are
            :class:`~nbcompress.engine.quantize.ort_int8.OrtInt8Linear` children.
        args: Positional arguments of a real call.
        kwargs: Its keyword arguments.
        output: Its output (the structure calls return).
    """

    def __init__(self, block: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        super().__init__()
        self.__dict__["block"] = block  # a plain reference: not a submodule of this graph
        self.spec = CallSpec(args, kwargs)
        leaves, self.out_tree = pytree.tree_flatten(output)
        self.out_consts = [None if isinstance(t, torch.Tensor) else t for t in leaves]
        self.example: list[torch.Tensor] = []
        self.inputs: list[str] | None = None  # graph inputs the exporter kept
        self.feeds: list[int] = []  # set with ``inputs`` by each export
        self.single = False
        #: Weight-only int8 layers (relative names) run in int8 with these fp32 channels.
        self.outliers: dict[str, torch.Tensor] = {}
        self.watching: Watch | None = None

    def watch(self) -> Watch:
        """The block's current :class:`Watch` (a new one after unpickling or re-pointing)."""
        if self.watching is None or self.watching.block is not self.block:
            self.watching = Watch(self.block)
        return self.watching

    def graph(self, vnni: bool) -> bytes:  # noqa: D102
        model = export_block(self.block, self.spec, self.example)
        self.inputs = [i.name for i in model.graph.input]
        #: The tensors (slot indices) the graph reads: the exporter drops unused ones.
        self.feeds = [i for i in range(len(self.example)) if f"in{i}" in self.inputs]
        self.single = self.out_consts == [None] and self.out_tree.is_leaf()
        for m in self.block.modules():
            if isinstance(m, OrtInt8Linear):
                m.listeners.add(self)
        return int8_graph(model, self.block, vnni, self.outliers)

    def run(self, tensors: list[torch.Tensor]) -> Any:
        """The block's output for these tensors (slot order), in its structure."""
        if self.watch().changed():
            self.watching = Watch(self.block)
            self._forget_sessions()  # weights or modules changed: export again
        threads = self.threads_for(tensors[0].numel())
        call = self._calls.get(threads)
        if call is None:
            # One export at a time: the example is this graph's attribute, and a second
            # Python thread's export read it emptied by the first one's ``finally``.
            with _EXPORTING:
                call = self._calls.get(threads)
                if call is None:
                    self.example = tensors
                    try:
                        call = runner(self.session(threads))
                    finally:
                        self.example = []  # not held past the export
        feeds = {f"in{i}": tensors[i].contiguous().numpy() for i in self.feeds}
        outs = call[0](call[1], feeds, None)
        if self.single:
            return torch.from_numpy(outs[0])  # one tensor: no unflattening
        it = iter(torch.from_numpy(a) for a in outs)
        leaves = [next(it) if c is None else c for c in self.out_consts]
        return pytree.tree_unflatten(leaves, self.out_tree)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(watching=None, example=[], inputs=None)  # exported again on first use
        return state

    @property
    def out_features(self) -> int:  # noqa: D102 - unused: outputs follow the block's
        return 0


class Watch:
    """What a block's graph was built from, checked on every call in ~tens of µs.

    Walking ``block.modules()`` per call cost 0.5 ms on MiniLM's encoder between ORT runs
    (cold caches); the flat lists here are built once. Held objects stay alive, so no id of
    a replaced module or tensor is reused by a new one.

    Args:
        block: The block.
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        mods = list(block.modules())
        self.hooks = [d for m in mods[1:] for d in (m._forward_hooks, m._forward_pre_hooks)]
        self.dicts = [d for m in mods for d in (m._modules, m._parameters, m._buffers)]
        self.values = [v for d in self.dicts for v in d.values()]
        self.tensors = [
            v for v in self.values if isinstance(v, torch.Tensor) and not v.is_inference()
        ]
        self.versions = [t._version for t in self.tensors]

    def hooked(self) -> bool:
        """Whether a hook would see a module inside the block (global hooks included)."""
        module = nn.modules.module
        return bool(module._global_forward_hooks or module._global_forward_pre_hooks) or any(
            self.hooks
        )

    def changed(self) -> bool:
        """Whether a module, parameter or buffer was swapped, or a tensor edited in place."""
        now = [v for d in self.dicts for v in d.values()]
        return (
            len(now) != len(self.values)
            or not all(map(operator.is_, now, self.values))
            or [t._version for t in self.tensors] != self.versions
        )


class BlockForward:
    """The instance ``forward`` of a block run as one ORT graph (see the module docstring).

    Args:
        block: The block.
        graph: Its :class:`OrtInt8Block`.
    """

    def __init__(self, block: nn.Module, graph: OrtInt8Block) -> None:
        self.block = block
        self.graph = graph

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        tensors = self.graph.spec.tensors(args, kwargs)
        if tensors is not None and not self.graph.watch().hooked():
            try:
                return self.graph.run(tensors)
            except Exception:  # noqa: BLE001 - a shape the graph cannot take: the block can
                pass
        return type(self.block).forward(self.block, *args, **kwargs)
