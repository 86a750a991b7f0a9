"""Argument checks shared by every verb: one clear message naming the argument and the fix."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "as_inputs",
    "call_model",
    "check_amount",
    "check_module",
    "describe_inputs",
    "eval_mode",
    "primary_output",
    "run_forward",
]


def check_module(obj: Any, arg: str = "model") -> nn.Module:
    """Return ``obj`` if it is an ``nn.Module``, else raise ``TypeError`` naming ``arg``."""
    if not isinstance(obj, nn.Module):
        raise TypeError(
            f"{arg}: expected a torch.nn.Module, got {type(obj).__name__}. "
            "Pass the model object itself (e.g. `model` or `model.encoder`)."
        )
    return obj


def check_amount(value: Any, arg: str = "amount", *, allow_zero: bool = True) -> float:
    """Return ``value`` as a float in [0, 1) (or (0, 1)), else raise naming ``arg``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{arg}: expected a number in [0, 1) such as 0.5 (the fraction of weights to "
            f"remove), got {type(value).__name__} {value!r}."
        )
    interval = "[0, 1)" if allow_zero else "(0, 1)"
    try:
        value = float(value)  # Fraction, numpy scalars; 10**400 overflows
    except (OverflowError, ValueError) as err:
        raise ValueError(
            f"{arg}: {value!r} is outside {interval}; it is the fraction of weights to remove, "
            "e.g. 0.5 removes half of them."
        ) from err
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value < 1) or math.isnan(value):
        raise ValueError(
            f"{arg}: {value!r} is outside {interval}; it is the fraction of weights to remove, "
            "e.g. 0.5 removes half of them (1.0 would remove every weight)."
        )
    return value


def as_inputs(example_inputs: Any, arg: str = "example_inputs") -> tuple:
    """Normalise example inputs to a tuple of positional arguments for :func:`call_model`.

    A tensor becomes ``(tensor,)`` and a sequence a tuple. A mapping of names to tensors (a
    dict, a tokenizer's ``BatchEncoding``) becomes ``(mapping,)``: :func:`call_model` then
    passes it as the forward signature asks (one argument, or keywords). An empty batch is
    refused.
    """
    if example_inputs is None:
        raise ValueError(
            f"{arg}: an example input is needed to run the model. Pass a tensor (or a tuple of "
            "tensors, or a dict of tensors) shaped like a real batch; in a notebook `--input x` "
            "names it."
        )
    if isinstance(example_inputs, torch.Tensor):
        inputs: tuple = (example_inputs,)
    elif isinstance(example_inputs, Mapping):
        inputs = (_check_mapping(example_inputs, arg),)
    elif isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        inputs = tuple(example_inputs)
    else:
        raise TypeError(
            f"{arg}: expected a tensor, a tuple of tensors or a dict of tensors, got "
            f"{type(example_inputs).__name__}."
        )
    for x in _tensors(inputs):
        if x.dim() and x.shape[0] == 0:
            raise ValueError(
                f"{arg}: the batch is empty (an input of shape {tuple(x.shape)}); pass at "
                "least one example shaped like a real batch."
            )
    return inputs


def _check_mapping(mapping: Mapping, arg: str) -> Mapping:
    if not all(isinstance(k, str) for k in mapping) or not any(
        isinstance(v, torch.Tensor) for v in mapping.values()
    ):
        raise TypeError(
            f"{arg}: a dict input must map argument names to tensors (e.g. a tokenizer's "
            "output with return_tensors='pt'); got keys "
            f"{list(mapping)[:4]!r} and no tensor value."
        )
    return mapping


def _tensors(inputs: tuple) -> list[torch.Tensor]:
    flat = [v for x in inputs for v in (x.values() if isinstance(x, Mapping) else (x,))]
    return [x for x in flat if isinstance(x, torch.Tensor)]


