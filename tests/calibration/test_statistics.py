"""Streaming per-tensor statistics: exact, order independent and indifferent to batching."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxq.calibration.statistics import NUM_BINS, AbsHistogram, TensorStats

SEED = 20240607


def _samples(count: int = 96, seed: int = SEED) -> np.ndarray:
    """Calibration-like float32 samples (batch axis first) with NaN/inf sprinkled in."""
    rng = np.random.default_rng(seed)
    samples = rng.standard_normal((count, 3, 5, 4)).astype(np.float32) * 2.5
    samples[5, 0, 0, 0] = np.nan
    samples[17, 1, 2, 3] = np.inf
    samples[40, 2, 4, 1] = -np.inf
    samples[41, 0, 1, 1] = 41.0  # one far outlier sets amax
    samples[77, 2, 3, 2] = -0.0
    return samples


def _batches(samples: np.ndarray, batch_size: int, shuffle_seed: int | None = None) -> list[np.ndarray]:
    """Split along the sample axis, optionally in a shuffled sample order."""
    order = np.arange(len(samples))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    return [samples[order[start : start + batch_size]] for start in range(0, len(samples), batch_size)]


def _stream(batches: list[np.ndarray]) -> tuple[TensorStats, AbsHistogram]:
    """The two calibration passes as the calibrator runs them."""
    stats = TensorStats()
    for batch in batches:
        stats = stats.merge(TensorStats.of(batch))
    hist = AbsHistogram.for_stats(stats)
    for batch in batches:
        hist.add(batch)
    return stats, hist


def _bits(stats: TensorStats) -> tuple[str, str, int, int]:
    """Exact identity of the statistics, sign of zero included."""
    return stats.low.hex(), stats.high.hex(), stats.nonfinite, stats.count


# ---------------------------------------------------------------------------------------------
# TensorStats


def test_stats_of_one_batch() -> None:
    stats = TensorStats.of(np.array([[-3.0, 0.5], [2.0, 1.0]], dtype=np.float32))
    assert (stats.low, stats.high, stats.nonfinite, stats.count) == (-3.0, 2.0, 0, 4)
    assert stats.has_data
    assert stats.amax == 3.0


def test_nonfinite_values_are_skipped_and_counted() -> None:
    values = np.array([np.nan, 1.5, -np.inf, -2.0, np.inf, np.nan, 0.25], dtype=np.float32)
    stats = TensorStats.of(values)
    assert (stats.low, stats.high, stats.nonfinite, stats.count) == (-2.0, 1.5, 4, 3)
    hist = AbsHistogram.for_stats(stats)
    hist.add(values)
    assert hist.total == 3
    assert hist.counts[-1] == 1  # |-2.0| == amax lands in the last bin
    assert hist.overflow == 0


@pytest.mark.parametrize(
    "values",
    [np.zeros(0, dtype=np.float32), np.array([np.nan, np.inf, -np.inf], dtype=np.float32)],
    ids=["empty", "all-nonfinite"],
)
def test_tensor_without_finite_data(values: np.ndarray) -> None:
    stats = TensorStats.of(values)
    assert not stats.has_data
    assert stats.count == 0
    assert stats.nonfinite == values.size
    assert stats.amax == 0.0
    assert (stats.low, stats.high) == (math.inf, -math.inf)
    with_data = stats.merge(TensorStats.of(np.array([-1.0, 4.0])))
    assert (with_data.low, with_data.high, with_data.count) == (-1.0, 4.0, 2)
    assert with_data.nonfinite == values.size


def test_negative_zero_is_canonical() -> None:
    """min/max may return -0.0 or 0.0 depending on element order; the stats must not."""
    first = TensorStats.of(np.array([-0.0, 0.0]))
    second = TensorStats.of(np.array([0.0, -0.0]))
    assert _bits(first) == _bits(second) == ((0.0).hex(), (0.0).hex(), 0, 2)
    assert math.copysign(1.0, first.low) == 1.0


@pytest.mark.parametrize(
    "dtype", [np.float16, np.float32, np.float64, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, np.int32]
)
def test_stats_of_any_numeric_dtype(dtype: type) -> None:
    values: np.ndarray = np.array([-3.0, 0.0, 2.0, 1.0]).astype(dtype)
    stats = TensorStats.of(values)
    assert (stats.low, stats.high, stats.count, stats.nonfinite) == (-3.0, 2.0, 4, 0)
    hist = AbsHistogram.for_stats(stats, num_bins=6)
    hist.add(values)
    assert hist.counts.tolist() == [1, 0, 1, 0, 1, 1]


def test_non_native_float_nonfinite_counted() -> None:
    values = np.array([1.0, np.nan, np.inf, -2.0], dtype=np.float32).astype(ml_dtypes.bfloat16)
    stats = TensorStats.of(values)
    assert (stats.low, stats.high, stats.nonfinite, stats.count) == (-2.0, 1.0, 2, 2)


# ---------------------------------------------------------------------------------------------
# AbsHistogram


def test_histogram_bins_follow_edges() -> None:
    hist = AbsHistogram(2.0, num_bins=4)
    assert hist.bin_width == 0.5
    assert hist.edges.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert hist.centers.tolist() == [0.25, 0.75, 1.25, 1.75]
    hist.add(np.array([0.0, -0.0, 0.49, -0.5, 0.99, 1.0, -1.5, 1.99, 2.0, -2.0]))
    assert hist.counts.tolist() == [3, 2, 1, 4]
    assert hist.total == 10
    assert hist.overflow == 0


def test_histogram_matches_numpy_histogram() -> None:
    """An independent binning of the same |x| on the same range gives the same counts."""
    values = np.random.default_rng(SEED).laplace(size=200_000)
    amax = float(np.abs(values).max())
    hist = AbsHistogram(amax)
    hist.add(values)
    reference, edges = np.histogram(np.abs(values), bins=NUM_BINS, range=(0.0, amax))
    np.testing.assert_allclose(hist.edges, edges, rtol=1e-15, atol=0)
    np.testing.assert_array_equal(hist.counts, reference)


@pytest.mark.parametrize("num_bins", [3, 6, 7, 10, 2048])
def test_values_on_an_edge_go_to_the_bin_above(num_bins: int) -> None:
    """Division then multiplication can round an edge value down; the bin must follow edges."""
    for amax in (3.0, 0.3, 7.77, 1e-3):
        hist = AbsHistogram(amax, num_bins)
        edges = hist.edges
        hist.add(edges[:-1])
        np.testing.assert_array_equal(hist.counts, np.ones(num_bins, dtype=np.int64))
        hist.add(np.nextafter(edges[1:-1], 0.0))  # just below each inner edge: the bin below
        assert hist.counts.tolist() == [2] * (num_bins - 1) + [1]


def test_histogram_last_edge_is_exactly_amax() -> None:
    amax = 0.1 + 0.2  # not a "nice" number
    hist = AbsHistogram(amax)
    assert hist.edges[-1] == amax
    assert len(hist.edges) == NUM_BINS + 1
    hist.add(np.array([amax, -amax, np.nextafter(amax, 0.0)]))
    assert hist.counts[-1] == 3


def test_histogram_values_above_amax_saturate_and_are_reported() -> None:
    hist = AbsHistogram(1.0, num_bins=8)
    hist.add(np.array([0.1, 5.0, -7.0, 1.0]))
    assert hist.counts[-1] == 3
    assert hist.overflow == 2


def test_histogram_with_zero_range() -> None:
    stats = TensorStats.of(np.zeros((2, 3)))
    assert stats.has_data and stats.amax == 0.0
    hist = AbsHistogram.for_stats(stats)
    hist.add(np.zeros((2, 3)))
    assert hist.bin_width == 0.0
    assert hist.counts[0] == 6
    assert hist.total == 6
    assert not hist.edges.any()


@pytest.mark.parametrize("amax", [-1.0, math.inf, math.nan])
def test_histogram_rejects_invalid_range(amax: float) -> None:
    with pytest.raises(ValueError, match="amax"):
        AbsHistogram(amax)


def test_histogram_merge_requires_same_range() -> None:
    with pytest.raises(ValueError, match="different ranges"):
        AbsHistogram(1.0).merge(AbsHistogram(2.0))
    with pytest.raises(ValueError, match="different ranges"):
        AbsHistogram(1.0).merge(AbsHistogram(1.0, num_bins=16))


def test_histogram_merge_and_copy_do_not_alias() -> None:
    first = AbsHistogram(1.0, num_bins=4)
    first.add(np.array([0.1, 0.9]))
    copy = first.copy()
    merged = first.merge(copy)
    first.add(np.array([0.5]))
    assert copy.counts.tolist() == [1, 0, 0, 1]
    assert merged.counts.tolist() == [2, 0, 0, 2]


def test_histogram_chunks_large_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The internal chunking that bounds memory changes nothing."""
    import onnxq.calibration.statistics as statistics

    values = np.random.default_rng(SEED).standard_normal(10_001)
    whole = AbsHistogram(float(np.abs(values).max()))
    whole.add(values)
    monkeypatch.setattr(statistics, "CHUNK_ELEMENTS", 1000)
    chunked = AbsHistogram(whole.amax)
    chunked.add(values)
    np.testing.assert_array_equal(chunked.counts, whole.counts)


