"""AWQ searches: measured output-MSE gains over RTN on activations with outlier channels, never worse
than RTN, results within their grids, and the reported error recomputed independently through
``onnx.reference.ReferenceEvaluator`` (block QuantizeLinear/DequantizeLinear + MatMul at opset 21)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnxq.algorithms import awq
from onnxq.calibration.activation_samples import ActivationSample
from onnxq.formats import int4

ROWS, CHANNELS = 256, 256
#: two weights reading the same activation (e.g. a fused K/V pair), different widths
WIDTHS = (128, 64)
BLOCK = 64
OUTLIERS = 8
#: outlier channels are this many times larger than the rest (as in LLM activations)
OUTLIER_GAIN = 25.0
#: awq-lite / awq-full must cut RTN's output MSE at least by this factor on outlier activations
REQUIRED_GAIN = 1.5


def outlier_sample(seed: int, rows: int = ROWS, channels: int = CHANNELS) -> ActivationSample:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, channels)).astype(np.float32)
    x[:, rng.choice(channels, OUTLIERS, replace=False)] *= np.float32(OUTLIER_GAIN)
    return ActivationSample(np.abs(x).mean(axis=0).astype(np.float32), x, rows)


def gaussian_weights(
    seed: int, channels: int = CHANNELS, widths: tuple[int, ...] = WIDTHS
) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((channels, n)) * 0.02).astype(np.float32) for n in widths]


def qdq_matmul_model(shape: tuple[int, int], block: int, zero_point: bool) -> ReferenceEvaluator:
    """y = x @ DQ(Q(w, scale, zp)) with blocks along axis 0: the deployed numbers, as ONNX defines them."""
    dtype = TensorProto.UINT4 if zero_point else TensorProto.INT4
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["w", "scale", "zp"], ["q"], axis=0, block_size=block),
            helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["wq"], axis=0, block_size=block),
            helper.make_node("MatMul", ["x", "wq"], ["y"]),
        ],
        "awq_check",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, shape[0]]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, list(shape)),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("zp", dtype, None),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return ReferenceEvaluator(model)


def deployed_mse(
    weights: list[np.ndarray], sample: ActivationSample, result: awq.AwqResult, block: int, zero_point: bool
) -> float:
    """Output MSE of the result as it would be deployed: x / s into Q/DQ(W * s, clip) MatMuls."""
    x = sample.rows.astype(np.float64)
    scale = np.ones(x.shape[1], np.float32) if result.input_scale is None else result.input_scale
    squared, count = 0.0, 0
    for w, clip in zip(weights, result.clip_ratios):
        scaled = w * scale[:, None]
        params = int4.weight_params(scaled, 0, block, zero_point, clip_ratio=clip)
        feed = {"x": sample.rows / scale, "w": scaled, "scale": params.scale, "zp": params.zero_point}
        (output,) = qdq_matmul_model(w.shape, block, zero_point).run(None, feed)
        y = np.asarray(output, np.float64)
        squared += float(np.sum((x @ w.astype(np.float64) - y) ** 2))
        count += y.size
    return squared / count


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("algorithm", ["awq-lite", "awq-full"])
def test_scale_search_beats_rtn_on_outlier_channels(algorithm: str, zero_point: bool) -> None:
    sample, weights = outlier_sample(1), gaussian_weights(2)
    result = awq.search(weights, sample, algorithm, BLOCK, zero_point)
    print(
        f"{algorithm} zero_point={zero_point}: RTN MSE {result.error_rtn:.4g} -> {result.error:.4g} "
        f"({result.error_rtn / result.error:.2f}x), alpha {result.alpha}, {result.seconds:.3f} s"
    )
    assert result.error * REQUIRED_GAIN < result.error_rtn
    assert result.alpha in awq.ALPHA_GRID and result.alpha > 0
    assert result.input_scale is not None and result.input_scale.dtype == np.float32
    np.testing.assert_array_equal(
        result.input_scale, awq.activation_scale(sample.channel_mean_abs, result.alpha)
    )
    # the reported numbers are the deployed ones, recomputed through ONNX's own Q/DQ definition
    assert deployed_mse(weights, sample, result, BLOCK, zero_point) == pytest.approx(result.error, rel=1e-4)
    rtn = awq.AwqResult(None, None, [None, None], 0.0, 0.0, 0.0)
    assert deployed_mse(weights, sample, rtn, BLOCK, zero_point) == pytest.approx(result.error_rtn, rel=1e-4)


def test_full_is_at_least_as_good_as_lite_and_clip_helps_on_outliers() -> None:
    sample, weights = outlier_sample(3), gaussian_weights(4)
    found = {name: awq.search(weights, sample, name, BLOCK) for name in awq.AWQ_ALGORITHMS}
    for name, result in found.items():
        print(
            f"{name}: {result.error_rtn:.4g} -> {result.error:.4g} ({result.error_rtn / result.error:.2f}x)"
        )
    assert found["awq-full"].error <= found["awq-lite"].error
    assert found["awq-clip"].error < found["awq-clip"].error_rtn
    assert found["awq-clip"].input_scale is None and found["awq-clip"].alpha is None


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("algorithm", awq.AWQ_ALGORITHMS)
def test_never_worse_than_rtn_and_within_grids(algorithm: str, zero_point: bool, seed: int) -> None:
    """Plain Gaussian activations (little for AWQ to gain), K not a multiple of the block size."""
    rng = np.random.default_rng(seed)
    channels = 200
    x = rng.standard_normal((64, channels)).astype(np.float32)
    sample = ActivationSample(np.abs(x).mean(axis=0).astype(np.float32), x, 64)
    weights = gaussian_weights(seed + 10, channels, (48, 24))
    result = awq.search(weights, sample, algorithm, BLOCK, zero_point)
    assert result.error <= result.error_rtn
    assert result.alpha is None or result.alpha in awq.ALPHA_GRID
    assert (result.input_scale is None) == (result.alpha is None)
    assert len(result.clip_ratios) == len(weights)
    for w, clip in zip(weights, result.clip_ratios):
        if clip is not None:
            assert clip.shape == (-(-channels // BLOCK), w.shape[1])
            assert ((clip > 0) & (clip <= 1)).all()
            assert set(np.unique(clip)) <= {np.float32(r) for r in awq.CLIP_GRID}
    assert deployed_mse(weights, sample, result, BLOCK, zero_point) == pytest.approx(result.error, rel=1e-4)


def test_alpha_zero_is_plain_rtn() -> None:
    sample = outlier_sample(5)
    np.testing.assert_array_equal(awq.activation_scale(sample.channel_mean_abs, 0.0), 1.0)
    assert awq.ALPHA_GRID[0] == 0.0 and awq.CLIP_GRID[0] == 1.0


def test_zero_mean_channels_keep_a_finite_positive_scale() -> None:
    means = np.array([0.0, 1.0, 4.0], np.float32)
    scale = awq.activation_scale(means, 0.5)
    assert scale is not None and np.isfinite(scale).all() and (scale > 0).all()
    assert awq.activation_scale(np.zeros(3, np.float32), 0.5) is None


def test_no_rows_gives_rtn_with_unknown_error() -> None:
    sample = ActivationSample(np.ones(CHANNELS, np.float32), np.zeros((0, CHANNELS), np.float32), 0)
    result = awq.search(gaussian_weights(6), sample, "awq-full", BLOCK)
    assert result.input_scale is None and result.clip_ratios == [None, None]
    assert np.isnan(result.error) and np.isnan(result.error_rtn)


def test_bad_arguments_are_value_errors() -> None:
    sample, weights = outlier_sample(7), gaussian_weights(8)
    with pytest.raises(ValueError, match="unknown AWQ algorithm"):
        awq.search(weights, sample, "awq-turbo", BLOCK)
    with pytest.raises(ValueError, match="not \\[K=256"):
        awq.search([weights[0].T], sample, "awq-lite", BLOCK)
    with pytest.raises(ValueError, match="at least one weight"):
        awq.search([], sample, "awq-lite", BLOCK)
    with pytest.raises(ValueError, match="block size"):
        awq.search(weights, sample, "awq-lite", 0)
