"""Emulation of deployable NVFP4 / MXFP8 models in standard ops, checked against onnx.reference.

The quantized activations (made graph outputs) must equal ReferenceEvaluator on the deployable graph
bit for bit. The MatMul after them accumulates in a different order in numpy and in ONNX Runtime, so
its output is checked bit for bit against ONNX Runtime's own MatMul fed the reference's quantized
activation and weight, and loosely against the reference.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.emulate import emulate, emulate_file, needs_emulation
from onnxq.errors import OnnxqError
from onnxq.formats.e8m0 import mx_shared_exponent
from onnxq.formats.fp4_e2m1 import FP4_E2M1_VALUES
from onnxq.formats.mxfp8 import FP8_E4M3_EMAX
from onnxq.graph.dynamic_quantize import TRT_DOMAIN, insert_mxfp8_activation, insert_nvfp4_activation
from onnxq.graph.fp4_weights import quantize_matmul_weights
from onnxq.model_io import clone_model, save_model
from onnxq.reference_ops import reference_evaluator

K, N = 128, 32
#: calibrated amax whose NVFP4 global scale amax / (6 * 448) is exactly 1.0
UNIT_GLOBAL_AMAX = 6.0 * 448.0


def matmul_model(x_shape: list[int | str], elem: int = TensorProto.FLOAT, opset: int = 23) -> ir.Model:
    k = x_shape[-1]
    assert isinstance(k, int)
    weight = np.random.default_rng(7).standard_normal((k, N)).astype(helper.tensor_dtype_to_np_dtype(elem))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", elem, x_shape)],
        [helper.make_tensor_value_info("y", elem, [*x_shape[:-1], N])],
        [numpy_helper.from_array(weight, "W")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 11
    return ir.serde.deserialize_model(model)


def deployable(
    x_shape: list[int | str], weights: str | None, activations: str | None, amax: float = 4.0, **kwargs: int
) -> ir.Model:
    """MatMul model with the given weight / activation formats; x' (and the weight) as graph outputs."""
    model = matmul_model(x_shape, **kwargs)
    if weights:
        assert quantize_matmul_weights(model, weights).weights == 1  # type: ignore[arg-type]
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    x = model.graph.inputs[0]
    if activations == "nvfp4":
        insert_nvfp4_activation(model.graph, x, [(matmul, 0)], amax)
    elif activations == "mxfp8":
        insert_mxfp8_activation(model.graph, x, [(matmul, 0)])
    for value in matmul.inputs:  # expose x' and W' (the tensors the MatMul reads)
        assert value is not None
        if not value.is_graph_input() and not value.is_graph_output():
            model.graph.outputs.append(value)
    return model


def checked(model: ir.Model) -> onnx.ModelProto:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def run_reference(model: onnx.ModelProto, x: np.ndarray, names: list[str] | None = None) -> list[np.ndarray]:
    """ReferenceEvaluator with onnxq's trt ops on input ``x``: the outputs (or ``names``) as arrays."""
    return [np.asarray(v) for v in reference_evaluator(model).run(names, {"x": x})]


def session(proto: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def emulated(model: ir.Model) -> onnx.ModelProto:
    copy = clone_model(model)
    emulate(copy)
    assert not needs_emulation(copy)
    assert TRT_DOMAIN not in copy.opset_imports
    proto = checked(copy)
    assert [o.version for o in proto.opset_import if o.domain == ""] == [model.opset_imports[""]]
    return proto


def ort_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ONNX Runtime's own MatMul on given operands, the weight a constant as in the emulated model
    (ORT prepacks constant weights, which changes the order of accumulation)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=11)
    return session(model).run(None, {"x": x})[0]


def activations(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Gaussian values with an all-zero block, a tiny block, values beyond amax 4 (saturation) and
    blocks of exact NVFP4 ties (block amax 24 -> block scale 4 at a global scale near 1/672)."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    rows = x.reshape(-1, shape[-1])
    rows[0, :32] = 0.0
    rows[-1, 32:64] *= np.float32(1e-6)
    rows[1, 5], rows[1, 40], rows[2, 100] = 40.0, -1e4, 1e30
    rows[3, :16] = np.float32(4) * np.array([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5] * 2, np.float32)
    rows[3, 8:16] *= -1
    # MXFP8: block amax 500 -> scale 1; E4M3 ties (1.0625 -> 1, 1.1875 -> 1.25, 272 -> 256, 304 -> 320),
    # 500 saturates to 448; zeros of both signs
    rows[4, :32] = 0.0
    rows[4, :9] = [-0.0, 500, 1.0625, 1.1875, 272, 304, -272, -1.0625, 256]
    return x


def compare(deploy: ir.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    """Run the deployable model in onnx.reference and the emulated one in ORT; assert exactness."""
    proto = checked(deploy)
    names = [o.name for o in proto.graph.output]
    expected = dict(zip(names, run_reference(proto, x)))
    emu = emulated(deploy)
    actual = dict(zip([o.name for o in emu.graph.output], session(emu).run(None, {"x": x})))
    assert set(actual) == set(expected)
    for name in names[1:]:  # x' and W': bit for bit
        np.testing.assert_array_equal(
            actual[name].view(np.uint32), expected[name].view(np.uint32), err_msg=name
        )
    quantized_x = expected[names[1]] if len(names) > 1 and expected[names[1]].shape == x.shape else x
    weight = next((expected[n] for n in names[1:] if expected[n].shape == (K, N)), None)
    if weight is None:
        weight = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "W"))
    np.testing.assert_array_equal(actual["y"], ort_matmul(quantized_x, weight))
    np.testing.assert_allclose(actual["y"], expected["y"], rtol=1e-5, atol=1e-3)
    return actual


