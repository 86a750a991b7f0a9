"""Which layers produce a model's output: its head(s), found from the forward pass.

"Leave the output layer alone" needs the layer(s) whose output reaches the model's output
without passing through another weight layer. Registration order is a poor guess: a
sentence encoder registers an unused pooler last, and a model may register its head first.
So the head is found, in order of preference:

1. **from a symbolic trace** (``torch.fx``, no input needed, milliseconds) of models that
   trace;
2. **from a real forward pass** (when an input is known) of models that do not: every
   weight layer's output is swapped for a fresh autograd leaf, so the model output's
   autograd graph ends at exactly the layers nearest to it;
3. **by registration order** (the last prunable layer), said to be a guess.

Inputs seen by any nbcompress command (``--input``, a sweep's evaluation) are remembered
weakly per model, so that every command finds the same head; the answer is cached per
model and layer structure.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.outputs import output_tensors
from nbcompress.engine.core.validation import call_model, eval_mode

__all__ = ["OutputLayers", "find_output_layers", "remember_inputs"]

#: How the answer was found.
TRACED, SYMBOLIC, GUESSED = "traced forward pass", "symbolic trace", "registration order"


@dataclass(frozen=True)
class OutputLayers:
    """The layer(s) producing a model's output, and how they were found.

    Attributes:
        names: Qualified names, in registration order (empty when none was found).
        how: ``"traced forward pass"``, ``"symbolic trace"`` or ``"registration order"``
            (a guess: the last prunable layer).
    """

    names: tuple[str, ...]
    how: str

    @property
    def guessed(self) -> bool:
        """The names are a guess from registration order, not from the forward pass."""
        return self.how == GUESSED

    def describe(self) -> str:
        """``"output layer fc3"`` / ``"output layers a, b"``, with the way it was found."""
        if not self.names:
            return "no output layer found"
        word = "output layer" if len(self.names) == 1 else "output layers"
        how = " (guessed from registration order)" if self.guessed else ""
        return f"{word} {', '.join(self.names)}{how}"


_INPUTS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
_FOUND: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, OutputLayers, Any]] = (
    weakref.WeakKeyDictionary()
)


@contextlib.contextmanager
def _attributes_kept(model: nn.Module) -> Iterator[None]:
    """Put every module's plain attributes back after a trace ran its Python ``forward``.

    A forward may count its calls or cache a feature on ``self``; a trace must not leave a
    counter advanced or a ``torch.fx`` Proxy behind (tensors are never written by a trace).
    """
    saved = [(m, dict(m.__dict__)) for m in model.modules()]
    try:
        yield
    finally:
        for module, attrs in saved:
            module.__dict__.clear()
            module.__dict__.update(attrs)


def remember_inputs(model: nn.Module, inputs: tuple) -> None:
    """Keep ``inputs`` (as ``as_inputs`` returns them) as an example input of ``model``.

    Held (not copied) until the model is garbage-collected or another input replaces it;
    used to find the output layer from a real forward pass when a guess is all there is.
    """
    _INPUTS[model] = inputs


def find_output_layers(
    model: nn.Module,
    candidates: Mapping[str, nn.Module],
    inputs: tuple | None = None,
    *,
    guess: str | None = None,
) -> OutputLayers:
    """The layers among ``candidates`` whose output reaches ``model``'s output directly.

    Args:
        model: The model.
        candidates: Name → layer: the weight layers that count (e.g. every layer that holds
            a weight matrix). Other modules (activations, norms, pooling) are looked through.
        inputs: An example input as ``as_inputs`` returns it; default the one remembered
            for this model (see :func:`remember_inputs`), if any.
        guess: The layer to name when neither trace works (default the last candidate).

    Returns:
        The output layers and how they were found; the model is not changed.
    """
    key = tuple((n, id(m)) for n, m in candidates.items())
    inputs = inputs if inputs is not None else _INPUTS.get(model)
    cached = _FOUND.get(model)
    known = cached[1] if cached is not None and cached[0] == key else None
    if known is not None and (not known.guessed or inputs is None):
        return known
    found = None
    if known is None:  # a guess means the symbolic trace failed before
        with _attributes_kept(model):
            names = _symbolic(model, candidates)
        found = OutputLayers(names, SYMBOLIC) if names else None
    if found is None and inputs is not None and (cached is None or cached[2] is not inputs):
        # A real forward pass is the fallback: it costs a forward with autograd (tried
        # once per input: a trace that found nothing on it finds nothing again).
        with _attributes_kept(model):
            names = _traced(model, candidates, inputs)
        found = OutputLayers(names, TRACED) if names else None
    found = found or known or _guessed(candidates, guess)
    _FOUND[model] = (key, found, inputs)
    return found


def _guessed(candidates: Mapping[str, nn.Module], guess: str | None) -> OutputLayers:
    names = [guess] if guess is not None else list(candidates)[-1:]
    return OutputLayers(tuple(names), GUESSED)


def _ordered(candidates: Iterable[str], hits: set[str]) -> tuple[str, ...]:
    return tuple(n for n in candidates if n in hits)


# --- from a real forward pass ------------------------------------------------------------


def _traced(model: nn.Module, candidates: Mapping[str, nn.Module], inputs: tuple) -> tuple:
    """Run the model once with each layer's output cut into a fresh leaf; walk back."""
    leaves: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # the leaves must outlive the walk (ids are the keys)
    preds: dict[str, set[str]] = {}  # layer → the cut layers its output was computed from

    def cut(value: Any, name: str) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            before = _walk([value], leaves, {}) if value.grad_fn is not None else set()
            preds.setdefault(name, set()).update(before - {name})
            leaf = value.detach().requires_grad_(True)
            leaves[id(leaf)] = name
            keep.append(leaf)
            # A clone, not the leaf itself: the model may modify the output in place.
            return leaf.clone()
        if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
            return type(value)(cut(v, name) for v in value)
        return value

    handles = [
        m.register_forward_hook(lambda _m, _a, out, name=n: cut(out, name))
        for n, m in candidates.items()
    ]
    try:
        with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = call_model(model, _normal(inputs))
            found = _walk(output_tensors(out), leaves, _weights(candidates), preds)
            return _ordered(candidates, _innermost(found, preds))
    except Exception:  # noqa: BLE001 - any failure means "not found this way"
        return ()
    finally:
        for h in handles:
            h.remove()


