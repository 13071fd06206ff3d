"""Streaming collection of MatMul input activations for AWQ: bit-identical for every batch size, equal
to numpy on the exposed tensors, rows reduced to fit the memory limit, non-finite values skipped,
as-is feeds, and bad arguments."""

from __future__ import annotations

import logging

import model_builders
import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxq.api import input_specs
from onnxq.calibration.activation_samples import (
    ROWS_MEMORY_SHARE,
    ActivationSample,
    collect_activation_samples,
)
from onnxq.calibration.calibrator import CalibrationSettings
from onnxq.calibration.data import CalibrationSource, open_calibration_data

SEQ, HIDDEN, WIDE, OUT = 5, 8, 16, 6
SAMPLES = 20
#: x [B, SEQ, HIDDEN]; h = x @ w1; flat = h as [B * SEQ, WIDE] (exporters reshape before a MatMul);
#: z = log(relu(x)) holds -inf wherever x <= 0 (as attention masks do)
TENSORS = ["x", "h", "flat", "z"]
MODEL_TEXT = f"""
agraph (float[B, {SEQ}, {HIDDEN}] x) => (float[B, {SEQ}, {OUT}] y, float[B, {SEQ}, 4] v) {{
    h = MatMul(x, w1)
    flat = Reshape(h, flat_shape)
    g = MatMul(flat, w2)
    y = Reshape(g, out_shape)
    r = Relu(x)
    z = Log(r)
    v = MatMul(z, w3)
}}
"""


def matmul_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    initializers = {
        "w1": model_builders.randn(rng, HIDDEN, WIDE),
        "w2": model_builders.randn(rng, WIDE, OUT),
        "w3": model_builders.randn(rng, HIDDEN, 4),
        "flat_shape": np.array([-1, WIDE], np.int64),
        "out_shape": np.array([-1, SEQ, OUT], np.int64),
    }
    return model_builders.build(MODEL_TEXT, initializers)


def positive_inputs(seed: int, samples: int = SAMPLES) -> dict[str, np.ndarray]:
    """|x| + 0.05, with about 5% of the values made negative so that z = log(relu(x)) is -inf there."""
    rng = np.random.default_rng(seed)
    x = (np.abs(rng.standard_normal((samples, SEQ, HIDDEN))) + 0.05).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = -0.1
    return {"x": x}


def collect(
    proto: onnx.ModelProto,
    data: CalibrationSource,
    batch_size: int | None,
    tensors: list[str],
    memory_mb: float = 64,
    rows: int = 40,
) -> dict[str, ActivationSample]:
    model = ir.serde.deserialize_model(proto)
    feeds = open_calibration_data(data, input_specs(model), batch_size)
    settings = CalibrationSettings(memory_limit_mb=memory_mb)
    return collect_activation_samples(model, tensors, feeds, settings, rows_per_tensor=rows)


def exposed_tensors(proto: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every tensor of TENSORS computed by ONNX Runtime in one plain session (x is the input)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    exposed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in TENSORS[1:])
    outputs = model_builders.run(exposed, feed)
    return {"x": feed["x"], **dict(zip(TENSORS[1:], outputs[2:]))}


def reference(values: np.ndarray, rows: int) -> ActivationSample:
    """numpy: masked float64 mean of |x| per channel; the first finite rows."""
    flat = values.reshape(-1, values.shape[-1]).astype(np.float64)
    finite = np.isfinite(flat)
    mean = np.where(finite, np.abs(flat), 0).sum(axis=0) / np.maximum(finite.sum(axis=0), 1)
    kept = flat[finite.all(axis=1)][:rows].astype(np.float32)
    return ActivationSample(mean.astype(np.float32), kept, flat.shape[0])


def assert_identical(first: dict[str, ActivationSample], second: dict[str, ActivationSample]) -> None:
    assert list(first) == list(second)
    for tensor in first:
        a, b = first[tensor], second[tensor]
        assert a.channel_mean_abs.tobytes() == b.channel_mean_abs.tobytes(), tensor
        assert a.rows.shape == b.rows.shape and a.rows.tobytes() == b.rows.tobytes(), tensor
        assert a.rows_seen == b.rows_seen, tensor


def test_bit_identical_for_batch_sizes_1_3_7() -> None:
    proto, data = matmul_model(), positive_inputs(1)
    results = [collect(proto, data, batch, TENSORS) for batch in (1, 3, 7)]
    assert_identical(results[0], results[1])
    assert_identical(results[0], results[2])


