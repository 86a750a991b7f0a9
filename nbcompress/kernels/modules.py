"""``SparseLinear`` and ``SparseConv2d``: inference modules running on the numba kernels.

The packed arrays are registered as buffers, so ``state_dict``, ``copy.deepcopy``,
``pickle`` and ``torch.save`` work as for any module; the kernels get zero-copy numpy
views of them at each call. There are no parameters: these modules do not train, and
asking for gradients raises a clear error instead of silently returning none.
"""

from __future__ import annotations

import operator as op
import threading
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nbcompress.kernels._epilogue import ACTIVATIONS
from nbcompress.kernels.batchnorm import affine_of, scaled_rows
from nbcompress.kernels.conv import bsr_conv_unchecked, conv_unchecked
from nbcompress.kernels.csr import matmul_t_unchecked
from nbcompress.kernels.formats import BSRMatrix, CSRMatrix, pack_bsr, pack_csr, ungroup
from nbcompress.kernels.inputs import block_divides, check_conv, checked_tensor
from nbcompress.kernels.linear import activation_of, bias_array, finish, linear_product, wake_pool
from nbcompress.kernels.notices import COMPILE_NOTICE

__all__ = ["FORMATS", "DYNAMIC_FORMATS", "SparseConv2d", "SparseLinear"]

#: Storage formats: float32 CSR, int8 CSR with per-row scales (float32 inputs), block-sparse
#: rows; ``SparseLinear`` only: int8 CSR and 4 × 1 blocks with batches quantized per call.
FORMATS = ("csr", "csr_int8", "bsr", "bsr_int8", "csr_int8_dynamic")
#: The formats of ``int8.py``'s kernels, with dynamically quantized batches.
DYNAMIC_FORMATS = ("csr_int8_dynamic", "bsr_int8")

#: Held while a module builds its matrix view, so that Python threads calling a fresh
#: module at once share one (its measured kernel choices and derived layouts with it).
_BUILDING = threading.Lock()
_SIGNED = {np.dtype(np.uint16): np.int16, np.dtype(np.uint32): np.int32}
_UNSIGNED = {np.dtype(np.int16): np.uint16, np.dtype(np.int32): np.uint32}


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}.")
    return fmt


