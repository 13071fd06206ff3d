"""AWQ (activation-aware weight quantization) searches for INT4/UINT4 block-wise weights, in numpy.

One search covers a group of weights that read the same activation X (Q, K and V projections share
one input), each W_i float32 [K, N_i] with K the reduction axis (the caller transposes Gemm transB=1
weights). The fake quantization is exactly :mod:`onnxq.formats.int4` (``weight_params``, ``quantize``,
``dequantize``), so the search optimises the numbers that are deployed. The error measured is the
output MSE over the kept activation rows (``ActivationSample.rows``): mean over every output element
of every weight of the group.

Algorithms:

- ``awq-lite``: a per-input-channel scale ``s = mean|x|^alpha``, normalised by ``sqrt(max(s) min(s))``
  (as the AWQ paper's code does), for every alpha of :data:`ALPHA_GRID`; the loss is
  ``||X W - (X / s) Q(W * s)||^2`` summed over the group, and the best alpha is shared by the group.
  Deploying it means ``W[k, :] *= s[k]`` before quantization and ``x[..., k] /= s[k]`` at run time.
- ``awq-clip``: per block and per output column, the clip ratio of :data:`CLIP_GRID` minimising that
  block's own contribution to the output error ``||X[:, block] (W_block - Q(W_block))||^2`` (AWQ's
  auto-clip; cross terms between blocks are ignored, as there). The block Gram matrices
  ``X_b^T X_b`` make every candidate one batched matmul.
- ``awq-full``: ``awq-lite``, then ``awq-clip`` on the scaled weights with the scaled activation.

Cases: the result never has more error than plain RTN: a scale or clip that does not lower the total
output error (clip ignores cross terms, so it can raise it) is dropped, and ties keep the simpler
result. Alpha 0 gives s = 1 exactly, i.e. RTN. No kept rows (every row held NaN/inf, or no data):
nothing to measure, RTN is returned with NaN errors. Channels whose mean |x| is 0 get a tiny positive
mean (:data:`MIN_RELATIVE_MEAN` of the largest) so that s stays finite and positive; an activation
whose means are all 0 or not finite skips the scale search. Unknown algorithm, weights that are not
2-D, or a K that differs from the sample's: ValueError.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnxq.calibration.activation_samples import ActivationSample
from onnxq.formats import int4
from onnxq.formats.granularity import n_blocks

AWQ_ALGORITHMS = ("awq-lite", "awq-clip", "awq-full")
#: exponents of mean|x| tried by awq-lite (0 is plain RTN); the AWQ paper's grid of 20 steps
ALPHA_GRID: tuple[float, ...] = tuple(round(step * 0.05, 2) for step in range(21))
#: clip ratios tried per block by awq-clip, 1.0 (no clipping) first so ties keep the full range
CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - step * 0.05, 2) for step in range(11))
#: floor of a channel's mean |x|, relative to the largest: a zero mean would give s = 0
MIN_RELATIVE_MEAN = 1e-5
#: the weights are blocked along axis 0 (K, the reduction axis)
REDUCTION_AXIS = 0


@dataclass
class AwqResult:
    """What a search chose for one group of weights, and the output MSE it measured."""

    input_scale: np.ndarray | None  # [K] float32 s: W[k, :] *= s[k] and x[..., k] /= s[k]
    alpha: float | None
    clip_ratios: list[np.ndarray | None]  # per weight, block-scale shape [ceil(K / block), N_i]
    error_rtn: float
    error: float
    seconds: float


@dataclass(frozen=True)
class _Quantizer:
    """The deployed INT4/UINT4 block numerics along K, as a fake-quantization function."""

    block_size: int
    zero_point: bool
    full_range: bool
    grid: str | None = None

    def fake(self, weight: np.ndarray, clip_ratio: np.ndarray | None = None) -> np.ndarray:
        """dequantize(quantize(weight)): what the deployed graph computes with."""
        params = int4.weight_params(
            weight, REDUCTION_AXIS, self.block_size, self.zero_point, self.full_range, clip_ratio, self.grid
        )
        return int4.dequantize(int4.quantize(weight, params), params)


@dataclass
class _Choice:
    """One candidate result: its scale, alpha, clip ratios and summed squared output error."""

    input_scale: np.ndarray | None
    alpha: float | None
    clip_ratios: list[np.ndarray | None]
    squared_error: float


def search(
    weights: Sequence[np.ndarray],
    sample: ActivationSample,
    algorithm: str,
    block_size: int,
    zero_point: bool = False,
    full_range: bool = False,
    grid: str | None = None,
) -> AwqResult:
    """Search ``algorithm`` for the group ``weights`` (each [K, N_i]) reading the activation ``sample``.

    ``zero_point``, ``full_range`` and ``grid`` select the INT4 variant as in ``int4.weight_params``. With
    awq-full, the clip ratios apply to the scaled weights ``W * s[:, None]``.
    """
    started = time.perf_counter()
    if algorithm not in AWQ_ALGORITHMS:
        raise ValueError(f"unknown AWQ algorithm {algorithm!r}; expected one of {AWQ_ALGORITHMS}")
    group = _checked_weights(weights, sample)
    quantizer = _Quantizer(int4.check_block_size(block_size), zero_point, full_range, grid)
    x = np.asarray(sample.rows, np.float32)
    rtn = _Choice(
        None, None, [None] * len(group), _squared_error(x, group, [quantizer.fake(w) for w in group])
    )
    best = rtn
    if x.shape[0] and algorithm in ("awq-lite", "awq-full"):
        best = _better(best, _search_scale(x, group, sample.channel_mean_abs, quantizer))
    if x.shape[0] and algorithm in ("awq-clip", "awq-full"):
        best = _better(best, _search_clip(x, group, best, quantizer))
    elements = x.shape[0] * sum(w.shape[1] for w in group)
    return AwqResult(
        input_scale=best.input_scale,
        alpha=best.alpha,
        clip_ratios=best.clip_ratios,
        error_rtn=_mean(rtn.squared_error, elements),
        error=_mean(best.squared_error, elements),
        seconds=time.perf_counter() - started,
    )


def _checked_weights(weights: Sequence[np.ndarray], sample: ActivationSample) -> list[np.ndarray]:
    """The weights as float32 [K, N_i], each K the sample's channel count; ValueError otherwise."""
    channels = int(np.shape(sample.channel_mean_abs)[0])
    if np.shape(sample.rows)[1:] != (channels,):
        raise ValueError(f"sample rows {np.shape(sample.rows)} do not have {channels} channels")
    if not weights:
        raise ValueError("an AWQ search needs at least one weight")
    group = [np.asarray(w, np.float32) for w in weights]
    for w in group:
        if w.ndim != 2 or w.shape[0] != channels:
            raise ValueError(f"weight of shape {w.shape} is not [K={channels}, N] for this activation")
    return group


