"""An exported float ONNX graph rewritten to compute a block's int8 Linears in int8.

The block is exported with every int8 Linear swapped for a float ``nn.Linear`` holding
exactly its dequantized weight (:func:`float_swaps`); the exporter writes that weight,
transposed, as the initializer of a ``MatMul``, so :func:`int8_graph` finds each layer by
value and replaces its ``MatMul`` (and the bias ``Add`` right after it) by:

- an :class:`~nbcompress.engine.quantize.ort_int8.OrtInt8Linear`: one
  ``DynamicQuantizeMatMul`` over its int8 weights (exactly its per-layer computation);
- a weight-only int8 layer (``Int8WeightOnly``, where the accuracy budget moved a layer
  whose activations quantize badly) given outlier input channels: those few channels in
  fp32 (``Gather`` + a thin ``MatMul``), the rest through ``DynamicQuantizeMatMul`` with
  the outliers zeroed. Measured on MiniLM's ``intermediate.dense`` (1 thread, batch 8):
  its input has channels up to 28 against a median of 1.5; per-tensor u8 activations gave
  a relative error of 4.4e-2, with the 8 largest channels split off 1.0e-2 (weight-only
  int8: 0.6e-2). Whether that is accurate enough is decided on the whole block's output.

Activation×activation MatMuls (attention) have no initializer and stay fp32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from nbcompress.engine.quantize.embedding_int8 import Int8Embedding
from nbcompress.engine.quantize.modules import Int8WeightOnly
from nbcompress.engine.quantize.ort_int8 import OrtInt8Linear, linear_nodes, session_weight

__all__ = ["OUTLIERS", "float_swaps", "int8_graph", "outlier_channels", "split_candidates"]

#: Input channels computed in fp32 per split layer: at most this many, one per 32 inputs.
OUTLIERS = 8


def split_candidates(block: nn.Module) -> dict[str, Int8WeightOnly]:
    """The block's weight-only int8 Linears (relative name → module)."""
    return {
        n: m
        for n, m in block.named_modules()
        if isinstance(m, Int8WeightOnly) and m.kind == "linear"
    }


