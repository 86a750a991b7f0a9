"""What a candidate module must do besides being accurate: stay ordinary, keep parents working.

- :func:`round_trip_problem`: a compressed model must survive ``pickle`` / ``torch.save``
  and load back working, so every candidate is pickled, loaded and run (torchao's modules
  cannot be pickled; torch 2.14's quantized convolutions pickle but load broken).
- :func:`fast_path_problem`: some parents read a child's ``weight`` directly instead of
  calling it (``nn.TransformerEncoderLayer``'s fused fast path reads ``linear1.weight``
  and ``linear2.weight``; ``nn.TransformerEncoder``'s nested-tensor path reads the first
  layer's). A candidate in such a place must keep ``weight`` and ``bias`` readable and
  make torch decline that fast path (see
  :class:`~nbcompress.engine.quantize.modules.OpaqueWeight`), or it is rejected.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.outputs import compare_outputs
from nbcompress.engine.quantize.embedding_int8 import tied_problem
from nbcompress.engine.quantize.report import storage_quiet

__all__ = [
    "FAST_PATH_READS",
    "candidate_problem",
    "dense_args",
    "fast_path_problem",
    "fast_path_reader",
    "probe_args",
    "round_trip_problem",
]

#: Parent type → names of the children whose ``weight``/``bias`` it reads directly.
FAST_PATH_READS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.TransformerEncoderLayer: ("linear1", "linear2"),
    nn.MultiheadAttention: ("out_proj",),
}


def dense_args(args: tuple) -> tuple:
    """``args`` with nested tensors padded to ordinary ones.

    ``nn.TransformerEncoder`` turns a padded batch into a nested tensor when its fused
    fast path applies; quantized stand-ins make it decline that path, so afterwards the
    layer sees the padded dense batch: that is the input to check candidates on.
    """
    return tuple(
        a.to_padded_tensor(0.0) if isinstance(a, torch.Tensor) and a.is_nested else a for a in args
    )


def probe_args(layer: nn.Module) -> tuple | None:
    """A small valid input for ``layer`` when no real one was captured (``None``: unknown)."""
    if isinstance(layer, nn.Linear):
        return (torch.randn(2, layer.in_features),)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        size = [d * (k - 1) + 1 for k, d in zip(layer.kernel_size, layer.dilation, strict=True)]
        return (torch.randn(1, layer.in_channels, *size),)
    if isinstance(layer, nn.RNNBase):
        return (torch.randn(2, 1, layer.input_size),)
    return None


def round_trip_problem(module: nn.Module, args: tuple | None) -> str | None:
    """Why ``module`` does not survive ``pickle.dumps`` + ``loads`` + a call, or ``None``.

    The loaded copy must compute what the module computes on ``args`` (to 1e-5: the
    numba modules re-measure their kernel choice after loading).
    """
    try:
        with storage_quiet():
            loaded = pickle.loads(pickle.dumps(module))
        if args is None:
            return None
        with torch.no_grad():
            diff = compare_outputs(module(*args), loaded(*args), arg="candidate")
    except Exception as err:  # noqa: BLE001 - any failure is the finding
        return f"does not survive pickle/torch.save ({type(err).__name__}: {str(err)[:80]})"
    if diff.relative > 1e-5:
        return f"computes differently after pickle/torch.save ({diff.relative:.1e})"
    return None


def fast_path_reader(model: nn.Module, name: str) -> str | None:
    """The type of ``name``'s parent if that parent reads ``name``'s weight directly."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    for kind, children in FAST_PATH_READS.items():
        if isinstance(parent, kind) and child in children:
            return kind.__name__
    return None


def fast_path_problem(module: nn.Module, reader: str, child: str) -> str | None:
    """Why ``module`` cannot stand in for ``reader``'s child ``child``, or ``None``."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not hasattr(module, "bias"):
        return (
            f"has no tensor `weight`/`bias`, which {reader}'s fused fast path reads "
            f"({child}.weight) directly"
        )
    if not torch.overrides.has_torch_function((weight,)):
        return f"{reader}'s fused fast path would compute with {child}.weight, bypassing it"
    return None


def candidate_problem(model: nn.Module, name: str, module: Any, args: tuple | None) -> str | None:
    """The first reason ``module`` may not replace layer ``name``, or ``None``."""
    tied = tied_problem(model, name)
    if tied is not None:
        return tied
    reader = fast_path_reader(model, name)
    if reader is not None:
        problem = fast_path_problem(module, reader, name.rpartition(".")[2])
        if problem is not None:
            return problem
    return round_trip_problem(module, args)
