"""Calibration data sources: reading, batching, fingerprinting, and every refusal."""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.calibration.data import (
    DEFAULT_BATCH_SIZE,
    CalibrationData,
    InputSpec,
    open_calibration_data,
)
from onnxq.errors import OnnxqError

LOGGER = "onnxq.calibration.data"
FEATURES = 3
SEQ_SPECS = [
    InputSpec("ids", np.dtype(np.int64), ("batch", "seq")),
    InputSpec("mask", np.dtype(np.float32), ("batch", "seq")),
]


def x_spec(batch: int | str | None = "N") -> list[InputSpec]:
    """A single float32 input [batch, 3]."""
    return [InputSpec("x", np.dtype(np.float32), (batch, FEATURES))]


def samples(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, FEATURES)).astype(np.float32)


def collect(data: CalibrationData, name: str = "x") -> np.ndarray:
    """All samples of one input over a pass, in order."""
    return np.concatenate([feed[name] for feed in data.batches()])


def assert_user_error(error: pytest.ExceptionInfo[OnnxqError], *fragments: str) -> None:
    message = str(error.value)
    assert "Fix:" in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


class Payload:
    """Unpickling this creates ``marker`` (a directory): proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


# ----------------------------------------------------------------------------------------------
# sources


def test_npz_reads_all_samples_in_order(tmp_path: Path) -> None:
    path = tmp_path / "calib.npz"
    data_x = samples(50)
    np.savez(path, x=data_x)
    data = open_calibration_data(path, x_spec(), batch_size=8)
    assert data.num_samples == 50
    assert data.num_batches == 7
    assert data.batch_size == 8
    np.testing.assert_array_equal(collect(data), data_x)


def test_str_path_and_second_pass(tmp_path: Path) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, x=samples(5))
    data = open_calibration_data(str(path), x_spec())
    np.testing.assert_array_equal(collect(data), collect(data))


def test_default_batch_size_dynamic_is_32(tmp_path: Path) -> None:
    data = open_calibration_data({"x": samples(40)}, x_spec())
    assert data.batch_size == DEFAULT_BATCH_SIZE
    assert [len(feed["x"]) for feed in data.batches()] == [32, 8]


def test_dict_source_multiple_inputs() -> None:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 100, (10, 4), dtype=np.int64)
    mask = rng.random((10, 4), dtype=np.float32)
    data = open_calibration_data({"ids": ids, "mask": mask}, SEQ_SPECS, batch_size=3)
    feeds = list(data.batches())
    assert [set(feed) for feed in feeds] == [{"ids", "mask"}] * 4
    np.testing.assert_array_equal(np.concatenate([f["ids"] for f in feeds]), ids)
    np.testing.assert_array_equal(np.concatenate([f["mask"] for f in feeds]), mask)


def test_single_array_for_single_input_model() -> None:
    data_x = samples(4)
    np.testing.assert_array_equal(collect(open_calibration_data(data_x, x_spec())), data_x)


def test_single_array_refused_for_multi_input_model() -> None:
    with pytest.raises(OnnxqError) as error:
        open_calibration_data(np.zeros((2, 4)), SEQ_SPECS)
    assert_user_error(error, "2 inputs")


def test_npy_file_for_single_input(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    data_x = samples(9)
    np.save(path, data_x)
    np.testing.assert_array_equal(collect(open_calibration_data(path, x_spec(), batch_size=4)), data_x)


def test_npy_file_refused_for_multi_input_model(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((2, 4), np.int64))
    with pytest.raises(OnnxqError) as error:
        open_calibration_data(path, SEQ_SPECS)
    assert_user_error(error, "'ids'", "'mask'", "np.savez")


def test_directory_of_single_sample_files_sorted_by_name(tmp_path: Path) -> None:
    data_x = samples(12)
    # Written out of order; "sample_10" sorts before "sample_2" by name, which is the documented order.
    names = [f"sample_{index}.npz" for index in range(12)]
    for index in reversed(range(12)):
        np.savez(tmp_path / names[index], x=data_x[index])  # no batch axis: one sample per file
    order = [int(name.split("_")[1].split(".")[0]) for name in sorted(names)]
    data = open_calibration_data(tmp_path, x_spec(), batch_size=5)
    assert data.num_samples == 12
    # Files of the same shape share batches.
    assert [len(feed["x"]) for feed in data.batches()] == [5, 5, 2]
    np.testing.assert_array_equal(collect(data), data_x[order])


def test_directory_mixes_batched_and_npy_files(tmp_path: Path) -> None:
    first, second = samples(3, seed=1), samples(4, seed=2)
    np.savez(tmp_path / "a.npz", x=first)
    np.save(tmp_path / "b.npy", second)
    data = open_calibration_data(tmp_path, x_spec(), batch_size=32)
    np.testing.assert_array_equal(collect(data), np.concatenate([first, second]))


def test_directory_batches_never_mix_shapes(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    lengths = {"a.npz": (3, 5), "b.npz": (2, 5), "c.npz": (4, 7), "d.npz": (1, 5)}
    for name, (count, seq) in lengths.items():
        np.savez(
            tmp_path / name,
            ids=rng.integers(0, 9, (count, seq)),
            mask=rng.random((count, seq)).astype(np.float32),
        )
    data = open_calibration_data(tmp_path, SEQ_SPECS, batch_size=4)
    shapes = [feed["ids"].shape for feed in data.batches()]
    # a+b share seq 5 (5 samples -> 4 + 1), c has seq 7, d has seq 5 again but is not adjacent to a/b.
    assert shapes == [(4, 5), (1, 5), (4, 7), (1, 5)]
    assert data.num_batches == 4
    assert data.num_samples == 10


def test_directory_ignores_other_files_without_loading_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "marker"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "labels.pkl").write_bytes(pickle.dumps(Payload(marker)))
    (data_dir / "README.txt").write_text("samples")
    np.savez(data_dir / "a.npz", x=samples(2))
    caplog.set_level(logging.WARNING, logger=LOGGER)
    data = open_calibration_data(data_dir, x_spec())
    assert len(collect(data)) == 2
    assert "labels.pkl" in caplog.text
    assert not marker.exists()


def test_list_of_feeds_is_rebatched() -> None:
    data_x = samples(20)
    feeds = [{"x": data_x[:3]}, {"x": data_x[3:11]}, {"x": data_x[11:]}]
    data = open_calibration_data(feeds, x_spec(), batch_size=6)
    assert data.num_samples == 20
    assert [len(feed["x"]) for feed in data.batches()] == [6, 6, 6, 2]
    np.testing.assert_array_equal(collect(data), data_x)


def test_callable_source_is_called_every_pass() -> None:
    data_x = samples(10)
    calls = []

    def make_feeds() -> Iterator[dict[str, np.ndarray]]:
        calls.append(1)
        for start in range(0, 10, 4):
            yield {"x": data_x[start : start + 4]}

    data = open_calibration_data(make_feeds, x_spec(), batch_size=3)
    assert data.num_samples is None
    assert data.num_batches is None
    np.testing.assert_array_equal(collect(data), data_x)
    np.testing.assert_array_equal(collect(data), data_x)
    assert len(calls) == 2


def test_reiterable_object_works_twice() -> None:
    data_x = samples(5)

    class Dataset:
        def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
            return iter([{"x": data_x[:2]}, {"x": data_x[2:]}])

    data = open_calibration_data(Dataset(), x_spec(), batch_size=2)
    np.testing.assert_array_equal(collect(data), data_x)
    np.testing.assert_array_equal(collect(data), data_x)


def test_one_shot_generator_refused_on_second_pass() -> None:
    data_x = samples(6)
    generator = ({"x": data_x[start : start + 2]} for start in range(0, 6, 2))
    data = open_calibration_data(generator, x_spec())
    np.testing.assert_array_equal(collect(data), data_x)
    with pytest.raises(OnnxqError) as error:
        collect(data)
    assert_user_error(error, "one-shot", "function that returns a fresh iterator")


def test_callable_returning_same_exhausted_iterator_is_refused() -> None:
    iterator = iter([{"x": samples(3)}])
    data = open_calibration_data(lambda: iterator, x_spec())
    collect(data)
    with pytest.raises(OnnxqError) as error:
        collect(data)
    assert_user_error(error, "no samples on pass 2", "fresh iterator")


def test_feed_that_is_not_a_dict_is_refused() -> None:
    with pytest.raises(OnnxqError) as error:
        open_calibration_data([samples(2)], x_spec())  # type: ignore[list-item]
    assert_user_error(error, "feed #0", "not a dict")
    data = open_calibration_data(lambda: iter([[1, 2]]), x_spec())  # type: ignore[arg-type,return-value]
    with pytest.raises(OnnxqError) as error:
        collect(data)
    assert_user_error(error, "feed #0", "not a dict")


def test_ragged_lists_are_refused() -> None:
    with pytest.raises(OnnxqError) as error:
        open_calibration_data({"x": [[1.0, 2.0, 3.0], [1.0]]}, x_spec())
    assert_user_error(error, "'x'", "cannot be converted")


def test_nested_lists_are_accepted() -> None:
    data = open_calibration_data({"x": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]}, x_spec())
    np.testing.assert_array_equal(collect(data), np.arange(1, 7, dtype=np.float32).reshape(2, 3))


def test_callable_returning_non_iterable_is_refused() -> None:
    data = open_calibration_data(lambda: 42, x_spec())  # type: ignore[arg-type,return-value]
    with pytest.raises(OnnxqError) as error:
        collect(data)
    assert_user_error(error, "returned int")


def test_unsupported_source_type() -> None:
    with pytest.raises(OnnxqError) as error:
        open_calibration_data(3.5, x_spec())  # type: ignore[arg-type]
    assert_user_error(error, "float")


def test_input_spec_normalizes_dtype_and_shape() -> None:
    spec = InputSpec("x", np.float32, ["N", 3])  # type: ignore[arg-type]
    assert spec.dtype == np.dtype(np.float32)
    assert spec.shape == ("N", 3)
    assert spec.fixed_batch is None
    assert InputSpec("y", np.dtype(np.int64), (1, None)).fixed_batch == 1


# ----------------------------------------------------------------------------------------------
# batching invariance and fingerprint


def _sources(tmp_path: Path, data_x: np.ndarray) -> dict[str, object]:
    """The same samples through every kind of source."""
    np.savez(tmp_path / "all.npz", x=data_x)
    directory = tmp_path / "dir"
    directory.mkdir()
    for start in range(0, len(data_x), 13):
        np.savez(directory / f"part_{start:04d}.npz", x=data_x[start : start + 13])
    feeds = [{"x": data_x[start : start + 9]} for start in range(0, len(data_x), 9)]
    return {
        "npz": tmp_path / "all.npz",
        "directory": directory,
        "dict": {"x": data_x},
        "list": feeds,
        "callable": lambda: iter(feeds),
    }


@pytest.mark.parametrize("kind", ["npz", "directory", "dict", "list", "callable"])
def test_batching_does_not_change_samples_or_fingerprint(tmp_path: Path, kind: str) -> None:
    data_x = samples(70, seed=3)
    source = _sources(tmp_path, data_x)[kind]
    fingerprints = set()
    for batch_size in (1, 7, 32):
        data = open_calibration_data(source, x_spec(), batch_size=batch_size)  # type: ignore[arg-type]
        batches = list(data.batches())
        assert all(len(feed["x"]) <= batch_size for feed in batches)
        np.testing.assert_array_equal(np.concatenate([feed["x"] for feed in batches]), data_x)
        fingerprints.add(data.fingerprint())
    assert len(fingerprints) == 1


def test_fingerprint_is_the_same_for_every_source_kind(tmp_path: Path) -> None:
    data_x = samples(30, seed=4)
    fingerprints = {
        open_calibration_data(source, x_spec()).fingerprint()  # type: ignore[arg-type]
        for source in _sources(tmp_path, data_x).values()
    }
    assert len(fingerprints) == 1


def test_fingerprint_changes_with_data_names_and_order() -> None:
    data_x = samples(8)
    base = open_calibration_data({"x": data_x}, x_spec()).fingerprint()
    changed = data_x.copy()
    changed[5, 1] = np.nextafter(changed[5, 1], np.float32(np.inf))
    assert open_calibration_data({"x": changed}, x_spec()).fingerprint() != base
    assert open_calibration_data({"x": data_x[::-1]}, x_spec()).fingerprint() != base
    renamed = [InputSpec("y", np.dtype(np.float32), ("N", FEATURES))]
    assert open_calibration_data({"y": data_x}, renamed).fingerprint() != base
    assert open_calibration_data({"x": data_x}, x_spec(), max_samples=7).fingerprint() != base
    assert len(base) == 64


def test_max_samples_keeps_the_first_samples_in_order(tmp_path: Path) -> None:
    data_x = samples(40)
    for start in range(0, 40, 10):
        np.savez(tmp_path / f"{start:02d}.npz", x=data_x[start : start + 10])
    data = open_calibration_data(tmp_path, x_spec(), batch_size=4, max_samples=23)
    assert data.num_samples == 23
    assert data.num_batches == 6
    np.testing.assert_array_equal(collect(data), data_x[:23])
    generator_data = open_calibration_data(iter([{"x": data_x}]), x_spec(), max_samples=5)
    np.testing.assert_array_equal(collect(generator_data), data_x[:5])


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(st.tuples(st.integers(0, 9), st.sampled_from([2, 3])), min_size=1, max_size=8),
    batch_size=st.integers(1, 12),
    max_samples=st.one_of(st.none(), st.integers(1, 40)),
)
def test_batches_match_plan_for_any_chunking(
    chunks: list[tuple[int, int]], batch_size: int, max_samples: int | None
) -> None:
    rng = np.random.default_rng(5)
    feeds: list[dict[str, np.ndarray]] = [
        {"ids": rng.integers(0, 9, (count, seq)), "mask": rng.random((count, seq)).astype(np.float32)}
        for count, seq in chunks
    ]
    total = sum(count for count, _ in chunks)
    if total == 0:
        with pytest.raises(OnnxqError):
            open_calibration_data(feeds, SEQ_SPECS, batch_size=batch_size, max_samples=max_samples)
        return
    data = open_calibration_data(feeds, SEQ_SPECS, batch_size=batch_size, max_samples=max_samples)
    batches = list(data.batches())
    assert data.num_batches == len(batches)
    assert data.num_samples == sum(len(feed["ids"]) for feed in batches)
    expected = [row for feed in feeds for row in feed["ids"]][:max_samples]
    got = [row for feed in batches for row in feed["ids"]]
    assert len(got) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert all(len(feed["ids"]) <= batch_size for feed in batches)
    reference = open_calibration_data(feeds, SEQ_SPECS, batch_size=1, max_samples=max_samples)
    assert data.fingerprint() == reference.fingerprint()


# ----------------------------------------------------------------------------------------------
# static batch dimension


def test_static_batch_dimension_is_the_default() -> None:
    data = open_calibration_data({"x": samples(8)}, x_spec(batch=4))
    assert data.batch_size == 4
    assert [len(feed["x"]) for feed in data.batches()] == [4, 4]


def test_static_batch_dimension_conflicts_with_requested_size() -> None:
    with pytest.raises(OnnxqError) as error:
        open_calibration_data({"x": samples(8)}, x_spec(batch=4), batch_size=8)
    assert_user_error(error, "fixed to 4", "set it to 4")


def test_static_batch_drops_the_partial_batch(caplog: pytest.LogCaptureFixture) -> None:
    data_x = samples(10)
    data = open_calibration_data({"x": data_x}, x_spec(batch=4))
    assert data.num_samples == 8
    assert data.num_batches == 2
    caplog.set_level(logging.WARNING, logger=LOGGER)
    np.testing.assert_array_equal(collect(data), data_x[:8])
    assert "dropped 2 samples" in caplog.text


def test_static_batch_with_too_few_samples() -> None:
    with pytest.raises(OnnxqError) as error:
        open_calibration_data({"x": samples(3)}, x_spec(batch=4))
    assert_user_error(error, "fewer than the model's fixed batch size 4")


def test_inputs_with_different_static_batches_run_as_is() -> None:
    """Different static leading dims share no sample axis: the feed must fit the model whole."""
    specs = [
        InputSpec("a", np.dtype(np.float32), (2, 3)),
        InputSpec("b", np.dtype(np.float32), (4, 3)),
    ]
    data = open_calibration_data({"a": samples(2), "b": samples(4)}, specs)
    assert data.as_is
    assert [feed["b"].shape for feed in data.batches()] == [(4, 3)]
    with pytest.raises(OnnxqError) as error:
        open_calibration_data({"a": samples(4), "b": samples(4)}, specs)
    assert_user_error(error, "'a'", "dimension 0", "fixes it to 2")


@pytest.mark.parametrize(("batch_size", "max_samples"), [(0, None), (None, 0)])
def test_non_positive_sizes_are_refused(batch_size: int | None, max_samples: int | None) -> None:
    with pytest.raises(OnnxqError) as error:
        open_calibration_data({"x": samples(3)}, x_spec(), batch_size=batch_size, max_samples=max_samples)
    assert_user_error(error, "at least 1")


# ----------------------------------------------------------------------------------------------
# validation


def test_missing_input_names_expected_inputs(tmp_path: Path) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, ids=np.zeros((2, 4), np.int64), labels=np.zeros(2))
    with pytest.raises(OnnxqError) as error:
        open_calibration_data(path, SEQ_SPECS)
    assert_user_error(error, "'mask'", "the model expects 'ids', 'mask'", "labels")


def test_missing_input_in_a_feed() -> None:
    with pytest.raises(OnnxqError) as error:
        open_calibration_data([{"ids": np.zeros((2, 4), np.int64)}], SEQ_SPECS)
    assert_user_error(error, "'mask'", "feed #0")


def test_extra_keys_are_ignored_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    path = tmp_path / "calib.npz"
    np.savez(path, x=samples(3), label=np.arange(3))
    data = open_calibration_data(path, x_spec())
    assert list(next(data.batches())) == ["x"]
    assert "label" in caplog.text
    caplog.clear()
    data = open_calibration_data([{"x": samples(2), "target": 1}] * 3, x_spec())
    for _ in data.batches():
        pass
    assert caplog.text.count("target") == 1


def test_wrong_rank(tmp_path: Path) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.zeros((2, 3, 1), np.float32))
    with pytest.raises(OnnxqError) as error:
        open_calibration_data(path, x_spec())
    assert_user_error(error, "'x'", "rank 3", "rank 2")


def test_unbatched_sample_only_accepted_in_directories(tmp_path: Path) -> None:
    with pytest.raises(OnnxqError) as error:
        open_calibration_data({"x": np.zeros(FEATURES, np.float32)}, x_spec())
    assert_user_error(error, "'x'", "rank 1")


def test_wrong_static_dim() -> None:
    with pytest.raises(OnnxqError) as error:
        open_calibration_data({"x": np.zeros((2, 4), np.float32)}, x_spec())
    assert_user_error(error, "'x'", "size 4 in dimension 1", "fixes it to 3")


def test_wrong_static_dim_in_a_directory_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=samples(2))
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 5), np.float32))
    with pytest.raises(OnnxqError) as error:
        open_calibration_data(tmp_path, x_spec())
    assert_user_error(error, "'x'", "b.npz", "size 5")


def test_integer_data_for_float_input_is_refused() -> None:
    with pytest.raises(OnnxqError) as error:
        open_calibration_data({"x": np.zeros((2, FEATURES), np.int32)}, x_spec())
    assert_user_error(error, "'x'", "int32", "float32", "astype")


def test_float_data_for_integer_input_is_refused() -> None:
    with pytest.raises(OnnxqError) as error:
        open_calibration_data({"ids": np.zeros((2, 4)), "mask": np.zeros((2, 4), np.float32)}, SEQ_SPECS)
    assert_user_error(error, "'ids'", "float64", "int64")


def test_bool_data_for_float_input_is_refused() -> None:
    with pytest.raises(OnnxqError) as error:
        open_calibration_data({"x": np.zeros((2, FEATURES), bool)}, x_spec())
    assert_user_error(error, "'x'", "bool")


def test_casts_within_a_kind_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    rng = np.random.default_rng(6)
    ids = rng.integers(0, 100, (4, 5)).astype(np.int32)
    mask = rng.random((4, 5))  # float64
    data = open_calibration_data({"ids": ids, "mask": mask}, SEQ_SPECS)
    feed = next(data.batches())
    assert feed["ids"].dtype == np.int64
    assert feed["mask"].dtype == np.float32
    np.testing.assert_array_equal(feed["ids"], ids)
    np.testing.assert_array_equal(feed["mask"], mask.astype(np.float32))
    assert "'ids' from int32 to int64" in caplog.text
    assert "'mask' from float64 to float32" in caplog.text


def test_integer_overflow_in_a_cast_is_refused() -> None:
    specs = [InputSpec("ids", np.dtype(np.int32), ("N", 2))]
    ok = open_calibration_data({"ids": np.array([[1, 2]], np.int64)}, specs)
    assert next(ok.batches())["ids"].dtype == np.int32
    data = open_calibration_data({"ids": np.array([[1, 2**40]], np.int64)}, specs)
    with pytest.raises(OnnxqError) as error:
        collect(data, "ids")
    assert_user_error(error, "'ids'", "int32")


def test_float_overflow_in_a_cast_is_refused() -> None:
    specs = [InputSpec("h", np.dtype(np.float16), ("N", 2))]
    data = open_calibration_data({"h": np.array([[1.0, 1e10]])}, specs)
    with pytest.raises(OnnxqError) as error:
        collect(data, "h")
    assert_user_error(error, "'h'", "float16")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_counted(tmp_path: Path, bad: float) -> None:
    data_x = samples(10)
    data_x[2, 0] = bad
    data_x[7, 2] = bad
    path = tmp_path / "calib.npz"
    np.savez(path, x=data_x)
    data = open_calibration_data(path, x_spec())
    with pytest.raises(OnnxqError) as error:
        collect(data)
    assert_user_error(error, "calibration data for input 'x' contains 2 NaN/Inf values")


def test_empty_npz_array(tmp_path: Path) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.zeros((0, FEATURES), np.float32))
    with pytest.raises(OnnxqError) as error:
        open_calibration_data(path, x_spec())
    assert_user_error(error, "no samples")


def test_empty_list_and_empty_generator() -> None:
    with pytest.raises(OnnxqError) as error:
        open_calibration_data([], x_spec())
    assert_user_error(error, "no samples")
    data = open_calibration_data(iter([]), x_spec())
    with pytest.raises(OnnxqError) as error:
        collect(data)
    assert_user_error(error, "no samples")


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(OnnxqError) as error:
        open_calibration_data(tmp_path, x_spec())
    assert_user_error(error, "no .npz or .npy files")


def test_inconsistent_sample_counts(tmp_path: Path) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, ids=np.zeros((5, 4), np.int64), mask=np.zeros((4, 4), np.float32))
    with pytest.raises(OnnxqError) as error:
        open_calibration_data(path, SEQ_SPECS)
    assert_user_error(error, "'ids': 5", "'mask': 4")


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(OnnxqError) as error:
        open_calibration_data(tmp_path / "missing.npz", x_spec())
    assert_user_error(error, "missing.npz", "does not exist")


def test_corrupt_npz(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file")
    with pytest.raises(OnnxqError) as error:
        open_calibration_data(garbage, x_spec())
    assert_user_error(error, "garbage.npz", "np.savez")


def test_truncated_npz(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, x=samples(100))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(OnnxqError) as error:
        open_calibration_data(truncated, x_spec())
    assert_user_error(error, "truncated.npz", "corrupt")


def test_npz_member_that_is_not_an_array(tmp_path: Path) -> None:
    path = tmp_path / "odd.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", b"not an npy payload")
    with pytest.raises(OnnxqError) as error:
        open_calibration_data(path, x_spec())
    assert_user_error(error, "odd.npz", "corrupt")


def test_scalar_model_input_takes_a_scalar_as_is() -> None:
    """A rank-0 input has no sample axis: its data is one scalar per feed, anything else is refused."""
    spec = [InputSpec("t", np.dtype(np.float32), ())]
    data = open_calibration_data({"t": np.float32(2.5)}, spec)
    assert [float(feed["t"]) for feed in data.batches()] == [2.5]
    with pytest.raises(OnnxqError) as error:
        open_calibration_data({"t": np.zeros(3)}, spec)
    assert_user_error(error, "'t'", "rank 0", "runs as it is")


# ----------------------------------------------------------------------------------------------
# pickles are never loaded


def test_payload_would_create_the_marker(tmp_path: Path) -> None:
    """Control: the payload used below really runs code when unpickled."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_npz_with_object_array_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.array([Payload(marker)], dtype=object))
    assert not marker.exists()
    with pytest.raises(OnnxqError) as error:
        open_calibration_data(path, [InputSpec("x", np.dtype(np.float32), ("N",))])
    assert_user_error(error, "'x'", "pickled/object data", "np.savez")
    assert not marker.exists()


def test_npy_with_object_array_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "x.npy"
    np.save(path, np.array([Payload(marker)], dtype=object))
    with pytest.raises(OnnxqError) as error:
        open_calibration_data(path, [InputSpec("x", np.dtype(np.float32), ("N",))])
    assert_user_error(error, "pickled/object data")
    assert not marker.exists()


@pytest.mark.parametrize("file_name", ["data.pkl", "data.npz", "data.npy", "data.pickle"])
def test_pickle_file_is_refused_whatever_its_name(tmp_path: Path, file_name: str) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / file_name
    path.write_bytes(pickle.dumps({"x": Payload(marker)}))
    with pytest.raises(OnnxqError) as error:
        open_calibration_data(path, x_spec())
    assert_user_error(error, file_name, "pickled/object data", "np.savez")
    assert not marker.exists()


def test_object_array_in_a_dict_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OnnxqError) as error:
        open_calibration_data({"x": np.array([None, 1], dtype=object)}, x_spec())
    assert_user_error(error, "'x'", "pickled/object data")
