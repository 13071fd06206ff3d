"""Calibration cache: bit-exact round trip, atomic writes, refusal of stale caches, and model_hash."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.calibration.cache import CACHE_FORMAT, CACHE_VERSION, load_cache, model_hash, save_cache
from onnxq.errors import OnnxqError

MODEL_SHA = "ab12" * 16
DATA_SHA = "cd34" * 16
METHOD = "entropy"
OPTIONS: dict[str, Any] = {"percentile": 99.99, "bins": 2048, "symmetric": True}
KEY: dict[str, Any] = {
    "model_hash": MODEL_SHA,
    "data_fingerprint": DATA_SHA,
    "method": METHOD,
    "options": OPTIONS,
}


def assert_user_error(error: pytest.ExceptionInfo[OnnxqError], *fragments: str) -> None:
    message = str(error.value)
    assert "Fix:" in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def random_ranges(count: int, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Ranges whose floats have all 53 bits of mantissa in use (no short decimal representation)."""
    rng = np.random.default_rng(seed)
    lows = -rng.random(count) * 10.0 ** rng.integers(-30, 30, count)
    highs = rng.random(count) * 10.0 ** rng.integers(-30, 30, count)
    return {f"tensor_{index}": (float(lows[index]), float(highs[index])) for index in range(count)}


# ----------------------------------------------------------------------------------------------
# round trip and format


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    ranges = random_ranges(200)
    ranges["edge"] = (-5e-324, 1.7976931348623157e308)  # smallest subnormal, largest double
    ranges["zero"] = (-0.0, 0.0)
    path = tmp_path / "calib.json"
    save_cache(path, ranges, **KEY)
    loaded = load_cache(path, **KEY)
    assert loaded.keys() == ranges.keys()
    for name, (low, high) in ranges.items():
        assert np.float64(loaded[name][0]).tobytes() == np.float64(low).tobytes(), name
        assert np.float64(loaded[name][1]).tobytes() == np.float64(high).tobytes(), name


def test_float32_values_round_trip_bit_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    values = (rng.standard_normal(500) * 10.0 ** rng.integers(-20, 20, 500)).astype(np.float32)
    values = np.concatenate(
        [values, [np.finfo(np.float32).tiny, np.float32(1e-45), np.finfo(np.float32).max]]
    )
    ranges = {f"t{index}": (float(-abs(value)), float(abs(value))) for index, value in enumerate(values)}
    path = tmp_path / "calib.json"
    save_cache(
        path, {name: (np.float32(low), np.float32(high)) for name, (low, high) in ranges.items()}, **KEY
    )
    loaded = load_cache(path, **KEY)
    for index, value in enumerate(values):
        high = np.float32(loaded[f"t{index}"][1])
        assert high.view(np.uint32) == abs(value).view(np.uint32)


def test_non_finite_ranges_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "calib.json"
    save_cache(path, {"masked": (-math.inf, 0.0), "unbounded": (0.0, math.inf)}, **KEY)
    json.loads(path.read_text(), parse_constant=lambda token: pytest.fail(f"non-standard JSON {token}"))
    assert load_cache(path, **KEY) == {"masked": (-math.inf, 0.0), "unbounded": (0.0, math.inf)}


def test_file_is_documented_sorted_json(tmp_path: Path) -> None:
    path = tmp_path / "calib.json"
    observed = {"a": {"min": np.float32(-1.5), "max": 2.0, "histogram": np.arange(3), "count": np.int64(7)}}
    save_cache(path, {"b": (0.0, 1.0), "a": (-1.0, 2.0)}, observed=observed, **KEY)
    text = path.read_text()
    document = json.loads(text)
    assert document["format"] == CACHE_FORMAT
    assert document["version"] == CACHE_VERSION
    assert document["model_sha256"] == MODEL_SHA
    assert document["data_sha256"] == DATA_SHA
    assert document["method"] == METHOD
    assert document["options"] == OPTIONS
    assert document["tensors"]["a"] == {
        "low": -1.0,
        "high": 2.0,
        "min": -1.5,
        "max": 2.0,
        "histogram": [0, 1, 2],
        "count": 7,
    }
    assert text == json.dumps(document, sort_keys=True, indent=2) + "\n"
    assert list(document["tensors"]) == ["a", "b"]


def test_observed_statistics_must_match_ranges(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="without a range"):
        save_cache(tmp_path / "c.json", {"a": (0.0, 1.0)}, observed={"b": {}}, **KEY)
    with pytest.raises(ValueError, match="reserved"):
        save_cache(tmp_path / "c.json", {"a": (0.0, 1.0)}, observed={"a": {"low": 3.0}}, **KEY)


