"""The data-free proxy metric, and when it cannot see anything: features instead of outputs.

The proxy compares the pruned model's output with the dense output on example inputs. Two
outputs make that comparison blind, and both are detected on the dense reference: an
output that barely varies across the batch or a softmax so flat that an output ignoring
the input would still score about 1 (a zero-initialised head, random-init mobilenet or
ConvNeXt logits), and a one-column output (a regressor, a binary logit), whose per-row
cosine is only a sign. The proxy then compares the features entering the output layer
(found from the forward pass, :mod:`nbcompress.engine.core.heads`) instead, centred on
their dense batch mean, so that features which no longer depend on the input score 0.
The output layer's own curve still compares the output (its input does not change when
it alone is pruned).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nbcompress.engine.core.layers import output_layers as find_output_layers
from nbcompress.engine.core.outputs import compare_outputs, output_tensors
from nbcompress.engine.core.validation import eval_mode, run_forward

__all__ = ["NULL_LEVEL", "Proxy", "output_layers"]

#: An input-blind output scoring at least this leaves the proxy nothing to measure.
NULL_LEVEL = 0.99


def output_layers(model: nn.Module, inputs: tuple) -> list[str]:
    """The layer(s) producing the output (:func:`nbcompress.engine.core.layers.output_layers`).

    Args:
        model: The model.
        inputs: Its inputs, as ``as_inputs`` returns them (used if a trace is needed).

    Returns:
        Qualified names (empty if none was found).
    """
    return list(find_output_layers(model, inputs).names)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(len(t), -1) if t.dim() > 1 else t.reshape(1, -1)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine per row, scale-free (features of a random-init net can have norms of 1e-9)."""
    a, b = a.double(), b.double()
    norms = a.norm(dim=1) * b.norm(dim=1)
    dots = (a * b).sum(1)
    cos = torch.where(norms > 0, dots / norms.clamp_min(1e-300), (norms == 0) & (dots == 0))
    return cos.clamp(-1.0, 1.0)


def _agreement(ref: torch.Tensor, out: torch.Tensor, kl: bool) -> float:
    if kl:
        div = F.kl_div(
            F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True, reduction="none"
        ).sum(1)
        return float(torch.exp(-div).mean())
    if ref.dim() > 1 and ref[0].numel() == 1:  # one column: the batch is the vector
        ref, out = ref.reshape(1, -1), out.reshape(1, -1)
    return float(_cosine(_rows(out), _rows(ref)).mean())


def _spread(t: torch.Tensor) -> float:
    """Mean standard deviation across the batch, relative to the tensor's RMS."""
    rows = _rows(t).double()
    if len(rows) < 2:
        return float("nan")
    scale = float(rows.pow(2).mean().sqrt())
    return float(rows.std(0).mean()) / scale if scale > 0 else 0.0


