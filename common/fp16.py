"""Convert a float32 ONNX model of this family to float16 weights and arithmetic.

Used for the CUDA backend's fp16 precision when TensorRT (which converts by itself) is absent. The
model keeps float32 inputs and outputs, with a Cast at each edge, so callers feed and read float32
either way. Only what must stay float32 stays: the ``scales`` and ``roi`` inputs of Resize.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# (op type, input index) pairs that the ONNX spec types as float32 whatever the data type.
_KEEP_FLOAT32 = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


def _kept_names(graph: onnx.GraphProto) -> set[str]:
    return {node.input[i] for node in graph.node for (op, i) in _KEEP_FLOAT32
            if node.op_type == op and len(node.input) > i and node.input[i]}


def _convert_initializers(graph: onnx.GraphProto, keep: set[str]) -> None:
    for index, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT and init.name not in keep:
            half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name)
            graph.initializer[index].CopyFrom(half)


def _convert_constants(graph: onnx.GraphProto, keep: set[str]) -> None:
    for node in graph.node:
        if node.op_type != "Constant" or node.output[0] in keep:
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(
                    numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of ``model`` with float32 inputs and outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    keep = _kept_names(graph)
    _convert_initializers(graph, keep)
    _convert_constants(graph, keep)
    weights = {init.name for init in graph.initializer}
    casts_in = []
    for value in graph.input:
        if value.name in weights or value.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        half = value.name + "_fp16"
        _rename_uses(graph, value.name, half)
        casts_in.append(helper.make_node("Cast", [value.name], [half], to=TensorProto.FLOAT16))
    for value in graph.output:
        half = value.name + "_fp16"
        for node in graph.node:
            for i, name in enumerate(node.output):
                if name == value.name:
                    node.output[i] = half
        _rename_uses(graph, value.name, half)
        graph.node.append(helper.make_node("Cast", [half], [value.name], to=TensorProto.FLOAT))
    for node in reversed(casts_in):
        graph.node.insert(0, node)
    del graph.value_info[:]
    return out