def test_write_is_atomic_and_leaves_no_temporary_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "calib.json"
    save_cache(path, {"a": (0.0, 1.0)}, **KEY)
    save_cache(path, {"a": (0.0, 2.0)}, **KEY)
    assert sorted(os.listdir(tmp_path)) == ["calib.json"]
    assert load_cache(path, **KEY) == {"a": (0.0, 2.0)}

    def failing_replace(source: str, target: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OnnxqError) as error:
        save_cache(path, {"a": (0.0, 3.0)}, **KEY)
    assert_user_error(error, "calib.json", "No space left")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["calib.json"]
    assert load_cache(path, **KEY) == {"a": (0.0, 2.0)}


def test_creates_missing_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "calib.json"
    save_cache(path, {"a": (0.0, 1.0)}, **KEY)
    assert load_cache(path, **KEY) == {"a": (0.0, 1.0)}


def test_unwritable_location(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OnnxqError) as error:
        save_cache(blocker / "calib.json", {"a": (0.0, 1.0)}, **KEY)
    assert_user_error(error, "cannot write calibration cache")


def test_options_compare_after_json_normalization(tmp_path: Path) -> None:
    path = tmp_path / "calib.json"
    save_cache(path, {"a": (0.0, 1.0)}, **{**KEY, "options": {"axes": (0, 1), "scale": np.float32(0.5)}})
    key = {**KEY, "options": {"scale": 0.5, "axes": [0, 1]}}
    assert load_cache(path, **key) == {"a": (0.0, 1.0)}


# ----------------------------------------------------------------------------------------------
# stale caches are refused


@pytest.fixture()
def cache_path(tmp_path: Path) -> Path:
    path = tmp_path / "calib.json"
    save_cache(path, random_ranges(3), **KEY)
    return path


def test_different_model_is_refused(cache_path: Path) -> None:
    with pytest.raises(OnnxqError) as error:
        load_cache(cache_path, **{**KEY, "model_hash": "ef56" * 16})
    assert_user_error(error, "different model", "ab12ab12ab12…", "ef56ef56ef56…", "--calib-cache")


def test_different_data_is_refused(cache_path: Path) -> None:
    with pytest.raises(OnnxqError) as error:
        load_cache(cache_path, **{**KEY, "data_fingerprint": "0" * 64})
    assert_user_error(error, "different calibration data", "cd34cd34cd34…", "000000000000…")


