"""Inputs that share no sample axis (recurrent state, rank-0 inputs, different static leading dims):
every file or feed dict is one feed, run as it is (issue 6, item 10), and dynamic dims written -1."""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys
from pathlib import Path

import model_builders
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxq
from onnxq.api import input_specs
from onnxq.calibration.data import (
    InputSpec,
    _ChunkInfo,
    _plan_batches,
    open_calibration_data,
    shares_sample_axis,
)
from onnxq.errors import OnnxqError
from onnxq.model_io import load_model

HIDDEN = 32
ROWS = 4
F32 = np.dtype(np.float32)
I64 = np.dtype(np.int64)
#: the shape of silero_vad's state input: the batch is axis 1, the layers axis 0
STATE = (2, ROWS, HIDDEN)


def recurrent_model(seed: int = 0, with_rate: bool = True, rate_first: bool = False) -> onnx.ModelProto:
    """x [4, 32] and state [2, 4, 32] (static), optional sr (int64 scalar): y = ((x @ W + sum(state)) * sr/16k) @ V."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"),
        helper.make_node("ReduceSum", ["state", "axis0"], ["s"], keepdims=0, name="state_sum"),
        helper.make_node("Add", ["h", "s"], ["z"], name="add"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, HIDDEN]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, list(STATE)),
    ]
    if with_rate:
        nodes += [
            helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT, name="cast"),
            helper.make_node("Div", ["srf", "rate"], ["gain"], name="gain"),
            helper.make_node("Mul", ["z", "gain"], ["zg"], name="scale"),
        ]
        rate = helper.make_tensor_value_info("sr", TensorProto.INT64, [])
        inputs = [rate, *inputs] if rate_first else [*inputs, rate]
    nodes.append(helper.make_node("MatMul", ["zg" if with_rate else "z", "v"], ["y"], name="mm2"))
    graph = helper.make_graph(
        nodes,
        "recurrent",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, HIDDEN])],
        [
            model_builders.weights(rng, "w", [HIDDEN, HIDDEN]),
            model_builders.weights(rng, "v", [HIDDEN, HIDDEN]),
            onnx.numpy_helper.from_array(np.array([0], np.int64), "axis0"),
            onnx.numpy_helper.from_array(np.array(16000.0, np.float32), "rate"),
        ],
    )
    return model_builders.finish(graph)


def feeds(count: int, seed: int = 1, with_rate: bool = True) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        feed = {
            "x": rng.standard_normal((ROWS, HIDDEN)).astype(np.float32),
            "state": rng.standard_normal(STATE).astype(np.float32),
        }
        if with_rate:
            feed["sr"] = np.array(16000, np.int64)
        out.append(feed)
    return out


def save_feeds(folder: Path, items: list[dict[str, np.ndarray]]) -> Path:
    folder.mkdir()
    for index, feed in enumerate(items):
        np.savez(folder / f"{index:03d}.npz", **feed)
    return folder


def specs_of(model: onnx.ModelProto) -> list[InputSpec]:
    return input_specs(load_model(model))


# ----------------------------------------------------------------------------------------------
# deciding the mode from the model


@pytest.mark.parametrize(
    ("shapes", "shared"),
    [
        ([("N", 3), ("N", 5)], True),  # a common dynamic batch
        ([(1, 3), (1, 5)], True),  # one static batch
        ([(None, 3), ("M", 5)], True),  # dynamic, differently named: still one axis
        ([("B", "T"), (2, "B", 128), ()], False),  # silero_vad: state [2, B, 128], sr rank 0
        ([(1, 576), (2, 1, 128)], False),  # silero_vad_openvino: different static leading dims
        ([("seq", 576), (1, 1, 128)], False),  # silero_vad_16k_sequence: static beside dynamic
        ([()], False),  # a lone scalar
    ],
)
def test_shares_sample_axis(shapes: list[tuple[int | str | None, ...]], shared: bool) -> None:
    specs = [InputSpec(f"i{index}", F32, shape) for index, shape in enumerate(shapes)]
    assert shares_sample_axis(specs) is shared


@pytest.mark.parametrize("dim", [-1, 0, -7])
def test_non_positive_dims_are_dynamic(dim: int) -> None:
    """paddle2onnx writes a dynamic dim as dim_value -1; it must never become a batch size."""
    spec = InputSpec("x", F32, (dim, 3))
    assert spec.shape == (None, 3) and spec.fixed_batch is None
    data = open_calibration_data({"x": np.ones((5, 3), np.float32)}, [spec], batch_size=2)
    assert [len(feed["x"]) for feed in data.batches()] == [2, 2, 1]


@pytest.mark.parametrize("batch_size", [0, -1])
def test_batch_planner_refuses_a_step_that_takes_nothing(batch_size: int) -> None:
    # islice: a planner that does not advance yields empty batches forever instead of failing
    with pytest.raises(ValueError, match="at least 1"):
        list(itertools.islice(_plan_batches([_ChunkInfo(6, ())], batch_size, fixed=True), 100))


def test_split_refuses_empty_runs() -> None:
    data = open_calibration_data({"x": np.ones((5, 3), np.float32)}, [InputSpec("x", F32, ("N", 3))])
    feed = next(data.batches())
    assert [len(part["x"]) for part in data.split(feed, 2)] == [2, 2, 1]
    with pytest.raises(ValueError, match="at least one sample"):
        list(data.split(feed, 0))


def test_negative_batch_dimension_quantizes_through_the_cli(tmp_path: Path) -> None:
    """Issue 6 item 1: a -1 batch dim made `onnxq quantize` loop forever; it must finish."""
    model = model_builders.residual_cnn()
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = -1
    path = tmp_path / "paddle.onnx"
    onnx.save(model, path)
    data = tmp_path / "calib.npz"
    np.savez(data, **model_builders.cnn_inputs(1, 6))
    output = tmp_path / "q.onnx"
    command = [sys.executable, "-m", "onnxq", "quantize", str(path), "--calib", str(data), "-o", str(output)]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("onnxq quantize did not return within 60 s on a model with a -1 batch dimension")
    assert run.returncode == 0, run.stderr
    onnx.checker.check_model(str(output), full_check=True)


# ----------------------------------------------------------------------------------------------
# as-is data


def test_directory_of_feeds_runs_each_file_as_is(tmp_path: Path) -> None:
    items = feeds(5)
    folder = save_feeds(tmp_path / "calib", items)
    data = open_calibration_data(folder, specs_of(recurrent_model()), max_samples=4)
    assert data.as_is and data.num_samples == 4 and data.num_batches == 4
    for _ in range(2):  # every pass gives the same feeds, unchanged
        seen = list(data.batches())
        assert len(seen) == 4
        for feed, expected in zip(seen, items):
            assert feed.keys() == expected.keys()
            for name, array in expected.items():
                np.testing.assert_array_equal(feed[name], array)
                assert feed[name].shape == array.shape


def test_list_of_feeds_runs_each_feed_as_is_and_ignores_batch_size(caplog: pytest.LogCaptureFixture) -> None:
    items = feeds(3)
    with caplog.at_level(logging.WARNING):
        data = open_calibration_data(items, specs_of(recurrent_model()), batch_size=8)
    assert "batch size 8 ignored" in caplog.text
    assert [feed["state"].shape for feed in data.batches()] == [STATE] * 3


def test_as_is_feed_must_match_every_static_dim(tmp_path: Path) -> None:
    bad = feeds(1)[0]
    bad["state"] = bad["state"][:, :2]
    with pytest.raises(OnnxqError, match=r"'state'.*dimension 1.*fixes it to 4"):
        open_calibration_data([bad], specs_of(recurrent_model()))
    unbatched = feeds(1)[0]
    unbatched["x"] = unbatched["x"][0]
    with pytest.raises(OnnxqError, match=r"'x'.*rank 2.*runs as it is"):
        open_calibration_data([unbatched], specs_of(recurrent_model()))


def test_full_rank_feeds_with_different_leading_sizes_run_as_is(tmp_path: Path) -> None:
    """All-dynamic declared dims (no common name), but the files hold whole feeds: input [8, 3], h [1, 1, 4]."""
    specs = [InputSpec("input", F32, ("seq", 3)), InputSpec("h", F32, (None, None, 4))]
    folder = tmp_path / "calib"
    folder.mkdir()
    for index, rows in enumerate((8, 5)):
        np.savez(
            folder / f"{index}.npz", input=np.ones((rows, 3), np.float32), h=np.ones((1, 1, 4), np.float32)
        )
    data = open_calibration_data(folder, specs)
    assert data.as_is
    assert [feed["input"].shape for feed in data.batches()] == [(8, 3), (5, 3)]


def test_fingerprint_of_as_is_data_covers_every_feed(tmp_path: Path) -> None:
    specs = specs_of(recurrent_model())
    first = open_calibration_data(feeds(3), specs).fingerprint()
    assert first == open_calibration_data(feeds(3), specs).fingerprint()
    changed = feeds(3)
    changed[2]["sr"] = np.array(8000, np.int64)
    assert open_calibration_data(changed, specs).fingerprint() != first
    assert open_calibration_data(feeds(2), specs).fingerprint() != first


@pytest.mark.parametrize("with_rate", [True, False])
def test_recurrent_model_calibrates_from_a_directory_of_feeds(tmp_path: Path, with_rate: bool) -> None:
    """End to end, with a cache: the second run reads the ranges back instead of calibrating."""
    model = recurrent_model(with_rate=with_rate)
    folder = save_feeds(tmp_path / "calib", feeds(4, with_rate=with_rate))
    cache = tmp_path / "ranges.json"
    # a tiny memory limit: runs cannot split an as-is feed, tensors are grouped instead
    options = {"calib_cache": cache, "calib_memory_mb": 1e-4, "calib_method": "entropy"}
    first = onnxq.quantize(model, calibration_data=folder, output_path=tmp_path / "q.onnx", **options)
    assert first.ranges and all(r.source.startswith("calibration") for r in first.ranges.values())
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    expected = {t: r.stats.amax for t, r in first.ranges.items()}
    reference = {
        name: max(float(np.abs(f[name]).max()) for f in feeds(4, with_rate=with_rate)) for name in ("x",)
    }
    assert expected["x"] == reference["x"]
    second = onnxq.quantize(model, calibration_data=folder, **options)
    assert {t: r.source for t, r in second.ranges.items()} == {t: "cache" for t in first.ranges}
    assert {t: (r.chosen_low, r.chosen_high) for t, r in second.ranges.items()} == {
        t: (r.chosen_low, r.chosen_high) for t, r in first.ranges.items()
    }


def test_compare_counts_as_is_feeds_with_a_scalar_first_input(tmp_path: Path) -> None:
    """compare counted samples as len(first input): a rank-0 first input (sr) made it crash."""
    model = recurrent_model(rate_first=True)
    reference = tmp_path / "model.onnx"
    onnx.save(model, reference)
    folder = save_feeds(tmp_path / "calib", feeds(3))
    onnxq.quantize(reference, calibration_data=folder, output_path=tmp_path / "q.onnx")
    result = onnxq.compare(reference, tmp_path / "q.onnx", folder)
    assert result.samples == 3
    assert result.outputs["y"].snr_db > 20
