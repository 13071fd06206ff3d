"""Granularity as data: which elements share one scale, and the Q/DQ attributes that say so.

Three kinds, each a row of the ONNX QuantizeLinear/DequantizeLinear contract:

- ``tensor``: one scale for the whole tensor; scale shape ``()``, no attribute.
- ``channel``: one scale per slice along ``axis``; scale shape ``(D_axis,)``, attribute ``axis``.
- ``block``: one scale per ``block_size`` consecutive elements along ``axis``; scale has the tensor's
  rank with ``ceil(D_axis / block_size)`` along ``axis`` (the last block may be shorter), attributes
  ``axis`` and ``block_size`` (opset >= 21).

Pure data and numpy: no graph code here. Formats (INT4, NVFP4, MXFP8) import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from onnxq.formats.int8 import normalize_axis

Kind = Literal["tensor", "channel", "block"]
#: first default-domain opset whose QuantizeLinear/DequantizeLinear has each granularity
MIN_OPSET: dict[str, int] = {"tensor": 10, "channel": 13, "block": 21}


def block_size_problem(block_size: object, multiple_of: int = 1) -> str | None:
    """Why ``block_size`` cannot be used (a one-line reason), or None when it can.

    Cases: not an int (bool counts as not an int: ``True`` is no block size); zero or negative; not a
    multiple of ``multiple_of`` (NVFP4 needs 16, MX formats 32; INT4 accepts any positive size).
    """
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        return f"block size {block_size!r} is not an integer"
    if block_size <= 0:
        return f"block size {block_size} is not positive"
    if block_size % multiple_of:
        return f"block size {block_size} is not a multiple of {multiple_of}"
    return None


def n_blocks(length: int, block_size: int) -> int:
    """ceil(length / block_size): a trailing partial block still gets its own scale (ONNX blocked Q/DQ)."""
    return -(-length // block_size)


@dataclass(frozen=True)
class Granularity:
    """Which elements share a scale. Build with :meth:`tensor`, :meth:`channel` or :meth:`block`."""

    kind: Kind
    axis: int | None = None
    block_size: int | None = None

    def __post_init__(self) -> None:
        # a half-specified granularity would silently map to the wrong Q/DQ attributes
        wants_axis, wants_block = self.kind != "tensor", self.kind == "block"
        if self.kind not in MIN_OPSET:
            raise ValueError(f"granularity kind {self.kind!r} is not one of {sorted(MIN_OPSET)}")
        if (self.axis is not None) != wants_axis or (self.block_size is not None) != wants_block:
            raise ValueError(f"{self.kind} granularity with axis={self.axis}, block_size={self.block_size}")
        problem = block_size_problem(self.block_size) if wants_block else None
        if problem:
            raise ValueError(problem)

    @classmethod
    def tensor(cls) -> Granularity:
        return cls("tensor")

    @classmethod
    def channel(cls, axis: int) -> Granularity:
        return cls("channel", axis)

    @classmethod
    def block(cls, axis: int, block_size: int) -> Granularity:
        return cls("block", axis, block_size)

    @property
    def min_opset(self) -> int:
        return MIN_OPSET[self.kind]

    def qdq_attributes(self, rank: int) -> dict[str, int]:
        """The QuantizeLinear/DequantizeLinear attributes for a tensor of ``rank`` (axis normalized)."""
        if self.axis is None:
            return {}
        attributes = {"axis": normalize_axis(self.axis, rank)}
        if self.block_size is not None:
            attributes["block_size"] = self.block_size
        return attributes

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scale (and zero point) for a tensor of ``shape``."""
        if self.axis is None:
            return ()
        axis = normalize_axis(self.axis, len(shape))
        if self.block_size is None:
            return (shape[axis],)
        return tuple(n_blocks(d, self.block_size) if i == axis else d for i, d in enumerate(shape))

    def expand(self, param: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``param`` (scale-shaped) broadcast to ``shape``, each block's value repeated over its elements."""
        param = np.asarray(param)
        if param.shape != self.scale_shape(shape):
            raise ValueError(f"parameter of shape {param.shape} does not fit {self} on a tensor of {shape}")
        if self.axis is None:
            return param
        axis = normalize_axis(self.axis, len(shape))
        if self.block_size is None:
            return param.reshape([-1 if i == axis else 1 for i in range(len(shape))])
        # repeat every block then cut the padding of the last, partial block
        repeated = np.repeat(param, self.block_size, axis=axis)
        return np.take(repeated, np.arange(shape[axis]), axis=axis)


def blocks_last(x: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """``x`` with ``axis`` split into (n_blocks, block_size) and moved last: shape (..., n_blocks, bs).

    A partial last block is padded with zeros, which leave |x| maxima and ranges widened to contain 0
    unchanged. Reducing over the last axis and moving axis -1 back gives the scale-shaped result.
    """
    axis = normalize_axis(axis, x.ndim)
    moved = np.moveaxis(np.asarray(x), axis, -1)
    pad = n_blocks(moved.shape[-1], block_size) * block_size - moved.shape[-1]
    if pad:
        moved = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, pad)])
    return moved.reshape(*moved.shape[:-1], -1, block_size)


def block_reduce(x: np.ndarray, granularity: Granularity, reduce: str = "amax") -> np.ndarray:
    """Per-block ``amax`` (largest |x|), ``min`` or ``max`` in the scale shape of ``granularity``.

    ``min``/``max`` include 0 (the zero padding of a partial block, and every block's range is widened
    to contain 0 anyway so that 0.0 stays exact).
    """
    if granularity.axis is None or granularity.block_size is None:
        raise ValueError(f"block_reduce needs block granularity, got {granularity}")
    blocks = blocks_last(np.asarray(x, dtype=np.float32), granularity.axis, granularity.block_size)
    if reduce == "amax":
        reduced = np.abs(blocks).max(axis=-1, initial=0.0)
    elif reduce in ("min", "max"):
        reduced = getattr(np, reduce)(blocks, axis=-1, initial=0.0)
    else:
        raise ValueError(f"unknown reduction {reduce!r}")
    return np.moveaxis(reduced, -1, normalize_axis(granularity.axis, np.ndim(x)))