def test_matches_numpy_on_the_exposed_tensors() -> None:
    proto, data = matmul_model(), positive_inputs(2)
    found = collect(proto, data, 4, TENSORS, rows=40)
    exposed = exposed_tensors(proto, data)
    for tensor in TENSORS:
        expected = reference(exposed[tensor], 40)
        sample = found[tensor]
        assert sample.rows_seen == expected.rows_seen == SAMPLES * SEQ
        np.testing.assert_allclose(sample.channel_mean_abs, expected.channel_mean_abs, rtol=1e-6)
        assert sample.rows.dtype == np.float32 and sample.rows.shape == expected.rows.shape == (
            40,
            sample.rows.shape[1],
        )
        np.testing.assert_allclose(sample.rows, expected.rows, rtol=1e-6)
    np.testing.assert_array_equal(found["x"].rows, data["x"].reshape(-1, HIDDEN)[:40])


def test_non_finite_values_are_skipped_in_means_and_rows() -> None:
    proto, data = matmul_model(), positive_inputs(3)
    z = collect(proto, data, 8, ["z"], rows=1000)["z"]
    with np.errstate(divide="ignore"):
        expected_z = np.log(np.maximum(data["x"], 0)).reshape(-1, HIDDEN)
    finite_rows = np.isfinite(expected_z).all(axis=1)
    assert 0 < finite_rows.sum() < len(finite_rows)  # the data does hold -inf rows
    assert np.isfinite(z.rows).all() and z.rows.shape == (int(finite_rows.sum()), HIDDEN)
    assert z.rows_seen == SAMPLES * SEQ
    masked = np.ma.masked_invalid(np.abs(expected_z.astype(np.float64)))
    np.testing.assert_allclose(z.channel_mean_abs, masked.mean(axis=0).filled(0), rtol=1e-6)


def test_tiny_memory_limit_reduces_rows_and_changes_nothing_else(caplog: pytest.LogCaptureFixture) -> None:
    proto, data = matmul_model(), positive_inputs(4)
    roomy = collect(proto, data, 7, TENSORS, memory_mb=64, rows=40)
    limit_mb = 0.001  # 1 KiB: rows of all four tensors (48 channels) fit only two; runs split up
    with caplog.at_level(logging.INFO):
        tight = collect(proto, data, 7, TENSORS, memory_mb=limit_mb, rows=40)
    affordable = int(limit_mb * ROWS_MEMORY_SHARE * 1024 * 1024 // (4 * (HIDDEN + WIDE + WIDE + HIDDEN)))
    assert 0 < affordable < 40
    messages = [r.getMessage() for r in caplog.records]
    assert any("rows per tensor instead of 40" in m for m in messages)
    assert any("group 2/" in m for m in messages)  # one sample's tensors exceed a run: tensor groups
    kept_bytes = sum(sample.rows.nbytes for sample in tight.values())
    assert kept_bytes <= limit_mb * ROWS_MEMORY_SHARE * 1024 * 1024
    for tensor in TENSORS:
        assert tight[tensor].channel_mean_abs.tobytes() == roomy[tensor].channel_mean_abs.tobytes()
        assert tight[tensor].rows_seen == roomy[tensor].rows_seen
        assert len(tight[tensor].rows) <= affordable
        np.testing.assert_array_equal(tight[tensor].rows, roomy[tensor].rows[: len(tight[tensor].rows)])


def as_is_model() -> onnx.ModelProto:
    """x [4, 8] and state [2, 4, 8]: different static leading dims, so feeds run as they are."""
    text = f"""
    agraph (float[4, {HIDDEN}] x, float[2, 4, {HIDDEN}] state) => (float[4, 3] y) {{
        s = ReduceSum<keepdims = 0>(state, axes)
        a = Add(x, s)
        y = MatMul(a, w)
    }}
    """
    rng = np.random.default_rng(5)
    return model_builders.build(text, {"w": model_builders.randn(rng, HIDDEN, 3), "axes": np.array([0])})


def test_as_is_feeds_are_one_sample_each() -> None:
    rng = np.random.default_rng(6)
    feeds = [
        {
            "x": rng.standard_normal((4, HIDDEN)).astype(np.float32),
            "state": rng.standard_normal((2, 4, HIDDEN)).astype(np.float32),
        }
        for _ in range(3)
    ]
    found = collect(as_is_model(), feeds, None, ["a", "x"], rows=6)
    a = np.concatenate([f["x"] + f["state"].sum(axis=0) for f in feeds])
    expected = reference(a, 6)
    assert found["a"].rows_seen == 12 and found["x"].rows_seen == 12
    np.testing.assert_allclose(found["a"].channel_mean_abs, expected.channel_mean_abs, rtol=1e-6)
    np.testing.assert_allclose(found["a"].rows, expected.rows, rtol=1e-6)
    np.testing.assert_array_equal(found["x"].rows, np.concatenate([f["x"] for f in feeds])[:6])


def test_bad_arguments_are_value_errors() -> None:
    proto, data = matmul_model(), positive_inputs(7, samples=2)
    with pytest.raises(ValueError, match="not in the graph"):
        collect(proto, data, 2, ["nowhere"])
    with pytest.raises(ValueError, match="rows per tensor"):
        collect(proto, data, 2, ["x"], rows=-1)