# ---------------------------------------------------------------------------------------------
# Batch invariance


@pytest.mark.parametrize(
    ("batch_size", "shuffle_seed"), [(1, None), (7, None), (32, None), (7, 1), (32, 2), (1, 3)]
)
def test_batching_and_order_do_not_change_anything(batch_size: int, shuffle_seed: int | None) -> None:
    samples = _samples()
    reference_stats, reference_hist = _stream([samples])
    stats, hist = _stream(_batches(samples, batch_size, shuffle_seed))
    assert _bits(stats) == _bits(reference_stats)
    assert (stats.nonfinite, stats.count) == (3, samples.size - 3)
    assert stats.amax == 41.0
    assert hist.amax == reference_hist.amax
    np.testing.assert_array_equal(hist.counts, reference_hist.counts)
    assert hist.counts.dtype == np.int64


# ---------------------------------------------------------------------------------------------
# Properties

_floats_with_specials = st.floats(allow_nan=True, allow_infinity=True, width=32)
_arrays = hnp.arrays(np.float32, st.integers(0, 40), elements=_floats_with_specials)
_finite_arrays = hnp.arrays(
    np.float64, st.integers(0, 200), elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
)


@settings(max_examples=60, deadline=None)
@given(_arrays, _arrays, _arrays)
def test_merge_is_associative_and_commutative(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
    sa, sb, sc = TensorStats.of(a), TensorStats.of(b), TensorStats.of(c)
    assert _bits(sa.merge(sb)) == _bits(sb.merge(sa))
    assert _bits(sa.merge(sb).merge(sc)) == _bits(sa.merge(sb.merge(sc)))
    assert _bits(sa.merge(sb).merge(sc)) == _bits(TensorStats.of(np.concatenate([a, b, c])))
    assert _bits(sa.merge(TensorStats())) == _bits(sa)


@settings(max_examples=60, deadline=None)
@given(_finite_arrays, st.lists(st.integers(0, 200), max_size=6), st.integers(1, 64))
def test_histogram_is_indifferent_to_chunking(values: np.ndarray, cuts: list[int], num_bins: int) -> None:
    amax = float(np.abs(values).max()) if values.size else 0.0
    whole = AbsHistogram(amax, num_bins)
    whole.add(values)
    pieces = np.split(values, sorted(min(cut, values.size) for cut in cuts))
    chunked = AbsHistogram(amax, num_bins)
    for piece in reversed(pieces):
        chunked.add(piece)
    merged = AbsHistogram(amax, num_bins)
    for piece in pieces:
        single = AbsHistogram(amax, num_bins)
        single.add(piece)
        merged = single.merge(merged)
    np.testing.assert_array_equal(chunked.counts, whole.counts)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert whole.total == values.size
    assert whole.overflow == 0