def outlier_channels(x: torch.Tensor) -> torch.Tensor:
    """Indices of the input channels of largest magnitude in ``x`` (``…, in``), sorted."""
    peak = x.detach().reshape(-1, x.shape[-1]).abs().amax(0)
    k = max(1, min(OUTLIERS, x.shape[-1] // 32))
    return peak.topk(k).indices.sort().values


def _int8(module: nn.Module) -> bool:
    return isinstance(module, OrtInt8Linear) or (
        isinstance(module, Int8WeightOnly) and module.kind == "linear"
    )


def _table(module: nn.Module) -> bool:
    """An int8 ``nn.Embedding`` stand-in of a full table (row-pruned ones stay fp32)."""
    return isinstance(module, Int8Embedding) and module.rows is None


def float_swaps(block: nn.Module) -> dict[str, nn.Module]:
    """Relative name → float Linear (Embedding) holding exactly the dequantized weight."""
    swaps: dict[str, nn.Module] = {}
    for name, m in block.named_modules():
        if _table(m):
            table = nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx)
            with torch.no_grad():
                table.weight.copy_(m.dequantized_weight())
            swaps[name] = table
        elif _int8(m):
            w = m.dequantized_weight()
            out = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
            with torch.no_grad():
                out.weight.copy_(w)
                if m.bias is not None:
                    out.bias.copy_(m.bias)
            swaps[name] = out
    return swaps


def int8_graph(
    model: Any, block: nn.Module, vnni: bool, outliers: dict[str, torch.Tensor]
) -> bytes:
    """``model`` (the exported float block) with its int8 Linears computed in int8.

    Args:
        model: The ``onnx.ModelProto`` exported from the block with :func:`float_swaps`.
        block: The block (its ``OrtInt8Linear`` and weight-only children).
        vnni: The CPU path (7-bit weights without VNNI, see ``ort_int8``).
        outliers: Weight-only layer (relative name) → input channels kept fp32; weight-only
            layers not named stay fp32 MatMuls.

    Returns:
        The serialized rewritten model.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    layers, tables = {}, {}
    for name, m in block.named_modules():
        if isinstance(m, OrtInt8Linear) or name in outliers:
            wt = m.dequantized_weight().t().contiguous().numpy()
            layers[(wt.shape, wt.tobytes())] = (m, outliers.get(name))
        elif _table(m):
            w = m.dequantized_weight().contiguous().numpy()
            tables[(w.shape, w.tobytes())] = m
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    nodes, dropped = [], set()
    for i, node in enumerate(graph.node):
        if id(node) in dropped:
            continue
        table = _found(tables, inits, node.input[0]) if node.op_type == "Gather" else None
        if table is not None and _attr(node, "axis") == 0:
            more, weights = _gather_nodes(f"e{i}", node.input[1], node.output[0], table)
            nodes += more
            graph.initializer.extend(weights)
            continue
        init = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        array = None if init is None else numpy_helper.to_array(init)
        found = None if array is None else layers.get((array.shape, array.tobytes()))
        if found is None:
            nodes.append(node)
            continue
        layer, channels = found
        out, bias_add = node.output[0], _bias_add(consumers, node.output[0], inits, layer)
        if bias_add is not None:
            dropped.add(id(bias_add))
            out = bias_add.output[0]
        bias = None if bias_add is None else layer.bias.detach()  # else the exporter's Add
        more, weights = _layer_nodes(f"q{i}", node.input[0], out, layer, bias, channels, vnni)
        nodes += more
        graph.initializer.extend(weights)
    del graph.node[:]
    graph.node.extend(nodes)
    live = {n for node in graph.node for n in node.input}
    kept = [i for i in graph.initializer if i.name in live]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model.SerializeToString()


def _found(index: dict, inits: dict, name: str) -> Any:
    from onnx import numpy_helper

    if name not in inits:
        return None
    array = numpy_helper.to_array(inits[name])
    return index.get((array.shape, array.tobytes()))


def _attr(node: Any, name: str) -> Any:
    from onnx import helper

    found = [helper.get_attribute_value(a) for a in node.attribute if a.name == name]
    return found[0] if found else 0


def _gather_nodes(name: str, ids: str, y: str, table: Int8Embedding) -> tuple[list, list]:
    """An int8 table's lookup: its 8-bit codes gathered, then ``q · scale + bias`` per row.

    The ORT session then holds the table in int8 (MiniLM's word table: 11.7 MB, not 47).
    """
    from onnx import helper, numpy_helper

    q = table.packed[:, : table.embedding_dim].contiguous()
    scale, bias = (torch.from_numpy(a).reshape(-1, 1) for a in table._arrays()[1:3])
    inits = [
        numpy_helper.from_array(q.numpy(), f"{name}_q"),
        numpy_helper.from_array(scale.contiguous().numpy(), f"{name}_s"),
        numpy_helper.from_array(bias.contiguous().numpy(), f"{name}_b"),
    ]
    nodes = [
        helper.make_node("Gather", [f"{name}_q", ids], [f"{name}_gq"], axis=0),
        helper.make_node("Cast", [f"{name}_gq"], [f"{name}_gf"], to=1),  # float32
        helper.make_node("Gather", [f"{name}_s", ids], [f"{name}_gs"], axis=0),
        helper.make_node("Gather", [f"{name}_b", ids], [f"{name}_gb"], axis=0),
        helper.make_node("Mul", [f"{name}_gf", f"{name}_gs"], [f"{name}_gm"]),
        helper.make_node("Add", [f"{name}_gm", f"{name}_gb"], [y]),
    ]
    return nodes, inits


def _layer_nodes(
    name: str,
    x: str,
    y: str,
    layer: nn.Module,
    bias: torch.Tensor | None,
    channels: torch.Tensor | None,
    vnni: bool,
) -> tuple[list[Any], list[Any]]:
    """One layer's nodes: ``DynamicQuantizeMatMul``, plus the fp32 outlier channels."""
    from onnx import helper, numpy_helper

    q, scale = session_weight(layer.qweight, layer.scale.float(), vnni)
    if channels is None:
        return linear_nodes(name, x, y, q, scale, bias)
    keep = torch.ones(q.shape[1])
    keep[channels] = 0.0
    nodes, inits = linear_nodes(name, f"{name}_xm", f"{name}_yq", q, scale, bias)
    w_out = layer.dequantized_weight()[:, channels].t().contiguous()
    inits += [
        numpy_helper.from_array(keep.numpy(), f"{name}_keep"),
        numpy_helper.from_array(channels.long().numpy(), f"{name}_idx"),
        numpy_helper.from_array(w_out.numpy(), f"{name}_wo"),
    ]
    nodes = [
        helper.make_node("Mul", [x, f"{name}_keep"], [f"{name}_xm"]),
        *nodes,
        helper.make_node("Gather", [x, f"{name}_idx"], [f"{name}_xo"], axis=-1),
        helper.make_node("MatMul", [f"{name}_xo", f"{name}_wo"], [f"{name}_yo"]),
        helper.make_node("Add", [f"{name}_yq", f"{name}_yo"], [y]),
    ]
    return nodes, inits


def _bias_add(consumers: dict, out: str, inits: dict, layer: nn.Module) -> Any:
    """The exporter's ``Add`` of ``layer``'s bias right after its MatMul, if that is all."""
    from onnx import numpy_helper

    after = consumers.get(out, [])
    if layer.bias is None or len(after) != 1 or after[0].op_type != "Add":
        return None
    other = [n for n in after[0].input if n != out]
    if len(other) != 1 or other[0] not in inits:
        return None
    bias = layer.bias.detach().float().numpy()
    return after[0] if np.array_equal(numpy_helper.to_array(inits[other[0]]), bias) else None
