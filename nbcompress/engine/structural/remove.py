"""``remove_``: physically remove channels, neurons and heads — one undoable step.

The coupled groups come from Torch-Pruning's dependency graph, built in a bounded child
process (:mod:`~nbcompress.engine.structural.graph`); the plan is applied in the parent
inside one transaction, the forward is re-checked on the example input, and anything that
fails rolls the model back bit-exactly.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.costs import macs
from nbcompress.engine.core.history import Transaction, transaction
from nbcompress.engine.core.validation import (
    as_inputs,
    call_model,
    check_amount,
    check_module,
    eval_mode,
    run_forward,
)
from nbcompress.engine.structural.apply import apply_plan, plan_modules
from nbcompress.engine.structural.child import check_bounds
from nbcompress.engine.structural.graph import channel_groups
from nbcompress.engine.structural.modes import tensor_shapes, traceless, training_flags
from nbcompress.engine.structural.plan import Plan, removal_plan

__all__ = ["remove_"]

REBUILD = (
    "parameters are new objects: rebuild any optimizer created before (e.g. "
    "torch.optim.SGD(model.parameters(), ...))"
)


def _check_amount(amount: Any) -> float | dict[str, float]:
    if isinstance(amount, Mapping):
        if not amount or not all(isinstance(k, str) for k in amount):
            raise ValueError(
                "amount: a dict must map root layer names or globs to fractions, e.g. "
                "{'layer3.*': 0.5}."
            )
        return {k: check_amount(v, f"amount[{k!r}]") for k, v in amount.items()}
    return check_amount(amount)


def _check_round_to(round_to: Any) -> int | None:
    if round_to is None:
        return None
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(
            f"round_to: expected a positive integer such as 8 (channel counts kept as its "
            f"multiples), got {round_to!r}."
        )
    return round_to


_REPLACED = {
    "nbcompress.engine.quantize.": "quantized (quantize_)",
    "torch.ao.nn.quantized": "quantized",
    "torch.nn.quantized": "quantized",
    "nbcompress.kernels.": "replaced by a sparse kernel layer",
}


def _check_plain(model: nn.Module) -> None:
    """Refuse models whose weights are parametrized (kept pruning masks, weight norm).

    Quantized and sparse replacements of a layer have no Torch-Pruning pruner either: the
    graph would see no layer there and silently remove nothing.
    """
    for name, module in model.named_modules():
        kind = type(module).__module__ + "."
        what = next((v for k, v in _REPLACED.items() if kind.startswith(k)), None)
        if what is not None:
            raise ValueError(
                f"model: {name or 'the model'} ({type(module).__name__}) is {what}; structural "
                "removal needs the dense layers, so remove channels first and quantize or "
                "sparsify afterwards (undo it first with undo_(model) / %undo model)."
            )
        params = dict(module.named_parameters(recurse=False))
        if hasattr(module, "parametrizations") or any(n.endswith("_orig") for n in params):
            raise ValueError(
                f"model: {name or 'the model'} has kept pruning masks or parametrized weights, "
                "which removal cannot shrink; make them permanent first with "
                "remove_masks_(model) (%prune --remove-masks)."
            )


def _forward_costs(model: nn.Module, inputs: tuple, check: bool = False) -> tuple[Any, int]:
    """Run the model once in eval mode; return its output and estimated MACs.

    Eval mode, so that BatchNorm statistics are not updated; with ``check`` a failure is
    the example input's fault and becomes one line naming ``example_inputs``.
    """
    total = [0]

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        total[0] += macs(module, args, output) or 0

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with eval_mode(model), torch.no_grad():
            out = run_forward(model, inputs) if check else call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return out, total[0]


def _first(out: Any) -> torch.Tensor | None:
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    if isinstance(out, Mapping):
        out = next((v for v in out.values() if isinstance(v, torch.Tensor)), None)
    return out if isinstance(out, torch.Tensor) else None


def _channels(groups: list, plan: Plan) -> str:
    """``"N of M channels in K groups"`` for the channel plan (empty if none ran)."""
    prunable = [g for g in groups if g.reason is None]
    removed = [len(plan.get((g.root, "out"), ())) for g in prunable]
    if not any(removed):
        return ""
    total = sum(g.width for g in prunable)
    touched = sum(1 for n in removed if n)
    return f"{sum(removed):,} of {total:,} channels removed in {touched} group(s), "


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _fold(model: nn.Module, plan: Plan, example_inputs: Any, tx: Transaction) -> list[str]:
    """Fold constants carried by removed channels into the next bias (when available)."""
    from nbcompress.engine.structural.consumers import find_consumers
    from nbcompress.engine.structural.fold import fold_constants

    for consumer in find_consumers(model, plan):
        tx.save(consumer.module)  # before eval_mode: the snapshot keeps the training flag
    with eval_mode(model):  # measured as the model is used; BatchNorm statistics untouched
        return fold_constants(model, plan, example_inputs, tx)


def _attention(model: nn.Module, tx: Transaction, options: dict[str, Any]) -> list[str]:
    """Remove attention heads / FFN neurons (``heads=`` / ``ffn=``)."""
    if options["heads"] is None and options["ffn"] is None:
        return []
    from nbcompress.engine.structural.attention import apply_attention, attention_plan

    plan = attention_plan(model, **options)
    return apply_attention(model, plan, tx)


def _train_reference(model: nn.Module, inputs: tuple) -> tuple[dict, list] | None:
    """The training forward's flags and output shapes, if it runs (leaving no trace).

    ``None`` when it fails on the example input even before removal (BatchNorm on one
    value per channel): then only the eval forward can be checked.
    """
    flags = training_flags(model)
    try:
        with traceless(model, flags):
            return flags, tensor_shapes(call_model(model, inputs))
    except Exception:  # noqa: BLE001 - not checkable on this input
        return None


def _fails(err: Exception, mode: str, fix: str) -> ValueError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return ValueError(
        f"model: the forward{mode} fails after removal ({type(err).__name__}: "
        f"{first[:200]}); {fix}."
    )


def _verify(model: nn.Module, inputs: tuple, ref: torch.Tensor | None, train: Any) -> int:
    """Re-run the forward after removal; raise one line if it fails or the output changed.

    Also in training mode (``train`` from :func:`_train_reference`): a branch that only runs
    there (an auxiliary classifier) must still fit. That forward leaves no trace.
    """
    fix = "the model was rolled back. Leave the failing part out with ignore= or layers="
    try:
        out, total = _forward_costs(model, inputs)
    except Exception as err:  # noqa: BLE001 - any failure of the user's forward
        raise _fails(err, "", fix) from err
    new = _first(out)
    if ref is not None and (new is None or new.shape != ref.shape):
        shape = None if new is None else tuple(new.shape)
        raise ValueError(
            f"model: the output shape changed after removal ({tuple(ref.shape)} -> {shape}); {fix}."
        )
    if new is not None and new.is_floating_point() and not bool(torch.isfinite(new).all()):
        raise ValueError(f"model: the output is not finite after removal; {fix}.")
    if train is not None:
        flags, shapes = train
        try:
            with traceless(model, flags):
                now = tensor_shapes(call_model(model, inputs))
        except Exception as err:  # noqa: BLE001 - any failure of the user's forward
            raise _fails(err, " in training mode", fix) from err
        if now != shapes:
            raise ValueError(
                f"model: the output shapes in training mode changed after removal ({shapes} "
                f"-> {now}); {fix}."
            )
    return total


def _check_ties(model: nn.Module, plan: Plan) -> None:
    """Refuse a plan that would shrink one side of a tied parameter (and so untie it)."""
    touched = set(plan_modules(plan))
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for names in owners.values():
        modules = [n.rpartition(".")[0] for n in names]
        if len(names) > 1 and touched & set(modules):
            shown = " and ".join(names)
            ignore = [m or "(model)" for m in dict.fromkeys(modules)]
            raise ValueError(
                f"model: {shown} are one tied parameter, which removal would untie (and grow "
                f"the model); leave them out with ignore={ignore}."
            )


def _nothing(groups: list, amount: Any, round_to: int | None) -> ValueError:
    reasons = sorted({g.reason for g in groups if g.reason})
    why = f" ({'; '.join(reasons[:3])})" if reasons else ""
    if round_to and removal_plan(groups, amount, None):
        widths = sorted({g.width for g in groups if g.reason is None})
        return ValueError(
            f"round_to: {round_to} leaves no channel to remove at amount={amount!r} (groups of "
            f"{', '.join(map(str, widths[:6]))} channels cannot keep a multiple of {round_to}); "
            "lower round_to (or drop it)."
        )
    return ValueError(
        f"amount: {amount!r} removes no channel — every group is too small for it or not "
        f"prunable{why}. Raise amount, lower round_to, or check layers=/ignore=."
    )


def _unmatched(groups: list, amount: Mapping[str, float]) -> None:
    roots = [g.root for g in groups]
    for pattern in amount:
        if not any(r == pattern or fnmatch.fnmatchcase(r, pattern) for r in roots):
            shown = ", ".join(roots[:20])
            raise ValueError(f"amount: key {pattern!r} matches no group root. Roots: {shown}.")


def remove_(
    model: nn.Module,
    amount: float | Mapping[str, float],
    *,
    example_inputs: Any = None,
    importance: str = "l1",
    round_to: int | None = None,
    layers: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
    heads: float | None = None,
    ffn: float | None = None,
    include_output: bool = False,
    timeout: float = 120.0,
    memory: int = 4 << 30,
) -> nn.Module:
    """Physically remove the least important channels / neurons: a smaller dense model.

    Every dimension coupled to a removed channel goes with it (the next layer's inputs,
    BatchNorm/LayerNorm, residual additions, concatenations, grouped and depthwise convs,
    flatten into Linear), so the model still runs and its output shape is unchanged. The
    output layer's outputs are kept. One undoable history step ``"remove"``; the step's
    detail gives channels, parameters and MACs before → after. Parameters are new objects
    afterwards: an optimizer created before must be rebuilt.

    Args:
        model: The model, changed in place.
        amount: Fraction of each coupled group's channels to remove (e.g. ``0.3``), or a
            dict of root layer name/glob → fraction. ``0`` with ``heads``/``ffn`` removes
            only those.
        example_inputs: One batch the model runs on (``--input x``); required.
        importance: ``"l1"`` (group-aware L1) or ``"wanda"`` (|W| · ‖X‖ on the input).
        round_to: Keep channel counts that are multiples of this (e.g. 8).
        layers: Glob pattern(s) of the root layers that may lose channels.
        ignore: Glob pattern(s) of modules never touched.
        heads: Fraction of attention heads to remove per attention layer.
        ffn: Fraction of FFN hidden neurons to remove per transformer block.
        include_output: Also let the output layer(s) lose output channels; the output
            shape must still be unchanged, else the step is rolled back.
        timeout: Seconds the dependency-graph build may take (in a child process).
        memory: Bytes of extra memory it may use.

    Returns:
        The model.

    Raises:
        TypeError: ``timeout`` or ``memory`` is not a number.
        ValueError: Bad input, quantized or sparse layers (remove first), a plan that
            would untie a tied parameter, a graph that cannot be built, or a model that no
            longer runs after removal — in eval mode or in training mode (its own flags,
            or ``model.train()`` for a model in eval mode; that check leaves no trace) —
            one line; the model is left exactly as it was.
    """
    check_module(model)
    check_bounds(timeout, memory)
    inputs = as_inputs(example_inputs)
    amount = _check_amount(amount)
    round_to = _check_round_to(round_to)
    for arg, value in (("heads", heads), ("ffn", ffn)):
        if value is not None:
            check_amount(value, arg)
    if not amount and heads is None and ffn is None:
        raise ValueError("amount: 0 removes nothing; pass a fraction such as 0.3 (or heads=/ffn=).")
    _check_plain(model)
    ref, macs0 = _forward_costs_checked(model, inputs)
    train = _train_reference(model, inputs)
    plan: Plan = {}
    groups: list = []
    if amount:
        groups = channel_groups(
            model,
            inputs,
            layers=layers,
            ignore=ignore,
            include_output=include_output,
            importance=importance,
            timeout=timeout,
            memory=memory,
        )
        if isinstance(amount, Mapping):
            _unmatched(groups, amount)
        plan = removal_plan(groups, amount, round_to)
        if not plan and heads is None and ffn is None:
            raise _nothing(groups, amount, round_to)
        _check_ties(model, plan)
    # Heads and FFN neurons are scored by L1 whatever ranks the channels (wanda needs a
    # per-channel input norm that a head does not have).
    attention = {"heads": heads, "ffn": ffn, "importance": "l1", "layers": layers}
    if round_to is not None:
        attention["round_to"] = round_to
    before = (_params(model), macs0)
    with transaction(model, "remove") as tx:
        notes = _fold(model, plan, example_inputs, tx) if plan else []
        notes += apply_plan(model, plan, tx) if plan else []
        notes += _attention(model, tx, attention)
        macs1 = _verify(model, inputs, ref, train)
        after = (_params(model), macs1)
        tx.step.detail = _channels(groups, plan) + _detail(before, after)
        tx.info.update(plan=plan, notes=[*notes, REBUILD], before=before, after=after)
    return model


def _forward_costs_checked(model: nn.Module, inputs: tuple) -> tuple[torch.Tensor | None, int]:
    """The reference forward: a failure here is the example input's fault (one line)."""
    out, total = _forward_costs(model, inputs, check=True)
    return _first(out), total


def _detail(before: tuple[int, int], after: tuple[int, int]) -> str:
    (p0, m0), (p1, m1) = before, after
    mac = f", MACs {m0:,} → {m1:,} (est.)" if m0 else ""
    return f"params {p0:,} → {p1:,}{mac}; {REBUILD}"