class _SparseBase(nn.Module):
    """Holds a packed weight as buffers and rebuilds the matrix view on demand."""

    format: str
    #: Activation applied after the bias (``fuse_activation_``); the class default serves
    #: modules pickled before there was one.
    activation: str | None = None

    def __init__(
        self, module: nn.Module, *, format: str = "csr", block: tuple[int, int] = (4, 1)
    ) -> None:
        super().__init__()
        weight = self._adopt(module)
        self._store(weight, format, block)
        self._set_bias(module.bias)

    def _adopt(self, module: nn.Module) -> torch.Tensor:
        """Check ``module``, copy its hyperparameters; return its weight as (out × in)."""
        raise NotImplementedError

    def _pack(
        self, weight: torch.Tensor, fmt: str, block: tuple[int, int]
    ) -> CSRMatrix | BSRMatrix:
        """The packed matrix the kernels multiply by (``weight`` as ``_adopt`` returned it)."""
        if fmt == "bsr_int8" and tuple(block) != (4, 1):
            raise ValueError(f"block: format 'bsr_int8' stores 4 × 1 blocks; got {block!r}.")
        if fmt.startswith("bsr"):
            return pack_bsr(weight, block, int8=fmt == "bsr_int8")
        return pack_csr(weight, int8=fmt.startswith("csr_int8"))

    def _store(self, weight: torch.Tensor, fmt: str, block: tuple[int, int]) -> None:
        self.format = _check_format(fmt)
        mat = self._pack(weight, fmt, block)
        self.weight_shape = mat.shape
        self.register_buffer("indptr", torch.from_numpy(mat.indptr))
        # Stored bit-for-bit as the signed type of the same width: torch cannot pickle
        # uint16/uint32 tensors; matrix() views them as unsigned again without a copy.
        self.register_buffer(
            "indices", torch.from_numpy(mat.indices.view(_SIGNED[mat.indices.dtype]))
        )
        self.register_buffer("values", torch.from_numpy(mat.data))
        scale = np.ones(0, np.float32) if mat.scale is None else mat.scale
        self.register_buffer("scale", torch.from_numpy(scale))

    def matrix(self) -> CSRMatrix | BSRMatrix:
        """The packed weight as numpy views of this module's buffers."""
        # Rebuilt only when a buffer object was swapped (e.g. by .to() or load_state_dict
        # with assign=True) or written in place (load_state_dict, copy_: the derived layouts
        # of int8.py and layouts.py are copies): per-call overhead is what small layers are
        # made of. The cache holds the tensors themselves, so a freed buffer's id can never
        # be mistaken; versions only grow, so their sum changes with any in-place write.
        buffers = self._buffers
        key = (buffers["indptr"], buffers["indices"], buffers["values"], buffers["scale"])
        version = key[0]._version + key[1]._version + key[2]._version + key[3]._version
        cached = self.__dict__.get("_matrix")
        if cached is not None and cached[1] == version:
            old = cached[0]
            if old[0] is key[0] and old[1] is key[1] and old[2] is key[2] and old[3] is key[3]:
                return cached[2]
        with _BUILDING:  # one matrix per buffers: kernel choices and layouts hang on it
            cached = self.__dict__.get("_matrix")
            if cached is not None and cached[1] == version and all(map(op.is_, cached[0], key)):
                return cached[2]
            mat = self._build_matrix()
            self.__dict__["_matrix"] = (key, version, mat)
        return mat

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for name in ("_matrix", "_bias_array"):  # numpy views of the buffers: rebuilt
            state.pop(name, None)
        return state

    def fuse_activation_(self, act: nn.Module) -> bool:
        """Apply ``act`` to this layer's output inside its kernels, if they support it.

        ``nn.ReLU``, ``nn.GELU()`` and ``nn.GELU(approximate="tanh")`` fuse: this layer
        then returns ``act(layer(x))`` (in the kernels' epilogue, ``linear.py``, or
        ``int8.py``'s last pass; GELU within ~1e-6 of torch's), and the caller replaces
        ``act`` by ``nn.Identity`` where it reads nothing but this layer's output.

        Args:
            act: The activation module that follows this layer.

        Returns:
            Whether it was fused; if not, nothing changed.
        """
        name = activation_of(act)
        if name is None or self.activation is not None:
            return False
        self.activation = name
        return True

    def _build_matrix(self) -> CSRMatrix | BSRMatrix:
        idx = self.indices.numpy()
        arrays = (self.indptr.numpy(), idx.view(_UNSIGNED[idx.dtype]), self.values.numpy())
        if self.format.startswith("bsr"):
            scale = self.scale.numpy() if self.format == "bsr_int8" else None
            return BSRMatrix(*arrays, shape=tuple(self.weight_shape), scale=scale)
        return CSRMatrix(*arrays, self.scale.numpy(), shape=tuple(self.weight_shape))

    @property
    def nnz(self) -> int:
        """Stored weight values."""
        return int(self.values.numel())

    @property
    def density(self) -> float:
        """Fraction of the dense weight that is stored."""
        m, k = self.weight_shape
        return self.nnz / max(1, m * k)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense float32 (out × in) tensor (dequantized for int8)."""
        return torch.from_numpy(self.matrix().to_dense())

    def _check_input(self, x: Any, ndim: str) -> torch.Tensor:
        return checked_tensor(type(self).__name__, x)

    @classmethod
    def from_dense(
        cls, module: nn.Module, *, format: str = "csr", block: tuple[int, int] = (4, 1)
    ) -> Any:
        """Pack a dense layer's weight; the original module is not modified.

        Args:
            module: The dense layer (``nn.Linear`` for SparseLinear, ``nn.Conv2d`` for
                SparseConv2d).
            format: One of :data:`FORMATS`.
            block: Block shape (R, C) for ``"bsr"`` (``"bsr_int8"``: 4 × 1 only).

        Returns:
            The sparse layer.
        """
        return cls(module, format=format, block=block)

    def _set_bias(self, bias: torch.Tensor | None) -> None:
        b = None if bias is None else bias.detach().to(torch.float32).clone()
        self.register_buffer("bias", b)

    def _extra(self) -> str:
        act = "" if self.activation is None else f", activation={self.activation}"
        bias = self.bias is not None
        return f"format={self.format}, density={self.density:.3f}, bias={bias}{act}"


class SparseLinear(_SparseBase):
    """Drop-in replacement for ``nn.Linear`` with a sparse weight (inference only).

    Build it with :meth:`from_dense` (or the constructor, same arguments). ``format``
    chooses the kernel: ``"csr"`` (float32, results equal the dense layer up to summation
    order), ``"bsr"`` (dense blocks, for structured sparsity), ``"csr_int8"`` (int8
    values with per-row scales, float32 inputs), ``"csr_int8_dynamic"`` and ``"bsr_int8"``
    (int8 values, element-wise or in 4 × 1 blocks; a batch above 1 is quantized to uint8
    per row and summed in int32, see ``int8.py``).
    """

    def _adopt(self, module: nn.Module) -> torch.Tensor:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"module: expected nn.Linear, got {type(module).__name__}.")
        self.out_features, self.in_features = module.out_features, module.in_features
        return module.weight.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to ``(..., in_features)`` input."""
        wake_pool()  # a parked worker wakes while the checks run (linear.py)
        with COMPILE_NOTICE:  # one line if this call compiles kernels (notices.py)
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x, "(..., in)")
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input: last dimension is {x.shape[-1]}, expected {self.in_features} "
                f"(SparseLinear({self.in_features}, {self.out_features}))."
            )
        x2 = x.reshape(-1, self.in_features) if x.ndim != 2 else x
        # The bias and the activation in the kernels' epilogue (linear.py).
        y = torch.from_numpy(linear_product(self, x2))
        return y if x.ndim == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        """Shape, format and density, shown in the module's repr."""
        return f"in_features={self.in_features}, out_features={self.out_features}, " + self._extra()


