"""SmoothQuant's math: per-input-channel smoothing scales, their error under fake quantization, the
alpha search, and the checks of the user's options.

For ``y = x @ W`` (x's last axis is K, W is ``[K, N]``) SmoothQuant moves activation outliers into the
weights: ``y = (x / s) @ (diag(s) W)`` with, per input channel k,

    s_k = max|x_k| ** alpha / max|W_k| ** (1 - alpha)

where ``max|W_k|`` is the largest magnitude of row k over every output column (and over every GEMM
that reads the same activation: Q, K and V share one ``s``). alpha = 1 makes every smoothed activation
channel peak at 1; alpha = 0 makes every smoothed weight row peak at 1 (s = 1 / max|W_k|, the identity
only when every row already peaks at 1).

Cases handled by :func:`smoothing_scale`:

- a channel whose activation or weight maximum is 0 (a dead channel, a zero weight row) or not finite
  keeps ``s = 1``: any other value would divide by 0 or scale by inf/NaN, and the channel contributes
  nothing (or nothing usable) to the product anyway;
- scales are computed in float64 and clipped to ``[MIN_SCALE, MAX_SCALE]`` so that both ``x / s`` and
  ``W * s`` stay finite and normal in float32 (extreme ratios of the maxima otherwise overflow).

:func:`smoothing_error` measures one candidate: the relative squared error of every GEMM's output when
the smoothed activation is fake-quantized per tensor (the range over the whole calibration data,
derived exactly from the per-channel minima and maxima) and the smoothed weight per output channel,
in the formats the model will be written in. :func:`search_alpha` evaluates the grid (``ALPHA_GRID``)
and, as a guard, no smoothing at all; it returns the best (ties: the smaller alpha, no smoothing first).

:func:`check_smoothquant_options` refuses, with one-line :class:`OnnxqError` messages: an alpha outside
[0, 1] (or not a number, or a string other than ``auto``), a mode other than int8/fp8, and a model with
no MatMul/Gemm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.formats.base import NumberFormat

#: modes whose Q/DQ SmoothQuant serves: per-tensor activations, per-channel weights
SMOOTHQUANT_MODES = ("int8", "fp8")
AUTO: Literal["auto"] = "auto"
#: the alpha the paper recommends for most models, and ``--smoothquant``'s value when none is given:
#: measured best on the benchmark encoders (tools/results/bench_smoothquant.md)
DEFAULT_ALPHA = 0.5
#: alphas ``auto`` tries: 0.0, 0.05, ..., 1.0
ALPHA_STEP = 0.05
ALPHA_GRID: tuple[float, ...] = tuple(round(i * ALPHA_STEP, 2) for i in range(round(1 / ALPHA_STEP) + 1))
#: bounds on s: x / s and W * s stay finite and normal in float32 for any sane model
MIN_SCALE = 1e-6
MAX_SCALE = 1e6
GEMM_OPS = ("MatMul", "Gemm")
#: weights are quantized per output channel: axis 1 of the [K, N] weight
WEIGHT_CHANNEL_AXIS = 1

Alpha = float | Literal["auto"]


@dataclass(frozen=True)
class ChannelRange:
    """Per-channel minimum and maximum of one activation over the calibration data."""

    low: np.ndarray  # [K] float32
    high: np.ndarray  # [K] float32

    @property
    def amax(self) -> np.ndarray:
        return np.maximum(np.abs(self.low), np.abs(self.high))

    def smoothed(self, scale: np.ndarray) -> tuple[float, float]:
        """The per-tensor [low, high] of ``x / s`` over the same data (exact: s > 0 keeps each
        channel's order)."""
        scale64 = scale.astype(np.float64)
        return float(np.min(self.low / scale64)), float(np.max(self.high / scale64))


@dataclass(frozen=True)
class QuantFormats:
    """How the model will quantize a GEMM: activation per tensor, weight per output channel."""

    activation: NumberFormat
    weight: NumberFormat
    symmetric: bool = True


@dataclass(frozen=True)
class AlphaSearch:
    """What :func:`search_alpha` found: ``alpha`` None means no smoothing measured best."""

    alpha: float | None
    scale: np.ndarray
    error: float
    error_unsmoothed: float
    #: (alpha, error) for every grid point, in grid order
    tried: tuple[tuple[float, float], ...]


def weight_row_amax(weights_kn: Sequence[np.ndarray]) -> np.ndarray:
    """max|W_k| per input channel over every output column of every weight (all ``[K, N]``)."""
    if not weights_kn:
        raise ValueError("no weights given")
    rows = [np.max(np.abs(w.astype(np.float32)), axis=1) for w in weights_kn]
    return np.max(np.stack(rows), axis=0)


def smoothing_scale(activation_amax: np.ndarray, weight_amax: np.ndarray, alpha: float) -> np.ndarray:
    """``s = max|x| ** alpha / max|W| ** (1 - alpha)`` per channel, float32 (see the module doc for guards)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    act = np.asarray(activation_amax, np.float64)
    wgt = np.asarray(weight_amax, np.float64)
    if act.shape != wgt.shape or act.ndim != 1:
        raise ValueError(f"per-channel maxima must be 1-D and alike, got {act.shape} and {wgt.shape}")
    usable = np.isfinite(act) & np.isfinite(wgt) & (act > 0) & (wgt > 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        raw = np.power(act, alpha) / np.power(wgt, 1.0 - alpha)
    scale = np.where(usable, np.clip(raw, MIN_SCALE, MAX_SCALE), 1.0)
    return scale.astype(np.float32)


def fake_quantize_activation(x: np.ndarray, low: float, high: float, formats: QuantFormats) -> np.ndarray:
    fmt = formats.activation
    params = fmt.activation_params(low, high, formats.symmetric)
    return fmt.dequantize(fmt.quantize(x, params), params)


def fake_quantize_weight(weight_kn: np.ndarray, formats: QuantFormats) -> np.ndarray:
    fmt = formats.weight
    params = fmt.weight_params(weight_kn, WEIGHT_CHANNEL_AXIS)
    return fmt.dequantize(fmt.quantize(weight_kn, params), params)


def smoothing_error(
    rows: np.ndarray,
    weights_kn: Sequence[np.ndarray],
    channel_range: ChannelRange,
    scale: np.ndarray,
    formats: QuantFormats,
) -> float:
    """Sum over the GEMMs of ``|x W - q(x / s) q(diag(s) W)|^2 / |x W|^2`` on ``rows`` ([R, K]).

    Each GEMM's error is relative to its own output, so Q, K and V weigh the same whatever their scale.
    """
    return _error(rows, weights_kn, _references(rows, weights_kn), channel_range, scale, formats)


def _references(rows: np.ndarray, weights_kn: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The float outputs ``x W`` (float64), computed once per search."""
    x64 = rows.astype(np.float32).astype(np.float64)
    return [x64 @ w.astype(np.float32).astype(np.float64) for w in weights_kn]


def _error(
    rows: np.ndarray,
    weights_kn: Sequence[np.ndarray],
    references: list[np.ndarray],
    channel_range: ChannelRange,
    scale: np.ndarray,
    formats: QuantFormats,
) -> float:
    scale32 = scale.astype(np.float32)
    low, high = channel_range.smoothed(scale32)
    quantized_x = fake_quantize_activation(rows.astype(np.float32) / scale32, low, high, formats)
    quantized_x64 = quantized_x.astype(np.float64)
    total = 0.0
    for weight, reference in zip(weights_kn, references):
        smoothed_w = fake_quantize_weight(weight.astype(np.float32) * scale32[:, None], formats)
        approx = quantized_x64 @ smoothed_w.astype(np.float64)
        energy = float(np.sum(reference**2))
        total += float(np.sum((reference - approx) ** 2)) / energy if energy > 0 else 0.0
    return total


def search_alpha(
    rows: np.ndarray,
    weights_kn: Sequence[np.ndarray],
    channel_range: ChannelRange,
    formats: QuantFormats,
    grid: Sequence[float] = ALPHA_GRID,
) -> AlphaSearch:
    """The grid alpha (or no smoothing) whose :func:`smoothing_error` on ``rows`` is smallest."""
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"rows must be a non-empty [R, K] array, got shape {rows.shape}")
    weight_amax = weight_row_amax(weights_kn)
    identity = np.ones(weight_amax.shape, np.float32)
    references = _references(rows, weights_kn)
    unsmoothed = _error(rows, weights_kn, references, channel_range, identity, formats)
    best: tuple[float | None, np.ndarray, float] = (None, identity, unsmoothed)
    tried = []
    for alpha in grid:
        scale = smoothing_scale(channel_range.amax, weight_amax, alpha)
        error = _error(rows, weights_kn, references, channel_range, scale, formats)
        tried.append((float(alpha), error))
        if error < best[2]:
            best = (float(alpha), scale, error)
    return AlphaSearch(best[0], best[1], best[2], unsmoothed, tuple(tried))


