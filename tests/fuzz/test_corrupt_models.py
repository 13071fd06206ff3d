"""Fuzz: random byte corruptions of a real model through ``onnxq quantize`` (the CLI's ``main``).

The models are dnsmos_p808_v8 (224 KB, a Keras export) and silero_vad_half (1.3 MB: `If` branches,
`Constant` weights) from the real-model cache when fetched (tests/realworld/fetch.py), else a residual
CNN built in code. Corruptions: flipped bytes (in the header
region or anywhere), truncation, inserted bytes, a zeroed range. Every case must exit 0 with a model
that passes the full checker and loads in ONNX Runtime, or exit 2 with a closing ``onnxq: error:`` line
and nothing at (or beside) the output path; never a traceback, a hang or a dead process.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from fuzz_worker import Sandbox
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CASE_TIMEOUT_S = 60.0
REAL_MODELS = ("dnsmos_p808_v8", "silero_vad_half")
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


def _real_model(name: str) -> bytes | None:
    override = os.environ.get("ONNXQ_REALMODELS")
    folder = Path(override).expanduser() if override else Path.home() / ".cache" / "onnxq-realmodels"
    path = folder / f"{name}.onnx"
    return path.read_bytes() if path.is_file() else None


def _built_model() -> bytes:
    from model_builders import residual_cnn

    return residual_cnn(seed=0).SerializeToString()


class Original(bytes):
    """The model's bytes, shown by name and size when hypothesis reports a failing case."""

    name = ""

    def __repr__(self) -> str:
        return f"<{self.name}, {len(self)} bytes>"


@pytest.fixture(scope="module", params=REAL_MODELS)
def original(request: pytest.FixtureRequest) -> bytes:
    """A cached real model; the first falls back to a model built in code when the cache is empty."""
    data = _real_model(request.param)
    if data is None and request.param != REAL_MODELS[0]:
        pytest.skip(f"{request.param} is not cached: run python tests/realworld/fetch.py")
    model = Original(data or _built_model())
    model.name = request.param if data else "built residual CNN"
    return model


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox()
    yield box
    box.close()


def calibration_feed(model_bytes: bytes) -> dict[str, np.ndarray]:
    """One sample for the intact model's inputs (dynamic dims as 1), seeded."""
    model = onnx.load_from_string(model_bytes)
    initializers = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(0)
    feed = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in value.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feed[value.name] = rng.uniform(-1, 1, size=dims).astype(dtype)
    return feed


@st.composite
def corruptions(draw: st.DrawFn, size: int) -> tuple[str, list[int]]:
    """(kind, parameters): a description that replays exactly (shown when a case fails)."""
    position = st.one_of(st.integers(0, min(size, 4096) - 1), st.integers(0, size - 1))
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "zero"]))
    if kind == "flip":  # [offset, xor, offset, xor, ...]
        pairs = draw(st.lists(st.tuples(position, st.integers(1, 255)), min_size=1, max_size=8))
        return kind, [v for pair in pairs for v in pair]
    if kind == "truncate":
        return kind, [draw(position)]
    if kind == "insert":
        return kind, [draw(position), *draw(st.lists(st.integers(0, 255), min_size=1, max_size=16))]
    return kind, [draw(position), draw(st.integers(1, 256))]


def corrupt(data: bytes, kind: str, params: list[int]) -> bytes:
    out = bytearray(data)
    if kind == "flip":
        for offset, xor in zip(params[::2], params[1::2]):
            out[offset] ^= xor
    elif kind == "truncate":
        del out[params[0]:]
    elif kind == "insert":
        out[params[0]:params[0]] = bytes(params[1:])
    else:
        out[params[0]:params[0] + params[1]] = bytes(len(out[params[0]:params[0] + params[1]]))
    return bytes(out)


def test_corruptions_change_the_bytes(original: bytes) -> None:
    assert corrupt(original, "flip", [10, 1]) != original
    assert len(corrupt(original, "truncate", [100])) == 100
    assert len(corrupt(original, "insert", [5, 1, 2])) == len(original) + 2
    assert corrupt(original, "zero", [0, 4])[:4] == bytes(4)


