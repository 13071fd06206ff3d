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
    max_examples=40,
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
