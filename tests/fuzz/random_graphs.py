"""Random valid ONNX graphs for fuzzing, drawn with hypothesis.

A graph starts from one input (rank 2, 3 or 4; batch dynamic ``N`` or static) and applies 1-6 ops, each
to any tensor made so far, so it grows chains and DAGs (residual Add/Mul, Concat of two branches):
Conv (plain, depthwise, 1x1/3x3, with or without bias), MatMul, Gemm, Add, Mul, Relu, Sigmoid, Softmax,
Concat, Reshape (rank 4 <-> 2 <-> 3), Transpose, GlobalAveragePool. Weights are drawn at scales from 1e-6
to 1e3, sometimes all zero; float32 or float16; opset 13 to 21. Every tensor no node reads is a graph output, and the model passes
``onnx.checker`` with full check (``build_model`` checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import helper, numpy_helper

Shape = tuple[Any, ...]  # dim 0 is "N" (dynamic) or an int
Draw = Callable[[st.SearchStrategy[Any]], Any]
# Choices list quantizable sizes first: hypothesis favours (and shrinks towards) the first element.
WEIGHT_SCALES = (0.0, 1e-6, 0.05, 1.0, 1e3)
WEIGHTED = frozenset({"Conv", "MatMul", "Gemm"})


@dataclass
class Builder:
    draw: Draw
    rng: np.random.Generator
    dtype: type = np.float32
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    shapes: dict[str, Shape] = field(default_factory=dict)
    consumed: set[str] = field(default_factory=set)

    def fresh(self, prefix: str) -> str:
        return f"{prefix}_{len(self.nodes)}_{len(self.initializers)}"

    def weight(self, shape: tuple[int, ...], prefix: str = "w") -> str:
        # float16 stays within +/-1: near 65504 the FP16 reference itself overflows, and where it does
        # is a matter of rounding, not of quantization
        scale = self.draw(st.sampled_from(WEIGHT_SCALES if self.dtype == np.float32 else WEIGHT_SCALES[:4]))
        name = self.fresh(prefix)
        value = (self.rng.standard_normal(shape) * scale).astype(self.dtype)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def const_i64(self, values: list[int]) -> str:
        name = self.fresh("shape")
        self.initializers.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    def add(self, op: str, inputs: list[str], shape: Shape, **attrs: Any) -> str:
        out = self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out + "_node", **attrs))
        self.consumed.update(inputs)
        self.shapes[out] = shape
        return out

    def same_shape_partner(self, x: str) -> str:
        """Another tensor of x's exact shape (a residual branch), or x itself."""
        partners = [t for t, s in self.shapes.items() if s == self.shapes[x]]
        return str(self.draw(st.sampled_from(sorted(partners))))