@pytest.mark.parametrize("x_shape", [["M", K], ["B", "T", K]])
def test_nvfp4_weights_and_activations(x_shape: list[int | str]) -> None:
    shape = (16, K) if len(x_shape) == 2 else (2, 8, K)
    compare(deployable(x_shape, "nvfp4", "nvfp4"), activations(shape))


@pytest.mark.parametrize("x_shape", [["M", K], ["B", "T", K]])
def test_mxfp8_weights_and_activations(x_shape: list[int | str]) -> None:
    shape = (16, K) if len(x_shape) == 2 else (2, 8, K)
    compare(deployable(x_shape, "mxfp8", "mxfp8", opset=24), activations(shape, seed=2))


def test_fp4_weights_only() -> None:
    deploy = deployable(["M", K], "nvfp4", None)
    copy = clone_model(deploy)
    stats = emulate(copy)
    assert stats.folded_weights == 1 and stats.nvfp4_activations == 0
    compare(deploy, activations((16, K), seed=4))


def test_nvfp4_activation_ties_match_ml_dtypes() -> None:
    """Global scale 1 and block amax 6 give block scale 1: x' must be x rounded to E2M1 by ml_dtypes."""
    grid = np.array(FP4_E2M1_VALUES[:8], np.float32)
    ties = (grid[:-1] + grid[1:]) / 2  # 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5
    near = np.concatenate([np.nextafter(ties, 0), np.nextafter(ties, 7), grid])
    magnitudes = np.concatenate([ties, near])
    values = np.concatenate([magnitudes, -magnitudes])
    per_block = 15  # the 16th element of every block is 6, so that every block amax is 6
    blocks = -(-values.size // per_block)
    padded = np.resize(values, blocks * per_block).reshape(blocks, per_block)
    x = np.concatenate([padded, np.full((blocks, 1), 6.0, np.float32)], axis=1).reshape(1, -1)
    x = np.resize(x, (1, -(-x.size // K) * K)).astype(np.float32)
    deploy = deployable(["M", x.shape[1]], None, "nvfp4", amax=UNIT_GLOBAL_AMAX)
    expected = np.clip(x, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    actual = compare(deploy, x)
    quantized = next(v for k, v in actual.items() if k != "y")
    np.testing.assert_array_equal(quantized, expected)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the reference MatMul of 2**127 blocks
def test_mxfp8_exponents_at_every_binade_edge() -> None:
    """Block amax 2**k, just below and just above, for every float32 binade: exact floor(log2)."""
    exponents = np.arange(-149, 128)
    powers = np.ldexp(np.float32(1), exponents).astype(np.float32)
    amaxes = np.concatenate([powers, np.nextafter(powers, np.float32(np.inf)), np.nextafter(powers, 0)])
    amaxes = np.concatenate([amaxes[np.isfinite(amaxes) & (amaxes > 0)], [0.0]]).astype(np.float32)
    rows = np.zeros((amaxes.size, 32), np.float32)
    rows[:, 0] = amaxes
    rows[:, 1] = -amaxes / 3
    deploy = deployable(["M", 32], None, "mxfp8", opset=24, elem=TensorProto.FLOAT)
    quantizer = next(n for n in deploy.graph if n.op_type == "TRT_MXFP8DynamicQuantize")
    deploy.graph.outputs.append(quantizer.outputs[1])  # the E8M0 codes
    proto = checked(deploy)
    codes_name = proto.graph.output[-1].name
    expected = run_reference(proto, rows, [codes_name])[0]
    emu = emulated(deploy)
    actual = session(emu).run([codes_name], {"x": rows})[0]
    np.testing.assert_array_equal(actual, expected)
    np.testing.assert_array_equal(expected[:, 0], mx_shared_exponent(amaxes, FP8_E4M3_EMAX) + 127)


def test_float16_activations() -> None:
    deploy = deployable(["M", K], None, "nvfp4", elem=TensorProto.FLOAT16)
    proto = checked(deploy)
    x = activations((8, K), seed=5)
    x[np.abs(x) > 6e4] = 6e4  # float16 range
    x16 = x.astype(np.float16)
    expected = run_reference(proto, x16)
    actual = session(emulated(deploy)).run(None, {"x": x16})
    np.testing.assert_array_equal(actual[1], expected[1])  # x' in float16
    np.testing.assert_allclose(
        actual[0].astype(np.float32), expected[0].astype(np.float32), rtol=2e-2, atol=0.5
    )


def test_emulate_file_round_trip(tmp_path: Path) -> None:
    deploy = deployable(["M", K], "nvfp4", "nvfp4")
    source, destination = tmp_path / "q.onnx", tmp_path / "emu.onnx"
    save_model(deploy, source)  # the check loads an emulated copy in ONNX Runtime
    stats = emulate_file(source, destination)
    assert (stats.folded_weights, stats.nvfp4_activations) == (1, 1)
    onnx.checker.check_model(str(destination), full_check=True)
    x = activations((8, K), seed=6)
    expected = run_reference(checked(deploy), x)
    actual = session(onnx.load(destination)).run(None, {"x": x})
    np.testing.assert_array_equal(actual[1], expected[1])


def test_modelopt_constant_mxfp8_weight_is_folded() -> None:
    codes = np.array([[127 + 2], [127 - 3]], np.uint8)
    values = np.random.default_rng(0).standard_normal((2, 32)).astype(ml_dtypes.float8_e4m3fn)
    graph = helper.make_graph(
        [helper.make_node("TRT_MXFP8DequantizeLinear", ["v", "s"], ["w"], domain=TRT_DOMAIN, axis=-1, block_size=32, output_dtype=TensorProto.FLOAT),
         helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 32])],
        [numpy_helper.from_array(values, "v"), numpy_helper.from_array(codes, "s")],
    )  # fmt: skip
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(TRT_DOMAIN, 1)], ir_version=11
    )
    model = ir.serde.deserialize_model(proto)
    assert needs_emulation(model)
    assert emulate(model).folded_weights == 1
    folded = model.graph.initializers["w"].const_value.numpy()  # type: ignore[union-attr]
    np.testing.assert_array_equal(folded, values.astype(np.float32) * np.array([[4.0], [0.125]], np.float32))
    assert set(model.graph.initializers) == {"w"}


def test_runtime_fp4_quantize_linear_is_refused_by_name() -> None:
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="my_fp4_q"),
         helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="my_fp4_dq")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "s"),
         helper.make_tensor("zp", TensorProto.FLOAT4E2M1, [], [0])],
    )  # fmt: skip
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=11)
    )
    assert needs_emulation(model)
    with pytest.raises(OnnxqError, match="my_fp4_q"):
        emulate(model)