class SparseConv2d(_SparseBase):
    """Drop-in replacement for ``nn.Conv2d`` with a sparse weight (inference only).

    1×1 convolutions without padding multiply the input (its strided pixels) directly.
    Other convolutions can run directly on the zero-padded image (each nonzero a tap
    offset, see ``layouts.py``; strided ones on the image split into stride phases, see
    ``conv.py``); all of them can run as GEMM over the unfolded input (H×W columns),
    unfolded straight into the cache-sized column panels or read per image by the tiles.
    A block-sparse (4 × 1) weight runs on the unfolded input or directly on the padded
    image. Which one runs is measured on first use per input shape
    (``conv.py``). Supports stride, padding, dilation, bias and groups (depthwise
    included: the grouped weight runs as the equivalent ungrouped one, whose zeros
    outside each group are never stored, see ``formats.ungroup``); refuses
    ``padding="same"`` and non-zero padding modes.

    ``channels_last_output`` (off by default) returns the output in channels-last strides
    (same shape and values), as ``nn.Conv2d`` does for a channels-last weight: torch's
    pooling runs far faster on that layout (max-pooling resnet18's 64 × 112 × 112 stem
    output: 6.6 ms → 0.6 ms here, one thread), its BatchNorm and ReLU as fast. The
    switch costs one copy of the output, so it pays where such a layer consumes it.
    :meth:`fold_batchnorm_` folds an eval-mode BatchNorm that follows the layer into
    its weight and bias.
    """

    groups: int = 1  # the class default serves modules pickled before groups were kept
    #: Return the output in channels-last strides (class default: modules pickled before).
    channels_last_output: bool = False

    def _adopt(self, module: nn.Module) -> torch.Tensor:
        check_conv(module)
        conv = module
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.padding = (0, 0) if conv.padding == "valid" else tuple(conv.padding)
        self.dilation = tuple(conv.dilation)
        self.groups = int(conv.groups)
        return conv.weight.detach().reshape(conv.out_channels, -1)

    def _pack(
        self, weight: torch.Tensor, fmt: str, block: tuple[int, int]
    ) -> CSRMatrix | BSRMatrix:
        if fmt in DYNAMIC_FORMATS:
            raise ValueError(
                f"format: {fmt!r} is for SparseLinear; convolutions take 'csr_int8' or 'bsr'."
            )
        groups = self.groups
        if groups == 1:
            return super()._pack(weight, fmt, block)
        per, k = weight.shape[0] // groups, weight.shape[1]
        if fmt != "bsr" or block_divides(block, per, k):
            return ungroup(super()._pack(weight, fmt, block), groups)
        # Blocks straddling groups (e.g. depthwise in blocks of 4 rows): pack the
        # ungrouped weight itself, zeros outside the groups included (out × in·kh·kw).
        full = weight.new_zeros(weight.shape[0], groups, k)
        rows = torch.arange(weight.shape[0])
        full[rows, rows // per] = weight
        return super()._pack(full.reshape(weight.shape[0], groups * k), fmt, block)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense float32 (out × in/groups·kh·kw) tensor, as ``conv.weight``."""
        full = super().dense_weight()
        if self.groups == 1:
            return full
        m, per = full.shape[0], full.shape[0] // self.groups
        rows = torch.arange(m)
        return full.reshape(m, self.groups, -1)[rows, rows // per]

    @property
    def density(self) -> float:
        """Fraction of the dense (grouped) weight that is stored."""
        m, k = self.weight_shape
        return self.nnz / max(1, m * (k // self.groups))

    def _unfold(self, image: torch.Tensor) -> np.ndarray:
        cols = F.unfold(image[None], self.kernel_size, self.dilation, self.padding, self.stride)
        return cols[0].contiguous().numpy()

    def _direct(self) -> bool:
        # 1×1 without padding: a product with the (strided) pixels, no unfold.
        return self.kernel_size == (1, 1) and self.padding == (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the convolution to ``(N, C, H, W)`` input."""
        wake_pool()
        with COMPILE_NOTICE:  # one line if this call compiles kernels (notices.py)
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x, "(N, C, H, W)")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"input: expected shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}."
            )
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
        )
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        y = torch.empty((n, self.out_channels, ho * wo), dtype=torch.float32)
        mat = self.matrix()
        images = x.contiguous().numpy()
        geom = (kh, kw, sh, sw, ph, pw, dh, dw, wo)
        if isinstance(mat, BSRMatrix):
            bsr_conv_unchecked(mat, images, geom, y.numpy(), lambda i: self._unfold(x[i]))
        elif self._direct():
            if (sh, sw) != (1, 1):  # the pixels the 1×1 reads, as one small copy
                images = np.ascontiguousarray(images[:, :, ::sh, ::sw])
            for i in range(n):
                xt = images[i].reshape(self.in_channels, ho * wo)
                matmul_t_unchecked(mat, xt, y[i].numpy())
        else:
            conv_unchecked(mat, images, geom, y.numpy(), lambda i: self._unfold(x[i]))
        bias, act = bias_array(self), ACTIVATIONS[self.activation]
        if act or bias.size:
            # On this thread, not torch's add: torch splits a large add over its own
            # OpenMP threads, whose barrier waited ~20 ms for a descheduled thread when
            # other processes held the cores here (1 × 64 × 28 × 28: 20 ms → 0.5 ms).
            for image in y.numpy():
                finish(image, bias, act)
        y = y.reshape(n, self.out_channels, ho, wo)
        if self.channels_last_output:
            return y.contiguous(memory_format=torch.channels_last)
        return y

    def fold_batchnorm_(self, bn: nn.Module) -> SparseConv2d:
        """Fold an eval-mode ``nn.BatchNorm2d`` that consumes this layer's output, in place.

        Row i of the weight is scaled by ``γ_i / sqrt(var_i + ε)`` and the bias becomes
        ``(b_i − mean_i) · γ_i / sqrt(var_i + ε) + β_i`` (``batchnorm.py``), so that this
        layer alone computes what it and ``bn`` computed (equal up to float rounding).
        The caller replaces ``bn`` by ``nn.Identity``, and only where ``bn`` reads nothing
        but this layer's output; ``bn`` itself is not modified. The stored pattern stays
        (int8 values keep their integers, their row scales change); kernel choices are
        measured again on first use.

        Args:
            bn: The BatchNorm, in eval mode, with running statistics and
                ``num_features == out_channels``.

        Returns:
            This layer.
        """
        scale, shift = affine_of(bn, self.out_channels)
        # New buffers, not in-place writes: matrix() then rebuilds its view, and the
        # kernel choices and layouts made for the old values go with the old one.
        new = scaled_rows(self.matrix(), self.format == "csr_int8", scale.numpy())
        for name, array in new.items():
            setattr(self, name, torch.from_numpy(array))
        bias = self._buffers["bias"]
        self._set_bias(shift if bias is None else bias * scale + shift)
        return self

    def extra_repr(self) -> str:
        """Shape, format and density, shown in the module's repr."""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            + (f"groups={self.groups}, " if self.groups != 1 else "")
            + self._extra()
        )