def _conv(b: Builder, x: str) -> str:
    n, c, h, w = b.shapes[x]
    depthwise = b.draw(st.booleans()) and c > 1
    cout = c if depthwise else b.draw(st.sampled_from([16, 32, 17, 8, 3, 1]))
    group = c if depthwise else 1
    k = b.draw(st.sampled_from([1, 3]))
    inputs = [x, b.weight((cout, c // group, k, k))]
    if b.draw(st.booleans()):
        inputs.append(b.weight((cout,), "bias"))
    return b.add("Conv", inputs, (n, cout, h, w), kernel_shape=[k, k], pads=[k // 2] * 4, group=group)


def _matmul(b: Builder, x: str) -> str:
    *lead, f = b.shapes[x]
    fo = b.draw(st.sampled_from([16, 64, 33, 4, 1]))
    return b.add("MatMul", [x, b.weight((f, fo))], (*lead, fo))


def _gemm(b: Builder, x: str) -> str:
    n, f = b.shapes[x]
    fo = b.draw(st.sampled_from([16, 64, 33, 4, 1]))
    inputs = [x, b.weight((fo, f))]
    if b.draw(st.booleans()):
        inputs.append(b.weight((fo,), "bias"))
    return b.add("Gemm", inputs, (n, fo), transB=1)


def _binary(b: Builder, x: str, op: str) -> str:
    shape = b.shapes[x]
    if b.draw(st.booleans()):
        other = b.same_shape_partner(x)
    else:  # a broadcast constant: per channel (rank 4), per feature, or a scalar
        const_shape = (shape[1], 1, 1) if len(shape) == 4 and b.draw(st.booleans()) else (shape[-1],)
        other = b.weight(const_shape if b.draw(st.booleans()) else (), "c")
    return b.add(op, [x, other], shape)


def _unary(b: Builder, x: str, op: str) -> str:
    if op == "Softmax":
        return b.add(op, [x], b.shapes[x], axis=-1)
    return b.add(op, [x], b.shapes[x])


def _concat(b: Builder, x: str) -> str:
    shape = b.shapes[x]
    fits = [t for t, s in b.shapes.items() if len(s) == len(shape) and s[0] == shape[0] and s[2:] == shape[2:]]
    other = str(b.draw(st.sampled_from(sorted(fits))))
    joined = (shape[0], shape[1] + b.shapes[other][1], *shape[2:])
    return b.add("Concat", [x, other], joined, axis=1)


def _reshape(b: Builder, x: str) -> str:
    shape = b.shapes[x]
    size = int(np.prod(shape[1:]))
    if len(shape) == 2 and b.draw(st.booleans()):
        target: Shape = (shape[0], size, 1, 1)
    elif len(shape) == 2 and size % 2 == 0:
        target = (shape[0], 2, size // 2)
    else:
        target = (shape[0], size)
    return b.add("Reshape", [x, b.const_i64([0, *target[1:]])], target)


def _transpose(b: Builder, x: str) -> str:
    shape = b.shapes[x]
    perm = [0, 1, 3, 2] if len(shape) == 4 else [0, 2, 1]
    return b.add("Transpose", [x], tuple(shape[p] for p in perm), perm=perm)


def _pool(b: Builder, x: str) -> str:
    n, c, _, _ = b.shapes[x]
    return b.add("GlobalAveragePool", [x], (n, c, 1, 1))


#: op -> (ranks it accepts, how to apply it)
OPS: dict[str, tuple[tuple[int, ...], Callable[[Builder, str], str]]] = {
    "Conv": ((4,), _conv),
    "MatMul": ((2, 3), _matmul),
    "Gemm": ((2,), _gemm),
    "Add": ((2, 3, 4), lambda b, x: _binary(b, x, "Add")),
    "Mul": ((2, 3, 4), lambda b, x: _binary(b, x, "Mul")),
    "Relu": ((2, 3, 4), lambda b, x: _unary(b, x, "Relu")),
    "Sigmoid": ((2, 3, 4), lambda b, x: _unary(b, x, "Sigmoid")),
    "Softmax": ((2, 3, 4), lambda b, x: _unary(b, x, "Softmax")),
    "Concat": ((2, 3, 4), _concat),
    "Reshape": ((2, 3, 4), _reshape),
    "Transpose": ((3, 4), _transpose),
    "GlobalAveragePool": ((4,), _pool),
}


def _input_shape(draw: Draw) -> Shape:
    batch = draw(st.sampled_from(["N", 1, 2]))
    rank = draw(st.sampled_from([2, 3, 4, 4]))
    if rank == 4:
        return (batch, draw(st.sampled_from([16, 20, 3, 1])), draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    if rank == 3:
        return (batch, draw(st.integers(1, 20)), draw(st.sampled_from([16, 32, 8, 1])))
    return (batch, draw(st.sampled_from([16, 64, 40, 5, 1])))


def _value_info(name: str, shape: Shape, dtype: type) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), list(shape))


def build_model(draw: Draw) -> tuple[onnx.ModelProto, Shape]:
    """A random model (checked with onnx.checker full check) and its input's shape.

    Mostly float32 at opset 17; also float16 (weights and activations) and opsets 13 to 21.
    """
    dtype = draw(st.sampled_from([np.float32, np.float32, np.float16]))
    opset = draw(st.sampled_from([17, 13, 19, 21]))
    builder = Builder(draw, np.random.default_rng(draw(st.integers(0, 2**16))), dtype)
    shape = _input_shape(draw)
    builder.shapes["x"] = shape
    for _ in range(draw(st.integers(1, 6))):
        x = str(draw(st.sampled_from(sorted(builder.shapes))))
        usable = sorted(op for op, (ranks, _) in OPS.items() if len(builder.shapes[x]) in ranks)
        weighted = [op for op in usable if op in WEIGHTED]
        # half the steps are weighted ops, so most graphs really get Q/DQ
        choices = weighted if weighted and draw(st.booleans()) else usable
        OPS[draw(st.sampled_from(choices))][1](builder, x)
    leaves = [t for t in builder.shapes if t not in builder.consumed and t != "x"] or ["x"]
    graph = helper.make_graph(
        builder.nodes, "fuzz", [_value_info("x", shape, dtype)],
        [_value_info(t, builder.shapes[t], dtype) for t in leaves], builder.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model, shape


def feeds(draw: Draw, model: onnx.ModelProto, shape: Shape) -> list[dict[str, np.ndarray]]:
    """1-3 feeds for input ``x``: batch 2 where it is dynamic; values at a drawn scale (sometimes all zero)."""
    dtype = helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    concrete = tuple(2 if d == "N" else d for d in shape)
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 1e3] if dtype == np.float32 else [0.0, 1e-3, 1.0]))
    count = draw(st.integers(1, 3))
    return [{"x": (rng.standard_normal(concrete) * scale).astype(dtype)} for _ in range(count)]
