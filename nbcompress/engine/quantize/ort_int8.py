"""Dynamic int8 Linear on ONNX Runtime's kernel: one more measured backend of ``quantize_``.

ONNX Runtime's ``com.microsoft::DynamicQuantizeMatMul`` quantizes the activations to uint8
per call and multiplies them by prepacked int8 weights (MLAS, with VNNI/AMX where the CPU
has them). Measured here (Intel, VNNI/AMX, 1 thread) on one 768→3072 layer it took
153–170 µs at batch 1 against torch fp32's 458 µs, faster than torch's fbgemm int8 that
:class:`~nbcompress.engine.quantize.modules.Int8DynamicLinear` runs on. :class:`OrtInt8Linear`
wraps that op as an ordinary module: the weight lives in int8 buffers (``state_dict``,
``pickle``, ``copy.deepcopy`` and ``torch.save`` see ~1 byte per weight), and the ORT
session, a one-node graph built in memory with ``onnx.helper``, is built lazily per thread
count and never pickled. ``onnxruntime`` and ``onnx`` are optional (extra ``ort``):
:func:`ort_problem` says why the backend is unavailable, and nothing else needs them.

Without VNNI (AVX2, e.g. AMD EPYC before Zen 4) MLAS sums u8×s8 products in saturating
int16 pairs: the issue measured a max error of 0.22 there. As for nbcompress's own int8
(:mod:`~nbcompress.engine.quantize.cpu`), the weights then get 7 bits (±63), so no pair sum
can saturate (255 × 63 × 2 = 32,130).
"""

from __future__ import annotations

import functools
import importlib.util
import threading
import weakref
from typing import Any

import numpy as np
import torch
from torch import nn

from nbcompress.engine.quantize.cpu import int8_cpu
from nbcompress.engine.quantize.modules import opaque_weight, per_row_int8

__all__ = [
    "ALLOW_SPINNING",
    "OrtInt8Linear",
    "OrtModule",
    "graph_bytes",
    "linear_nodes",
    "ort_problem",
    "per_tensor",
    "per_tensor_int8",
    "runner",
    "session_weight",
]

#: Whether ORT's intra-op pool spins between runs. Off: its threads would otherwise spin
#: against torch's OpenMP pool between layers (the numba/OpenMP trap in environment.md).
ALLOW_SPINNING = False
_INT8_MAX = 127
_SAFE_MAX = 63  # |w| ≤ 63: a u8×s8 pair sum fits int16 (see the module docstring)


@functools.cache
def _import_problem() -> str | None:
    for name in ("onnxruntime", "onnx"):
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed (pip install 'nbcompress[ort]')"
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means "not here"
        return f"onnxruntime does not import here ({type(err).__name__}: {str(err)[:80]})"
    return None


def ort_problem() -> str | None:
    """Why the ONNX Runtime backend cannot run here (``None``: it can).

    The backend registry's ``available`` check; tests monkeypatch it to take the
    "not installed" path.
    """
    return _import_problem()


def session_weight(
    qweight: torch.Tensor, scale: torch.Tensor, vnni: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 weight and per-row scales the ORT session computes with on this CPU.

    The stored weight unless it is wider than 7 bits and the CPU lacks VNNI (saved on a
    VNNI machine, loaded here): then it is requantized to ±63 from its dequantized values,
    for the session only (the buffers stay as saved).
    """
    if vnni or not qweight.numel() or int(qweight.abs().max()) <= _SAFE_MAX:
        return qweight, scale
    q, s = per_row_int8(qweight.float() * scale[:, None], _SAFE_MAX)
    return q, s.float()


def per_tensor_int8(w: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of ``w`` with one scale for the whole tensor: ``(qweight, scale)``.

    ``scale`` is stored per row (all entries equal), so the buffers keep the per-row
    layout and ``state_dict`` shapes; :func:`linear_nodes` hands ORT a scalar then.
    """
    peak = float(torch.maximum(w.max(), w.min().neg())) if w.numel() else 0.0
    scale = peak / top if peak > 0 else 1.0
    q = (w / scale).round_().clamp_(-top, top).to(torch.int8)
    return q, torch.full((w.shape[0],), scale, dtype=torch.float32)


def per_tensor(scale: torch.Tensor) -> bool:
    """Whether per-row ``scale`` holds one value (a per-tensor weight scale)."""
    return bool(scale.numel()) and bool((scale == scale[0]).all())


def linear_nodes(
    name: str, x: str, y: str, qweight: torch.Tensor, scale: torch.Tensor, bias: Any
) -> tuple[list[Any], list[Any]]:
    """``y = DynamicQuantizeMatMul(x, Wᵀ, scale, bias)``: its node and initializers.

    The weight is an initializer (not a graph input), so ORT prepacks it once per session.
    No zero point (symmetric weights: 0 is the default), and a scalar scale where every
    row's is equal: measured here on BERT-FFN ×2 (1 thread) the per-row zero-point vector
    cost 2–8% and per-row scales another 3–6% against ORT's own per-tensor nodes.
    """
    from onnx import helper, numpy_helper

    s = scale.detach().float().contiguous()
    s = s[:1].reshape(()) if per_tensor(s) else s
    inits = [
        numpy_helper.from_array(qweight.t().contiguous().numpy(), f"{name}_w"),
        numpy_helper.from_array(s.numpy(), f"{name}_s"),
    ]
    inputs = [x, f"{name}_w", f"{name}_s"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.detach().float().numpy(), f"{name}_b"))
        inputs += ["", f"{name}_b"]  # "": the omitted zero point
    node = helper.make_node("DynamicQuantizeMatMul", inputs, [y], domain="com.microsoft")
    return [node], inits


