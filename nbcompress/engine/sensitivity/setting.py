"""What a setting of per-layer ratios would do to the model: footprint and proxy metric.

A *setting* is one pruning ratio per explored layer; the explorer widget shows these figures
for its sliders, and applying a setting is :func:`~nbcompress.engine.prune.prune.prune_ratios_`.
The cost figures come from really pruning each layer inside
:func:`~nbcompress.engine.core.history.trial` (always rolled back) and measuring it with
:func:`~nbcompress.engine.core.costs.layer_bytes`, so the readouts use exactly the engine's
pruning rule (existing zeros count, channel granularity zeroes biases). Layer
pruning is independent per layer, so results are cached per ``(layer, ratio)`` and a slider
move only re-measures the layer that moved.

A sweep's predictions hold for the model it measured; :class:`SweepCheck` says whether the
live model is still that one, and if not why (a step recorded or undone since, a layer whose
sparsity differs from the sweep's ``start``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nbcompress.engine.core.costs import layer_bytes
from nbcompress.engine.core.history import history_token, steps_since, trial
from nbcompress.engine.core.layers import MULTI_WEIGHT_TYPES, prunable_weights
from nbcompress.engine.core.report import fmt_pct
from nbcompress.engine.prune.prune import prune_ratios_
from nbcompress.engine.sensitivity.evaluate import layer_sparsity, measurer, weight_sparsity

if TYPE_CHECKING:
    from nbcompress.engine.sensitivity.result import SensitivityResult

__all__ = [
    "Footprint",
    "SettingCosts",
    "SweepCheck",
    "layer_footprint",
    "model_footprint",
    "proxy_metric",
]


@dataclass(frozen=True)
class Footprint:
    """Parameter counts and estimated storage of a model (or of one layer).

    Attributes:
        nonzero: Parameters that are not zero.
        total: All parameters.
        dense: Bytes stored dense as fp32 (estimate).
        csr: Bytes with weight matrices stored as CSR (estimate, see ``layer_bytes``).
    """

    nonzero: int
    total: int
    dense: int
    csr: int

    def __add__(self, other: Footprint) -> Footprint:
        return Footprint(
            self.nonzero + other.nonzero,
            self.total + other.total,
            self.dense + other.dense,
            self.csr + other.csr,
        )

    def __sub__(self, other: Footprint) -> Footprint:
        return Footprint(
            self.nonzero - other.nonzero,
            self.total - other.total,
            self.dense - other.dense,
            self.csr - other.csr,
        )

    @property
    def sparsity(self) -> float:
        """Fraction of parameters that are zero."""
        return 1.0 - self.nonzero / self.total if self.total else 0.0


_EMPTY = Footprint(0, 0, 0, 0)


def _own_footprint(module: nn.Module) -> Footprint:
    """Footprint of the parameters ``module`` holds directly (not its children's)."""
    params = list(module.parameters(recurse=False))
    if not params:
        return _EMPTY
    size = layer_bytes(module)
    nonzero = sum(int(torch.count_nonzero(p.detach())) for p in params)
    return Footprint(nonzero, sum(p.numel() for p in params), size["dense"], size["csr"])


def layer_footprint(module: nn.Module) -> Footprint:
    """Footprint of one layer as pruning sees it.

    A MultiheadAttention's ``out_proj`` is a child module whose weight the attention reads
    directly; it is pruned with the layer, so it counts with it.
    """
    if not isinstance(module, MULTI_WEIGHT_TYPES):
        return _own_footprint(module)
    total = _EMPTY
    for sub in module.modules():
        total = total + _own_footprint(sub)
    return total


def model_footprint(model: nn.Module) -> Footprint:
    """Footprint of the whole model as it is now.

    Args:
        model: Any module.

    Returns:
        Sums over every module's own parameters, so each parameter counts once.
    """
    total = _EMPTY
    for module in model.modules():
        total = total + _own_footprint(module)
    return total


class SettingCosts:
    """Footprint of ``model`` if a setting were applied, exact and cached per layer.

    Args:
        model: The live model (never changed: every measurement runs in a trial).
        granularity: Pruning granularity of the sweep.
    """

    def __init__(self, model: nn.Module, granularity: str = "element") -> None:
        self.model = model
        self.granularity = granularity
        self._version: tuple[int, ...] | None = None
        self._now = _EMPTY
        self._layer_now: dict[str, Footprint] = {}
        self._cache: dict[tuple[str, float], Footprint] = {}
        # The figures of the last few histories: an undo returns to one of them for free.
        self._states: dict[tuple[int, ...], tuple] = {}

    def invalidate(self) -> None:
        """Forget every cached figure: the model changed in a way its history cannot show.

        A step recorded or undone on the model itself is noticed without this (the cache
        is keyed on :func:`~nbcompress.engine.core.history.history_token`); call it after a
        step on a module containing the model, or an edit outside nbcompress.
        """
        self._version = None
        self._states.clear()

    def _refresh(self) -> None:
        # Any recorded step (Apply, Undo, %prune in another cell) changes the history token;
        # undo + a new step is not "same". Figures kept for a token are reused only if the
        # model still counts the same, as a guard against a forced undo after hand edits.
        version = history_token(self.model)
        if version == self._version:
            return
        self._version = version
        now = model_footprint(self.model)
        kept = self._states.pop(version, None)
        if kept is None or kept[0] != now:
            kept = (now, {}, {})
        self._now, self._layer_now, self._cache = kept
        self._states[version] = kept  # the same dicts: filled as figures are measured
        while len(self._states) > 8:
            del self._states[next(iter(self._states))]

    def now(self) -> Footprint:
        """Footprint of the model as it is now."""
        self._refresh()
        return self._now

    def layer(self, name: str, ratio: float) -> Footprint:
        """Footprint of layer ``name`` alone after pruning it to ``ratio``."""
        self._refresh()
        if name not in self._layer_now:
            self._layer_now[name] = layer_footprint(self.model.get_submodule(name))
        key = (name, round(float(ratio), 6))
        if key not in self._cache:
            if key[1] <= 0 or self._already(name, key[1]):
                self._cache[key] = self._layer_now[name]
            else:
                with trial(self.model):
                    prune_ratios_(self.model, {name: key[1]}, granularity=self.granularity)
                    self._cache[key] = layer_footprint(self.model.get_submodule(name))
        return self._cache[key]

    def _already(self, name: str, ratio: float) -> bool:
        # L1 counts existing zeros: a weight already this sparse is left as it is (exact for
        # elements; channels and blocks may still zero a bias, so they are measured).
        if self.granularity != "element":
            return False
        weights = prunable_weights(self.model.get_submodule(name)).values()
        return all(weight_sparsity(w.detach(), "element") >= ratio for w in weights)

    def setting(self, ratios: Mapping[str, float]) -> Footprint:
        """Footprint of the whole model if ``ratios`` were applied now."""
        total = self.now()
        for name, ratio in ratios.items():
            after = self.layer(name, ratio)
            total = total - self._layer_now[name] + after
        return total


def proxy_metric(model: nn.Module, example_inputs: Any) -> Callable[[nn.Module], float]:
    """The engine's data-free proxy as an ``evaluate(model)`` function.

    Its reference output is taken now, so later measurements compare against the model
    as it is at this moment (the setting the sliders start from). The function measures
    that same model object only.
    """
    measure = measurer(model, None, example_inputs, proxy=True)

    def evaluate(m: nn.Module) -> float:
        if m is not model:
            raise ValueError("model: this proxy measures the model it was made for only.")
        return measure()

    return evaluate


def _count(n: int, what: str) -> str:
    return f"a {what}" if n == 1 else f"{n} {what}s"


class SweepCheck:
    """Whether the live model is still the one a sensitivity sweep measured, and if not, why.

    The model counts as changed when the steps in place differ from those at sweep time
    (recorded or undone since: :func:`~nbcompress.engine.core.history.history_token`), or when
    an analysed layer's sparsity differs from ``result.start`` (which also catches edits the
    history cannot see). Both checks are cheap: a token comparison and a count of zeros.

    Args:
        result: The sweep's result.
        model: The live model.
        token: ``history_token(model)`` taken when the sweep ran. Without it the token now
            is used, unless the sparsity already differs from the sweep's, in which case
            only the sparsity is compared (the steps at sweep time are unknown).
    """

    def __init__(
        self, result: SensitivityResult, model: nn.Module, token: tuple[int, ...] | None = None
    ) -> None:
        self.result = result
        self.model = model
        self.own: set[int] = set()
        if token is None and not self.drift():
            token = history_token(model)
        self.token = None if token is None else tuple(token)

    def sparsity(self) -> dict[str, float | None]:
        """Each analysed layer's sparsity now, as the sweep counted it (``None``: layer gone)."""
        out: dict[str, float | None] = {}
        for name in self.result.layers:
            try:
                module = self.model.get_submodule(name)
                # A quantized replacement keeps a placeholder weight on the meta device.
                if any(p.is_meta for p in module.parameters()):
                    raise TypeError(name)
                out[name] = layer_sparsity(module, self.result.granularity)
            except (AttributeError, TypeError, ValueError, RuntimeError):  # removed or replaced
                out[name] = None
        return out

    def drift(self, sparsity: Mapping[str, float | None] | None = None) -> dict[str, float | None]:
        """Layers whose sparsity now differs from sweep time: name → sparsity now."""
        now = self.sparsity() if sparsity is None else sparsity
        start = self.result.start
        return {n: s for n, s in now.items() if s is None or abs(s - start.get(n, 0.0)) > 1e-9}

    def effective(
        self, ratios: Mapping[str, float], sparsity: Mapping[str, float | None] | None = None
    ) -> dict[str, float]:
        """The ratios the layers would really have if ``ratios`` were applied now.

        Pruning never revives a weight, so a layer already sparser than its ratio (pruned
        in another cell) stays as it is. While the model is the swept one this is
        ``ratios`` (its ratios never go below ``result.start``).

        Args:
            ratios: Layer → ratio to apply.
            sparsity: :meth:`sparsity` if the caller has it already.
        """
        now = self.sparsity() if sparsity is None else sparsity
        out = {}
        for name, ratio in ratios.items():
            current = now.get(name)
            # A ratio stays below 1 (check_amount); past the sweep the curves are extended.
            out[name] = ratio if current is None else max(ratio, min(current, 0.9999))
        return out

    def mark_own(self, before: tuple[int, ...]) -> None:
        """Count the steps recorded since ``before`` as the caller's own (e.g. its Apply)."""
        self.own |= set(history_token(self.model)) - set(before)

    def reason(self, sparsity: Mapping[str, float | None] | None = None) -> str | None:
        """Why the model is no longer the swept one, in a few words; ``None`` if it is.

        Args:
            sparsity: :meth:`sparsity` if the caller has it already.

        Returns:
            E.g. ``"a prune step in another cell; fc1 90.0% sparse (swept at 0.0%)"``.
        """
        parts = []
        if self.token is not None:
            foreign = steps_since(self.model, (*self.token, *self.own))
            if foreign:
                names = Counter(s.name for s in foreign)
                kinds = next(iter(names)) if len(names) == 1 else "compression"
                parts.append(f"{_count(len(foreign), kinds + ' step')} in another cell")
            now = set(history_token(self.model))
            if (now - set(self.token)) & self.own:
                parts.append("the setting applied here")
            if set(self.token) - now:
                parts.append(f"{_count(len(set(self.token) - now), 'step')} undone")
        drift = self.drift(sparsity)
        if drift:
            name, value = next(iter(drift.items()))
            swept = fmt_pct(self.result.start.get(name, 0.0))
            more = f" and {len(drift) - 1} more layer(s)" if len(drift) > 1 else ""
            if value is None:
                parts.append(f"{name} removed or replaced{more}")
            else:
                parts.append(f"{name} {fmt_pct(value)} sparse (swept at {swept}){more}")
        return "; ".join(parts) or None
