"""Fuzz: random valid graphs (random_graphs.py) through ``onnxq.quantize`` in every mode and target.

Each case must end in a model that passes the full checker, runs in ONNX Runtime and is finite where
the FP32 model is, or in an OnnxqError (one line), never another exception, a hang or a dead process
(onnxq runs in a sandboxed worker, see fuzz_worker.py). Derandomized and bounded: CI sees the same
cases every run, in a few seconds.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
import pytest
import random_graphs
from fuzz_worker import Sandbox
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CASE_TIMEOUT_S = 60.0
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox()
    yield box
    box.close()


@FUZZ
@given(data=st.data())
def test_random_graph_quantizes_or_refuses_clearly(sandbox: Sandbox, data: st.DataObject) -> None:
    model, shape = random_graphs.build_model(data.draw)
    feeds = random_graphs.feeds(data.draw, model, shape)
    mode, target = data.draw(st.sampled_from([("int8", "tensorrt"), ("fp8", "tensorrt"), ("int8", "ort")]))
    verdict, detail = sandbox.call(
        "quantize_case", model.SerializeToString(), feeds, mode, target, timeout=CASE_TIMEOUT_S
    )
    assert verdict in ("ok", "refused"), (
        f"{mode}/{target} on input {shape}: {verdict}: {detail}\n{onnx.printer.to_text(model.graph)}"
    )


@settings(derandomize=True, database=None, deadline=None, max_examples=200)
@given(data=st.data())
def test_the_generator_only_makes_valid_models(data: st.DataObject) -> None:
    """build_model checks every model it returns (a generator bug must not pass as an onnxq finding)."""
    model, _ = random_graphs.build_model(data.draw)
    assert model.graph.node and model.graph.output


def test_float16_concat_for_ort_is_refused_in_one_line(sandbox: Sandbox) -> None:
    """Found by this fuzz: FP16 Add -> Concat -> Conv for the ORT target wrote float16 scales into a
    QLinearConcat group that ONNX Runtime rejects (onnxq's output check then refused its own model,
    asking to be reported). ORT's CPU integer kernels take float32 scales only: refused up front."""
    import numpy as np
    from onnx import numpy_helper, parser

    model = parser.parse_model(
        '<ir_version: 10, opset_import: ["" : 17]>\n'
        "g (float16[1,16,4,4] x) => (float16[1,16,4,4] c) {\n"
        "  a = Add(x, k)  y = Concat<axis=1>(a, a)  c = Conv<pads=[1,1,1,1]>(y, w)\n}"
    )
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((16, 32, 3, 3)) * 0.1).astype(np.float16)
    model.graph.initializer.extend(
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array(0.5, np.float16), "k")]
    )
    onnx.checker.check_model(model, full_check=True)
    feeds = [{"x": rng.standard_normal((1, 16, 4, 4)).astype(np.float16)}]
    verdict, detail = sandbox.call("quantize_case", model.SerializeToString(), feeds, "int8", "ort")
    assert verdict == "refused" and "float32 scales only" in detail, f"{verdict}: {detail}"
    verdict, detail = sandbox.call("quantize_case", model.SerializeToString(), feeds, "int8", "tensorrt")
    assert verdict == "ok", f"{verdict}: {detail}"