# --- the user's options -----------------------------------------------------------------------------


def check_smoothquant_options(alpha: Any, mode: str, model: ir.Model | None) -> Alpha:
    """The alpha to use (a float in [0, 1] or ``"auto"``), or OnnxqError for any bad input.

    ``model`` None skips the model check (the CLI checks options before loading anything).
    """
    value = _alpha_value(alpha)
    if mode not in SMOOTHQUANT_MODES:
        raise OnnxqError(
            f"--smoothquant applies to per-tensor activation modes ({', '.join(SMOOTHQUANT_MODES)}), not {mode}",
            "drop --smoothquant, or use --mode int8 or --mode fp8 (AWQ serves the INT4 modes: --algo)",
        )
    if model is not None and not _has_gemm(model):
        raise OnnxqError(
            "--smoothquant found no MatMul or Gemm in the model: there is nothing to smooth",
            "drop --smoothquant for this model",
        )
    return value


def _alpha_value(alpha: Any) -> Alpha:
    if isinstance(alpha, str) and alpha.strip().lower() == AUTO:
        return AUTO
    number = math.nan
    if not isinstance(alpha, bool):
        try:
            number = float(alpha)
        except (TypeError, ValueError):
            number = math.nan
    if not 0.0 <= number <= 1.0:  # NaN fails too
        raise OnnxqError(
            f"--smoothquant alpha {alpha!r} is not a number in [0, 1] or 'auto'",
            f"pass an alpha between 0 and 1 (default {DEFAULT_ALPHA}) or 'auto' to search it per layer",
        )
    return number


def _has_gemm(model: ir.Model) -> bool:
    return any(
        node.op_type in GEMM_OPS and node.domain in ("", "ai.onnx")
        for graph in model.graphs()
        for node in graph
    )
