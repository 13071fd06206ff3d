"""Calibration methods against independent references: brute force, slow loops and analytic optima."""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import onnxq.calibration.methods as methods
from onnxq.calibration.methods import (
    DEFAULT_PERCENTILE,
    METHOD_NAMES,
    NUM_QUANTIZED_BINS,
    EntropyCalibration,
    MseCalibration,
    PercentileCalibration,
    entropy_divergences,
    get_method,
    register_method,
    registered_methods,
)
from onnxq.calibration.statistics import NUM_BINS, AbsHistogram, TensorStats
from onnxq.errors import OnnxqError

SEED = 7
INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0
#: ACIQ (Banner et al. 2019): optimal 8-bit clipping of Laplace(b) is 9.89 * b.
ACIQ_LAPLACE_8BIT = 9.89


class Int8Standin:
    """Symmetric INT8 fake quantization as the format contract defines it."""

    name = "int8"
    max_representable = INT8_MAX

    def fake_quantize(self, x: np.ndarray, amax: float) -> np.ndarray:
        scale = amax / INT8_MAX
        return np.clip(np.round(np.asarray(x, dtype=np.float64) / scale), -INT8_MAX, INT8_MAX) * scale


class Fp8Standin:
    """FP8 E4M3 fake quantization: scale to 448, saturating cast to float8_e4m3fn."""

    name = "fp8"
    max_representable = FP8_E4M3_MAX

    def fake_quantize(self, x: np.ndarray, amax: float) -> np.ndarray:
        scale = amax / FP8_E4M3_MAX
        scaled = np.clip(np.asarray(x, dtype=np.float64) / scale, -FP8_E4M3_MAX, FP8_E4M3_MAX)
        return scaled.astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * scale


# Typed Any: the stand-ins implement only the part of NumberFormat that calibration uses.
INT8: Any = Int8Standin()
FP8: Any = Fp8Standin()
FORMATS: list[Any] = [INT8, FP8]


def _calibrate(values: np.ndarray, num_bins: int = NUM_BINS) -> tuple[TensorStats, AbsHistogram]:
    stats = TensorStats.of(values)
    hist = AbsHistogram.for_stats(stats, num_bins)
    hist.add(values)
    return stats, hist


def _distribution(name: str, size: int, seed: int = SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if name == "uniform":
        return rng.uniform(-1.0, 1.0, size)
    if name == "gaussian":
        return rng.standard_normal(size)
    if name == "laplace_outliers":
        return np.concatenate([rng.laplace(size=size), [30.0, -35.0, 41.0]])
    if name == "gaussian_outliers":
        return np.concatenate([rng.standard_normal(size), [40.0, -60.0, 55.0]])
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------
# Registry


def test_builtin_methods_are_registered() -> None:
    assert METHOD_NAMES == ("max", "entropy", "percentile", "mse")
    for name in METHOD_NAMES:
        method = get_method(name)
        assert method.name == name
        assert method.needs_histogram == (name != "max")
    assert set(METHOD_NAMES) <= set(registered_methods())
    assert get_method(" Entropy ").name == "entropy"


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(OnnxqError) as error:
        get_method("kl")
    message = str(error.value)
    assert "'kl'" in message
    for name in METHOD_NAMES:
        assert name in message


def test_options_are_passed_and_checked() -> None:
    method = get_method("percentile", percentile=99.9)
    assert isinstance(method, PercentileCalibration) and method.percentile == 99.9
    assert get_method("percentile") == PercentileCalibration(DEFAULT_PERCENTILE)
    assert get_method("entropy", num_quantized_bins=64) == EntropyCalibration(64)
    assert get_method("mse", min_bin=1) == MseCalibration(1)
    with pytest.raises(OnnxqError, match="does not accept options") as error:
        get_method("max", percentile=99.0)
    assert "none" in str(error.value)
    with pytest.raises(OnnxqError, match="percentile"):
        get_method("entropy", percentile=99.0)
    for bad in (0.0, -1.0, 100.5):
        with pytest.raises(OnnxqError, match="outside"):
            get_method("percentile", percentile=bad)


def test_register_method(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))

    class Half:
        name = "half"
        needs_histogram = False

        def threshold(self, stats: TensorStats, hist: AbsHistogram | None, fmt: Any) -> float:
            return stats.amax / 2

    register_method("half", Half)
    stats = TensorStats.of(np.array([-4.0, 1.0]))
    assert get_method("HALF").threshold(stats, None, INT8) == 2.0
    assert "half" in registered_methods()
    with pytest.raises(ValueError, match="already registered"):
        register_method("half", Half)
    with pytest.raises(ValueError, match="already registered"):
        register_method("max", Half)
    register_method("max", Half, replace=True)
    assert get_method("max").name == "half"


