"""Declared shapes that the graph does not produce (ddddocr style): repaired before planning, said in the
plan, and the quantized model passes the strict checker."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.checker
import onnx.parser
import onnx_ir as ir
import pytest
from model_builders import randn, run, snr_db
from onnx import numpy_helper

import onnxq
from onnxq.graph import passes

# y is declared [N, 16] but MatMul by a [64, 32] weight makes [N, 32]; h is declared [N, 8] (it is
# [N, 64]); r keeps a correct declared shape with a dynamic dim written as -1 (paddle2onnx).
WRONG_SHAPES = """<ir_version: 10, opset_import: ["" : 17]>
g (float[N, 64] x) => (float[N, 16] y) <float[N, 8] h, float[-1, 64] r> {
    h = MatMul(x, w1)
    r = Relu(h)
    y = MatMul(r, w2)
}"""


def wrong_shapes_model(seed: int = 70) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model(WRONG_SHAPES)
    model.graph.initializer.extend(
        [numpy_helper.from_array(randn(rng, 64, 64), "w1"), numpy_helper.from_array(randn(rng, 64, 32), "w2")]
    )
    onnx.checker.check_model(model)  # well formed; only the strict (shape) check sees the lie
    with pytest.raises(onnx.shape_inference.InferenceError):
        onnx.checker.check_model(model, full_check=True)
    return model


def test_repair_declared_shapes_replaces_contradicted_ones() -> None:
    model = ir.serde.deserialize_model(wrong_shapes_model())
    notes = passes.repair_declared_shapes(model)

    assert len(notes) == 2
    assert any(
        note.startswith("declared shape [N, 16] of y contradicts the inferred [N, 32]") for note in notes
    )
    assert any(note.startswith("declared shape [N, 8] of h contradicts") for note in notes)
    assert passes.notes(model) == notes
    values = {v.name: v for node in model.graph for v in node.outputs}
    assert list(values["y"].shape) == [ir.SymbolicDim("N"), 32]
    assert values["y"].dtype == ir.DataType.FLOAT  # dtypes are kept
    r_shape = list(values["r"].shape)  # -1 is read as dynamic, the static 64 stays
    assert not isinstance(r_shape[0], int) and r_shape[1] == 64
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def test_repair_keeps_shapes_inference_cannot_check() -> None:
    """A custom op's output shape cannot be inferred: the declared one stays."""
    model = onnx.parser.parse_model("""<ir_version: 10, opset_import: ["" : 17, "custom" : 1]>
        g (float[N, 4] x) => (float[N, 7] y) { y = custom.Grow(x) }""")
    loaded = ir.serde.deserialize_model(model)
    assert passes.repair_declared_shapes(loaded) == []
    assert list(loaded.graph.outputs[0].shape) == [ir.SymbolicDim("N"), 7]


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_model_with_wrong_declared_shapes_passes_strict_check(mode: str) -> None:
    model = wrong_shapes_model()
    rng = np.random.default_rng(71)
    result = onnxq.quantize(
        model, mode=mode, calibration_data={"x": rng.standard_normal((16, 64)).astype(np.float32)}
    )
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    assert any("of y contradicts" in note for note in result.plan.notes)
    feed = {"x": rng.standard_normal((4, 64)).astype(np.float32)}
    assert snr_db(run(model, feed)[0], run(proto, feed)[0]) > 25