def test_different_method_is_refused(cache_path: Path) -> None:
    with pytest.raises(OnnxqError) as error:
        load_cache(cache_path, **{**KEY, "method": "minmax"})
    assert_user_error(error, "'entropy'", "'minmax'")


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({**OPTIONS, "percentile": 99.9}, "percentile: 99.99 in the cache vs 99.9 now"),
        ({**OPTIONS, "new": 1}, "new: '<unset>' in the cache vs 1 now"),
        ({"percentile": 99.99, "bins": 2048}, "symmetric: True in the cache vs '<unset>' now"),
    ],
)
def test_different_options_are_refused(cache_path: Path, options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(OnnxqError) as error:
        load_cache(cache_path, **{**KEY, "options": options})
    assert_user_error(error, "different calibration options", fragment)


# ----------------------------------------------------------------------------------------------
# unusable files


def test_missing_cache(tmp_path: Path) -> None:
    with pytest.raises(OnnxqError) as error:
        load_cache(tmp_path / "none.json", **KEY)
    assert_user_error(error, "none.json", "does not exist")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not an onnxq calibration cache"),
        ('{"format": "something-else"}', "not an onnxq calibration cache"),
        (json.dumps({"format": CACHE_FORMAT, "version": 99}), "version 99"),
    ],
)
def test_corrupt_or_foreign_files(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "calib.json"
    path.write_text(content)
    with pytest.raises(OnnxqError) as error:
        load_cache(path, **KEY)
    assert_user_error(error, "calib.json", fragment)


def _document(tensors: Any) -> str:
    return json.dumps(
        {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "model_sha256": MODEL_SHA,
            "data_sha256": DATA_SHA,
            "method": METHOD,
            "options": OPTIONS,
            "tensors": tensors,
        }
    )


@pytest.mark.parametrize(
    ("tensors", "fragment"),
    [
        ([1, 2], "no valid 'tensors' table"),
        ({"conv": {"low": 0.0}}, "no valid range for tensor 'conv'"),
        ({"conv": {"low": "zero", "high": 1.0}}, "no valid range for tensor 'conv'"),
        ({"conv": {"low": True, "high": 1.0}}, "no valid range for tensor 'conv'"),
        ({"conv": [0.0, 1.0]}, "no valid range for tensor 'conv'"),
        ({"conv": {"low": 2.0, "high": 1.0}}, "low 2.0 > high 1.0 for tensor 'conv'"),
    ],
)
def test_bad_tensor_entries(tmp_path: Path, tensors: Any, fragment: str) -> None:
    path = tmp_path / "calib.json"
    path.write_text(_document(tensors))
    with pytest.raises(OnnxqError) as error:
        load_cache(path, **KEY)
    assert_user_error(error, fragment)


# ----------------------------------------------------------------------------------------------
# model_hash


def build_model_proto(
    weight: np.ndarray | None = None, alpha: float = 0.1, node_name: str = "gemm"
) -> onnx.ModelProto:
    """x[N,4] -> Gemm(W, b) -> LeakyRelu(alpha) -> If(cond){Relu}{Neg} -> y."""
    if weight is None:
        weight = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    bias = np.arange(3, dtype=np.float32)
    then_graph = helper.make_graph(
        [helper.make_node("Relu", ["act"], ["then_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["act"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "W", "b"], ["gemm_out"], name=node_name),
            helper.make_node("LeakyRelu", ["gemm_out"], ["act"], alpha=alpha),
            helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def build_model(**kwargs: Any) -> ir.Model:
    return ir.serde.deserialize_model(build_model_proto(**kwargs))


def test_model_hash_is_deterministic() -> None:
    first = model_hash(build_model())
    assert first == model_hash(build_model())
    assert len(first) == 64
    int(first, 16)


def test_model_hash_changes_with_one_weight_byte() -> None:
    weight = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    changed = weight.copy()
    changed.reshape(-1).view(np.uint8)[17] ^= 1
    assert model_hash(build_model(weight=weight)) != model_hash(build_model(weight=changed))


def test_model_hash_changes_with_attribute_and_subgraph() -> None:
    base = build_model()
    assert model_hash(base) != model_hash(build_model(alpha=0.2))
    proto = build_model_proto()
    then_branch = proto.graph.node[2].attribute[0].g
    then_branch.node[0].op_type = "Sigmoid"
    assert model_hash(base) != model_hash(ir.serde.deserialize_model(proto))


def test_model_hash_changes_with_graph_input_type() -> None:
    proto = build_model_proto()
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 5
    assert model_hash(build_model()) != model_hash(ir.serde.deserialize_model(proto))


def test_model_hash_changes_with_tensor_names() -> None:
    proto = build_model_proto()
    proto.graph.node[0].output[0] = "renamed"
    proto.graph.node[1].input[0] = "renamed"
    assert model_hash(build_model()) != model_hash(ir.serde.deserialize_model(proto))


def test_model_hash_ignores_node_names_and_docs() -> None:
    proto = build_model_proto(node_name="other")
    proto.doc_string = "documentation"
    proto.producer_name = "someone"
    assert model_hash(build_model()) == model_hash(ir.serde.deserialize_model(proto))


def test_model_hash_with_external_weights(tmp_path: Path) -> None:
    proto = build_model_proto()
    path = tmp_path / "model.onnx"
    onnx.save_model(proto, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    loaded = ir.load(path)
    assert isinstance(loaded.graph.initializers["W"].const_value, ir.ExternalTensor)
    assert model_hash(loaded) == model_hash(build_model())


def test_model_hash_never_serializes_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model()
    expected = model_hash(model)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("model_hash must stream tensors, not serialize the model")

    monkeypatch.setattr(ir.serde, "serialize_model", refuse)
    monkeypatch.setattr(ir.serde, "serialize_graph", refuse)
    assert model_hash(model) == expected


def _model_with_function(op_type: str) -> ir.Model:
    function = helper.make_function(
        "local",
        "act",
        ["inp"],
        ["out"],
        [helper.make_node(op_type, ["inp"], ["out"])],
        [helper.make_opsetid("", 19)],
    )
    graph = helper.make_graph(
        [helper.make_node("act", ["x"], ["y"], domain="local")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 19), helper.make_opsetid("local", 1)],
        functions=[function],
    )
    model.ir_version = 10
    return ir.serde.deserialize_model(model)


def test_model_hash_covers_local_functions() -> None:
    assert model_hash(_model_with_function("Relu")) == model_hash(_model_with_function("Relu"))
    assert model_hash(_model_with_function("Relu")) != model_hash(_model_with_function("Sigmoid"))
