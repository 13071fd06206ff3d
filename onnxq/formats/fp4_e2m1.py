"""FP4 E2M1 (1 sign, 2 exponent bits with bias 1, 1 mantissa bit; no infinities, no NaN).

The 8 magnitudes are 0, 0.5 (the only subnormal), 1, 1.5, 2, 3, 4, 6. It is the value type of NVFP4 and
MXFP4; on its own it has no scale, so a format around it (``nvfp4``) supplies the scales.

Rounding follows ONNX QuantizeLinear to FLOAT4E2M1 (``onnx.reference`` casts with ml_dtypes): round to
nearest, ties to the even code (0.25 -> 0, 0.75 -> 1, 5 -> 4), finite overflow and +/-inf saturate to
+/-6 whatever ``saturate`` says (there is no code to overflow into). There is no NaN code either:
ml_dtypes turns NaN into a zero, so callers refuse NaN inputs before quantizing.

Storage: ``numpy_helper.from_array`` and onnx_ir pack two codes per byte, element ``2i`` in the low
nibble and ``2i + 1`` in the high nibble; an odd count leaves the last high nibble 0.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

FP4_E2M1_MAX = 6.0
#: smallest positive value, the only subnormal (exponent bits 00, mantissa 1)
FP4_E2M1_MIN_SUBNORMAL = 0.5
#: exponent of the largest value: 6 = 1.5 * 2**2 (the ``emax_elem`` of the OCP MX spec)
FP4_E2M1_EMAX = 2
FLOAT4_E2M1FN = np.dtype(ml_dtypes.float4_e2m1fn)
#: value of each 4-bit code 0x0..0xF (bit 3 is the sign)
FP4_E2M1_VALUES: tuple[float, ...] = (
    *(0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
    *(-0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0),
)
_NIBBLE = 0x0F


def saturate_to_fp4(v: np.ndarray) -> np.ndarray:
    """Float ``v`` rounded to E2M1 (ties to even), +/-inf and overflow clamped to +/-6, as float4 array.

    The clamp is explicit so that the result does not depend on how a ml_dtypes version casts overflow.
    """
    clamped = np.clip(np.asarray(v, dtype=np.float32), -FP4_E2M1_MAX, FP4_E2M1_MAX)
    with np.errstate(invalid="ignore"):  # NaN has no code: ml_dtypes gives a zero, callers refuse NaN
        return clamped.astype(FLOAT4_E2M1FN)


def fp4_codes(q: np.ndarray) -> np.ndarray:
    """The 4-bit codes (uint8 0..15) of a float4 array: ml_dtypes stores one code per byte."""
    return np.asarray(q, dtype=FLOAT4_E2M1FN).view(np.uint8) & _NIBBLE


def fp4_from_codes(codes: np.ndarray) -> np.ndarray:
    """Float4 array from 4-bit codes (uint8 0..15)."""
    codes = np.asarray(codes, dtype=np.uint8)
    if (codes > _NIBBLE).any():
        raise ValueError("FP4 codes are 4-bit: 0..15")
    return codes.view(FLOAT4_E2M1FN)


def pack_fp4(q: np.ndarray) -> np.ndarray:
    """Codes of ``q`` (flattened, C order) two per byte, low nibble first: ONNX's raw_data layout."""
    codes = fp4_codes(q).reshape(-1)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(0))  # the unused high nibble of an odd count is 0
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)


def unpack_fp4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_fp4`: the float4 array of ``shape`` held in ``packed`` bytes."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    count = int(np.prod(shape, dtype=np.int64))
    if packed.size != -(-count // 2):
        raise ValueError(f"{packed.size} bytes do not hold {count} FP4 values")
    codes = np.stack([packed & _NIBBLE, packed >> 4], axis=-1).reshape(-1)[:count]
    return fp4_from_codes(codes).reshape(shape)
