"""Per-tensor statistics gathered while streaming calibration batches.

Calibration runs in two passes over the same samples:

1. :class:`TensorStats` keeps the finite minimum and maximum of a tensor plus how many finite and
   non-finite (NaN, +inf, -inf) elements were seen. Non-finite values are skipped, never folded into
   the range: one ``inf`` would otherwise make every scale useless.
2. :class:`AbsHistogram` counts ``|x|`` of the finite values into ``NUM_BINS`` equal bins over the
   fixed range ``[0, amax]``, where ``amax`` comes from pass 1.

Both are built only from order-independent operations (min, max, integer counts), and the bin of
every element depends on that element alone, so the result is bit-identical whatever the batch size,
the order of the batches or how a batch is split. Only these small per-tensor objects are kept
between batches; the activations themselves are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

#: Histogram resolution; 2048 bins is what TensorRT's entropy calibrator expects.
NUM_BINS = 2048

#: Elements binned per step by :meth:`AbsHistogram.add`. Its float64/int64 temporaries then stay
#: in cache, which is 2-3x faster on large batches than whole-array passes, and memory stays
#: bounded. Chunking never changes the counts.
CHUNK_ELEMENTS = 1 << 16

_NATIVE_NUMERIC_KINDS = "biuf"


def _as_numeric(array: np.ndarray) -> np.ndarray:
    """View ``array`` as a numpy-native numeric array.

    ml_dtypes types (bfloat16, float8) are not native kinds and their reductions do not skip
    anything, so they are widened to float32, which holds every one of their values exactly.
    """
    values = np.asarray(array)
    if values.dtype.kind not in _NATIVE_NUMERIC_KINDS:
        values = values.astype(np.float32)
    return values


def _finite_part(values: np.ndarray) -> tuple[np.ndarray, int]:
    """The finite elements of ``values`` (flattened) and the number of non-finite ones dropped.

    The common all-finite case returns the flattened array without copying it.
    """
    flat = values.reshape(-1)
    if flat.dtype.kind != "f":
        return flat, 0
    finite = np.isfinite(flat)
    finite_count = int(np.count_nonzero(finite))
    if finite_count == flat.size:
        return flat, 0
    return flat[finite], flat.size - finite_count


def _canonical(value: float) -> float:
    """Turn ``-0.0`` into ``0.0`` so that equal statistics are also bit-identical.

    ``min``/``max`` may return either zero depending on which one comes first in a batch.
    """
    return value + 0.0


@dataclass(frozen=True)
class TensorStats:
    """Finite range and element counts of one tensor over all calibration batches seen so far.

    With no finite data yet, ``low`` is ``+inf`` and ``high`` is ``-inf``: these sentinels make
    :meth:`merge` a plain min/max with no special case. Check :attr:`has_data` before using them.
    """

    low: float = math.inf
    high: float = -math.inf
    #: number of NaN, +inf and -inf elements skipped
    nonfinite: int = 0
    #: number of finite elements
    count: int = 0

    @classmethod
    def of(cls, array: np.ndarray) -> TensorStats:
        """Statistics of one batch."""
        finite, nonfinite = _finite_part(_as_numeric(array))
        if finite.size == 0:
            return cls(nonfinite=nonfinite)
        return cls(
            low=_canonical(float(finite.min())),
            high=_canonical(float(finite.max())),
            nonfinite=nonfinite,
            count=int(finite.size),
        )

    def merge(self, other: TensorStats) -> TensorStats:
        """Statistics of the union of both batches; exact, associative and commutative."""
        return TensorStats(
            low=min(self.low, other.low),
            high=max(self.high, other.high),
            nonfinite=self.nonfinite + other.nonfinite,
            count=self.count + other.count,
        )

    @property
    def has_data(self) -> bool:
        """Whether at least one finite element was seen."""
        return self.count > 0

    @property
    def amax(self) -> float:
        """Largest finite magnitude, ``max(|low|, |high|)``; 0.0 when there is no finite data."""
        if not self.has_data:
            return 0.0
        return max(abs(self.low), abs(self.high))


class AbsHistogram:
    """Counts of ``|x|`` over ``num_bins`` equal bins covering the fixed range ``[0, amax]``.

    Bin ``k`` holds magnitudes in ``[edges[k], edges[k + 1])``; the last bin also holds ``amax``
    itself. The range is fixed up front (from pass 1) rather than grown as data arrives, because a
    growing range re-bins earlier counts and makes the result depend on batch order.

    Magnitudes above ``amax`` (possible only if pass 2 sees different data than pass 1) saturate
    into the last bin and are also counted in :attr:`overflow`, so callers can detect it.
    With ``amax == 0`` every zero lands in bin 0 (and any non-zero value is overflow).
    """

    def __init__(self, amax: float, num_bins: int = NUM_BINS) -> None:
        if not (math.isfinite(amax) and amax >= 0.0):
            raise ValueError(f"histogram range must be a finite amax >= 0, got {amax!r}")
        if num_bins < 1:
            raise ValueError(f"histogram needs at least one bin, got {num_bins}")
        self.amax = float(amax)
        self.num_bins = int(num_bins)
        self.counts = np.zeros(self.num_bins, dtype=np.int64)
        self.overflow = 0

    @classmethod
    def for_stats(cls, stats: TensorStats, num_bins: int = NUM_BINS) -> AbsHistogram:
        """An empty histogram over the range found by pass 1."""
        return cls(stats.amax, num_bins)

    def add(self, array: np.ndarray) -> None:
        """Count the finite magnitudes of one batch (non-finite values are skipped)."""
        finite, _ = _finite_part(_as_numeric(array))
        for chunk in _chunks(finite):
            self._add_finite(chunk)

    def _add_finite(self, finite: np.ndarray) -> None:
        """Bin finite values; each element's bin depends on that element alone.

        Working in float64 makes the bins independent of the input dtype. The bin is
        ``floor(|x| / amax * num_bins)``; ``|x| / amax`` is exactly 1.0 at ``amax`` and never above
        it below ``amax``, so only ``amax`` itself (moved into the last bin) and overflow reach
        ``num_bins``. The two rounded operations can still put a value lying exactly on an edge
        one bin low (e.g. 0.5 / 3 * 6 < 1), so the index is then corrected against :attr:`edges`,
        as ``np.histogram`` does: every counted value satisfies ``edges[k] <= |x| < edges[k + 1]``.
        """
        if finite.size == 0:
            return
        magnitudes = np.abs(finite.astype(np.float64, copy=False))
        self.overflow += int(np.count_nonzero(magnitudes > self.amax))
        if self.amax == 0.0:
            indices = np.zeros(magnitudes.size, dtype=np.int64)
        else:
            last = self.num_bins - 1
            scaled = np.floor(magnitudes / self.amax * self.num_bins)
            indices = np.minimum(scaled, last).astype(np.int64)
            edges = self.edges
            indices -= magnitudes < edges[indices]
            indices += (magnitudes >= edges[indices + 1]) & (indices < last)
        self.counts += np.bincount(indices, minlength=self.num_bins)

    def add_bin_indices(self, indices: np.ndarray) -> None:
        """Count bin indices computed elsewhere (inside ONNX Runtime); index ``num_bins`` marks a
        skipped (non-finite) value. Counting is exact, so the order of batches does not matter."""
        counts = np.bincount(indices.ravel(), minlength=self.num_bins + 1)
        self.counts += counts[: self.num_bins]

    def merge(self, other: AbsHistogram) -> AbsHistogram:
        """A new histogram with the counts of both; they must share range and bin count."""
        if other.amax != self.amax or other.num_bins != self.num_bins:
            raise ValueError(
                f"cannot merge histograms over different ranges: "
                f"[0, {self.amax!r}] x {self.num_bins} vs [0, {other.amax!r}] x {other.num_bins}"
            )
        merged = AbsHistogram(self.amax, self.num_bins)
        merged.counts = self.counts + other.counts
        merged.overflow = self.overflow + other.overflow
        return merged

    def copy(self) -> AbsHistogram:
        """An independent copy (``add`` mutates in place)."""
        return self.merge(AbsHistogram(self.amax, self.num_bins))

    @property
    def total(self) -> int:
        """Number of values counted."""
        return int(self.counts.sum())

    @property
    def bin_width(self) -> float:
        """Width of every bin, ``amax / num_bins``."""
        return self.amax / self.num_bins

    @property
    def edges(self) -> np.ndarray:
        """The ``num_bins + 1`` bin edges; ``edges[k]`` is the upper edge of bin ``k - 1``.

        Computed as ``amax * (k / num_bins)`` so that the last edge is exactly ``amax``.
        """
        return self.amax * (np.arange(self.num_bins + 1, dtype=np.float64) / self.num_bins)

    @property
    def centers(self) -> np.ndarray:
        """Midpoint of every bin."""
        return self.amax * ((np.arange(self.num_bins, dtype=np.float64) + 0.5) / self.num_bins)


def _chunks(values: np.ndarray) -> Iterator[np.ndarray]:
    """Consecutive slices of at most ``CHUNK_ELEMENTS`` of a 1-d array."""
    for start in range(0, values.size, CHUNK_ELEMENTS):
        yield values[start : start + CHUNK_ELEMENTS]
