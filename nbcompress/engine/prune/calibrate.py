"""Calibration for activation-aware pruning: what each layer's inputs look like.

Forward hooks accumulate, per layer, the squared norm of every input feature (Wanda's
``‖X_j‖²``) and optionally the Gram matrix ``H = X Xᵀ`` of the inputs (for reconstruction).
A convolution's input features are the columns of its im2col matrix: one per input channel
and kernel offset, per group. Only sums are kept, never the activations of all batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nbcompress.engine.core.validation import as_inputs, eval_mode, run_forward

__all__ = [
    "SUPPORTED",
    "ActivationStats",
    "LayerStats",
    "calibration_inputs",
    "collect_stats",
    "forward_order",
    "im2col_sq_norms",
]

#: Layers whose input features can be measured: Linear, Conv1d and Conv2d.
SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)

#: Elements of an im2col chunk (float32: 16 MiB).
_COLS = 1 << 22

_FIX = (
    "pass example_inputs=x (a tensor, tuple or dict of tensors shaped like a real batch), a "
    "list of such batches or a DataLoader (in a notebook --input x)"
)


def calibration_inputs(example_inputs: Any, arg: str = "example_inputs") -> list[tuple]:
    """Calibration batches as positional-argument tuples for the model.

    One input is a tensor, a tuple of positional arguments or a mapping (as
    :func:`~nbcompress.engine.core.validation.as_inputs` accepts). A list, or any other
    iterable such as a ``DataLoader``, is a sequence of batches; a batch that is a tuple or
    list (``(x, y)`` from a loader) contributes its first element.

    Raises:
        ValueError: No input given, or no batch in it (names ``arg`` and the fix).
        TypeError: Something that is neither an input nor an iterable of inputs.
    """
    if example_inputs is None:
        raise ValueError(f"{arg}: calibration inputs are needed; {_FIX}.")
    if isinstance(example_inputs, (torch.Tensor, tuple, Mapping)):
        return [as_inputs(example_inputs, arg)]
    if isinstance(example_inputs, (str, bytes, nn.Module)) or not hasattr(
        example_inputs, "__iter__"
    ):
        raise TypeError(
            f"{arg}: expected calibration inputs, got {type(example_inputs).__name__}; {_FIX}."
        )
    batches = []
    for item in example_inputs:
        if isinstance(item, (tuple, list)) and item:
            item = item[0]  # (x, y) from a loader: the model's input is x
        batches.append(as_inputs(item, f"{arg}[{len(batches)}]"))
    if not batches:
        raise ValueError(f"{arg}: the calibration data holds no batch; {_FIX}.")
    return batches


@dataclass
class LayerStats:
    """Sums over a layer's calibration inputs, per group of a grouped convolution.

    Attributes:
        sq: ``(groups, d)`` float64: sum of squares of each input feature (im2col column).
        gram: ``(groups, d, d)`` float64 ``X Xᵀ``, or ``None`` when not collected.
        samples: Input vectors (rows of X) seen.
    """

    sq: torch.Tensor
    gram: torch.Tensor | None = None
    samples: int = 0

    def norms(self) -> torch.Tensor:
        """``‖X_j‖₂`` per group and input feature, float32."""
        return self.sq.sqrt().float()


@dataclass
class ActivationStats:
    """Input statistics of the layers of a model, by layer name.

    Made by :func:`collect_stats` (once, on the dense model, in a sensitivity sweep); any
    function that takes calibration inputs for ``method="wanda"`` also takes this.
    """

    layers: dict[str, LayerStats] = field(default_factory=dict)
    batches: int = 0


def _groups(module: nn.Module) -> int:
    return getattr(module, "groups", 1)


def _columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """im2col of a Conv1d/Conv2d input: ``(N, C·k, L)``, channel-major like the weight."""
    pad, mode = module._reversed_padding_repeated_twice, module.padding_mode
    if isinstance(module, nn.Conv1d):
        x = F.pad(x, pad, "constant" if mode == "zeros" else mode).unsqueeze(2)
        kernel, stride, dilation = (
            (1, *module.kernel_size),
            (1, *module.stride),
            (1, *module.dilation),
        )
    else:
        x = F.pad(x, pad, "constant" if mode == "zeros" else mode)
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    return F.unfold(x, kernel, dilation=dilation, stride=stride)


def im2col_sq_norms(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of each im2col column of a conv input, ``(groups, C/groups · k)``.

    No im2col matrix is built: the column of channel ``c`` at kernel offset ``o`` holds the
    (padded) input at a strided grid, so its squared norm is the sum of ``x²`` over that
    grid, read as a view. Memory: one copy of the input.
    """
    pad, mode = module._reversed_padding_repeated_twice, module.padding_mode
    xp = F.pad(x.double(), pad, "constant" if mode == "zeros" else mode).square()
    spatial = xp.shape[2:]
    k, s, d = module.kernel_size, module.stride, module.dilation
    outs = [(n - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i, n in enumerate(spatial)]
    sums = []
    for offset in torch.cartesian_prod(*[torch.arange(n) for n in k]).reshape(-1, len(k)):
        view = xp
        for i, o in enumerate(offset.tolist()):
            start = o * d[i]
            view = view.narrow(2 + i, start, s[i] * (outs[i] - 1) + 1)[
                (slice(None),) * (2 + i) + (slice(None, None, s[i]),)
            ]
        sums.append(view.sum(dim=[0, *range(2, xp.dim())]))
    per = torch.stack(sums, 1)  # (C, k): channel-major, offsets in weight order
    return per.reshape(_groups(module), -1)


def _accumulate(stats: LayerStats, module: nn.Module, x: torch.Tensor, gram: bool) -> None:
    g = _groups(module)
    if isinstance(module, nn.Linear):
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        stats.sq += rows.double().square().sum(0).reshape(1, -1)
        if gram:
            # float32 products (half the time of float64), summed per batch into float64.
            stats.gram += (rows.T @ rows).double().unsqueeze(0)
        stats.samples += rows.shape[0]
        return
    x = x.detach()
    if x.dim() == module.weight.dim() - 1:
        x = x.unsqueeze(0)  # an unbatched conv input
    stats.sq += im2col_sq_norms(module, x)
    if not gram:
        stats.samples += x.shape[0]
        return
    # im2col of one sample: g·d features × about as many positions as the input has.
    per_sample = g * stats.sq.shape[1] * max(x[0, 0].numel(), 1)
    step = max(1, _COLS // per_sample)
    for chunk in x.split(step):
        cols = _columns(module, chunk).float()  # (n, g·d, L)
        cols = cols.reshape(cols.shape[0], g, -1, cols.shape[2]).permute(1, 0, 3, 2)
        cols = cols.reshape(g, -1, cols.shape[-1])  # (g, n·L, d)
        stats.gram += (cols.transpose(1, 2) @ cols).double()
        stats.samples += cols.shape[1]


def _empty_stats(module: nn.Module, gram: bool) -> LayerStats:
    g = _groups(module)
    d = module.weight.shape[1] * (module.weight[0, 0].numel() if module.weight.dim() > 2 else 1)
    sq = torch.zeros(g, d, dtype=torch.float64)
    return LayerStats(sq, torch.zeros(g, d, d, dtype=torch.float64) if gram else None)


class _Reached(Exception):
    """Raised by the hook of the last layer wanted, to skip the rest of the forward pass."""


def _run(
    model: nn.Module, batches: list[tuple], arg: str, before: Callable[[], None] | None = None
) -> None:
    """Run every batch in eval mode; a model error names ``arg`` (and the batch)."""
    with eval_mode(model), torch.no_grad():
        for i, batch in enumerate(batches):
            if before is not None:
                before()
            try:
                run_forward(model, batch, arg if len(batches) == 1 else f"{arg}[{i}]")
            except ValueError as err:
                if not isinstance(err.__cause__, _Reached):
                    raise


def collect_stats(
    model: nn.Module,
    batches: list[tuple],
    modules: Mapping[str, nn.Module],
    *,
    gram: bool = False,
    stop_early: bool = False,
    arg: str = "example_inputs",
) -> ActivationStats:
    """Input statistics of ``modules`` (Linear / Conv1d / Conv2d) over all ``batches``.

    Args:
        model: The model to run (in eval mode, without gradients; flags restored).
        batches: From :func:`calibration_inputs`.
        modules: Layer name → layer; layers of other types are skipped.
        gram: Also accumulate the Gram matrix of the inputs.
        stop_early: Stop each forward pass once every layer was called (valid when each
            is called once per forward).
        arg: The argument named in errors.

    Returns:
        Statistics of the layers the forward passes called (others are missing).

    Raises:
        ValueError: The model failed on a batch (names ``arg`` and the input's shape).
    """
    wanted = {n: m for n, m in modules.items() if isinstance(m, SUPPORTED)}
    stats = ActivationStats(batches=len(batches))
    pending: set[str] = set()

    def hook(name: str, module: nn.Module):
        def record(mod: nn.Module, inputs: tuple, output: Any) -> None:
            if name not in stats.layers:
                stats.layers[name] = _empty_stats(module, gram)
            _accumulate(stats.layers[name], module, inputs[0], gram)
            pending.discard(name)
            if stop_early and not pending:
                raise _Reached

        return record

    handles = [m.register_forward_hook(hook(n, m)) for n, m in wanted.items()]
    try:
        _run(model, batches, arg, lambda: pending.update(wanted))
    finally:
        for h in handles:
            h.remove()
    return stats


def forward_order(
    model: nn.Module, batch: tuple, modules: Mapping[str, nn.Module], arg: str = "example_inputs"
) -> tuple[list[str], dict[str, int]]:
    """Names of ``modules`` in the order the forward pass first calls them, and call counts.

    Layers the forward pass never calls come last, in their given order (count 0).
    """
    calls: dict[str, int] = {}

    def hook(name: str):
        def record(mod: nn.Module, inputs: tuple, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        _run(model, [batch], arg)
    finally:
        for h in handles:
            h.remove()
    order = list(calls) + [n for n in modules if n not in calls]
    return order, {n: calls.get(n, 0) for n in modules}