def _normal(value: Any) -> Any:
    """Inputs made under ``torch.inference_mode`` as normal tensors (autograd refuses them)."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_normal(v) for v in value)
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def _walk(
    outputs: list[torch.Tensor],
    leaves: dict[int, str],
    params: dict[int, str],
    preds: dict[str, set[str]] | None = None,
    *,
    start: tuple[Any, ...] = (),
) -> set[str]:
    """Names of the cut layers that the outputs' autograd graph reaches.

    An operation that uses a layer's weight directly (a head tied to the embedding,
    ``F.linear(h, emb.weight)``) is that layer: the walk stops there too, rather than
    running on through the residual stream to every block. ``preds`` collects, for such
    a tied operation, the cut layers its other inputs came from; ``start`` adds graph
    nodes to walk from.
    """
    hits: set[str] = set()
    seen: set[int] = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None] + list(start)
    stack += [t for t in outputs if t.grad_fn is None and id(t) in leaves]
    while stack:
        node = stack.pop()
        if isinstance(node, torch.Tensor):
            hits.add(leaves[id(node)])
            continue
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # an AccumulateGrad node
        if variable is not None:
            if id(variable) in leaves:
                hits.add(leaves[id(variable)])
            continue
        nexts = [nxt for nxt, _ in node.next_functions]
        tied = {params[p] for n in nexts if (p := _weight_behind(n)) in params}
        if tied:
            hits |= tied
            if preds is not None:  # what the tied operation's other input came from
                before = _walk([], leaves, {}, None, start=tuple(nexts))
                for name in tied:
                    preds.setdefault(name, set()).update(before - {name})
            continue
        stack.extend(nexts)
    return hits


def _innermost(hits: set[str], preds: Mapping[str, set[str]]) -> set[str]:
    """The hits no other hit was computed from.

    In a residual network every block's last layer reaches the output through the skip
    connections; the head is the one whose output no other reaching layer consumed (the
    last block's projection of a sentence encoder, ``head`` in ``head(h) + h``).
    """
    ancestors: dict[str, set[str]] = {}

    def above(name: str) -> set[str]:
        if name not in ancestors:
            ancestors[name] = set()  # a cycle (a layer called twice) ends here
            found: set[str] = set()
            for p in preds.get(name, ()):
                found |= {p} | above(p)
            ancestors[name] = found - {name}
        return ancestors[name]

    return {h for h in hits if not any(h in above(other) for other in hits if other != h)}


def _weight_behind(node: Any, depth: int = 3) -> int | None:
    """The ``id`` of the parameter a node reads, through up to ``depth`` one-input views."""
    for _ in range(depth):
        if node is None:
            return None
        variable = getattr(node, "variable", None)
        if variable is not None:
            return id(variable)
        if len(node.next_functions) != 1:
            return None
        node = node.next_functions[0][0]
    return None


def _weights(candidates: Mapping[str, nn.Module]) -> dict[int, str]:
    """id(weight matrix) → the candidate owning it."""
    return {id(p): n for n, m in candidates.items() for p in m.parameters() if p.dim() >= 2}


# --- from a symbolic trace ---------------------------------------------------------------


class _LayerTracer(torch.fx.Tracer):
    """A tracer that stops at every candidate (a quantized or sparse layer included)."""

    def __init__(self, candidates: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.candidates = candidates

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Candidates are called, not traced into; other modules as torch.fx decides."""
        return module_qualified_name in self.candidates or super().is_leaf_module(
            m, module_qualified_name
        )


def _symbolic(model: nn.Module, candidates: Mapping[str, nn.Module]) -> tuple:
    """Walk a ``torch.fx`` graph back from its output to the nearest candidate calls."""
    tracer = _LayerTracer(candidates)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tracer.trace(model)
    except Exception:  # noqa: BLE001 - models with data-dependent control flow do not trace
        tracer.__dict__.clear()
        return ()
    owners = {
        f"{n}.{p}" if n else p: n
        for n, m in candidates.items()
        for p, w in m.named_parameters()
        if w.dim() >= 2
    }
    hits: dict[str, list[torch.fx.Node]] = {}

    def reached(node: torch.fx.Node) -> bool:
        if node.op == "call_module" and node.target in candidates:
            hits.setdefault(str(node.target), []).append(node)
            return True
        # An operation on a layer's weight (a tied head) is that layer: stop there too.
        tied = {owners[a.target] for a in node.all_input_nodes if a.op == "get_attr"
                and a.target in owners}  # fmt: skip
        for name in tied:
            hits.setdefault(name, []).append(node)
        return bool(tied)

    _fx_back([n for n in graph.nodes if n.op == "output"], reached)
    preds = {h: _fx_before(nodes, candidates, owners) - {h} for h, nodes in hits.items()}
    found = _innermost(set(hits), preds)
    # The tracer and graph form reference cycles through the model: break them, so that a
    # deleted model is freed at once rather than at the next garbage collection.
    hits.clear()
    tracer.__dict__.clear()
    graph.__dict__.clear()
    return _ordered(candidates, found)


def _fx_back(start: list[torch.fx.Node], stop: Callable[[torch.fx.Node], bool]) -> None:
    """Visit every node the ``start`` nodes were computed from, not past a node ``stop`` takes."""
    seen: set[torch.fx.Node] = set()
    stack = list(start)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if not stop(node):
            stack.extend(node.all_input_nodes)


def _fx_before(
    nodes: list[torch.fx.Node], candidates: Mapping[str, nn.Module], owners: dict[str, str]
) -> set[str]:
    """Every candidate whose output (or weight) the given nodes were computed from."""
    found: set[str] = set()

    def note(node: torch.fx.Node) -> bool:
        if node.op == "call_module" and node.target in candidates:
            found.add(str(node.target))
        elif node.op == "get_attr" and node.target in owners:
            found.add(owners[node.target])
        return False  # walk on: every layer above counts

    _fx_back([a for n in nodes for a in n.all_input_nodes], note)
    return found
