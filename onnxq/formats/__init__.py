"""Number formats by name (``get_format("int8")``); INT4, NVFP4, ... join later via ``register_format``."""

from __future__ import annotations

from onnxq.errors import OnnxqError
from onnxq.formats.base import NumberFormat, QuantParams
from onnxq.formats.fp8_e4m3 import Fp8E4M3Format
from onnxq.formats.int8 import Int8Format
from onnxq.formats.int8_reduced import Int8ReducedRangeFormat
from onnxq.formats.uint8 import Uint8Format

__all__ = ["ALIASES", "FORMATS", "NumberFormat", "QuantParams", "get_format", "register_format"]

FORMATS: dict[str, NumberFormat] = {
    "int8": Int8Format(),
    "uint8": Uint8Format(),
    "fp8": Fp8E4M3Format(),
    "int8_reduced": Int8ReducedRangeFormat(),
}
#: other spellings users type for a registered format
ALIASES: dict[str, str] = {"fp8_e4m3": "fp8"}


def get_format(name: str) -> NumberFormat:
    """The registered format called ``name`` (case-insensitive, aliases accepted)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in FORMATS:
        known = ", ".join(sorted(FORMATS))
        raise OnnxqError(f"unknown number format {name!r}", f"use one of: {known}")
    return FORMATS[key]


def register_format(name: str, fmt: NumberFormat, *, replace: bool = False) -> None:
    """Make ``fmt`` available as ``get_format(name)``; refuses to shadow a name unless ``replace``."""
    key = name.strip().lower()
    if not replace and (key in FORMATS or key in ALIASES):
        raise ValueError(f"number format {key!r} is already registered")
    ALIASES.pop(key, None)  # an alias would otherwise keep winning the lookup
    FORMATS[key] = fmt
