"""Which share of a model's parameters ``quantize_`` left in float, and why.

A report that lists only the layers it touched hides the rest: on vit_b_16 the attention
projections (``nn.MultiheadAttention.in_proj_weight``, a bare parameter) are a third of
the model. Every parameter is attributed to its layer (``weighted_layers``, which folds
MultiheadAttention / LSTM children into their parent) before the swap; afterwards the
parameters of layers that were not quantized are summed per layer type and reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nbcompress.engine.core.layers import weighted_layers

__all__ = ["Coverage", "param_owners"]


def param_owners(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Layer name → ``(type name, parameter count)`` for every parameter of the model.

    Each parameter (shared ones once) counts for its innermost layer; a parameter held by
    no layer (a bare ``nn.Parameter`` on a container) counts for that container.
    """
    layers = weighted_layers(model)
    owners: dict[str, tuple[str, int]] = {}
    for pname, param in model.named_parameters():
        parts = pname.split(".")[:-1]
        prefixes = [".".join(parts[:i]) for i in range(len(parts), -1, -1)]
        owner = next((p for p in prefixes if p in layers), prefixes[0])
        kind = type(model.get_submodule(owner)).__name__
        owners[owner] = (kind, owners.get(owner, (kind, 0))[1] + param.numel())
    return owners


@dataclass
class Coverage:
    """Parameters quantized and left float, grouped by ``(layer type, reason)``.

    Attributes:
        total: Parameters of the model before quantization.
        float_params: ``(layer type, reason)`` → parameters left in float.
        layers: ``(layer type, reason)`` → how many layers.
    """

    total: int = 0
    float_params: dict[tuple[str, str], int] = field(default_factory=dict)
    layers: dict[tuple[str, str], int] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        owners: dict[str, tuple[str, int]],
        rows: list[dict[str, Any]],
        absorbed: set[str],
    ) -> Coverage:
        """Attribute every owner to quantized, or to float with a reason."""
        done = {r["layer"] for r in rows if r.get("backend")} | absorbed
        kept = {r["layer"]: r["note"] or "kept float" for r in rows if not r.get("backend")}
        cov = cls(total=sum(n for _, n in owners.values()))
        for name, (kind, n) in owners.items():
            if name in done or any(name.startswith(d + ".") for d in done if d):
                continue
            if name in kept:
                reason = kept[name]
            elif kind in _NO_KERNEL:
                reason = _NO_KERNEL[kind]
            else:
                reason = "not selected (layers=/types=) or not a layer type quantize_ handles"
            key = (kind, reason)
            cov.float_params[key] = cov.float_params.get(key, 0) + n
            cov.layers[key] = cov.layers.get(key, 0) + 1
        return cov

    @property
    def float_share(self) -> float:
        """Fraction of the model's parameters left in float."""
        return sum(self.float_params.values()) / self.total if self.total else 0.0

    def note(self) -> str | None:
        """One line for the report (``None`` when every parameter was quantized)."""
        if not self.float_params:
            return None
        parts = []
        for key in sorted(self.float_params, key=self.float_params.get, reverse=True):
            share = self.float_params[key] / self.total
            parts.append(f"{key[0]} ×{self.layers[key]} {share:.1%} ({key[1]})")
        return (
            f"Left in float: {self.float_share:.1%} of the model's {self.total:,} parameters — "
            + "; ".join(parts)
            + "."
        )


#: Layer types no mode quantizes, with the reason shown in the report.
_NO_KERNEL = {
    "LayerNorm": "normalisation, kept float for accuracy",
    "BatchNorm1d": "normalisation, folded into its Conv by static mode only",
    "BatchNorm2d": "normalisation, folded into its Conv by static mode only",
    "BatchNorm3d": "normalisation, folded into its Conv by static mode only",
    "GroupNorm": "normalisation, kept float for accuracy",
}
