"""Entropy calibration on the distributions that broke it: a ReLU zero spike, data far from zero."""

from __future__ import annotations

import numpy as np

from onnxq.calibration.methods import ENTROPY_MAX_CLIPPED_FRACTION, get_method
from onnxq.calibration.statistics import AbsHistogram, TensorStats
from onnxq.formats import get_format


def entropy_threshold(values: np.ndarray) -> tuple[float, float]:
    """(threshold, share of values above it)."""
    stats = TensorStats.of(values)
    histogram = AbsHistogram.for_stats(stats)
    histogram.add(values)
    threshold = get_method("entropy").threshold(stats, histogram, get_format("int8"))
    return threshold, float(np.mean(np.abs(values) > threshold))


def test_relu_zero_spike_does_not_drag_the_threshold_down() -> None:
    """Half exact zeros (after ReLU): the spike must not decide the clip."""
    rng = np.random.default_rng(0)
    values = np.maximum(rng.standard_normal(400_000), 0.0).astype(np.float32)
    threshold, clipped = entropy_threshold(values)
    assert clipped <= ENTROPY_MAX_CLIPPED_FRACTION
    assert threshold > 2.5  # a half-normal's 99.4th percentile; a clip below it costs accuracy


def test_values_far_from_zero_are_not_clipped_to_their_minimum() -> None:
    """A pooled mean in [0.3, 1.8]: the degenerate KL minimum sits at the smallest value."""
    rng = np.random.default_rng(1)
    values = rng.uniform(0.3, 1.8, 200_000).astype(np.float32)
    threshold, clipped = entropy_threshold(values)
    assert clipped <= ENTROPY_MAX_CLIPPED_FRACTION
    assert threshold > 1.7


def test_rare_outliers_are_still_clipped() -> None:
    """What entropy is for: a Gaussian bulk with a few far outliers keeps the bulk's resolution."""
    rng = np.random.default_rng(2)
    values = rng.standard_normal(200_000).astype(np.float32)
    values[:20] = 60.0
    threshold, clipped = entropy_threshold(values)
    assert threshold < 10.0 and clipped <= ENTROPY_MAX_CLIPPED_FRACTION