@functools.lru_cache(maxsize=256)
def _forward_takes_one_argument(forward_type: type, keys: frozenset[str]) -> bool:
    try:
        # Bind self with a placeholder: the signature as the call sees it.
        params = inspect.signature(functools.partial(forward_type.forward, None)).parameters
    except (TypeError, ValueError):  # no signature (e.g. a builtin): Hugging Face style
        return False
    positional = [
        p.name for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(positional) == 1 and positional[0] not in keys


def call_model(model: nn.Module, inputs: tuple) -> Any:
    """Call ``model`` on inputs as :func:`as_inputs` returns them.

    The one place that decides how a mapping input is passed: a forward with one positional
    parameter besides ``self`` (``nn.Sequential``, sentence-transformers modules) gets the
    mapping as that argument, unless the parameter is named after one of its keys; any other
    forward (Hugging Face models) gets it as keyword arguments. Each call gets a fresh copy
    of the mapping, since sentence encoders add their outputs to the dict they are given.
    """
    if len(inputs) == 1 and isinstance(inputs[0], Mapping):
        mapping = dict(inputs[0])
        if _forward_takes_one_argument(type(model), frozenset(mapping)):
            return model(mapping)
        return model(**mapping)
    return model(*inputs)


def describe_inputs(inputs: tuple) -> str:
    """Human-readable shapes of example inputs, e.g. ``(8, 1, 28, 28) float32``."""
    parts = []
    for x in inputs:
        if isinstance(x, Mapping):
            parts.append(
                "{" + ", ".join(f"{k}: {describe_inputs((v,))}" for k, v in x.items()) + "}"
            )
        elif isinstance(x, torch.Tensor):
            parts.append(f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}")
        else:
            parts.append(type(x).__name__)
    return ", ".join(parts)


def _expected_input(model: nn.Module) -> str | None:
    for module in model.modules():
        if isinstance(module, nn.Linear):
            n = module.in_features
            return f"last dimension {n} (first layer is Linear({n}, …))"
        if isinstance(module, nn.Conv2d):
            c = module.in_channels
            return f"shape (N, {c}, H, W) (first layer is Conv2d({c}, …))"
        if isinstance(module, nn.Conv1d):
            c = module.in_channels
            return f"shape (N, {c}, L) (first layer is Conv1d({c}, …))"
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            return f"integer indices < {module.num_embeddings} (first layer is an Embedding)"
    return None


def run_forward(model: nn.Module, inputs: tuple, arg: str = "example_inputs") -> Any:
    """Run the model on ``inputs`` (:func:`call_model`) without gradients.

    Any error the forward raises (a shape mismatch, a missing key, a user's assert) becomes
    one ``ValueError`` naming ``arg`` and the input's shapes; Ctrl-C passes through.
    """
    try:
        with torch.no_grad():
            return call_model(model, inputs)
    except Exception as err:
        expected = _expected_input(model)
        hint = f" The model expects {expected}." if expected else ""
        text = str(err).strip()
        first = text.splitlines()[0] if text else ""
        if not isinstance(err, (RuntimeError, ValueError, TypeError, IndexError)) or not first:
            first = f"{type(err).__name__}" + (f" {first}" if first else "")
        raise ValueError(
            f"{arg}: the model failed on the example input of shape {describe_inputs(inputs)}: "
            f"{first}.{hint} Pass an input shaped like a real batch."
        ) from err


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode for a while, then restore every module's own flag.

    Measuring in training mode would update BatchNorm statistics (changing the model)
    and make Dropout random.
    """
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def primary_output(out: Any) -> torch.Tensor:
    """The tensor to compare in a model's output (first element; named outputs by key).

    Used wherever two runs of a model are compared (proxy metrics, quantization errors).
    """
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, Mapping):
        # Sentence encoders return their input dict extended with the embedding.
        floats = {k: v for k, v in out.items() if torch.is_tensor(v) and v.is_floating_point()}
        key = next((k for k in ("sentence_embedding", "logits") if k in floats), None)
        out = floats[key] if key else next(iter(floats.values()))
    return out


def positive_int(value: Any, arg: str, example: str) -> int:
    """``value`` as an int >= 1, else one line naming ``arg`` with an ``example`` fix."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{arg}: {value!r} is not a whole number >= 1; pass one, e.g. {example}.")
    return int(value)
