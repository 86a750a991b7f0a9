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
from typing import Any

import numpy as np
import torch
from torch import nn

from nbcompress.engine.quantize.cpu import int8_cpu
from nbcompress.engine.quantize.modules import opaque_weight, per_row_int8

__all__ = ["ALLOW_SPINNING", "OrtInt8Linear", "ort_problem", "session_weight"]

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


def _model_bytes(qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> bytes:
    """A one-node ONNX graph ``y = DynamicQuantizeMatMul(x, Wᵀ, scale, 0, bias)``, serialized.

    The weight is an initializer (not an input), so ORT prepacks it once per session.
    """
    from onnx import TensorProto, helper, numpy_helper

    out_features, in_features = qweight.shape
    inits = [
        numpy_helper.from_array(qweight.t().contiguous().numpy(), "w"),
        numpy_helper.from_array(scale.detach().float().contiguous().numpy(), "w_scale"),
        numpy_helper.from_array(torch.zeros(out_features, dtype=torch.int8).numpy(), "w_zero"),
    ]
    inputs = ["x", "w", "w_scale", "w_zero"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.detach().float().contiguous().numpy(), "b"))
        inputs.append("b")
    node = helper.make_node("DynamicQuantizeMatMul", inputs, ["y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node],
        "nbcompress_int8_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", out_features])],
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


class OrtInt8Linear(nn.Module):
    """Dynamic int8 Linear run by ONNX Runtime, stored as int8 with per-row float scales.

    Symmetric int8 weights (zero point 0, so exact zeros stay zero), 7 bits where the CPU
    lacks VNNI (:func:`~nbcompress.engine.quantize.cpu.int8_cpu`); activations are
    quantized to uint8 per call by ORT. Inference only: no gradient flows through it.

    The session follows ``torch.get_num_threads()`` (one session per thread count, built
    on first use with that many intra-op threads) and is shared by concurrent callers
    (ORT's ``run`` is thread-safe). Input: any leading dims, float on the CPU (computed
    in float32, returned in the input's dtype).
    """

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        if type(layer) is not nn.Linear:
            raise TypeError(f"layer: expected an nn.Linear, got {type(layer).__name__}")
        q, scale = per_row_int8(layer.weight.detach().float(), int8_cpu().weight_max)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.float())
        bias = layer.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), False)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._sessions: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._in = int(self.qweight.shape[1])  # read on every call: a plain attribute

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sessions"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_runtime()  # sessions are rebuilt on the next call

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        with self._lock:
            self._sessions = {}  # the weights changed: rebuild on the next call

    def _apply(self, fn: Any, recurse: bool = True) -> OrtInt8Linear:
        out = super()._apply(fn, recurse)
        with self._lock:
            self._sessions = {}  # .to() / .float() may have replaced the buffers
        return out

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

    def session(self, threads: int | None = None) -> Any:
        """The ORT session for ``threads`` intra-op threads (default: torch's count)."""
        threads = torch.get_num_threads() if threads is None else int(threads)
        found = self._sessions.get(threads)
        if found is not None:
            return found
        problem = ort_problem()
        if problem is not None:
            raise RuntimeError(f"OrtInt8Linear cannot run here: {problem}")
        with self._lock:
            if threads not in self._sessions:
                q, s = session_weight(self.qweight.cpu(), self.scale.cpu(), int8_cpu().vnni)
                bias = None if self.bias is None else self.bias.detach().cpu()
                sessions = dict(self._sessions)  # readers never see a half-built dict
                sessions[threads] = _new_session(_model_bytes(q, s, bias), threads)
                self._sessions = sessions
            return self._sessions[threads]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        # The common case (float32, contiguous, CPU, no grad) in one torch call and numpy
        # checks: every torch call between two ORT runs was measured at 3–8 µs here (ORT's
        # weight streaming evicts torch's dispatch code and tables from L2), ~25 µs per
        # layer for the attribute checks alone on BERT-FFN at batch 1.
        try:
            a = x.numpy()  # refuses grad-requiring, non-CPU and some dtypes: checked below
        except (RuntimeError, TypeError):
            a = None
        if a is None or a.dtype != np.float32 or not a.flags.c_contiguous:
            return self._general(x)
        if a.ndim == 0 or a.shape[-1] != self._in:
            raise ValueError(f"x: expected last dimension {self._in}, got shape {a.shape}.")
        if a.ndim == 2:
            return torch.from_numpy(self._product(a))
        y = self._product(a.reshape(-1, self._in))
        return torch.from_numpy(y.reshape(*a.shape[:-1], y.shape[-1]))

    def _general(self, x: torch.Tensor) -> torch.Tensor:
        """Checked path: explain what cannot run; cast or copy what can, then cast back."""
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "OrtInt8Linear is inference-only (ONNX Runtime computes it, no gradient "
                "flows): call it under torch.no_grad(), or undo_(model) the quantization "
                "to train."
            )
        if x.device.type != "cpu" or not x.is_floating_point():
            raise ValueError(
                f"x: OrtInt8Linear runs on the CPU on float input, got a {x.dtype} tensor "
                f"on {x.device}; move the input to the CPU (ONNX Runtime's CPU kernel)."
            )
        return self(x.detach().to(torch.float32).contiguous()).to(x.dtype)

    def _product(self, a: np.ndarray) -> np.ndarray:
        """``a @ Wᵀ + b`` by ORT for a 2-D float32 array (rows may be 0)."""
        if a.shape[0] == 0:
            return np.zeros((0, self.qweight.shape[0]), dtype=np.float32)
        return self.session().run(None, {"x": a})[0]

    def extra_repr(self) -> str:  # noqa: D102
        wide = self.qweight.numel() and int(self.qweight.abs().max()) > _SAFE_MAX
        return (
            f"{self.in_features}→{self.out_features}, int{8 if wide else 7} per-row, "
            "dynamic, onnxruntime"
        )
