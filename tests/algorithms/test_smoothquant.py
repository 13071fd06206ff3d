"""SmoothQuant's math: s against numpy's formula, the zero/non-finite guards, what alpha 0 and 1 mean,
the error measure against an independent ONNX Q/DQ evaluation (onnx.reference), the search never
worse than any fixed alpha on the same data, and the one-line errors for bad options."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnxq.algorithms import smoothquant as sq
from onnxq.errors import OnnxqError
from onnxq.formats import get_format

ROWS, CHANNELS, WIDTH = 128, 64, 48
OUTLIERS = 4
OUTLIER_GAIN = 40.0
INT8 = sq.QuantFormats(get_format("int8"), get_format("int8"), symmetric=True)


def outlier_rows(seed: int, rows: int = ROWS) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, CHANNELS)).astype(np.float32)
    x[:, rng.choice(CHANNELS, OUTLIERS, replace=False)] *= np.float32(OUTLIER_GAIN)
    return x


def weights(seed: int, widths: tuple[int, ...] = (WIDTH,)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((CHANNELS, n)) / np.sqrt(CHANNELS)).astype(np.float32) for n in widths]


def channel_range(x: np.ndarray) -> sq.ChannelRange:
    return sq.ChannelRange(x.min(axis=0), x.max(axis=0))


def test_scale_matches_the_formula() -> None:
    rng = np.random.default_rng(0)
    act = rng.uniform(0.1, 50, CHANNELS)
    wgt = rng.uniform(0.01, 2, CHANNELS)
    for alpha in (0.0, 0.3, 0.5, 0.85, 1.0):
        expected = (act**alpha / wgt ** (1 - alpha)).astype(np.float32)
        np.testing.assert_allclose(sq.smoothing_scale(act, wgt, alpha), expected, rtol=1e-6)


def test_dead_and_nonfinite_channels_keep_scale_one() -> None:
    act = np.array([0.0, 3.0, np.inf, 2.0, np.nan, 4.0])
    wgt = np.array([1.0, 0.0, 1.0, 0.5, 1.0, 2.0])
    scale = sq.smoothing_scale(act, wgt, 0.5)
    np.testing.assert_array_equal(scale[:3], 1.0)
    assert scale[4] == 1.0
    np.testing.assert_allclose(scale[[3, 5]], np.sqrt([2.0, 4.0]) / np.sqrt([0.5, 2.0]), rtol=1e-6)


def test_extreme_ratios_stay_finite_in_float32() -> None:
    scale = sq.smoothing_scale(np.array([1e30, 1e-30]), np.array([1e-30, 1e30]), 1.0)
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    np.testing.assert_array_equal(scale, np.array([sq.MAX_SCALE, sq.MIN_SCALE], np.float32))


def test_alpha_zero_normalizes_weight_rows_and_alpha_one_activation_channels() -> None:
    x, (w,) = outlier_rows(1), weights(2)
    act, wgt = channel_range(x).amax, sq.weight_row_amax([w])
    smoothed_w = w * sq.smoothing_scale(act, wgt, 0.0)[:, None]
    np.testing.assert_allclose(np.abs(smoothed_w).max(axis=1), 1.0, rtol=1e-6)
    smoothed_x = x / sq.smoothing_scale(act, wgt, 1.0)
    np.testing.assert_allclose(np.abs(smoothed_x).max(axis=0), 1.0, rtol=1e-6)


def test_alpha_zero_is_the_identity_when_weight_rows_already_peak_at_one() -> None:
    (w,) = weights(3)
    w = w / np.abs(w).max(axis=1, keepdims=True)
    scale = sq.smoothing_scale(channel_range(outlier_rows(4)).amax, sq.weight_row_amax([w]), 0.0)
    np.testing.assert_allclose(scale, 1.0, rtol=1e-6)


def test_shared_weight_maximum_is_over_every_consumer() -> None:
    ws = weights(5, (16, 32, 8))
    expected = np.max(np.concatenate([np.abs(w) for w in ws], axis=1), axis=1)
    np.testing.assert_array_equal(sq.weight_row_amax(ws), expected)


def _qdq_matmul_error(x: np.ndarray, w: np.ndarray, scale: np.ndarray, low: float, high: float) -> float:
    """Relative output error of Q/DQ(x / s) @ DQ(Q(W * s)) run by onnx.reference."""
    amax = max(abs(low), abs(high))
    ws = w * scale[:, None]
    w_scale = (np.abs(ws).max(axis=0) / 127).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
            helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], axis=1),
            helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
            helper.make_node("MatMul", ["xd", "wd"], ["y"]),
        ],
        "sq_check",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("xs", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("xz", TensorProto.INT8, None),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("ws", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("wz", TensorProto.INT8, None),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    feed = {
        "x": (x / scale).astype(np.float32),
        "xs": np.float32(amax / 127),
        "xz": np.int8(0),
        "w": ws.astype(np.float32),
        "ws": w_scale,
        "wz": np.zeros(w.shape[1], np.int8),
    }
    outputs = ReferenceEvaluator(model).run(None, feed)
    assert isinstance(outputs, list)
    y = np.asarray(outputs[0], np.float64)
    reference = x.astype(np.float64) @ w.astype(np.float64)
    return float(np.sum((reference - y) ** 2) / np.sum(reference**2))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8])
def test_error_matches_qdq_as_onnx_defines_it(alpha: float) -> None:
    x, (w,) = outlier_rows(6), weights(7)
    ranges = channel_range(x)
    scale = sq.smoothing_scale(ranges.amax, sq.weight_row_amax([w]), alpha)
    low, high = ranges.smoothed(scale)
    expected = _qdq_matmul_error(x, w, scale, low, high)
    assert sq.smoothing_error(x, [w], ranges, scale, INT8) == pytest.approx(expected, rel=1e-4)


def test_smoothing_cuts_the_error_on_outlier_activations() -> None:
    x, ws = outlier_rows(8), weights(9, (WIDTH, 32))
    ranges = channel_range(x)
    ones = np.ones(CHANNELS, np.float32)
    smoothed = sq.smoothing_scale(ranges.amax, sq.weight_row_amax(ws), 0.5)
    assert sq.smoothing_error(x, ws, ranges, smoothed, INT8) < 0.2 * sq.smoothing_error(
        x, ws, ranges, ones, INT8
    )


@pytest.mark.parametrize("fmt", ["int8", "uint8", "fp8"])
def test_auto_is_never_worse_than_a_fixed_alpha_on_the_same_data(fmt: str) -> None:
    symmetric = fmt != "uint8"
    formats = sq.QuantFormats(get_format(fmt), get_format("fp8" if fmt == "fp8" else "int8"), symmetric)
    x, ws = outlier_rows(10), weights(11, (WIDTH, 16))
    ranges = channel_range(x)
    found = sq.search_alpha(x, ws, ranges, formats)
    assert found.alpha in sq.ALPHA_GRID
    wgt = sq.weight_row_amax(ws)
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        fixed = sq.smoothing_error(x, ws, ranges, sq.smoothing_scale(ranges.amax, wgt, alpha), formats)
        assert found.error <= fixed
    assert found.error <= found.error_unsmoothed
    assert found.error == pytest.approx(sq.smoothing_error(x, ws, ranges, found.scale, formats))


def test_auto_keeps_no_smoothing_when_it_measures_best() -> None:
    """One channel: every s gives the same quantized product up to rounding; a grid of one alpha far
    from the identity cannot win when no smoothing is exact enough."""
    x = np.full((8, 1), 2.0, np.float32)
    w = np.full((1, 4), 1.0, np.float32)  # x and W sit on the grid: unsmoothed error 0
    found = sq.search_alpha(x, [w], channel_range(x), INT8, grid=(0.3,))
    assert found.error_unsmoothed == 0.0
    assert found.alpha is None and np.all(found.scale == 1.0)


def _gemm_model(op: str = "MatMul") -> ir.Model:
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "w"], ["y"])] if op else [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.1] * 16)],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize("alpha", [0, 0.5, 1, "0.25", "auto", "AUTO"])
def test_good_options_pass(alpha: object) -> None:
    value = sq.check_smoothquant_options(alpha, "int8", _gemm_model())
    assert value == "auto" if str(alpha).lower() == "auto" else value == float(alpha)  # type: ignore[arg-type]
    assert sq.check_smoothquant_options(alpha, "fp8", _gemm_model("Gemm")) == value


@pytest.mark.parametrize("alpha", [-0.1, 1.01, float("nan"), float("inf"), "half", None, True, [0.5]])
def test_alpha_outside_zero_one_is_refused_in_one_line(alpha: object) -> None:
    with pytest.raises(OnnxqError, match=r"alpha .* is not a number in \[0, 1\]") as caught:
        sq.check_smoothquant_options(alpha, "int8", _gemm_model())
    assert "\n" not in str(caught.value) and "Fix:" in str(caught.value)


@pytest.mark.parametrize("mode", ["int4", "nvfp4", "w4a8", "mxfp8", "int4-w4a8", "nvfp4-w4a16"])
def test_modes_it_does_not_serve_are_refused(mode: str) -> None:
    with pytest.raises(OnnxqError, match=f"not {mode}") as caught:
        sq.check_smoothquant_options(0.5, mode, _gemm_model())
    assert "\n" not in str(caught.value)


def test_model_without_gemm_is_refused() -> None:
    with pytest.raises(OnnxqError, match="no MatMul or Gemm") as caught:
        sq.check_smoothquant_options("auto", "int8", _gemm_model(op=""))
    assert "\n" not in str(caught.value)
    assert sq.check_smoothquant_options(0.5, "int8", None) == 0.5  # no model yet: options only