# ---------------------------------------------------------------------------------------------
# No usable data


@pytest.mark.parametrize(
    "values",
    [np.zeros(0), np.array([np.nan, np.inf, -np.inf]), np.zeros(17), np.array([0.0, np.nan, -0.0])],
    ids=["empty", "all-nonfinite", "all-zero", "zero-and-nan"],
)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_no_finite_range_gives_zero(values: np.ndarray, name: str) -> None:
    stats = TensorStats.of(values)
    hist = AbsHistogram.for_stats(stats)
    hist.add(values)
    for fmt in FORMATS:
        assert get_method(name).threshold(stats, hist, fmt) == 0.0


@pytest.mark.parametrize("name", ["entropy", "percentile", "mse"])
def test_histogram_methods_require_the_histogram(name: str) -> None:
    with pytest.raises(ValueError, match="histogram"):
        get_method(name).threshold(TensorStats.of(np.array([1.0])), None, INT8)


def test_single_value_tensor() -> None:
    stats, hist = _calibrate(np.full(50, -2.5))
    for name in ("max", "entropy", "percentile"):
        assert get_method(name).threshold(stats, hist, INT8) == 2.5
    # mse sees the bin midpoint amax - w/2, equally far from the clips amax - w and amax
    assert get_method("mse").threshold(stats, hist, INT8) >= 2.5 - hist.bin_width


# ---------------------------------------------------------------------------------------------
# Batch invariance


def _stream_thresholds(samples: np.ndarray, batch_size: int, shuffle_seed: int | None) -> dict[str, float]:
    order = np.arange(len(samples))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    batches = [samples[order[start : start + batch_size]] for start in range(0, len(samples), batch_size)]
    stats = TensorStats()
    for batch in batches:
        stats = stats.merge(TensorStats.of(batch))
    hist = AbsHistogram.for_stats(stats)
    for batch in batches:
        hist.add(batch)
    options: dict[str, dict[str, Any]] = {"percentile": {"percentile": 99.9}}
    return {
        f"{name}/{fmt.name}": get_method(name, **options.get(name, {})).threshold(stats, hist, fmt)
        for name in METHOD_NAMES
        for fmt in FORMATS
    }


def test_thresholds_do_not_depend_on_batching() -> None:
    rng = np.random.default_rng(SEED)
    samples = rng.laplace(size=(64, 4, 8, 8)).astype(np.float32)
    samples[3, 0, 0, 0] = np.nan
    samples[9, 1, 2, 3] = -np.inf
    samples[30, 2, 5, 5] = 50.0
    reference = _stream_thresholds(samples, len(samples), None)
    assert len(set(reference.values())) > 3  # the methods really differ on this data
    for batch_size, shuffle_seed in [(1, None), (7, None), (32, None), (7, 11), (1, 12), (32, 13)]:
        thresholds = _stream_thresholds(samples, batch_size, shuffle_seed)
        assert {k: v.hex() for k, v in thresholds.items()} == {k: v.hex() for k, v in reference.items()}


# ---------------------------------------------------------------------------------------------
# max and percentile


def test_max_is_the_observed_amax() -> None:
    stats, hist = _calibrate(np.array([-7.5, 3.0, np.nan, np.inf]))
    assert get_method("max").threshold(stats, hist, INT8) == 7.5
    assert get_method("max").threshold(stats, None, FP8) == 7.5


@pytest.mark.parametrize("distribution", ["uniform", "gaussian", "laplace_outliers"])
@pytest.mark.parametrize("percentile", [50.0, 99.0, 99.9, DEFAULT_PERCENTILE])
def test_percentile_matches_numpy(distribution: str, percentile: float) -> None:
    values = _distribution(distribution, 200_000)
    stats, hist = _calibrate(values)
    threshold = PercentileCalibration(percentile).threshold(stats, hist, INT8)
    magnitudes = np.abs(values)
    # The order statistic itself lies inside the chosen bin, below its upper edge.
    order_statistic = float(np.percentile(magnitudes, percentile, method="inverted_cdf"))
    assert threshold - hist.bin_width <= order_statistic <= threshold
    # ... and that bin is the first one reaching the percentile.
    assert np.mean(magnitudes <= threshold) >= percentile / 100
    assert np.mean(magnitudes < threshold - hist.bin_width) < percentile / 100