def test_dynamic_quantizer_feeding_something_else_is_refused() -> None:
    deploy = deployable(["M", K], None, "nvfp4")
    quantizer = next(n for n in deploy.graph if n.op_type == "TRT_FP4DynamicQuantize")
    deploy.graph.outputs.append(quantizer.outputs[1])
    with pytest.raises(OnnxqError, match=quantizer.name or "TRT_FP4DynamicQuantize"):
        emulate(deploy)


def test_mxfp8_activations_at_opset_17_are_raised_to_19() -> None:
    """A model that only has trt MXFP8 activations may be below opset 19 (FP8 QuantizeLinear)."""
    deploy = deployable(["M", K], None, "mxfp8", opset=17)
    deploy.ir_version = 8
    x = activations((8, K), seed=8)
    expected = run_reference(checked(deploy), x)
    copy = clone_model(deploy)
    stats = emulate(copy)
    assert (stats.mxfp8_quantizers, stats.mxfp8_dequantizers) == (1, 1)
    assert copy.opset_imports[""] == 19 and copy.ir_version == 9
    actual = session(checked(copy)).run(None, {"x": x})
    np.testing.assert_array_equal(actual[1].view(np.uint32), expected[1].view(np.uint32))


def test_float_model_needs_no_emulation() -> None:
    model = matmul_model(["M", K])
    assert not needs_emulation(model)
    assert emulate(model).folded_weights == 0


def test_trt_op_inside_a_subgraph_is_refused() -> None:
    def branch(name: str, with_trt: bool) -> onnx.GraphProto:
        nodes = [
            helper.make_node("TRT_MXFP8DynamicQuantize", ["x"], ["q", "s"], domain=TRT_DOMAIN),
            helper.make_node("TRT_MXFP8DequantizeLinear", ["q", "s"], [f"{name}_out"], domain=TRT_DOMAIN),
        ]
        if not with_trt:
            nodes = [helper.make_node("Identity", ["x"], [f"{name}_out"])]
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [2, 32])
        return helper.make_graph(nodes, name, [], [out])

    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], name="branching",
                          then_branch=branch("then", True), else_branch=branch("else", False))], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
    )  # fmt: skip
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(TRT_DOMAIN, 1)], ir_version=11
    )
    model = ir.serde.deserialize_model(proto)
    assert needs_emulation(model)
    with pytest.raises(OnnxqError, match="inside a subgraph"):
        emulate(model)
