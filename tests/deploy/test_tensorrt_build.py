"""Engine building: options, the one-line error without TensorRT, atomic writes, polygraphy config, runtime.

Tests marked by ``_real_tensorrt`` build and run a real engine; they skip where ``import tensorrt``
fails (this development machine) and run as they are wherever TensorRT and a GPU exist.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.calibration.data import InputSpec
from onnxq.deploy import tensorrt_build
from onnxq.deploy.profiles import build_profile
from onnxq.deploy.tensorrt_build import (
    BuildOptions,
    build_engine,
    config_arguments,
    import_tensorrt,
    inspect_model,
    parse_version,
    write_atomically,
)
from onnxq.deploy.trt_runtime import EngineRunner, Timing, check_feed_in_profile, summarize_times
from onnxq.errors import OnnxqError

IR_VERSION = 10
OPSET = 21
FEATURES = 16


def _qdq_model(dynamic_batch: bool = True) -> onnx.ModelProto:
    """x -> Q/DQ (int8) -> MatMul with a Q/DQ int8 weight -> y."""
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, size=(FEATURES, FEATURES)).astype(np.int8)
    batch = "batch" if dynamic_batch else 2
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"]),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"]),
    ]
    initializers = [
        numpy_helper.from_array(np.float32(0.02), "x_scale"),
        numpy_helper.from_array(np.int8(0), "x_zero"),
        numpy_helper.from_array(weight, "w_q"),
        numpy_helper.from_array(np.float32(0.01), "w_scale"),
        numpy_helper.from_array(np.int8(0), "w_zero"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, FEATURES])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def _plain_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, FEATURES])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def _fp4_model() -> onnx.ModelProto:
    """A FLOAT4E2M1 weight dequantized by a block-wise DQ (opset 23, IR 11)."""
    values = np.arange(-6, 6, 0.5, dtype=np.float32)[:FEATURES].astype(ml_dtypes.float4_e2m1fn)
    weight = numpy_helper.from_array(values.reshape(1, FEATURES), "w_fp4")
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["w_fp4", "w_scale"], ["w"], axis=1, block_size=FEATURES),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "fp4",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, FEATURES])],
        [weight, numpy_helper.from_array(np.ones((1, 1), np.float32), "w_scale")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=11)


@pytest.fixture
def qdq_onnx(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(_qdq_model(), path)
    return path


def _fake_tensorrt(version: str) -> types.ModuleType:
    module = types.ModuleType("tensorrt")
    module.__version__ = version  # type: ignore[attr-defined]
    module.BuilderFlag = types.SimpleNamespace(TF32="TF32")  # type: ignore[attr-defined]
    module.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")  # type: ignore[attr-defined]
    module.HardwareCompatibilityLevel = types.SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS")  # type: ignore[attr-defined]
    module.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED")  # type: ignore[attr-defined]
    return module


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import tensorrt`` raises ImportError, as it does where TensorRT is not installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def _folder_names(folder: Path) -> set[str]:
    return {entry.name for entry in folder.iterdir()}


# --- options --------------------------------------------------------------------------------------


def test_fp16_with_strong_typing_is_refused() -> None:
    with pytest.raises(OnnxqError, match="onnxq convert --to fp16"):
        BuildOptions(strongly_typed=True, weak_precisions=("fp16",))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"builder_optimization_level": 6}, "out of range"),
        ({"builder_optimization_level": -1}, "out of range"),
        ({"workspace_mib": 0}, "too small"),
        ({"strongly_typed": False, "weak_precisions": ("int8",)}, "unknown precision"),
    ],
)
def test_invalid_options(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(OnnxqError, match=message):
        BuildOptions(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "version"), [("10.8.0.43", (10, 8)), ("11.4", (11, 4)), (" 9.3.0", (9, 3))])
def test_parse_version(text: str, version: tuple[int, int]) -> None:
    assert parse_version(text) == version


def test_parse_version_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not a version"):
        parse_version("unknown")


# --- TensorRT missing or too old ------------------------------------------------------------------


@pytest.mark.usefixtures("no_tensorrt")
def test_missing_tensorrt_is_one_line_with_version_and_install() -> None:
    with pytest.raises(OnnxqError) as caught:
        import_tensorrt((10, 8))
    message = str(caught.value)
    assert "\n" not in message
    assert "TensorRT is not available" in message
    assert "10.8" in message and "pip install tensorrt" in message and "JetPack" in message


@pytest.mark.usefixtures("no_tensorrt")
def test_build_without_tensorrt_writes_nothing(qdq_onnx: Path) -> None:
    before = _folder_names(qdq_onnx.parent)
    options = BuildOptions(
        profile=build_profile(
            [InputSpec("x", np.dtype(np.float32), ("batch", FEATURES))], ["x:1x16,4x16,8x16"]
        )
    )
    with pytest.raises(OnnxqError, match="TensorRT is not available"):
        build_engine(qdq_onnx, qdq_onnx.parent / "model.engine", options)
    assert _folder_names(qdq_onnx.parent) == before


def test_too_old_tensorrt_names_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("8.6.1"))
    with pytest.raises(OnnxqError, match=r"TensorRT 8\.6\.1 is too old: this model needs 10\.0"):
        import_tensorrt()


def test_fp4_model_needs_tensorrt_10_8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "fp4.onnx"
    onnx.save(_fp4_model(), model)
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.5.0"))
    with pytest.raises(OnnxqError, match=r"needs 10\.8"):
        build_engine(model, tmp_path / "fp4.engine", BuildOptions(), engine_bytes_builder=lambda *_: b"x")
    assert not (tmp_path / "fp4.engine").exists()


def test_weak_fp16_refused_on_tensorrt_11(qdq_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("11.4.0"))
    options = BuildOptions(strongly_typed=False, weak_precisions=("fp16",))
    with pytest.raises(OnnxqError, match="removed the precision flags"):
        build_engine(qdq_onnx, qdq_onnx.with_suffix(".engine"), options, engine_bytes_builder=lambda *_: b"x")


# --- the model ------------------------------------------------------------------------------------


def test_inspect_model(tmp_path: Path) -> None:
    cases = {
        "qdq": (_qdq_model(), True, False),
        "plain": (_plain_model(), False, False),
        "fp4": (_fp4_model(), True, True),
    }
    for name, (model, quantized, fp4) in cases.items():
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, path)
        traits = inspect_model(path)
        assert (traits.explicitly_quantized, traits.uses_fp4) == (quantized, fp4), name
    assert inspect_model(tmp_path / "fp4.onnx").min_tensorrt == (10, 8)
    assert inspect_model(tmp_path / "qdq.onnx").min_tensorrt == (10, 0)


def test_unreadable_model(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\xff\x00 not protobuf")
    with pytest.raises(OnnxqError, match="cannot read"):
        inspect_model(path)


# --- paths and atomic writes ----------------------------------------------------------------------


def test_fake_build_writes_engine_bytes(qdq_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.8.0"))
    payload = np.random.default_rng(3).bytes(4096)
    seen: list[tuple[Path, BuildOptions]] = []

    def fake_builder(onnx_path: Path, options: BuildOptions, trt: types.ModuleType) -> bytes:
        seen.append((onnx_path, options))
        return payload

    engine = qdq_onnx.parent / "model.engine"
    result = build_engine(qdq_onnx, engine, BuildOptions(), engine_bytes_builder=fake_builder)
    assert engine.read_bytes() == payload
    assert result.engine_bytes == len(payload) and result.tensorrt_version == "10.8.0"
    assert seen == [(qdq_onnx, BuildOptions())]
    assert _folder_names(engine.parent) == {"model.onnx", "model.engine"}


def test_failed_build_keeps_the_old_engine(qdq_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.8.0"))
    engine = qdq_onnx.parent / "model.engine"
    engine.write_bytes(b"old engine")

    def failing_builder(*_: object) -> bytes:
        raise OnnxqError("TensorRT could not build model.onnx: no tactic", "read the log")

    with pytest.raises(OnnxqError, match="no tactic"):
        build_engine(qdq_onnx, engine, BuildOptions(), engine_bytes_builder=failing_builder)
    assert engine.read_bytes() == b"old engine"
    assert _folder_names(engine.parent) == {"model.onnx", "model.engine"}


def test_failed_rename_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"old engine")

    def refuse(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OnnxqError, match="No space left"):
        write_atomically(engine, b"new engine")
    assert engine.read_bytes() == b"old engine"
    assert _folder_names(tmp_path) == {"model.engine"}


def test_interrupted_write_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "model.engine", b"new engine")
    assert _folder_names(tmp_path) == set()


@pytest.mark.parametrize(
    ("engine_name", "options", "message"),
    [
        ("missing_dir/model.engine", BuildOptions(), "does not exist"),
        ("model.onnx", BuildOptions(), "is the input model"),
        (".", BuildOptions(), "is a directory"),
        ("model.engine", BuildOptions(plugins=(Path("no_such_plugin.so"),)), "plugin library"),
    ],
)
def test_path_checks_come_before_tensorrt(
    qdq_onnx: Path, engine_name: str, options: BuildOptions, message: str, no_tensorrt: None
) -> None:
    with pytest.raises(OnnxqError, match=message):
        build_engine(qdq_onnx, qdq_onnx.parent / engine_name, options)


def test_missing_model(tmp_path: Path) -> None:
    with pytest.raises(OnnxqError, match="does not exist"):
        build_engine(tmp_path / "none.onnx", tmp_path / "m.engine", BuildOptions())


def test_unloadable_plugin_is_one_line(tmp_path: Path) -> None:
    plugin = tmp_path / "libbroken.so"
    plugin.write_bytes(b"not an ELF file")
    with pytest.raises(OnnxqError, match="cannot load plugin library"):
        tensorrt_build.load_plugins((plugin,), _fake_tensorrt("10.8.0"), through_registry=False)


# --- polygraphy configuration ---------------------------------------------------------------------


def test_config_arguments_map_every_option(tmp_path: Path) -> None:
    polygraphy_trt = pytest.importorskip("polygraphy.backend.trt", reason="polygraphy is not installed")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"cache")
    profile = build_profile(
        [
            InputSpec("x", np.dtype(np.float32), ("batch", FEATURES)),
            InputSpec("s", np.dtype(np.float32), (1,)),
        ],
        ["x:1x16,4x16,8x16"],
    )
    options = BuildOptions(
        profile=profile,
        timing_cache=cache,
        builder_optimization_level=4,
        workspace_mib=512,
        hardware_compatible=True,
        version_compatible=True,
    )
    arguments = config_arguments(options, _fake_tensorrt("10.8.0"), polygraphy_trt.Profile)
    (trt_profile,) = arguments.pop("profiles")
    assert list(trt_profile.keys()) == ["x"]  # static inputs stay out of the profile
    assert tuple(trt_profile["x"].min) == (1, FEATURES) and tuple(trt_profile["x"].max) == (8, FEATURES)
    assert arguments == {
        "tf32": True,
        "fp16": False,
        "bf16": False,
        "load_timing_cache": str(cache),
        "builder_optimization_level": 4,
        "memory_pool_limits": {"WORKSPACE": 512 * 2**20},
        "hardware_compatibility_level": "AMPERE_PLUS",
        "version_compatible": True,
        "profiling_verbosity": "DETAILED",
    }


def test_config_arguments_for_a_weak_fp16_build_without_cache(tmp_path: Path) -> None:
    options = BuildOptions(
        strongly_typed=False, weak_precisions=("fp16",), timing_cache=tmp_path / "new.cache"
    )
    arguments = config_arguments(options, _fake_tensorrt("10.8.0"), dict)
    assert arguments == {"tf32": True, "fp16": True, "bf16": False, "profiling_verbosity": "DETAILED"}
    # a missing timing cache is only written, not loaded


# --- runtime helpers ------------------------------------------------------------------------------


def test_summarize_times_against_numpy() -> None:
    seconds = list(np.random.default_rng(5).uniform(0.001, 0.003, size=21))
    timing = summarize_times(seconds, warmup=10)
    milliseconds = np.array(seconds) * 1000
    assert timing == Timing(
        float(np.median(milliseconds)), float(milliseconds.min()), float(milliseconds.max()), 21, 10
    )


def test_feed_outside_profile_is_refused() -> None:
    profile = build_profile([InputSpec("x", np.dtype(np.float32), ("batch", FEATURES))], ["x:1x16,4x16,8x16"])
    check_feed_in_profile({"x": np.zeros((8, FEATURES), np.float32)}, profile)
    with pytest.raises(OnnxqError, match=r"outside the engine's profile 1x16 \.\. 8x16"):
        check_feed_in_profile({"x": np.zeros((9, FEATURES), np.float32)}, profile)


@pytest.mark.usefixtures("no_tensorrt")
def test_runner_without_tensorrt(tmp_path: Path) -> None:
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine")
    with pytest.raises(OnnxqError, match="TensorRT is not available"), EngineRunner(engine):
        pass


# --- real TensorRT --------------------------------------------------------------------------------


def test_real_build_and_run(qdq_onnx: Path) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (import tensorrt failed)")
    pytest.importorskip("polygraphy", reason="polygraphy is not installed")
    import onnxruntime as ort

    spec = InputSpec("x", np.dtype(np.float32), ("batch", FEATURES))
    profile = build_profile([spec], ["x:1x16,4x16,8x16"])
    engine = qdq_onnx.parent / "model.engine"
    result = build_engine(
        qdq_onnx, engine, BuildOptions(profile=profile, timing_cache=qdq_onnx.parent / "t.cache")
    )
    assert engine.stat().st_size == result.engine_bytes > 0
    assert (qdq_onnx.parent / "t.cache").stat().st_size > 0
    feed = {"x": np.random.default_rng(1).normal(size=(4, FEATURES)).astype(np.float32)}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    expected = ort.InferenceSession(str(qdq_onnx), options).run(None, feed)[0]
    with EngineRunner(engine, profile=profile) as runner:
        got = runner.infer(feed)["y"]
        timing = runner.time(feed, runs=5, warmup=2)
    # both compute int8 x int8 with float scales: equal up to float accumulation order
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    assert timing.runs == 5 and timing.median_ms > 0


class _FakeConfig:
    def __init__(self) -> None:
        self.plugins_to_serialize: list[str] = []


def _fake_polygraphy(calls: dict[str, object], failure: Exception | None = None) -> types.SimpleNamespace:
    """Stand-ins for polygraphy's loaders that record how onnxq wires them."""

    def network_from_onnx_path(path: str, strongly_typed: bool) -> str:
        calls["network"] = (path, strongly_typed)
        return "network"

    def create_config(**arguments: object) -> object:
        calls["config_arguments"] = arguments
        return lambda builder, network: _FakeConfig()

    def engine_bytes_from_network(network: str, config: object, save_timing_cache: str | None) -> object:
        def build() -> bytes:
            assert callable(config)
            calls["config"] = config("builder", network)
            calls["save_timing_cache"] = save_timing_cache
            if failure is not None:
                raise failure
            return b"serialized engine"

        return build

    return types.SimpleNamespace(
        NetworkFromOnnxPath=network_from_onnx_path,
        CreateConfig=create_config,
        EngineBytesFromNetwork=engine_bytes_from_network,
        Profile=dict,
    )