def test_percentile_100_is_max() -> None:
    stats, hist = _calibrate(_distribution("laplace_outliers", 10_000))
    assert PercentileCalibration(100.0).threshold(stats, hist, INT8) == stats.amax


# ---------------------------------------------------------------------------------------------
# entropy


def _reference_divergences(counts: np.ndarray, num_quantized_bins: int) -> np.ndarray:
    """The KL procedure written bin by bin, one candidate at a time."""
    hist = counts.astype(np.float64)
    divergences = []
    for kept in range(num_quantized_bins, len(hist) + 1):
        reference = hist[:kept].copy()
        reference[-1] += hist[kept:].sum()
        group = np.arange(kept) * num_quantized_bins // kept
        occupied = hist[:kept] > 0
        group_sums = np.bincount(group, weights=hist[:kept], minlength=num_quantized_bins)
        group_occupied = np.bincount(group, weights=occupied, minlength=num_quantized_bins)
        merged = np.where(occupied, group_sums[group] / np.maximum(group_occupied[group], 1), 0.0)
        if merged.sum() == 0:
            divergences.append(math.inf)
            continue
        p = reference / reference.sum()
        q = merged / merged.sum()
        q[q == 0] = 1e-4
        support = p > 0
        divergences.append(float(np.sum(p[support] * np.log(p[support] / q[support]))))
    return np.array(divergences)


def _reference_entropy_bins(counts: np.ndarray, num_quantized_bins: int) -> int:
    """Number of kept bins: the smallest admissible candidate whose KL ties the minimum (1e-12).

    As documented for the method: bin 0 (the ReLU zero spike) counts as bin 1 for the divergence,
    and a candidate may clip at most 1% of the values (of the original counts).
    """
    smoothed = np.array(counts, dtype=np.int64)
    if smoothed.size > 1:
        smoothed[0] = smoothed[1]
    divergences = _reference_divergences(smoothed, num_quantized_bins)
    for kept in range(num_quantized_bins, len(counts) + 1):
        if np.sum(counts[kept:]) > 0.01 * np.sum(counts):
            divergences[kept - num_quantized_bins] = np.inf
    if not np.isfinite(divergences).any():
        return len(counts)
    best = divergences.min()
    return num_quantized_bins + int(np.flatnonzero(divergences <= best + 1e-12)[0])


@pytest.mark.parametrize("distribution", ["uniform", "gaussian", "laplace_outliers", "gaussian_outliers"])
def test_entropy_matches_slow_reference(distribution: str) -> None:
    stats, hist = _calibrate(_distribution(distribution, 100_000))
    divergences = entropy_divergences(hist)
    reference = _reference_divergences(hist.counts, NUM_QUANTIZED_BINS)
    np.testing.assert_allclose(divergences, reference, rtol=1e-9, atol=1e-12)
    expected_bins = _reference_entropy_bins(hist.counts, NUM_QUANTIZED_BINS)
    threshold = get_method("entropy").threshold(stats, hist, INT8)
    assert threshold == hist.edges[expected_bins]


_small_histograms = st.integers(2, 12).flatmap(
    lambda nq: st.tuples(
        st.just(nq),
        st.lists(st.integers(0, 40) | st.just(0), min_size=nq, max_size=nq + 60).filter(any),
    )
)


@settings(max_examples=60, deadline=None)
@given(_small_histograms)
def test_entropy_regrouping_matches_reference_on_any_histogram(case: tuple[int, list[int]]) -> None:
    num_quantized_bins, counts = case
    hist = AbsHistogram(1.0, len(counts))
    hist.counts = np.array(counts, dtype=np.int64)
    np.testing.assert_allclose(
        entropy_divergences(hist, num_quantized_bins),
        _reference_divergences(hist.counts, num_quantized_bins),
        rtol=1e-9,
        atol=1e-12,
    )
    stats = TensorStats(low=0.0, high=1.0, count=hist.total)
    expected = hist.edges[_reference_entropy_bins(hist.counts, num_quantized_bins)]
    assert EntropyCalibration(num_quantized_bins).threshold(stats, hist, INT8) == expected


