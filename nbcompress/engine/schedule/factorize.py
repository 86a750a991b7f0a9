"""``factorize_``: replace Linear and Conv2d layers by low-rank pairs where smaller and faster.

Each selected layer's weight is split by a truncated SVD (:mod:`.lowrank`). A layer is
replaced only where the pair has fewer parameters and, with an example input, runs faster
on the layer's own input from that example (a paired, interleaved race: warm-up, medians).
All replacements happen in one transaction, so ``undo_(model)`` puts the original module
objects back, bit-exactly.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.history import transaction
from nbcompress.engine.core.layers import select_layers
from nbcompress.engine.core.validation import (
    as_inputs,
    check_module,
    eval_mode,
    positive_int,
    primary_output,
    run_forward,
)
from nbcompress.engine.schedule.lowrank import (
    LowRankConv2d,
    LowRankLinear,
    check_energy,
    choose_rank,
    factor_layer,
    max_rank,
    singular_values,
)
from nbcompress.engine.schedule.lowrank_report import FactorizeReport, remember_report
from nbcompress.timing import race

__all__ = ["FactorizeReport", "LowRankConv2d", "LowRankLinear", "factorize_"]

#: Required gain before a pair counts as faster: below it, timing noise decides.
MARGIN = 0.05


def _check_rank(rank: Any) -> int | float:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Real):
        raise TypeError(
            f"rank: expected a positive int (e.g. 16) or a fraction of min(in, out) in "
            f"(0, 1) such as 0.25, got {type(rank).__name__} {rank!r}."
        )
    if isinstance(rank, numbers.Integral):
        if rank < 1:
            raise ValueError(f"rank: {rank} is below 1; pass a rank such as 16.")
        return int(rank)
    value = float(rank)
    if not 0 < value < 1:
        raise ValueError(
            f"rank: {rank!r} is not a fraction in (0, 1); pass an int (16) or a fraction "
            "of min(in, out) such as rank=0.25."
        )
    return value


def _rule(rank: Any, energy: Any) -> tuple[int | float | None, float | None, str]:
    if rank is not None and energy is not None:
        raise ValueError("rank / energy: give one of them, not both (e.g. energy=0.9).")
    if rank is not None:
        r = _check_rank(rank)
        return r, None, f"rank {r}"
    e = check_energy(0.9 if energy is None else energy)
    return None, e, f"energy {e:g}"


def _candidates(
    model: nn.Module, layers: Any, include_output: bool
) -> tuple[dict[str, nn.Module], str | None]:
    selected, excluded = select_layers(
        model, layers, (nn.Linear, nn.Conv2d), include_output=include_output
    )
    # The halves of an earlier factorisation are not factorised again.
    pairs = {n for n, m in model.named_modules() if isinstance(m, (LowRankLinear, LowRankConv2d))}
    kept = {n: m for n, m in selected.items() if n.rpartition(".")[0] not in pairs}
    if not kept:
        raise ValueError("layers: every selected layer is already factorised; undo_ it first.")
    return kept, excluded


def _check_full_rank(selected: dict[str, nn.Module], rank: int | float | None) -> None:
    if not isinstance(rank, int):
        return
    for name, layer in selected.items():
        if getattr(layer, "groups", 1) != 1:
            continue
        full = max_rank(layer)
        if rank >= full:
            raise ValueError(
                f"rank: {rank} is not below min(in, out) = {full} of layer {name!r}; the "
                f"maximum is {full - 1} (or select larger layers, or give a fraction such as 0.5)."
            )


@contextlib.contextmanager
def _layer_inputs(layers: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record each layer's first input tensor during the block (a copy)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def record(_m: nn.Module, args: tuple) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _row(name: str, layer: nn.Module, rank: int | None, full: int | None) -> dict[str, Any]:
    return {
        "layer": name,
        "type": type(layer).__name__,
        "rank": rank,
        "full rank": full,
        "params before": _params(layer),
        "params after": None,
        "MACs before": None,
        "MACs after": None,
        "time before": None,
        "time after": None,
        "output error": None,
        "result": "",
    }


def _macs(layer: nn.Module, y: torch.Tensor, rank: int) -> tuple[int, int]:
    """MACs of the dense layer and of the pair on one example (same output positions)."""
    w = layer.weight
    out, fan_in = w.shape[0], w[0].numel()
    positions = y.numel() // out
    return positions * out * fan_in, positions * rank * (fan_in + out)


@torch.inference_mode()
def _measure(
    row: dict[str, Any], layer: nn.Module, new: nn.Module, x: torch.Tensor, repeats: int
) -> None:
    """Fill in the row's MACs, output error and paired latencies on the layer input ``x``."""
    y, y_new = layer(x), new(x)
    row["MACs before"], row["MACs after"] = _macs(layer, y, new.rank)
    row["output error"] = float((y_new - y).norm() / y.norm().clamp_min(1e-30))
    result = race({"before": lambda: layer(x), "after": lambda: new(x)},
                  rounds=repeats, warmup=3, min_sample=2e-3)  # fmt: skip
    row["time before"] = result.times["before"].median
    row["time after"] = result.times["after"].median
    row["ratio"] = result.ratio("after")


