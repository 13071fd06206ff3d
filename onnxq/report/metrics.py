"""Running sums for one quantized tensor, added batch by batch (nothing but scalars and bins is kept).

Three arrays per batch: the FP32 model's tensor (``reference``), the tensor the quantizer reads in the
quantized model (``source``: upstream quantization error included) and what the layer reads after the
dequantizer (``seen``). Figures:

- ``snr_db``: ``seen`` against ``reference`` (everything the model lost up to this tensor);
- ``local_snr_db``: ``seen`` against ``source`` (the noise this quantizer alone adds: the cheap
  sensitivity estimate);
- ``clipped_share``: share of ``source`` values beyond the limits given (the caller passes the
  representable range widened by half the step next to each extreme: values that round to the
  extreme code are rounded, not clipped);
- a fixed-range histogram of ``source`` (range known before the pass), values beyond it in the end bins.

Only positions where all three arrays are finite count; the others are counted in ``nonfinite``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from onnxq.comparison import snr_db

#: bins of the histograms drawn in the HTML report
HISTOGRAM_BINS = 64


@dataclass
class TensorMetrics:
    signal: float = 0.0
    noise: float = 0.0
    local_signal: float = 0.0
    local_noise: float = 0.0
    clipped: int = 0
    elements: int = 0
    nonfinite: int = 0
    #: edges (HISTOGRAM_BINS + 1) and counts of the source values; None until ``start_histogram``
    edges: np.ndarray | None = field(default=None, repr=False)
    counts: np.ndarray | None = field(default=None, repr=False)

    def start_histogram(self, low: float, high: float) -> None:
        if not (math.isfinite(low) and math.isfinite(high)):
            return
        if high <= low:
            low, high = low - 1.0, high + 1.0  # a constant tensor: one visible bar
        self.edges = np.linspace(low, high, HISTOGRAM_BINS + 1)
        self.counts = np.zeros(HISTOGRAM_BINS, np.int64)

    def add(
        self,
        reference: np.ndarray,
        source: np.ndarray,
        seen: np.ndarray,
        limits: tuple[np.ndarray | float, np.ndarray | float] | None,
    ) -> None:
        """One batch; ``limits`` (low, high) broadcast against the arrays, None for no fixed range."""
        if reference.shape != seen.shape or source.shape != seen.shape:
            raise ValueError(f"shapes differ: {reference.shape}, {source.shape}, {seen.shape}")
        ref, src, out = (np.asarray(a, np.float64) for a in (reference, source, seen))
        finite = np.isfinite(ref) & np.isfinite(src) & np.isfinite(out)
        self.nonfinite += int(finite.size - np.count_nonzero(finite))
        if limits is not None:
            low = np.broadcast_to(limits[0], src.shape)[finite]
            high = np.broadcast_to(limits[1], src.shape)[finite]
        ref, src, out = ref[finite], src[finite], out[finite]
        self.signal += float(ref @ ref)
        self.noise += float((out - ref) @ (out - ref))
        self.local_signal += float(src @ src)
        self.local_noise += float((out - src) @ (out - src))
        self.elements += int(ref.size)
        if limits is not None:
            self.clipped += int(np.count_nonzero((src < low) | (src > high)))
        if self.edges is not None and self.counts is not None and src.size:
            clamped = np.clip(src, self.edges[0], self.edges[-1])
            self.counts += np.histogram(clamped, bins=self.edges)[0]

    @property
    def snr_db(self) -> float:
        return snr_db(self.signal, self.noise)

    @property
    def local_snr_db(self) -> float:
        return snr_db(self.local_signal, self.local_noise)

    @property
    def clipped_share(self) -> float:
        return self.clipped / self.elements if self.elements else 0.0