def test_entropy_keeps_the_whole_uniform_range() -> None:
    stats, hist = _calibrate(_distribution("uniform", 200_000))
    assert get_method("entropy").threshold(stats, hist, INT8) >= 0.99 * stats.amax


def test_entropy_ignores_far_outliers() -> None:
    """It must not degenerate to max: a few far outliers are clipped, the Gaussian bulk kept."""
    stats, hist = _calibrate(_distribution("gaussian_outliers", 200_000))
    threshold = get_method("entropy").threshold(stats, hist, INT8)
    assert stats.amax == 60.0
    assert 2.5 < threshold < 6.0


def test_entropy_clips_a_clean_gaussian_tail() -> None:
    stats, hist = _calibrate(_distribution("gaussian", 200_000))
    threshold = get_method("entropy").threshold(stats, hist, INT8)
    assert 2.5 < threshold < 0.95 * stats.amax


# ---------------------------------------------------------------------------------------------
# mse


def _sample_mse(values: np.ndarray, fmt: Any, clip: float) -> float:
    return float(np.mean(np.square(fmt.fake_quantize(values, clip) - values)))


def _brute_force_clip(values: np.ndarray, fmt: Any, amax: float) -> tuple[float, float]:
    """Best clip for the raw samples: coarse grid over (0, amax], then a fine grid around the best."""
    coarse = np.linspace(amax / 64, amax, 96)
    errors = [_sample_mse(values, fmt, clip) for clip in coarse]
    best = int(np.argmin(errors))
    fine = np.linspace(coarse[max(best - 1, 0)], coarse[min(best + 1, len(coarse) - 1)], 48)
    fine_errors = [_sample_mse(values, fmt, clip) for clip in fine]
    return float(fine[int(np.argmin(fine_errors))]), float(np.min(fine_errors))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda fmt: fmt.name)
@pytest.mark.parametrize("distribution", ["uniform", "gaussian", "laplace_outliers"])
def test_mse_matches_brute_force_on_raw_samples(distribution: str, fmt: Any) -> None:
    values = _distribution(distribution, 40_000)
    stats, hist = _calibrate(values)
    threshold = get_method("mse").threshold(stats, hist, fmt)
    best_clip, best_error = _brute_force_clip(values, fmt, stats.amax)
    achieved = _sample_mse(values, fmt, threshold)
    assert achieved <= best_error * 1.02, (threshold, best_clip)
    if fmt is INT8 and distribution != "laplace_outliers":
        # Only a uniform grid without outliers gives an error curve sharp enough to pin the clip.
        assert abs(threshold - best_clip) <= 0.01 * stats.amax


def test_mse_uniform_int8_keeps_the_range() -> None:
    """For uniform data clipping only hurts: the optimum (~0.996 analytically) is about the max."""
    stats, hist = _calibrate(_distribution("uniform", 200_000))
    threshold = get_method("mse").threshold(stats, hist, INT8)
    assert 0.98 * stats.amax <= threshold <= stats.amax


def test_mse_laplace_int8_matches_aciq() -> None:
    values = np.random.default_rng(SEED).laplace(scale=1.0, size=1_000_000)
    stats, hist = _calibrate(values)
    threshold = get_method("mse").threshold(stats, hist, INT8)
    assert abs(threshold - ACIQ_LAPLACE_8BIT) <= 0.1 * ACIQ_LAPLACE_8BIT


def _gaussian_int8_optimum() -> float:
    """Minimize clipping error + uniform rounding noise of a unit Gaussian, analytically."""
    clips = np.linspace(2.0, 6.0, 4001)
    tail = np.array([0.5 * math.erfc(c / math.sqrt(2.0)) for c in clips])
    density = np.exp(-0.5 * clips**2) / math.sqrt(2.0 * math.pi)
    clipping = 2.0 * ((1.0 + clips**2) * tail - clips * density)
    rounding = (clips / INT8_MAX) ** 2 / 12.0 * (1.0 - 2.0 * tail)
    return float(clips[np.argmin(clipping + rounding)])


