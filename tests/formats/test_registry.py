"""The format registry: lookup by name and alias, errors that name the choices, new registrations."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir
import pytest

import onnxq.formats as formats
from onnxq.errors import OnnxqError
from onnxq.formats import FORMATS, NumberFormat, QuantParams, get_format, register_format
from onnxq.formats.base import QuantParams as BaseQuantParams

# name -> (onnx dtype, numpy dtype name, min opset, max representable)
EXPECTED = {
    "int8": (ir.DataType.INT8, "int8", 13, 127.0),
    "uint8": (ir.DataType.UINT8, "uint8", 13, 255.0),
    "fp8": (ir.DataType.FLOAT8E4M3FN, "float8_e4m3fn", 19, 448.0),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_formats(name: str) -> None:
    fmt = get_format(name)
    assert fmt.name == name and FORMATS[name] is fmt
    assert (fmt.onnx_dtype, fmt.numpy_dtype.name, fmt.min_opset, fmt.max_representable) == EXPECTED[name]


def test_alias_and_case() -> None:
    assert get_format("fp8_e4m3") is get_format("fp8")
    assert get_format(" INT8 ") is FORMATS["int8"]


def test_unknown_name_lists_the_known_formats() -> None:
    with pytest.raises(OnnxqError) as info:
        get_format("int3")
    message = str(info.value)
    assert "'int3'" in message and "Fix:" in message
    for name in EXPECTED:
        assert name in info.value.fix


def test_quant_params_is_re_exported() -> None:
    assert QuantParams is BaseQuantParams


class _HalfFormat:
    """A stand-in for a later format (INT4, NVFP4): only the attributes matter here."""

    name: str = "half"
    onnx_dtype: ir.DataType = ir.DataType.FLOAT16
    numpy_dtype: np.dtype = np.dtype(np.float16)
    min_opset: int = 21
    max_representable: float = 65504.0

    def weight_params(self, weight: np.ndarray, axis: int | None) -> QuantParams:
        raise NotImplementedError

    def activation_params(self, low: float, high: float, symmetric: bool) -> QuantParams:
        raise NotImplementedError

    def quantize(self, x: np.ndarray, params: QuantParams) -> np.ndarray:
        return np.asarray(x, np.float16)

    def dequantize(self, q: np.ndarray, params: QuantParams) -> np.ndarray:
        return np.asarray(q, np.float32)

    def fake_quantize(self, x: np.ndarray, amax: float) -> np.ndarray:
        return np.asarray(x, np.float16).astype(np.float32)


@pytest.fixture
def restore_registry() -> Iterator[None]:
    saved_formats, saved_aliases = dict(formats.FORMATS), dict(formats.ALIASES)
    yield
    formats.FORMATS.clear()
    formats.FORMATS.update(saved_formats)
    formats.ALIASES.clear()
    formats.ALIASES.update(saved_aliases)


@pytest.mark.usefixtures("restore_registry")
def test_register_new_format() -> None:
    fmt: NumberFormat = _HalfFormat()
    register_format("Half", fmt)
    assert get_format("half") is fmt
    with pytest.raises(OnnxqError, match="half"):
        get_format("nvfp4")  # the message lists the new one too


@pytest.mark.usefixtures("restore_registry")
def test_register_refuses_to_shadow_unless_replace() -> None:
    fmt: NumberFormat = _HalfFormat()
    with pytest.raises(ValueError, match="already registered"):
        register_format("int8", fmt)
    with pytest.raises(ValueError, match="already registered"):
        register_format("fp8_e4m3", fmt)
    register_format("fp8_e4m3", fmt, replace=True)
    assert get_format("fp8_e4m3") is fmt
    assert get_format("fp8") is FORMATS["fp8"] and FORMATS["fp8"] is not fmt