def _mean(squared_error: float, elements: int) -> float:
    return squared_error / elements if elements else math.nan


def _better(current: _Choice, candidate: _Choice | None) -> _Choice:
    """The candidate only when it strictly lowers the error: ties keep the simpler result."""
    if candidate is not None and candidate.squared_error < current.squared_error:
        return candidate
    return current


def _squared_error(x: np.ndarray, weights: list[np.ndarray], fakes: list[np.ndarray]) -> float:
    """sum_i ||x (W_i - Q(W_i))||^2 in float64, one matmul per weight. With x = X / s and W_i scaled
    by s this is ||X W - (X / s) Q(W s)||^2: x (W s) equals X W up to float rounding."""
    total = 0.0
    for w, fake in zip(weights, fakes):
        total += float(np.sum(np.square(x @ (w - fake), dtype=np.float64)))
    return total


def activation_scale(channel_mean_abs: np.ndarray, alpha: float) -> np.ndarray | None:
    """AWQ's per-channel scale ``mean^alpha / sqrt(max * min)`` (float32), or None when the means are
    all 0 or not finite. Zero means are raised to ``MIN_RELATIVE_MEAN`` of the largest first."""
    mean = np.asarray(channel_mean_abs, np.float64)
    largest = float(mean.max(initial=0.0))
    if not math.isfinite(largest) or largest <= 0:
        return None
    scale = np.maximum(mean, largest * MIN_RELATIVE_MEAN) ** alpha
    return (scale / math.sqrt(float(scale.max()) * float(scale.min()))).astype(np.float32)


