"""Placement details found on real exported models: reasons must be true for the node they name
(HardSwish's Div by 6 is no normalization), and negative declared dims (-1) are dynamic, not sizes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest
from model_builders import build, randn
from onnx import numpy_helper

import onnxq
from onnxq.placement.planner import plan_placement
from onnxq.placement.rules import load_rule_set

# HardSwish written as basic ops, as exporters without a HardSwish op write it: x * Clip(x + 3, 0, 6) / 6
HARDSWISH = """g (float[N, 16, 8, 8] x) => (float[N, 32, 8, 8] y) {
    [conv1] c1 = Conv<pads = [1, 1, 1, 1]>(x, w1)
    [add3] a = Add(c1, three)
    [clip] k = Clip(a, zero, six)
    [mul] m = Mul(c1, k)
    [div6] h = Div(m, six)
    [conv2] y = Conv<pads = [1, 1, 1, 1]>(h, w2)
}"""


@pytest.mark.parametrize("target", ["tensorrt", "ort"])
def test_hardswish_div_reason_names_the_div(target: str) -> None:
    rng = np.random.default_rng(80)
    inits = {
        "w1": randn(rng, 32, 16, 3, 3),
        "w2": randn(rng, 32, 32, 3, 3, scale=0.05),
        "three": np.array(3, np.float32),
        "zero": np.array(0, np.float32),
        "six": np.array(6, np.float32),
    }
    model = build(HARDSWISH, inits, 17)
    data = {"x": rng.standard_normal((8, 16, 8, 8)).astype(np.float32)}
    result = onnxq.quantize(model, calibration_data=data, target=target)

    div = result.plan.decision("div6")
    assert div is not None and not div.quantized and div.category == "kept float"
    assert div.reason == "Div by constant 6: elementwise arithmetic and reductions stay in float"
    assert not any(word in div.reason for word in ("normalization", "GELU", "Softmax"))
    assert result.plan.decision("conv2") is not None and result.plan.decision("conv2").quantized


def test_softmax_keeps_the_precision_reason() -> None:
    rng = np.random.default_rng(81)
    model = build(
        """g (float[N, 32] x) => (float[N, 32] y) {
            [mm] h = MatMul(x, w)
            [softmax] y = Softmax<axis = -1>(h)
        }""",
        {"w": randn(rng, 32, 32)},
    )
    plan = plan_placement(ir.serde.deserialize_model(model), load_rule_set("tensorrt"))
    found = plan.decision("softmax")
    assert found is not None
    assert found.reason == "precision-sensitive op (normalization, GELU, Softmax) stays in float"


def test_negative_declared_dims_are_dynamic_not_a_gemv() -> None:
    """[-1, -1, 64] (paddle2onnx's dynamic dims): read as sizes, the rows multiply to 1 and the MatMul
    would be skipped as a GEMV; read as dynamic, it is a GEMM like the [N, S, 64] spelling."""
    rng = np.random.default_rng(82)
    weight = numpy_helper.from_array(randn(rng, 64, 64), "w")
    plans = {}
    for spelling in ("N, S", "-1, -1"):
        proto = onnx.parser.parse_model(f"""<ir_version: 10, opset_import: ["" : 17]>
            g (float[{spelling}, 64] x) => (float[{spelling}, 64] y) {{ [mm] y = MatMul(x, w) }}""")
        proto.graph.initializer.append(weight)
        plans[spelling] = plan_placement(ir.serde.deserialize_model(proto), load_rule_set("tensorrt"))
    symbolic, negative = (plans[s].decision("mm") for s in ("N, S", "-1, -1"))
    assert symbolic is not None and negative is not None
    assert symbolic.quantized
    assert (negative.quantized, negative.reason) == (symbolic.quantized, symbolic.reason)