def graph_bytes(nodes: list[Any], inits: list[Any], widths: tuple[int, int], y: str) -> bytes:
    """The serialized ONNX model of ``nodes`` from input ``x`` (rows × widths[0]) to ``y``."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "nbcompress_int8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", widths[0]])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["rows", widths[1]])],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    # IR 9 (not the newest onnx writes): every onnxruntime from 1.17 reads it.
    return helper.make_model(graph, opset_imports=opsets, ir_version=9).SerializeToString()


def _new_session(model: bytes, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only: no notebook stderr chatter
    opts.add_session_config_entry("session.intra_op.allow_spinning", str(int(ALLOW_SPINNING)))
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def runner(session: Any) -> tuple[Any, list[str]]:
    """``(run, output names)``: ``run(names, feeds, None)`` computes a session's outputs.

    The compiled session's own ``run`` where the wrapper exposes it: the Python wrapper's
    checks (input names, graph capture, ownership) repeat on every call what the caller
    already knows, and every Python step between two ORT runs is slow (cold caches).
    """
    names = [o.name for o in session.get_outputs()]
    inner = getattr(session, "_sess", None)
    run = getattr(inner, "run", None)
    return (run if callable(run) else session.run), names


class OrtModule(nn.Module):
    """An ORT-run inference module: lazy sessions per thread count, numpy-fast calls.

    Subclasses keep their weights in buffers and describe their graph
    (:meth:`graph`); this base builds one session per ``torch.get_num_threads()`` on
    first use, never pickles one (rebuilt after ``pickle``, ``deepcopy``, ``torch.save``
    or ``load_state_dict``), lets concurrent callers share it (ORT's ``run`` is
    thread-safe) and takes any leading dims of float input on the CPU (computed in
    float32, returned in the input's dtype). No gradient flows through it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sessions: dict[int, Any] = {}
        #: Thread count → :func:`runner` of its session (the hot path's one lookup).
        self._calls: dict[int, tuple[Any, list[str]]] = {}
        self._lock = threading.Lock()
        self._in = 0  # input width, a plain attribute (read on every call); set by subclasses
        #: Inputs of at most this many elements run on one thread, where that measured
        #: faster than torch's thread count (``ort_threads``); 0: never.
        self.one_thread_upto = 0
        #: Modules whose graphs hold this one's weights (``ort_chain``): told when they change.
        self.listeners: weakref.WeakSet[OrtModule] = weakref.WeakSet()

    def graph(self, vnni: bool) -> bytes:
        """The serialized ONNX model from input ``x`` to the output, for this CPU path."""
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sessions"], state["_lock"], state["listeners"] = {}, None, None
        state["_calls"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("one_thread_upto", 0)  # pickled before it existed
        super().__setstate__(state)
        self._calls = {}  # also for objects pickled before the hot path had it
        self._lock = threading.Lock()  # sessions are rebuilt on the next call
        self.listeners = weakref.WeakSet()

    def _forget_sessions(self) -> None:
        with self._lock:
            self._calls, self._sessions = {}, {}
        for other in list(self.listeners):
            other._forget_sessions()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._forget_sessions()  # the weights changed: rebuild on the next call

    def _apply(self, fn: Any, recurse: bool = True) -> OrtModule:
        out = super()._apply(fn, recurse)
        self._forget_sessions()  # .to() / .float() may have replaced the buffers
        return out

    def session(self, threads: int | None = None) -> Any:
        """The ORT session for ``threads`` intra-op threads (default: torch's count)."""
        threads = torch.get_num_threads() if threads is None else int(threads)
        found = self._sessions.get(threads)
        if found is not None:
            return found
        problem = ort_problem()
        if problem is not None:
            raise RuntimeError(f"{type(self).__name__} cannot run here: {problem}")
        with self._lock:
            if threads not in self._sessions:
                sessions = dict(self._sessions)  # readers never see a half-built dict
                sessions[threads] = _new_session(self.graph(int8_cpu().vnni), threads)
                calls = dict(self._calls)
                calls[threads] = runner(sessions[threads])
                self._sessions, self._calls = sessions, calls
            return self._sessions[threads]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = self._fast(x)
        return out if out is not None else self._general(x)

    def _fast(self, x: torch.Tensor) -> torch.Tensor | None:
        """The common case (float32, contiguous, CPU, no grad); ``None`` for any other.

        One torch call and numpy checks: every torch call between two ORT runs was
        measured at 3–8 µs here (ORT's weight streaming evicts torch's dispatch code and
        tables from L2), ~25 µs per layer for the attribute checks alone on BERT-FFN at
        batch 1.
        """
        try:
            a = x.numpy()  # refuses grad-requiring, non-CPU and some dtypes
        except (RuntimeError, TypeError):
            return None
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            return None
        if a.ndim == 0 or a.shape[-1] != self._in:
            raise ValueError(f"x: expected last dimension {self._in}, got shape {a.shape}.")
        if a.ndim == 2:
            call = self._calls.get(1 if a.size <= self.one_thread_upto else torch.get_num_threads())
            if call is not None and a.shape[0]:  # the hot path: no further Python call
                return torch.from_numpy(call[0](call[1], {"x": a}, None)[0])
            return torch.from_numpy(self._product(a))
        y = self._product(a.reshape(-1, self._in))
        return torch.from_numpy(y.reshape(*a.shape[:-1], y.shape[-1]))

    def _general(self, x: torch.Tensor) -> torch.Tensor:
        """Checked path: explain what cannot run; cast or copy what can, then cast back."""
        name = type(self).__name__
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"{name} is inference-only (ONNX Runtime computes it, no gradient flows): "
                "call it under torch.no_grad(), or undo_(model) the quantization to train."
            )
        if x.device.type != "cpu" or not x.is_floating_point():
            raise ValueError(
                f"x: {name} runs on the CPU on float input, got a {x.dtype} tensor on "
                f"{x.device}; move the input to the CPU (ONNX Runtime's CPU kernel)."
            )
        out = self._fast(x.detach().to(torch.float32).contiguous())
        if out is None:
            raise TypeError(f"x: {name} cannot read a {type(x).__name__} as a numpy array.")
        return out.to(x.dtype)

    def _product(self, a: np.ndarray) -> np.ndarray:
        """The graph's output for a 2-D float32 array (rows may be 0)."""
        if a.shape[0] == 0:
            return np.zeros((0, self.out_features), dtype=np.float32)
        return self.session(self.threads_for(a.size)).run(None, {"x": a})[0]

    def threads_for(self, size: int) -> int:
        """The session's thread count for an input of ``size`` elements."""
        return 1 if size <= self.one_thread_upto else torch.get_num_threads()

    @property
    def out_features(self) -> int:
        """Output width."""
        raise NotImplementedError


class OrtInt8Linear(OrtModule):
    """Dynamic int8 Linear run by ONNX Runtime, stored as int8 with per-row float scales.

    Symmetric int8 weights (zero point 0, so exact zeros stay zero), 7 bits where the CPU
    lacks VNNI (:func:`~nbcompress.engine.quantize.cpu.int8_cpu`); activations are
    quantized to uint8 per call by ORT. See :class:`OrtModule` for sessions, threads and
    inputs.

    Args:
        layer: The float layer.
        per_tensor: One weight scale for the whole matrix (stored repeated per row), which
            ORT's node runs faster; chosen by ``ort_chain`` only where measured no less
            accurate than per-row scales.
    """

    def __init__(self, layer: nn.Linear, per_tensor: bool = False) -> None:
        super().__init__()
        if type(layer) is not nn.Linear:
            raise TypeError(f"layer: expected an nn.Linear, got {type(layer).__name__}")
        quantize = per_tensor_int8 if per_tensor else per_row_int8
        q, scale = quantize(layer.weight.detach().float(), int8_cpu().weight_max)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.float())
        bias = layer.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), False)
        self._in = layer.in_features

    @property
    def in_features(self) -> int:
        """Input width."""
        return int(self.qweight.shape[1])

    @property
    def out_features(self) -> int:
        """Output width."""
        return int(self.qweight.shape[0])

    @property
    def weight(self) -> torch.Tensor:
        """Shape-only stand-in for the float weight (see ``modules.OpaqueWeight``)."""
        return opaque_weight(self.qweight.shape)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight as stored (``qweight × scale``)."""
        return self.qweight.float() * self.scale[:, None]

    def nodes(self, name: str, x: str, y: str, vnni: bool) -> tuple[list[Any], list[Any]]:
        """This layer's ORT node and initializers from ``x`` to ``y`` for the CPU path."""
        q, s = session_weight(self.qweight.cpu(), self.scale.cpu(), vnni)
        bias = None if self.bias is None else self.bias.detach().cpu()
        return linear_nodes(name, x, y, q, s, bias)

    def graph(self, vnni: bool) -> bytes:  # noqa: D102
        nodes, inits = self.nodes("l", "x", "y", vnni)
        return graph_bytes(nodes, inits, (self.in_features, self.out_features), "y")

    def extra_repr(self) -> str:  # noqa: D102
        wide = self.qweight.numel() and int(self.qweight.abs().max()) > _SAFE_MAX
        scales = "per-tensor" if per_tensor(self.scale) else "per-row"
        return (
            f"{self.in_features}→{self.out_features}, int{8 if wide else 7} {scales}, "
            "dynamic, onnxruntime"
        )
