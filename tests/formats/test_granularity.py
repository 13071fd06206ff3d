"""Granularity as data: Q/DQ attributes, scale shapes, block-size checks, and the blocked DQ semantics
of ``expand`` checked against ``onnx.reference.ReferenceEvaluator``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxq.formats.granularity import Granularity, block_reduce, block_size_problem, blocks_last, n_blocks

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None)


@pytest.mark.parametrize(
    ("granularity", "rank", "attributes", "opset"),
    [
        (Granularity.tensor(), 2, {}, 10),
        (Granularity.channel(0), 4, {"axis": 0}, 13),
        (Granularity.channel(-1), 3, {"axis": 2}, 13),
        (Granularity.block(0, 128), 2, {"axis": 0, "block_size": 128}, 21),
        (Granularity.block(-1, 16), 2, {"axis": 1, "block_size": 16}, 21),
    ],
)
def test_qdq_attributes_and_opset(granularity: Granularity, rank: int, attributes: dict, opset: int) -> None:
    assert granularity.qdq_attributes(rank) == attributes
    assert granularity.min_opset == opset


@pytest.mark.parametrize(
    ("granularity", "shape", "scale_shape"),
    [
        (Granularity.tensor(), (256, 64), ()),
        (Granularity.channel(1), (256, 64), (64,)),
        (Granularity.block(0, 128), (256, 64), (2, 64)),
        (Granularity.block(0, 128), (200, 64), (2, 64)),  # the last block holds 72 rows
        (Granularity.block(0, 128), (100, 64), (1, 64)),  # one partial block
        (Granularity.block(1, 16), (64, 33), (64, 3)),
        (Granularity.block(-1, 32), (2, 3, 64), (2, 3, 2)),
    ],
)
def test_scale_shape_rounds_blocks_up(granularity: Granularity, shape: tuple, scale_shape: tuple) -> None:
    assert granularity.scale_shape(shape) == scale_shape


@pytest.mark.parametrize(
    ("block_size", "multiple_of", "reason"),
    [
        (128, 1, None),
        (200, 1, None),
        (np.int64(32), 16, None),
        (48, 16, None),
        (24, 16, "block size 24 is not a multiple of 16"),
        (16, 32, "block size 16 is not a multiple of 32"),
        (0, 1, "block size 0 is not positive"),
        (-16, 16, "block size -16 is not positive"),
        (1.5, 1, "block size 1.5 is not an integer"),
        (16.0, 16, "block size 16.0 is not an integer"),
        ("16", 1, "block size '16' is not an integer"),
        (True, 1, "block size True is not an integer"),
        (None, 1, "block size None is not an integer"),
    ],
)
def test_block_size_problem(block_size: object, multiple_of: int, reason: str | None) -> None:
    assert block_size_problem(block_size, multiple_of) == reason


@pytest.mark.parametrize(
    ("kind", "axis", "block_size"),
    [
        ("tensor", 0, None),
        ("channel", None, None),
        ("channel", 0, 16),
        ("block", 0, None),
        ("block", 0, 0),
        ("row", 0, None),
    ],
)
def test_half_specified_granularity_is_rejected(kind: str, axis: int | None, block_size: int | None) -> None:
    with pytest.raises(ValueError):
        Granularity(kind, axis, block_size)  # type: ignore[arg-type]


def test_n_blocks_is_ceil_division() -> None:
    assert [n_blocks(k, 128) for k in (1, 127, 128, 129, 200, 256, 257)] == [1, 1, 1, 2, 2, 2, 3]


def dequantize_model(shape: tuple[int, ...], granularity: Granularity, scale: np.ndarray) -> onnx.ModelProto:
    """y = DequantizeLinear(x int8, scale) with the granularity's attributes, at opset 21."""
    node = helper.make_node(
        "DequantizeLinear", ["x", "scale"], ["y"], **granularity.qdq_attributes(len(shape))
    )
    graph = helper.make_graph(
        [node],
        "dq",
        [helper.make_tensor_value_info("x", TensorProto.INT8, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializer=[numpy_helper.from_array(scale, "scale")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


@FAST
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    axis=st.sampled_from([0, 1, -1]),
    block_size=st.integers(1, 48),
    seed=st.integers(0, 2**16),
)
def test_expand_matches_blocked_dequantize_linear(
    rows: int, cols: int, axis: int, block_size: int, seed: int
) -> None:
    """expand(scale) * x is what ONNX's blocked DequantizeLinear computes, partial last blocks included."""
    rng = np.random.default_rng(seed)
    granularity = Granularity.block(axis, block_size)
    shape = (rows, cols)
    scale = rng.uniform(0.5, 2.0, granularity.scale_shape(shape)).astype(np.float32)
    x = rng.integers(-128, 128, shape).astype(np.int8)
    (y,) = ReferenceEvaluator(dequantize_model(shape, granularity, scale)).run(None, {"x": x})
    np.testing.assert_array_equal(y, x.astype(np.float32) * granularity.expand(scale, shape))


def test_expand_of_channel_and_tensor_broadcasts() -> None:
    shape = (3, 4)
    scale = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    np.testing.assert_array_equal(
        np.ones(shape) * Granularity.channel(1).expand(scale, shape), np.tile(scale, (3, 1))
    )
    assert Granularity.tensor().expand(np.float32(2.0), shape).shape == ()
    with pytest.raises(ValueError, match="does not fit"):
        Granularity.block(0, 2).expand(np.ones((1, 4), np.float32), shape)


def block_reduce_by_loop(x: np.ndarray, axis: int, block_size: int, reduce) -> np.ndarray:
    """Independent reference: slice each block out explicitly (short last block), reduce with 0 included."""
    x = np.moveaxis(x, axis, 0)
    out = [reduce(np.concatenate([x[i : i + block_size], np.zeros((1, *x.shape[1:]), x.dtype)]), axis=0)
           for i in range(0, x.shape[0], block_size)]  # fmt: skip
    return np.moveaxis(np.stack(out), 0, axis)


@FAST
@given(
    rows=st.integers(1, 30), cols=st.integers(1, 30), axis=st.sampled_from([0, 1]), block_size=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_block_reduce_matches_a_loop(rows: int, cols: int, axis: int, block_size: int, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    granularity = Granularity.block(axis, block_size)
    amax = block_reduce(x, granularity, "amax")
    assert amax.shape == granularity.scale_shape(x.shape)
    np.testing.assert_array_equal(amax, block_reduce_by_loop(np.abs(x), axis, block_size, np.max))
    np.testing.assert_array_equal(
        block_reduce(x, granularity, "min"), block_reduce_by_loop(x, axis, block_size, np.min)
    )
    np.testing.assert_array_equal(
        block_reduce(x, granularity, "max"), block_reduce_by_loop(x, axis, block_size, np.max)
    )


def test_blocks_last_pads_the_partial_block_with_zeros() -> None:
    x = np.arange(1, 6, dtype=np.float32).reshape(5, 1)  # K = 5 along axis 0, block 2
    blocks = blocks_last(x, 0, 2)
    assert blocks.shape == (1, 3, 2)
    assert blocks.tolist() == [[[1, 2], [3, 4], [5, 0]]]


def test_block_reduce_rejects_other_granularities() -> None:
    with pytest.raises(ValueError, match="needs block granularity"):
        block_reduce(np.ones((2, 2)), Granularity.channel(0))
    with pytest.raises(ValueError, match="unknown reduction"):
        block_reduce(np.ones((2, 2)), Granularity.block(0, 2), "mean")