class Proxy:
    """Data-free metric: fidelity of the (pruned) model's output to the dense output.

    Every floating tensor of the output is compared, whatever its structure (a tensor, a
    tuple such as an LSTM's output and state, a dict such as a sentence encoder's, a
    dataclass): a two-dimensional tensor with several columns is read as classifier
    logits (agreement ``exp(-KL)``), any other by cosine similarity per row; the metric
    is the mean over the tensors. Integer tensors (token ids, masks) are not outputs.
    When the output cannot show a change (see the module), the features entering the
    output layer are compared instead, and :attr:`note` says why.

    Args:
        model: The dense model (its output now is the reference).
        inputs: Example inputs, as ``as_inputs`` returns them.
        reference: The dense output on ``inputs`` if already computed.

    Attributes:
        name: What the metric is, for the result.
        floor: The metric of an output that ignores the input (``None``: unknown); a
            sweep fills a layer's larger ratios once it is down there.
        note: Why features are compared, or why the proxy cannot judge ("" if neither).
        layers: The output layer(s) whose input is compared (empty: the output is).
    """

    def __init__(self, model: nn.Module, inputs: tuple, reference: Any = None) -> None:
        self.inputs, self.note, self.layers = inputs, "", []
        if reference is None:
            with eval_mode(model):
                reference = run_forward(model, inputs)
        refs = output_tensors(reference)
        if not refs:
            raise TypeError(
                "evaluate: without an evaluation function the proxy compares floating-point "
                f"outputs, but the model returned none (its output is {type(reference).__name__}); "
                "pass evaluate=fn (--eval fn)."
            )
        self.refs = [t.detach().float() for t in refs]
        self.kl = [t.dim() == 2 and t.shape[1] > 1 for t in self.refs]
        self.name = _output_name(self.kl)
        self.floor = self._output_floor()
        reason = self._blind()
        if reason:
            with eval_mode(model):
                self._use_features(model, reason)

    def _output_floor(self) -> float | None:
        if len(self.refs[0]) < 2 or self.refs[0].dim() < 1:
            return None
        blind = [r.mean(0, keepdim=True).expand_as(r) for r in self.refs]
        values = [_agreement(r, b, k) for r, b, k in zip(self.refs, blind, self.kl, strict=True)]
        return sum(values) / len(values)

    def _blind(self) -> str:
        """Why the output cannot show a change ("" if it can)."""
        for ref in self.refs:
            if ref.dim() > 1 and len(ref) > 1 and ref[0].numel() == 1:
                return (
                    f"the output has one column ({tuple(ref.shape)}): compared per row it "
                    "would count signs only"
                )
        if self.floor is None or self.floor < NULL_LEVEL:
            return ""
        spread = min(_spread(r) for r in self.refs)
        if spread < 1e-3:
            return f"the output is near-constant across the batch (relative std {spread:.1g})"
        return (
            f"an output that ignores the input would still score {self.floor:.4f} (the "
            "softmax is nearly flat)"
        )

    def _use_features(self, model: nn.Module, reason: str) -> None:
        layers = output_layers(model, self.inputs)
        feats = self._features(model, layers) if layers else None
        if feats is None or not _spread(feats) > 1e-6:
            self.note = (
                f"The data-free proxy cannot judge this model: {reason}, and nothing entering "
                "its output layer varies across the batch either; its curves may read a flat "
                "1.0. Pass evaluate=fn (--eval fn) with real data."
            )
            self.floor = None
            return
        self.layers, self.feature_ref = layers, _rows(feats)
        self.center = self.feature_ref.mean(0, keepdim=True)
        self.output_name, self.output_floor = self.name, None
        self.name = f"feature cosine (centred) entering {', '.join(layers)}"
        self.floor = 0.0
        self.note = (
            f"Proxy: {reason}, so the proxy compares the features entering "
            f"{', '.join(layers)} (cosine centred on their dense batch mean; 0 = no longer "
            f"depends on the input); {', '.join(layers)}'s own curve compares the output."
        )

    def _features(self, model: nn.Module, layers: list[str]) -> torch.Tensor | None:
        modules = dict(model.named_modules())
        seen: list[torch.Tensor] = []

        def grab(module, args):
            if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                seen.append(args[0].detach().float())

        handles = [modules[n].register_forward_pre_hook(grab) for n in layers]
        try:
            out = run_forward(model, self.inputs)
        finally:
            for handle in handles:
                handle.remove()
        self._last_output = out
        return seen[-1] if seen else None

    def __call__(self, model: nn.Module) -> float:
        """The proxy metric of ``model`` now: 1 when it matches the reference."""
        # Eval mode, as for the reference: a train-mode forward would update BatchNorm
        # statistics (measuring must not change the model) and make Dropout random.
        with eval_mode(model):
            if not self.layers:
                return self._outputs(run_forward(model, self.inputs))
            feats = self._features(model, self.layers)
        compare_outputs(self.refs, self._last_output)  # same structure, else one clear error
        if feats is None or feats[0].numel() != self.feature_ref[0].numel():
            return float("nan")
        now = _rows(feats) - self.center
        return float(_cosine(now, self.feature_ref - self.center).mean())

    def at_layer(self, model: nn.Module, layer: str) -> float:
        """The metric with ``layer`` alone pruned: the output for the output layer itself."""
        if layer not in self.layers:
            return self(model)
        with eval_mode(model):
            return self._outputs(run_forward(model, self.inputs))

    def floor_at(self, layer: str) -> float | None:
        """:attr:`floor` for ``layer``'s curve (unknown for an output layer in feature mode)."""
        return None if layer in self.layers else self.floor

    def _outputs(self, out: Any) -> float:
        compare_outputs(self.refs, out)  # same structure and shapes, else one clear error
        values = [
            _agreement(ref, t.detach().float(), kl)
            for ref, t, kl in zip(self.refs, output_tensors(out), self.kl, strict=True)
        ]
        return float(sum(values) / len(values))


def _output_name(kl: list[bool]) -> str:
    kinds = {"exp(-KL)" if k else "cosine" for k in kl}
    if kinds == {"exp(-KL)"}:
        name = "output agreement exp(-KL)"
    elif kinds == {"cosine"}:
        name = "output cosine similarity"
    else:
        name = "output agreement (exp(-KL) of logits, cosine of the rest)"
    return name + (f", mean over {len(kl)} output tensors" if len(kl) > 1 else "")