@FUZZ
@given(data=st.data())
def test_corrupted_model_is_quantized_or_refused_in_one_line(
    original: bytes, sandbox: Sandbox, data: st.DataObject
) -> None:
    kind, params = data.draw(corruptions(len(original)), label="corruption")
    mode, target = data.draw(st.sampled_from([("int8", "tensorrt"), ("fp8", "tensorrt"), ("int8", "ort")]))
    with tempfile.TemporaryDirectory(prefix="onnxq-corrupt-") as work:
        model, calib, output = Path(work) / "model.onnx", Path(work) / "calib.npz", Path(work) / "out" / "q.onnx"
        model.write_bytes(corrupt(original, kind, params))
        np.savez(calib, **calibration_feed(original))  # type: ignore[arg-type]
        output.parent.mkdir()
        verdict, detail = sandbox.call(
            "cli_case", str(model), str(calib), str(output), mode, target, timeout=CASE_TIMEOUT_S
        )
    assert verdict in ("ok", "refused"), f"{kind} {params} ({mode}/{target}): {verdict}: {detail}"


def _bytes_with(old: bytes, new: bytes) -> bytes:
    """A small MatMul -> Relu model whose serialized bytes have ``old`` replaced by ``new``."""
    model = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "g (float[N, 32] x) => (float[N, 32] y) { h = MatMul(x, w)  y = Relu(h) }"
    )
    weight = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(weight, "w"))
    data = model.SerializeToString()
    assert data.count(old) == 1
    return data.replace(old, new)


def test_op_type_that_is_not_utf8_is_refused_in_one_line(sandbox: Sandbox, tmp_path: Path) -> None:
    """Found by the corruption fuzz: a flipped byte in an op type gave 'internal error: TypeError'."""
    model, calib, output = tmp_path / "model.onnx", tmp_path / "calib.npz", tmp_path / "out" / "q.onnx"
    model.write_bytes(_bytes_with(b"Relu", b"Rel\xff"))
    np.savez(calib, x=np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32))
    output.parent.mkdir()
    verdict, detail = sandbox.call("cli_case", str(model), str(calib), str(output), "int8", "tensorrt")
    assert verdict == "refused", f"{verdict}: {detail}"


@pytest.mark.parametrize("attribute", ["vaxue", "value"])
def test_malformed_constant_node_is_refused_in_one_line(sandbox: Sandbox, tmp_path: Path, attribute: str) -> None:
    """Found by the corruption fuzz on silero_vad_half: a Constant whose attribute name or type a flipped
    byte broke ('vaTue', or type UNDEFINED) ended in 'internal error' from onnx_ir's constant lifting."""
    weight = onnx.numpy_helper.from_array(np.ones((32, 32), np.float32), "w")
    constant = onnx.helper.make_node("Constant", [], ["w"], **{attribute: weight})
    if attribute == "value":
        constant.attribute[0].type = onnx.AttributeProto.UNDEFINED
    graph = onnx.helper.make_graph(
        [constant, onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 32])],
    )
    model, calib, output = tmp_path / "model.onnx", tmp_path / "calib.npz", tmp_path / "out" / "q.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), model)
    np.savez(calib, x=np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32))
    output.parent.mkdir()
    verdict, detail = sandbox.call("cli_case", str(model), str(calib), str(output), "int8", "tensorrt")
    assert verdict == "refused", f"{verdict}: {detail}"


def test_error_naming_a_tensor_with_a_newline_stays_one_line(sandbox: Sandbox, tmp_path: Path) -> None:
    """Found by the corruption fuzz: a flipped byte made a tensor name 'conv2d_7/k\\nrnel:0'; the error
    that names it was printed over two lines (names must be escaped in the one-line message)."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "ker\nnel"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 32])],
    )
    model, calib, output = tmp_path / "model.onnx", tmp_path / "calib.npz", tmp_path / "out" / "q.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 12)], ir_version=7), model)
    np.savez(calib, x=np.zeros((4, 32), np.float32))
    output.parent.mkdir()
    verdict, detail = sandbox.call("cli_case", str(model), str(calib), str(output), "int8", "tensorrt")
    assert verdict == "refused", f"{verdict}: {detail}"