def test_polygraphy_wiring_for_a_version_compatible_build_with_plugins(
    qdq_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("polygraphy", reason="polygraphy is not installed")
    calls: dict[str, object] = {}
    loaded: list[str] = []
    trt = _fake_tensorrt("10.8.0")
    trt.get_plugin_registry = lambda: types.SimpleNamespace(load_library=loaded.append)  # type: ignore[attr-defined]
    monkeypatch.setattr(tensorrt_build, "_import_polygraphy_trt", lambda: _fake_polygraphy(calls))
    plugin = qdq_onnx.parent / "libplugin.so"
    cache = qdq_onnx.parent / "timing.cache"
    options = BuildOptions(version_compatible=True, plugins=(plugin,), timing_cache=cache)
    assert tensorrt_build.polygraphy_engine_bytes(qdq_onnx, options, trt) == b"serialized engine"
    assert loaded == [str(plugin)]  # through the registry, before the network is parsed
    assert calls["network"] == (str(qdq_onnx), True)
    assert calls["save_timing_cache"] == str(cache)
    assert calls["config_arguments"] == config_arguments(options, trt, dict)
    config = calls["config"]
    assert isinstance(config, _FakeConfig) and config.plugins_to_serialize == [str(plugin)]


def test_polygraphy_failure_becomes_one_line(qdq_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exception = pytest.importorskip("polygraphy.exception", reason="polygraphy is not installed")
    failure = exception.PolygraphyException("In node 3 (parseGraph): UNSUPPORTED_NODE: Foo\nmore detail")
    monkeypatch.setattr(tensorrt_build, "_import_polygraphy_trt", lambda: _fake_polygraphy({}, failure))
    with pytest.raises(OnnxqError) as caught:
        tensorrt_build.polygraphy_engine_bytes(qdq_onnx, BuildOptions(), _fake_tensorrt("10.8.0"))
    assert str(caught.value).startswith("TensorRT could not build model.onnx: In node 3 (parseGraph)")
    assert "\n" not in str(caught.value)
