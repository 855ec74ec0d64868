"""A small ONNX graph writer for the demo models.

The demo models are written node by node from NumPy arrays with the ``onnx`` package, so that no
deep-learning framework is needed at run time. The writer tracks every tensor's shape as it goes,
which lets it count parameters and multiply-adds exactly the way the model-cost figures in
docs/contract.md §3 are counted (convolutions only; activations, resizes and additions are free).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


@dataclass(frozen=True)
class Tensor:
    """A named activation of shape ``[batch, channels, height, width]`` (batch is symbolic)."""

    name: str
    channels: int
    height: int
    width: int


class GraphWriter:
    """Accumulates nodes and weights; counts parameters and multiply-adds per sample."""

    def __init__(self) -> None:
        self._nodes: list[onnx.NodeProto] = []
        self._weights: list[onnx.TensorProto] = []
        self._inputs: list[onnx.ValueInfoProto] = []
        self._outputs: list[onnx.ValueInfoProto] = []
        self._count = 0
        self.parameters = 0
        self.multiply_adds = 0

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def _constant(self, prefix: str, array: np.ndarray) -> str:
        name = self._name(prefix)
        self._weights.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def input(self, name: str, channels: int, height: int, width: int) -> Tensor:
        self._inputs.append(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", channels, height, width])
        )
        return Tensor(name, channels, height, width)

    def output(self, tensor: Tensor, name: str, *, flatten: bool = False) -> None:
        """Declare ``tensor`` an output; ``flatten`` turns ``[B, C, 1, 1]`` into ``[B, C]``."""
        if flatten:
            shape_name = self._constant("shape", np.array([-1, tensor.channels], dtype=np.int64))
            self._nodes.append(helper.make_node("Reshape", [tensor.name, shape_name], [name]))
            self._outputs.append(
                helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", tensor.channels])
            )
            return
        self._nodes.append(helper.make_node("Identity", [tensor.name], [name]))
        dims = ["batch", tensor.channels, tensor.height, tensor.width]
        self._outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))

    def conv(
        self,
        x: Tensor,
        weight: np.ndarray,
        bias: np.ndarray,
        *,
        stride: tuple[int, int] = (1, 1),
        padding: int = 0,
        groups: int = 1,
    ) -> Tensor:
        """2-D convolution; ``weight`` is ``[out, in / groups, kh, kw]`` float32."""
        out_channels, in_per_group, kh, kw = weight.shape
        if in_per_group * groups != x.channels:
            raise ValueError(f"conv expects {in_per_group * groups} input channels, got {x.channels}")
        height = (x.height + 2 * padding - kh) // stride[0] + 1
        width = (x.width + 2 * padding - kw) // stride[1] + 1
        out = Tensor(self._name("conv"), out_channels, height, width)
        self._nodes.append(
            helper.make_node(
                "Conv",
                [x.name, self._constant("w", weight.astype(np.float32)),
                 self._constant("b", bias.astype(np.float32))],
                [out.name],
                kernel_shape=[kh, kw],
                strides=list(stride),
                pads=[padding] * 4,
                group=groups,
            )
        )
        self.parameters += weight.size + bias.size
        self.multiply_adds += out_channels * height * width * in_per_group * kh * kw
        return out

    def _unary(self, op: str, x: Tensor) -> Tensor:
        out = Tensor(self._name(op.lower()), x.channels, x.height, x.width)
        self._nodes.append(helper.make_node(op, [x.name], [out.name]))
        return out

    def relu(self, x: Tensor) -> Tensor:
        return self._unary("Relu", x)

    def sigmoid(self, x: Tensor) -> Tensor:
        return self._unary("Sigmoid", x)

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        out = Tensor(self._name("add"), a.channels, a.height, a.width)
        self._nodes.append(helper.make_node("Add", [a.name, b.name], [out.name]))
        return out

    def concat(self, tensors: list[Tensor]) -> Tensor:
        first = tensors[0]
        out = Tensor(self._name("concat"), sum(t.channels for t in tensors), first.height, first.width)
        self._nodes.append(helper.make_node("Concat", [t.name for t in tensors], [out.name], axis=1))
        return out

    def upsample2x(self, x: Tensor) -> Tensor:
        """Bilinear x2 with ``align_corners=True``, as ``nn.Upsample`` exports it."""
        out = Tensor(self._name("up"), x.channels, 2 * x.height, 2 * x.width)
        scales = self._constant("scales", np.array([1, 1, 2, 2], dtype=np.float32))
        self._nodes.append(
            helper.make_node(
                "Resize", [x.name, "", scales], [out.name],
                mode="linear", coordinate_transformation_mode="align_corners",
            )
        )
        return out

    def model(self, graph_name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self._nodes, graph_name, self._inputs, self._outputs, self._weights)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lipfarm-demo"
        )
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model
