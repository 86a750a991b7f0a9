"""Exact removal: fold the constants that removed channels still carry into the next bias.

A channel whose weights were zeroed is not silent: a BatchNorm after it still emits its
shift (measured on EfficientNet-Lite0: constants up to |7.07|, 9 of 16 still non-zero after
ReLU6), so cutting it out of the next layer changes the output. Where the value reaching the
next layer (the *consumer*) is constant over the example inputs, its contribution
``W[:, c] * const`` is moved into the consumer's bias before the channel is removed, which is
exact for a ``Linear`` and for a convolution that never reads padding zeros. Everywhere else
the change that removal causes is measured (one extra forward per case) and reported.

Values are measured in the model's current mode (in training mode a BatchNorm uses batch
statistics: a zeroed channel then carries exactly its shift). Running statistics the forwards
update, the random number generators and the training flags are left as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.history import Transaction
from nbcompress.engine.core.outputs import compare_outputs
from nbcompress.engine.core.validation import as_inputs, run_forward
from nbcompress.engine.structural.consumers import (
    Consumer,
    channel_dim,
    classify,
    find_consumers,
    first_tensor,
    recorder,
)
from nbcompress.engine.structural.modes import traceless
from nbcompress.engine.structural.plan import Plan

__all__ = ["fold_constants"]

_MAX_MEASURED = 8  # consumers measured one by one; the rest share one measurement
_SEED = 0x5EED  # the same dropout masks in every measuring forward


@contextlib.contextmanager
def _hooked(pairs: list[tuple[nn.Module, Any]], *, post: bool = False) -> Iterator[None]:
    handles = [
        m.register_forward_hook(h) if post else m.register_forward_pre_hook(h, with_kwargs=True)
        for m, h in pairs
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _zeroer(module: nn.Module, channels: list[int]) -> Any:
    """``(module, pre-hook)`` zeroing ``channels`` of its input: their removal, for conv/linear.

    Attention reads its channels from query, key and value: all three are zeroed.
    """
    count = 3 if isinstance(module, nn.MultiheadAttention) else 1

    def zero(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        first = first_tensor(args, kwargs)
        if first is None:
            return args, kwargs
        idx = torch.tensor(channels, device=first.device)
        dim = channel_dim(mod, first)
        done: dict[int, torch.Tensor] = {}  # self-attention passes one tensor three times

        def zeroed(value: Any) -> Any:
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                return value
            if id(value) not in done:
                done[id(value)] = value.index_fill(dim, idx, 0.0)
            return done[id(value)]

        names = ("query", "key", "value", "input")
        args = (*(zeroed(a) for a in args[:count]), *args[count:])
        kwargs = {k: zeroed(v) if k in names else v for k, v in kwargs.items()}
        return args, kwargs

    return module, zero


def _renormer(c: Consumer) -> Any:
    """``(module, post-hook)`` normalising over the kept channels only, as after removal."""
    removed = set(c.idxs)
    keep = [i for i in range(c.module.normalized_shape[0]) if i not in removed]

    def renorm(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        k = torch.tensor(keep, device=output.device)
        xs = args[0].index_select(-1, k)
        w = None if mod.weight is None else mod.weight.index_select(0, k)
        if isinstance(mod, nn.LayerNorm):
            b = None if mod.bias is None else mod.bias.index_select(0, k)
            y = nn.functional.layer_norm(xs, (len(keep),), w, b, mod.eps)
        else:
            y = nn.functional.rms_norm(xs, (len(keep),), w, mod.eps)
        return output.index_copy(-1, k, y)

    return c.module, renorm


def _run(model: nn.Module, inputs: tuple) -> Any:
    torch.manual_seed(_SEED)  # same dropout masks as the reference run
    return run_forward(model, inputs)


def _delta(model: nn.Module, inputs: tuple, ref: Any, hooks: list, post: bool = False) -> float:
    """Max |Δ| of the output with ``hooks`` on (``nan`` if that forward fails: a report only)."""
    try:
        with _hooked(hooks, post=post):
            return compare_outputs(ref, _run(model, inputs)).max_abs
    except Exception:  # noqa: BLE001 - the measurement is a note; removal is checked later
        return float("nan")


def _names(consumers: list[Consumer]) -> str:
    shown = ", ".join(c.name for c in consumers[:3])
    return shown + (f" +{len(consumers) - 3} more" if len(consumers) > 3 else "")


def _stuck_notes(model: nn.Module, inputs: tuple, ref: Any, stuck: list[Consumer]) -> list[str]:
    notes = []
    for c in stuck[:_MAX_MEASURED]:
        peak = max(abs(float(c.total[c.idxs.index(i)]) / c.count) for i in c.stuck)
        delta = _delta(model, inputs, ref, [_zeroer(c.module, c.stuck)])
        notes.append(
            f"{c.name}: {len(c.stuck)} removed input channel(s) carry a constant (up to "
            f"|{peak:.3g}|) that cannot be folded into its bias exactly because {c.why}; "
            f"removing them changes the model output by max |Δ| {delta:.3g}."
        )
    rest = stuck[_MAX_MEASURED:]
    if rest:
        delta = _delta(model, inputs, ref, [_zeroer(c.module, c.stuck) for c in rest])
        notes.append(
            f"{_names(rest)}: removed input channels carry constants that cannot be folded "
            f"exactly (padding, transposed convs); removing them changes the output by max "
            f"|Δ| {delta:.3g} together."
        )
    return notes


def _varying_note(model: nn.Module, inputs: tuple, ref: Any, cons: list[Consumer]) -> str:
    n = sum(len(c.varying) for c in cons)
    delta = _delta(model, inputs, ref, [_zeroer(c.module, c.varying) for c in cons])
    single = [c for c in cons if c.count == 1]
    why = (
        f" ({_names(single)} saw one value per channel, too few to tell a constant: pass a "
        "batch of at least 2 examples)"
        if single
        else ""
    )
    return (
        f"{n} removed channel(s) feeding {_names(cons)} carry a varying signal{why}; removing "
        f"them changes the model output by max |Δ| {delta:.3g} on the example inputs "
        "(the pruning itself: fine-tune to recover)."
    )


def _notes(model: nn.Module, inputs: tuple, ref: Any, consumers: list[Consumer]) -> list[str]:
    """One line per case that removal cannot keep exact, with the measured output change."""
    notes = _stuck_notes(model, inputs, ref, [c for c in consumers if c.stuck])
    varying = [c for c in consumers if c.varying]
    if varying:
        notes.append(_varying_note(model, inputs, ref, varying))
    norms = [c for c in consumers if c.kind == "norm"]
    if norms:
        delta = _delta(model, inputs, ref, [_renormer(c) for c in norms], post=True)
        notes.append(
            f"{_names(norms)}: {len(norms)} normalisation layer(s) now normalise over the kept "
            f"channels only (not foldable): the model output changes by max |Δ| {delta:.3g}."
        )
    other = [c for c in consumers if c.kind == "other"]
    if other:
        kinds = sorted({type(c.module).__name__ for c in other})
        notes.append(
            f"{_names(other)}: removed input channels of {'/'.join(kinds)} are not checked "
            "for constants (only Linear, Conv and LayerNorm are); their effect is not measured."
        )
    unseen = [c for c in consumers if c.kind in ("fold", "zero") and c.count == 0]
    if unseen:
        notes.append(
            f"{_names(unseen)}: not run by the example inputs, so constants in their removed "
            "input channels could not be measured or folded."
        )
    return notes


def _bias_delta(module: nn.Module, fold: dict[int, float]) -> torch.Tensor:
    """``W[:, c] · const`` summed over the folded channels (conv: over the kernel, per group)."""
    weight = module.weight.detach().double()
    idx = torch.tensor(list(fold), device=weight.device)
    values = torch.tensor(list(fold.values()), dtype=torch.float64, device=weight.device)
    if isinstance(module, nn.Linear):
        return weight.index_select(1, idx) @ values
    per_in = module.in_channels // module.groups
    per_out = module.out_channels // module.groups
    summed = weight.flatten(2).sum(2)  # (out, in/groups): a constant input sees all taps
    delta = torch.zeros(module.out_channels, dtype=torch.float64, device=weight.device)
    for channel, value in fold.items():
        group, local = divmod(channel, per_in)
        rows = slice(group * per_out, (group + 1) * per_out)
        delta[rows] += summed[rows, local] * value
    return delta


def _fold(consumers: list[Consumer], tx: Transaction) -> list[str]:
    """Add each folded constant's contribution to its consumer's bias (saved first)."""
    folded = [c for c in consumers if c.fold]
    created = []
    for c in folded:
        delta = _bias_delta(c.module, c.fold)
        tx.save(c.module)
        weight = c.module.weight
        with torch.no_grad():
            if c.module.bias is None:
                bias = delta.to(dtype=weight.dtype)
                c.module.bias = nn.Parameter(bias, requires_grad=weight.requires_grad)
                created.append(c.name)
            else:
                bias = c.module.bias
                bias.copy_((bias.detach().double() + delta).to(bias.dtype))
    if not folded:
        return []
    n = sum(len(c.fold) for c in folded)
    made = f" (created a bias for {', '.join(created)})" if created else ""
    return [
        f"folded the constant values of {n} removed channel(s) into the bias of "
        f"{_names(folded)}{made}, so that removing them leaves the output unchanged."
    ]


def fold_constants(model: nn.Module, plan: Plan, example_inputs: Any, tx: Transaction) -> list[str]:
    """Fold what removed channels still carry into the next layer's bias, before removal.

    For every module whose input channels the plan cuts, the values of those channels at
    its input are measured over ``example_inputs`` (forward pre-hooks, no gradients, the
    model in its current mode). A channel is constant when its spread over the batch and
    the positions is within ``1e-5`` of the input's peak (and at least two values were
    seen). Its contribution is added to the consumer's bias (a zero bias is created where
    there is none) when that is exact: a ``Linear``, or a convolution that reads no padding
    zeros (no padding, or reflect/replicate/circular padding; groups respected). Where it is
    not exact — a zero-padded k×k conv, attention's input projections, LayerNorm (its
    statistics change), a channel that varies — nothing is folded and a one-line note gives
    the measured max |Δ| of the model output that removing those channels causes (by zeroing
    them at the consumer, which equals their removal for a conv or linear; for LayerNorm by
    normalising over the kept channels). Other consumer types are named, not measured.

    Other cuts are not consumers: an output cut removes what the next layer's input cut
    measures, per-channel layers (BatchNorm, PReLU) touch no kept channel, a depthwise
    conv's removed inputs feed only its removed outputs (measured downstream), and
    ``param:`` cuts (ViT's class token) are not read by a layer's weights. The forwards
    leave running statistics, training flags and random number generators as they were.

    Args:
        model: The model, not yet shrunk (the plan uses its original coordinates).
        plan: ``(module name, handler) -> original indices to remove``.
        example_inputs: A tensor, tuple or dict of tensors, as for the model's forward.
        tx: The open transaction of the removal; every module is saved before it changes.

    Returns:
        One line per fold done and per case that removal does not keep exact.
    """
    consumers = find_consumers(model, plan)
    if not consumers:
        return []
    inputs = as_inputs(example_inputs)
    watched = [c for c in consumers if c.kind in ("fold", "zero")]
    with traceless(model):
        with _hooked([(c.module, recorder(c)) for c in watched]):
            reference = _run(model, inputs)
        for c in watched:
            classify(c, plan)
        notes = _notes(model, inputs, reference, consumers)
    return _fold(consumers, tx) + notes
