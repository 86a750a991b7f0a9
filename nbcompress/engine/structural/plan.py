"""What structural removal removes: coupled channel groups, and a plan in original coordinates.

A :class:`Group` is one coupled set of tensor dimensions (a conv's output channels, the
BatchNorm after it, the inputs of every consumer, residual partners, concatenation slices,
a flatten into a Linear): removing root channel ``i`` removes, in every item, the indices
mapped from ``i``. Groups are computed once (in a bounded child process, see
:mod:`nbcompress.engine.structural.graph`) with full indices in the model's original
coordinates, so a :data:`Plan` is order-independent: every ``(module, handler)`` is shrunk
once, with the union of its indices over the groups that reach it.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Cut", "Group", "GroupItem", "Plan", "amount_for", "plan_channels", "removal_plan"]


@dataclass(frozen=True)
class Cut:
    """One tensor dimension of one module to shrink.

    Attributes:
        module: Qualified module name in the model (``""`` = the model itself).
        handler: ``"out"``, ``"in"``, ``"depthwise_out"`` (a depthwise conv: in, out and
            groups shrink together) or ``"param:<attr>:<dim>"`` (a bare parameter of the
            module, e.g. ViT's ``class_token`` along dim 2).
        idxs: Indices to remove, in the original (unpruned) coordinates of that dimension.
    """

    module: str
    handler: str
    idxs: tuple[int, ...]


@dataclass(frozen=True)
class GroupItem:
    """One member of a coupled group, with all its indices and the root channel of each.

    Attributes:
        module: Qualified module name.
        handler: As :attr:`Cut.handler`.
        idxs: Every index of this dimension that the group couples (original coordinates).
        root_idxs: For each entry of ``idxs``, the root channel it follows (a flatten into a
            Linear maps one root channel to many inputs; a concatenation offsets them).
    """

    module: str
    handler: str
    idxs: tuple[int, ...]
    root_idxs: tuple[int, ...]


@dataclass(frozen=True)
class Group:
    """A coupled set of dimensions, rooted at the output channels of a Conv/Linear.

    Attributes:
        root: Qualified name of the root layer.
        width: Number of root channels.
        items: Every coupled dimension (the root's own ``"out"`` item included).
        scores: Importance per root channel (group-aware L1 by default); low = removed first.
        step: Channels are removed in multiples of this (attention heads, channel groups).
        reason: Why the group is not prunable (``None`` = prunable).
        blocks: The root channels form this many equal blocks that must keep equal widths
            (grouped convolutions, GroupNorm): the same positions are removed in each block.
    """

    root: str
    width: int
    items: tuple[GroupItem, ...]
    scores: tuple[float, ...]
    step: int = 1
    reason: str | None = None
    blocks: int = 1

    @property
    def modules(self) -> tuple[str, ...]:
        """Names of the modules the group touches, in order, without repeats."""
        return tuple(dict.fromkeys(item.module for item in self.items))


#: ``(module, handler)`` → original indices to remove.
Plan = dict[tuple[str, str], frozenset[int]]


def amount_for(root: str, amount: float | Mapping[str, float]) -> float:
    """The fraction asked for the group rooted at ``root`` (the first matching glob wins)."""
    if not isinstance(amount, Mapping):
        return float(amount)
    for pattern, value in amount.items():
        if pattern == root or fnmatch.fnmatchcase(root, pattern):
            return float(value)
    return 0.0


def _count(width: int, amount: float, unit: int, round_to: int | None, limit: int) -> int:
    """How many root channels to remove: about ``amount``, a multiple of ``unit``, ≤ ``limit``.

    With ``round_to`` the remaining width is rounded down to a multiple of it (as
    Torch-Pruning does: a little more is removed); never every channel.
    """
    r = round_to or 1
    target = int(amount * width)
    if target <= 0:
        return 0
    limit = min(limit, width - 1)
    for n in range(target, limit + 1):
        if n % unit == 0 and (width - n) % r == 0:
            return n
    for n in range(min(target, limit + 1) - 1, 0, -1):
        if n % unit == 0 and (width - n) % r == 0:
            return n
    return 0


def _valid_positions(group: Group, order: list[int], size: int, blocks: int) -> list[int]:
    """``order`` without the positions that would empty some item's dimension.

    A concatenation consumer or a small branch may hold only a few of the root channels:
    removing all of them would leave a layer with zero channels.
    """
    counts = []
    for item in group.items:
        per_root: dict[int, int] = {}
        for r in item.root_idxs:
            per_root[r] = per_root.get(r, 0) + 1
        counts.append((per_root, len(item.idxs)))
    removed = [0] * len(counts)
    kept = []
    for p in order:
        roots = [b * size + p for b in range(blocks)]
        add = [sum(per_root.get(r, 0) for r in roots) for per_root, _ in counts]
        if any(removed[i] + a >= total for i, (a, (_, total)) in enumerate(zip(add, counts))):
            continue
        removed = [x + a for x, a in zip(removed, add)]
        kept.append(p)
    return kept


def _segments(group: Group) -> list[list[int]] | None:
    """The root channels split by concatenated producers (each rounded on its own)."""
    parts = {
        tuple(sorted(set(item.root_idxs)))
        for item in group.items
        if item.handler == "out" and len(set(item.root_idxs)) < group.width
    }
    covered = sorted(r for part in parts for r in part)
    if len(parts) < 2 or covered != list(range(group.width)):
        return None
    return [list(part) for part in sorted(parts)]


def plan_channels(group: Group, amount: float, round_to: int | None = None) -> tuple[int, ...]:
    """The root channels of ``group`` to remove for ``amount`` (lowest scores first).

    The count is about ``amount`` of the width, a multiple of the group's step, leaving a
    multiple of ``round_to``; no member of the group loses every one of its channels.
    """
    if group.reason is not None or amount <= 0:
        return ()
    blocks = group.blocks if group.width % group.blocks == 0 else 1
    size = group.width // blocks
    # Positions within a block are scored by their mean over the blocks.
    per_pos = [sum(group.scores[b * size + p] for b in range(blocks)) / blocks for p in range(size)]
    order = sorted(range(size), key=lambda p: (per_pos[p], p))
    valid = _valid_positions(group, order, size, blocks)
    segments = _segments(group) if round_to and blocks == 1 and group.step == 1 else None
    if segments:
        # A concatenation: each producer keeps a multiple of round_to channels.
        chosen = []
        for part in segments:
            mine = [p for p in valid if p in set(part)]
            chosen += mine[: _count(len(part), amount, 1, round_to, len(mine))]
        return tuple(sorted(chosen))
    unit = math.lcm(group.step, blocks)
    n = _count(group.width, amount, unit, round_to, len(valid) * blocks)
    chosen = valid[: n // blocks]
    return tuple(sorted(b * size + p for b in range(blocks) for p in chosen))


def _check_amounts(amount: float | Mapping[str, float]) -> None:
    values = amount.values() if isinstance(amount, Mapping) else [amount]
    for value in values:
        bad = isinstance(value, bool) or not isinstance(value, numbers.Real)
        if bad or not 0 <= float(value) < 1:
            raise ValueError(
                f"amount: {value!r} is not a fraction in [0, 1); it is the share of each "
                "group's channels to remove, e.g. 0.3 (1.0 would remove every channel)."
            )


def removal_plan(
    groups: Sequence[Group],
    amount: float | Mapping[str, float],
    round_to: int | None = None,
) -> Plan:
    """Choose the channels to remove in every prunable group and merge them into one plan.

    Args:
        groups: Groups from :func:`~nbcompress.engine.structural.graph.channel_groups`.
        amount: Fraction of each group's root channels to remove, or a mapping from root
            name (or glob) to fraction; roots matched by no key keep their channels.
        round_to: Keep channel counts that are multiples of this (fast on real kernels).

    Returns:
        ``(module, handler)`` → original indices to remove (union over the groups).
    """
    _check_amounts(amount)
    if round_to is not None and (
        isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1
    ):
        raise ValueError(f"round_to: expected a positive integer such as 8, got {round_to!r}.")
    merged: dict[tuple[str, str], set[int]] = {}
    for group in groups:
        chosen = set(plan_channels(group, amount_for(group.root, amount), round_to))
        if not chosen:
            continue
        for item in group.items:
            idxs = {i for i, r in zip(item.idxs, item.root_idxs) if r in chosen}
            merged.setdefault((item.module, item.handler), set()).update(idxs)
    return {key: frozenset(v) for key, v in merged.items() if v}