def _plan(
    name: str, layer: nn.Module, rule: tuple, x: torch.Tensor | None, opts: dict[str, Any]
) -> tuple[dict[str, Any], nn.Module | None]:
    """Decide one layer: its report row and the replacement (``None`` if skipped)."""
    if getattr(layer, "groups", 1) != 1 or not name:
        row = _row(name or "(the model itself)", layer, None, None)
        row["result"] = (
            f"skipped: grouped conv (groups={layer.groups}) is not factorised"
            if name
            else "skipped: the model is the layer itself; wrap it in nn.Sequential to replace it"
        )
        return row, None
    sigma = singular_values(layer)
    rank = choose_rank(sigma, rank=rule[0], energy=rule[1])
    row = _row(name, layer, rank, len(sigma))
    new = factor_layer(layer, rank)
    row["params after"] = _params(new)
    if x is not None:
        _measure(row, layer, new, x, opts["repeats"])
    if row["params after"] >= row["params before"]:
        row["result"] = "skipped: not smaller at this rank"
    elif opts["example"] and x is None:
        row["result"] = "skipped: not run by the example input"
    elif opts["only_faster"] and row.pop("ratio") >= 1 - MARGIN:
        row["result"] = "skipped: not measured faster"
    else:
        row["result"] = "factorised"
    row.pop("ratio", None)
    return row, new if row["result"] == "factorised" else None


def _model_error(model: nn.Module, inputs: tuple, reference: torch.Tensor) -> float:
    """Relative error ‖y′ − y‖ / ‖y‖ of the model's output on the example after the change."""
    with eval_mode(model):
        out = primary_output(run_forward(model, inputs)).detach()
    return float(
        (out.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-30)
    )


def factorize_(
    model: nn.Module,
    *,
    rank: int | float | None = None,
    energy: float | None = None,
    layers: str | Sequence[str] | None = None,
    include_output: bool = False,
    example_inputs: Any = None,
    only_faster: bool = True,
    repeats: int = 15,
) -> nn.Module:
    """Replace Linear/Conv2d layers by truncated-SVD pairs where smaller (and faster), in place.

    A Linear ``W`` becomes ``Linear(in→r, no bias)`` then ``Linear(r→out)`` with the bias
    (:class:`LowRankLinear`); a k×k Conv2d (groups=1) becomes a k×k conv to ``r`` channels
    (same stride, padding, dilation) then a 1×1 conv with the bias (:class:`LowRankConv2d`).
    Grouped convs are skipped with the reason. Undo with ``undo_(model)`` (bit-exact, the
    original module objects come back). The report: :func:`factorize_report`.

    Args:
        model: The model, edited in place.
        rank: Rank to keep: an int, or a float in (0, 1) as a fraction of min(in, out).
        energy: Keep the smallest ``r`` whose singular values hold this fraction of the
            squared Frobenius norm, ``Σ_{i≤r} σᵢ² ≥ energy · Σ σᵢ²``; in (0, 1]. Default
            0.9 when neither ``rank`` nor ``energy`` is given.
        layers: Glob pattern(s) on layer names; ``None`` = every Linear and Conv2d.
        include_output: Also factorise the output layer (left alone by default).
        example_inputs: An input shaped like a real batch: each layer is timed and its
            output error measured on its own input from it. Required when ``only_faster``.
        only_faster: Replace only layers measured at least 5% faster (paired race).
        repeats: Timed rounds per layer.

    Returns:
        The model (the same object).

    Raises:
        ValueError: rank not below min(in, out), energy outside (0, 1], a pattern that
            matches nothing, ``only_faster`` without ``example_inputs``; model untouched.
        TypeError: ``model`` is not a module.
    """
    check_module(model)
    rule = _rule(rank, energy)
    if only_faster and example_inputs is None:
        raise ValueError(
            "example_inputs: needed to time each layer (only_faster=True); pass "
            "example_inputs=x shaped like a real batch, or only_faster=False."
        )
    repeats = positive_int(repeats, "repeats", "repeats=15")
    inputs = None if example_inputs is None else as_inputs(example_inputs)
    selected, excluded = _candidates(model, layers, include_output)
    _check_full_rank(selected, rule[0])
    seen: dict[str, torch.Tensor] = {}
    reference = None
    if inputs is not None:
        with eval_mode(model), _layer_inputs(selected) as seen:
            reference = primary_output(run_forward(model, inputs)).detach().clone()
    report = FactorizeReport(rule=rule[2], excluded_output=excluded)
    opts = {"repeats": repeats, "only_faster": only_faster, "example": inputs is not None}
    plans = []
    with eval_mode(model):
        for name, layer in selected.items():
            row, new = _plan(name, layer, rule, seen.get(name), opts)
            report.rows.append(row)
            plans.append((name, new))
    chosen = [(n, m) for n, m in plans if m is not None]
    if chosen:
        with transaction(model, "factorize", f"{report.rule}: {len(chosen)} layers") as tx:
            for name, new in chosen:
                tx.replace(name, new)
            tx.info["report"] = report
            if reference is not None:
                report.output_error = _model_error(model, inputs, reference)
    remember_report(model, report)
    return model
