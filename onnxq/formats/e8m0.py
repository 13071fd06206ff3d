"""E8M0: the unsigned power-of-two scale of the OCP Microscaling (MX) formats (ml_dtypes float8_e8m0fnu).

Eight exponent bits, bias 127, no sign, no mantissa: code c stands for 2**(c - 127), from 2**-127
(code 0x00) to 2**127 (0xFE); 0xFF is NaN. There is no zero.

Scale choice (OCP MX spec v1.0, section 6.3): a block of values with largest magnitude ``amax`` shares
the exponent ``floor(log2(amax)) - emax_elem``, where ``emax_elem`` is the exponent of the element
format's largest value (8 for FP8 E4M3: 448 = 1.75 * 2**8; 2 for FP4 E2M1: 6 = 1.5 * 2**2). ``amax``
then lands in the element format's top binade; elements above its largest value (up to 511 for E4M3)
saturate, as the spec accepts. This is the default. NVIDIA's MXFP8 recipe (ModelOpt's export) rounds
the other way, ``ceil(log2(amax / elem_max))`` (:func:`mx_shared_exponent_round_up`): nothing
saturates, at the cost of an unused top binade in some blocks. Measured on random weights (MXFP8,
blocks of 32): 30.7 dB (spec) vs 31.5 dB (round up) for Gaussian, 29.4 vs 31.6 dB for Student-t(3).

Two deliberate clamps, beyond the spec text:
- an all-zero block (``amax == 0``, no log) gets exponent 0 (scale 1.0): any scale reproduces zeros,
  and 1.0 is what every other onnxq format gives an empty range;
- exponents are kept >= -126 so that the scale is a normal float32: a runtime that flushes subnormals
  (GPU kernels with FTZ/DAZ) would otherwise turn 2**-127 into 0 and ``x / 0`` into inf.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

FLOAT8_E8M0FNU = np.dtype(ml_dtypes.float8_e8m0fnu)
E8M0_BIAS = 127
E8M0_NAN_CODE = 0xFF
#: exponent of code 0x00 and of code 0xFE (the largest finite scale)
E8M0_MIN_EXPONENT = -127
E8M0_MAX_EXPONENT = 127
#: lowest exponent onnxq writes: 2**-126 is float32's smallest normal
MIN_NORMAL_EXPONENT = -126
#: exponent given to an all-zero block: scale 1.0
ZERO_BLOCK_EXPONENT = 0


def floor_log2(amax: np.ndarray) -> np.ndarray:
    """floor(log2(amax)) of positive finite float32 values, exactly (frexp, no float log rounding).

    ``frexp`` writes ``amax = m * 2**e`` with ``0.5 <= m < 1``, so ``floor(log2(amax)) = e - 1``;
    float32 subnormals are exact too.
    """
    _, exponent = np.frexp(np.asarray(amax, dtype=np.float32))
    return (exponent - 1).astype(np.int32)


def mx_shared_exponent(amax: np.ndarray | float, emax_elem: int) -> np.ndarray:
    """floor(log2(amax)) - emax_elem (OCP MX): amax lands in the element format's top binade.

    Cases: amax == 0 (all-zero block) gives :data:`ZERO_BLOCK_EXPONENT`; the result is clamped to
    [:data:`MIN_NORMAL_EXPONENT`, :data:`E8M0_MAX_EXPONENT`]; NaN/inf amax are refused.
    """
    amax = np.asarray(amax, dtype=np.float32)
    if not np.isfinite(amax).all() or (amax < 0).any():
        raise ValueError("MX scales need finite, non-negative block maxima (NaN or inf in the tensor?)")
    exponent = np.where(amax > 0, floor_log2(np.where(amax > 0, amax, 1.0)) - emax_elem, ZERO_BLOCK_EXPONENT)
    return np.clip(exponent, MIN_NORMAL_EXPONENT, E8M0_MAX_EXPONENT).astype(np.int32)


def mx_shared_exponent_round_up(amax: np.ndarray | float, elem_max: float) -> np.ndarray:
    """ceil(log2(amax / elem_max)) (NVIDIA's MXFP8 recipe): the smallest power of two under which amax
    still fits, so no element saturates. Same cases and clamps as :func:`mx_shared_exponent`.

    The quotient is taken in float64, where amax / elem_max of a float32 amax lands exactly on a power
    of two only when it is one (24 significant bits cannot round onto it in 53), so ceil is exact.
    """
    amax = np.asarray(amax, dtype=np.float32)
    if not np.isfinite(amax).all() or (amax < 0).any():
        raise ValueError("MX scales need finite, non-negative block maxima (NaN or inf in the tensor?)")
    mantissa, exponent = np.frexp(np.where(amax > 0, amax, 1.0).astype(np.float64) / elem_max)
    ceil = np.where(mantissa == 0.5, exponent - 1, exponent)  # an exact power of two 2**(e-1)
    exponent = np.where(amax > 0, ceil, ZERO_BLOCK_EXPONENT)
    return np.clip(exponent, MIN_NORMAL_EXPONENT, E8M0_MAX_EXPONENT).astype(np.int32)


def e8m0_from_exponent(exponent: np.ndarray) -> np.ndarray:
    """The E8M0 scale 2**exponent (code exponent + 127), for exponents in [-127, 127]."""
    exponent = np.asarray(exponent, dtype=np.int32)
    if ((exponent < E8M0_MIN_EXPONENT) | (exponent > E8M0_MAX_EXPONENT)).any():
        raise ValueError(f"E8M0 exponents lie in [{E8M0_MIN_EXPONENT}, {E8M0_MAX_EXPONENT}]")
    return (exponent + E8M0_BIAS).astype(np.uint8).view(FLOAT8_E8M0FNU)


def mx_scale(amax: np.ndarray | float, emax_elem: int) -> np.ndarray:
    """The E8M0 block scale 2**(floor(log2(amax)) - emax_elem) (see :func:`mx_shared_exponent`)."""
    return e8m0_from_exponent(mx_shared_exponent(amax, emax_elem))


def e8m0_to_float32(scale: np.ndarray) -> np.ndarray:
    """E8M0 scales as float32 (exact: every finite E8M0 value is a float32 power of two)."""
    return np.asarray(scale, dtype=FLOAT8_E8M0FNU).astype(np.float32)
