"""Small ONNX models made by code for the tests: contract shapes only, or a known misbehaviour."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper


def tiny_model(path, inputs: dict, outputs: dict, *, elem=TensorProto.FLOAT):
    """A structurally valid model declaring the given input/output shapes (for contract checks)."""
    first = next(iter(inputs))
    nodes = [helper.make_node("Identity", [first], [name]) for name in outputs]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(n, elem, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, elem, s) for n, s in outputs.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def nan_generator(path, roi: int = 320):
    """A generator of the contract's shapes whose output is 0 / 0: NaN everywhere."""
    starts, ends, axes = (helper.make_tensor(n, TensorProto.INT64, [1], v)
                          for n, v in (("s", [0]), ("e", [3]), ("a", [1])))
    nodes = [helper.make_node("Slice", ["input", "s", "e", "a"], ["rgb"]),
             helper.make_node("Sub", ["rgb", "rgb"], ["zero"]),
             helper.make_node("Div", ["zero", "zero"], ["output"])]
    graph = helper.make_graph(
        nodes, "nan", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", 6, roi, roi]),
                       helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["B", 32, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 3, roi, roi])],
        initializer=[starts, ends, axes])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path