def test_mse_gaussian_int8_matches_analytic_optimum() -> None:
    optimum = _gaussian_int8_optimum()
    assert 3.5 < optimum < 4.5
    stats, hist = _calibrate(_distribution("gaussian", 1_000_000))
    threshold = get_method("mse").threshold(stats, hist, INT8)
    assert abs(threshold - optimum) <= 0.05 * optimum


def test_mse_fp8_clips_less_than_int8() -> None:
    """E4M3's relative precision makes large values cheap, so it keeps more of a Gaussian's tail."""
    stats, hist = _calibrate(_distribution("gaussian", 200_000))
    mse = get_method("mse")
    assert mse.threshold(stats, hist, FP8) > mse.threshold(stats, hist, INT8)


def test_mse_with_the_real_formats() -> None:
    formats = pytest.importorskip("onnxq.formats")
    stats, hist = _calibrate(_distribution("laplace_outliers", 50_000))
    mse = get_method("mse")
    for name, standin in (("int8", INT8), ("fp8", FP8)):
        real = mse.threshold(stats, hist, formats.get_format(name))
        expected = mse.threshold(stats, hist, standin)
        assert abs(real - expected) <= 2 * hist.bin_width, name


# ---------------------------------------------------------------------------------------------
# asymmetric uint8 (ONNX Runtime's activations): the real grid of [max(low, -c), min(high, c)]

UINT8_STEPS = 255.0


class Uint8Standin:
    """Asymmetric UINT8 fake quantization of signed data for a clip ``c``, independent of onnxq."""

    name = "uint8"

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high

    def fake_quantize(self, x: np.ndarray, clip: float) -> np.ndarray:
        low, high = min(max(self.low, -clip), 0.0), max(min(self.high, clip), 0.0)
        scale = (high - low) / UINT8_STEPS
        zero_point = np.rint(-low / scale)
        codes = np.clip(np.rint(np.asarray(x, dtype=np.float64) / scale) + zero_point, 0, UINT8_STEPS)
        return (codes - zero_point) * scale


def _signed_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    gaussian = rng.standard_normal(60_000)
    hardswish_like = np.maximum(rng.laplace(scale=1.5, size=60_000), 0.0) - 0.375 * (rng.random(60_000) < 0.3)
    two_sided = np.concatenate([rng.laplace(size=60_000), [-10.5, 15.0]])
    return {"gaussian": gaussian, "hardswish_like": hardswish_like, "two_sided_outliers": two_sided}


@pytest.mark.parametrize("case", ["gaussian", "hardswish_like", "two_sided_outliers"])
def test_mse_uint8_matches_brute_force_on_signed_samples(case: str) -> None:
    """The clip ``mse`` picks for uint8 is (near) the best for the real signed data on the real grid."""
    formats = pytest.importorskip("onnxq.formats")
    values = _signed_cases()[case]
    stats, hist = _calibrate(values)
    reference = Uint8Standin(stats.low, stats.high)
    threshold = get_method("mse").threshold(stats, hist, formats.get_format("uint8"))
    _, best_error = _brute_force_clip(values, reference, stats.amax)
    assert _sample_mse(values, reference, threshold) <= best_error * 1.02


def test_mse_uint8_two_sided_is_priced_on_the_coarser_grid() -> None:
    """Symmetric data spreads 255 steps over [-c, c]: pricing it on [0, c] (the uint8 format's own
    shortcut for positive magnitudes) picks a clip whose real error is worse."""
    formats = pytest.importorskip("onnxq.formats")
    values = _signed_cases()["two_sided_outliers"]
    stats, hist = _calibrate(values)
    reference = Uint8Standin(stats.low, stats.high)
    fixed = get_method("mse").threshold(stats, hist, formats.get_format("uint8"))
    one_sided_grid = np.asarray(hist.edges[methods.DEFAULT_MSE_MIN_BIN :])
    naive_errors = [
        float(
            np.dot(
                hist.counts,
                np.square(
                    np.rint(np.minimum(hist.centers, c) / (c / UINT8_STEPS)) * (c / UINT8_STEPS)
                    - hist.centers
                ),
            )
        )
        for c in one_sided_grid
    ]
    naive = float(one_sided_grid[int(np.argmin(naive_errors))])
    assert fixed != naive
    assert _sample_mse(values, reference, fixed) < _sample_mse(values, reference, naive)
