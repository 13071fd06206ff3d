"""quantize/dequantize of every format against two independent implementations of the ONNX ops:
``onnx.reference.ReferenceEvaluator`` and ONNX Runtime's CPU kernels, on an x -> Q -> DQ model."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxq.formats.base import NumberFormat, QuantParams
from onnxq.formats.fp8_e4m3 import Fp8E4M3Format
from onnxq.formats.int8 import Int8Format
from onnxq.formats.uint8 import Uint8Format

E4M3 = ml_dtypes.float8_e4m3fn
OPSET = 21
IR_VERSION = 10
SHAPE = (3, 8, 5)
ONNX_TYPE = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8, "fp8": TensorProto.FLOAT8E4M3FN}
BY_NAME: dict[str, NumberFormat] = {"int8": Int8Format(), "uint8": Uint8Format(), "fp8": Fp8E4M3Format()}


def qdq_model(fmt: NumberFormat, params: QuantParams, shape: tuple[int, ...]) -> onnx.ModelProto:
    """x -> QuantizeLinear -> q -> DequantizeLinear -> y, with scale and zero point as initializers."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"]),
    ]
    if params.axis is not None:
        for node in nodes:
            node.attribute.append(helper.make_attribute("axis", params.axis))
    qtype = ONNX_TYPE[fmt.name]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [
            helper.make_tensor_value_info("q", qtype, shape),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, shape),
        ],
        initializer=[
            numpy_helper.from_array(np.asarray(params.scale, np.float32), "scale"),
            numpy_helper.from_array(np.asarray(params.zero_point, fmt.numpy_dtype), "zp"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def run_reference(model: onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q, y = ReferenceEvaluator(model).run(None, {"x": x})
    return np.asarray(q), np.asarray(y)


def run_ort(model: onnx.ModelProto, x: np.ndarray, fmt: NumberFormat) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q, y = session.run(None, {"x": x})
    # ONNX Runtime hands FP8 tensors back as their raw uint8 bit patterns
    return (q.view(E4M3) if fmt.numpy_dtype == E4M3 else q), y


def assert_same(ours: tuple[np.ndarray, np.ndarray], theirs: tuple[np.ndarray, np.ndarray]) -> None:
    q, y = ours
    assert theirs[0].dtype == q.dtype
    # compared as float32 so NaN == NaN whatever its sign bit (ORT writes 0x7F for every NaN)
    np.testing.assert_array_equal(q.astype(np.float32), theirs[0].astype(np.float32))
    np.testing.assert_array_equal(y, theirs[1])


def sample(seed: int, spread: float) -> np.ndarray:
    """Mostly in-range values, some far outside, and exact zeros."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE) * spread
    x[rng.random(SHAPE) < 0.05] *= 50
    x[rng.random(SHAPE) < 0.05] = 0.0
    return x.astype(np.float32)


def case_params(name: str, layout: str, x: np.ndarray) -> tuple[NumberFormat, QuantParams]:
    rng = np.random.default_rng(7)
    axis = {"tensor": None, "axis1": 1, "axis-1": -1, "axis0": 0}[layout]
    if name == "uint8":
        fmt = BY_NAME["uint8"]
        if axis is None:
            return fmt, fmt.activation_params(float(x.min()) / 4, float(x.max()) / 4, symmetric=False)
        n = x.shape[axis]
        scale = np.asarray(rng.uniform(0.01, 0.2, n), np.float32)
        return fmt, QuantParams(scale, np.asarray(rng.integers(0, 256, n), np.uint8), axis)
    fmt = BY_NAME[name]
    # an amax below the data's makes some values saturate
    params = fmt.weight_params(x * np.float32(0.6), axis)
    if name == "int8" and axis is not None:  # QuantizeLinear with a zero point the symmetric rules never make
        zp = rng.integers(-20, 20, params.scale.shape).astype(np.int8)
        params = QuantParams(params.scale, zp, params.axis)
    return fmt, params


CASES = [(n, layout) for n in ("int8", "uint8", "fp8") for layout in ("tensor", "axis1", "axis-1", "axis0")]


@pytest.mark.parametrize(("name", "layout"), CASES)
def test_matches_reference_evaluator_and_onnx_runtime(name: str, layout: str) -> None:
    x = sample(seed=len(CASES) + CASES.index((name, layout)), spread=3.0)
    fmt, params = case_params(name, layout, x)
    q = fmt.quantize(x, params)
    ours = (q, fmt.dequantize(q, params))
    model = qdq_model(fmt, params, SHAPE)
    assert_same(ours, run_reference(model, x))
    assert_same(ours, run_ort(model, x, fmt))


@pytest.mark.parametrize("name", ["int8", "uint8", "fp8"])
def test_exact_ties_match(name: str) -> None:
    # a power-of-two scale keeps x / scale exact, so every k + 0.5 is a true tie
    fmt = BY_NAME[name]
    zp = np.asarray(3 if name == "uint8" else 0, fmt.numpy_dtype)
    params = QuantParams(np.array(0.25, np.float32), zp)
    halves = np.arange(-600, 600, dtype=np.float32) * np.float32(0.125)
    fp8_ties = np.array([2.0**-12, 3 * 2.0**-12, 5 * 2.0**-12, 1.0625 / 4, 432 / 4, 464 / 4], np.float32)
    x = np.concatenate([halves, fp8_ties]).reshape(1, -1)
    q = fmt.quantize(x, params)
    model = qdq_model(fmt, params, x.shape)
    assert_same((q, fmt.dequantize(q, params)), run_reference(model, x))
    assert_same((q, fmt.dequantize(q, params)), run_ort(model, x, fmt))


SPECIALS = np.array([[np.inf, -np.inf, np.nan, -np.nan, 3e38, -3e38, 1e10, -1e10]], np.float32)


@pytest.mark.parametrize("name", ["int8", "uint8", "fp8"])
def test_non_finite_and_huge_inputs_match_onnx_runtime(name: str) -> None:
    fmt = BY_NAME[name]
    params = QuantParams(np.array(0.5, np.float32), np.zeros((), fmt.numpy_dtype))
    q = fmt.quantize(SPECIALS, params)
    assert_same(
        (q, fmt.dequantize(q, params)), run_ort(qdq_model(fmt, params, SPECIALS.shape), SPECIALS, fmt)
    )


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_non_finite_fp8_inputs_match_reference_evaluator() -> None:
    # Not done for int8/uint8: onnx.reference casts rint(x) to int32 before clipping, so inf and
    # |x / scale| >= 2**31 wrap (1e10 comes out as -128); ONNX Runtime saturates them, as we do.
    fmt = BY_NAME["fp8"]
    params = QuantParams(np.array(0.5, np.float32), np.zeros((), E4M3))
    q = fmt.quantize(SPECIALS, params)
    assert_same(
        (q, fmt.dequantize(q, params)), run_reference(qdq_model(fmt, params, SPECIALS.shape), SPECIALS)
    )


@pytest.mark.parametrize("name", ["int8", "uint8", "fp8"])
def test_fake_quantize_matches_onnx_runtime(name: str) -> None:
    fmt = BY_NAME[name]
    x = sample(seed=99, spread=2.0)
    amax = 2.5
    low = -amax if name != "uint8" or (x < 0).any() else 0.0
    params = fmt.activation_params(low, amax, symmetric=name != "uint8")
    _, y = run_ort(qdq_model(fmt, params, SHAPE), x, fmt)
    np.testing.assert_array_equal(fmt.fake_quantize(x, amax), y)