def _search_scale(
    x: np.ndarray, weights: list[np.ndarray], channel_mean_abs: np.ndarray, quantizer: _Quantizer
) -> _Choice | None:
    """awq-lite: the alpha whose scale gives the group the least output error (None: no scale)."""
    best: _Choice | None = None
    for alpha in ALPHA_GRID:
        scale = activation_scale(channel_mean_abs, alpha)
        if scale is None:
            return None
        scaled = [w * scale[:, None] for w in weights]
        error = _squared_error(x / scale, scaled, [quantizer.fake(w) for w in scaled])
        if best is None or error < best.squared_error:
            best = _Choice(scale, alpha, [None] * len(weights), error)
    return best


def _search_clip(x: np.ndarray, weights: list[np.ndarray], base: _Choice, quantizer: _Quantizer) -> _Choice:
    """awq-clip on top of ``base`` (RTN, or awq-lite's scale): per block and column, the clip ratio
    minimising that block's output error; the total error is then measured with every cross term."""
    scale = base.input_scale
    x_used = x if scale is None else x / scale
    used = weights if scale is None else [w * scale[:, None] for w in weights]
    grams = _block_grams(x_used, quantizer.block_size)
    ratios = [_best_clip_ratios(w, grams, quantizer) for w in used]
    fakes = [quantizer.fake(w, ratio) for w, ratio in zip(used, ratios)]
    error = _squared_error(x_used, used, fakes)
    kept = [None if bool((ratio == 1).all()) else ratio for ratio in ratios]
    return _Choice(scale, base.alpha, kept, error)


def _block_grams(x: np.ndarray, block_size: int) -> np.ndarray:
    """X_b^T X_b for every block b of K columns: [n_blocks, block, block] (last block zero-padded)."""
    rows, channels = x.shape
    blocks = n_blocks(channels, block_size)
    padded = np.zeros((rows, blocks * block_size), np.float32)
    padded[:, :channels] = x
    per_block = padded.reshape(rows, blocks, block_size).transpose(1, 0, 2)
    grams: np.ndarray = per_block.transpose(0, 2, 1) @ per_block
    return grams


def _best_clip_ratios(weight: np.ndarray, grams: np.ndarray, quantizer: _Quantizer) -> np.ndarray:
    """Per block and column [n_blocks, N], the ratio of CLIP_GRID with the least block output error
    d^T G_b d (d = W_b - Q(W_b) for that column); CLIP_GRID starts at 1.0, so ties keep no clipping."""
    channels, columns = weight.shape
    blocks, block_size = grams.shape[0], grams.shape[1]
    best_error = np.full((blocks, columns), np.inf, np.float32)
    best_ratio = np.ones((blocks, columns), np.float32)
    for ratio in CLIP_GRID:
        candidate = np.full((blocks, columns), ratio, np.float32)
        difference = np.zeros((blocks * block_size, columns), np.float32)
        difference[:channels] = weight - quantizer.fake(weight, candidate)
        per_block = difference.reshape(blocks, block_size, columns)
        error = np.sum(per_block * (grams @ per_block), axis=1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_ratio = np.where(better, candidate, best_ratio)
    return best_ratio
