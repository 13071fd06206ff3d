"""The ORT target's INT8 weight grid per deployment CPU (onnxq.ort_grid).

The saturation test measures for real: on x86 without VNNI ONNX Runtime's fused u8s8 Conv saturates
on the full grid and the 7-bit grid must win; with VNNI or on ARM nothing saturates and the full grid
must win. The development machine has VNNI, so the saturating branch of the decision is also tested
with injected measurements.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest

import onnxq.api as api
import onnxq.ort_grid as ort_grid
from onnxq.calibration.calibrator import TensorRange, calibrate
from onnxq.calibration.methods import get_method
from onnxq.errors import OnnxqError
from onnxq.graph.qdq import insert_qdq
from onnxq.model_io import load_model
from onnxq.modes import mode_spec
from onnxq.ort_grid import (
    FULL_GRID,
    METADATA_KEY,
    REDUCED_GRID,
    SATURATION_DB,
    CpuInfo,
    apply_grid,
    check_ort_cpu_option,
    choose_ort_weight_grid,
    decide,
    detect_cpu,
    grid_for_cpu,
    metadata_value,
    record_choice,
    resolve_ort_weight_grid,
    with_grid,
)
from onnxq.placement.planner import plan_placement
from onnxq.placement.rules import load_rule_set

SEED = 11
IR_VERSION = 10
CHANNELS = 64
SIDE = 5
SAMPLES = 6
#: how close deployed and as-written must be where nothing saturates (requantization rounding only)
CLEAN_KERNEL_TOLERANCE_DB = SATURATION_DB

# x in [0, 1] (uint8 codes up to 255, zero point 0) times positive weights near their channel's
# maximum (codes near 127): every pair of products sums far above int16's 32767 on vpmaddubsw.
MODEL_TEXT = f"""
<ir_version: {IR_VERSION}, opset_import: ["" : 17]>
net (float[N, {CHANNELS}, {SIDE}, {SIDE}] x) => (float[N, {CHANNELS}, {SIDE}, {SIDE}] y) {{
    a = Conv <pads = [1, 1, 1, 1]> (x, w1)
    r = Relu (a)
    y = Conv <pads = [1, 1, 1, 1]> (r, w2)
}}
"""


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(SEED)
    proto = onnx.parser.parse_model(MODEL_TEXT)
    first = rng.uniform(0.8, 1.0, (CHANNELS, CHANNELS, 3, 3)) / (CHANNELS * 9)
    second = rng.standard_normal((CHANNELS, CHANNELS, 3, 3)) / np.sqrt(CHANNELS * 9)
    for name, weight in (("w1", first), ("w2", second)):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(weight.astype(np.float32), name))
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    path = tmp_path_factory.mktemp("ort_grid") / "net.onnx"
    onnx.save(proto, path)
    return path


def _feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(SEED + 1)
    values = rng.uniform(0.0, 1.0, (SAMPLES, CHANNELS, SIDE, SIDE)).astype(np.float32)
    values[:, 0, 0, 0] = 0.0  # the calibrated minimum is 0: uint8 zero point 0, codes up to 255
    return [{"x": values[i : i + 1]} for i in range(SAMPLES)]


def _prepared(model_path: Path, target: str = "ort") -> tuple[Any, ...]:
    """(model, plan, activation params, formats) as ``onnxq.quantize`` has them before insertion."""
    settings = api._options("int8", {"target": target})
    model = load_model(str(model_path))
    api._prepare(model, settings, mode_spec("int8"))
    rules = load_rule_set(target, None)
    plan = plan_placement(model, rules, api._placement(settings))
    formats = api.formats_for("int8", rules.activation_symmetric)
    data = api._open_data(model, plan, _feeds(), settings)

    def max_ranges(tensors: list[str]) -> dict[str, TensorRange]:
        return calibrate(model, tensors, data, get_method("max"), formats[0])

    ranges = api._calibrate(model, plan, data, settings, {}, max_ranges)
    params = api.activation_parameters(plan, ranges, formats[0], rules.activation_symmetric)
    return model, plan, params, formats


def _measured(
    full_written: float, full_deployed: float, reduced_written: float, reduced_deployed: float
) -> dict[str, float]:
    return {
        f"{FULL_GRID}/as_written": full_written,
        f"{FULL_GRID}/deployed": full_deployed,
        f"{REDUCED_GRID}/as_written": reduced_written,
        f"{REDUCED_GRID}/deployed": reduced_deployed,
    }


def test_bad_ort_cpu_values_are_one_line_errors() -> None:
    with pytest.raises(OnnxqError, match="--ort-cpu 'avx512' is not a known") as unknown:
        check_ort_cpu_option("avx512", "ort")
    with pytest.raises(OnnxqError, match="only to --target ort") as wrong_target:
        check_ort_cpu_option("vnni", "tensorrt")
    with pytest.raises(OnnxqError, match="only to --target ort") as auto_target:
        check_ort_cpu_option("auto", "tensorrt")
    for error in (unknown.value, wrong_target.value, auto_target.value):
        assert "\n" not in str(error) and "Fix:" in str(error)
    for value, target in (
        (None, "tensorrt"),
        (None, "ort"),
        ("auto", "ort"),
        ("avx2", "ort"),
        ("arm", "ort"),
    ):
        check_ort_cpu_option(value, target)


def test_named_cpus_get_their_grid() -> None:
    assert grid_for_cpu("avx2").grid == REDUCED_GRID
    assert grid_for_cpu("vnni").grid == FULL_GRID
    assert grid_for_cpu("arm").grid == FULL_GRID
    assert grid_for_cpu("vnni").measured == {}
    with pytest.raises(ValueError):
        grid_for_cpu("auto")


def test_cpu_kind_from_cpuinfo_flags() -> None:
    assert detect_cpu("flags\t: fpu sse avx2 avx512bw avx512_vnni\n", "x86_64") == CpuInfo(
        "vnni", ("avx512_vnni", "avx512bw", "avx2")
    )
    assert detect_cpu("flags : fpu avx2 avx_vnni\n", "x86_64").kind == "vnni"
    assert detect_cpu("flags : fpu sse4_2 avx2 fma\n", "x86_64") == CpuInfo("avx2", ("avx2",))
    assert detect_cpu("Features : fp asimd asimddp\n", "aarch64") == CpuInfo("arm", ("asimddp",))
    assert detect_cpu("flags : fpu sse4_2\n", "x86_64").kind == "unknown"


def test_saturating_measurement_picks_the_reduced_grid() -> None:
    choice = decide(_measured(42.0, 18.0, 37.0, 37.0))
    assert choice.grid == REDUCED_GRID and "saturates" in choice.reason
    assert choice.measured[f"{FULL_GRID}/deployed"] == 18.0
    lost = SATURATION_DB * 1.5  # beyond the 7-bit grid's own loss by more than the threshold
    assert decide(_measured(42.0, 42.0 - lost, 37.0, 37.0)).grid == REDUCED_GRID
    assert decide(_measured(42.0, float("-inf"), 37.0, 37.0)).grid == REDUCED_GRID
    assert decide(_measured(42.0, float("nan"), 37.0, 37.0)).grid == REDUCED_GRID


def test_clean_kernels_pick_the_full_grid() -> None:
    assert decide(_measured(42.0, 42.1, 37.0, 37.0)).grid == FULL_GRID
    # both grids lose the same rounding deployed: not saturation
    assert decide(_measured(42.0, 40.5, 37.0, 35.5)).grid == FULL_GRID
    # the grids' SNR against each other is not the criterion (noise on a few samples)
    assert decide(_measured(30.0, 30.0, 33.0, 33.0)).grid == FULL_GRID


def test_measured_choice_follows_this_cpu(model_path: Path) -> None:
    """Real measurement: saturation without VNNI, none with it (or on ARM)."""
    model, plan, params, formats = _prepared(model_path)
    choice = choose_ort_weight_grid(model, plan, _feeds(), params, formats)
    measured = choice.measured
    assert set(measured) == set(_measured(0, 0, 0, 0))
    # as written, one more bit of weight is a finer grid on every CPU
    assert measured[f"{FULL_GRID}/as_written"] > measured[f"{REDUCED_GRID}/as_written"]
    kind = detect_cpu().kind
    full_loss = measured[f"{FULL_GRID}/as_written"] - measured[f"{FULL_GRID}/deployed"]
    if kind == "avx2":
        assert full_loss > SATURATION_DB and choice.grid == REDUCED_GRID, choice.reason
    elif kind in ("vnni", "arm"):
        assert abs(full_loss) < CLEAN_KERNEL_TOLERANCE_DB and choice.grid == FULL_GRID, choice.reason
    else:
        pytest.skip(f"CPU kind {kind}: no expectation for its kernels")
    assert choice.machine is not None and choice.machine.kind == kind
    again = choose_ort_weight_grid(model, plan, _feeds(), params, formats)
    assert metadata_value(again) == metadata_value(choice)


def test_named_cpu_skips_the_measurement(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, plan, params, formats = _prepared(model_path)

    def no_session(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a named CPU must not run a session")

    monkeypatch.setattr(ort_grid, "make_session", no_session)
    choice = resolve_ort_weight_grid("vnni", model, plan, _feeds(), params, formats)
    assert choice.grid == FULL_GRID and choice.cpu == "vnni" and choice.measured == {}
    weights = [t for t in plan.tensors() if t.role == "weight"]
    assert weights and all(t.int8_weight_format == FULL_GRID for t in weights)


def test_without_data_or_named_grid_nothing_is_measured(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, plan, params, formats = _prepared(model_path)
    monkeypatch.setattr(ort_grid, "make_session", None)  # any session call would fail
    no_data = resolve_ort_weight_grid("auto", model, plan, None, params, formats)
    assert no_data.grid == REDUCED_GRID and "not measured" in no_data.reason  # patterns/ort.toml's grid
    trt_model, trt_plan, trt_params, trt_formats = _prepared(model_path, "tensorrt")
    unnamed = choose_ort_weight_grid(trt_model, trt_plan, _feeds(), trt_params, trt_formats)
    assert unnamed.grid == FULL_GRID and unnamed.measured == {}


def test_grids_reach_the_weight_codes_and_metadata(model_path: Path, tmp_path: Path) -> None:
    model, plan, params, formats = _prepared(model_path)
    for grid, (low, high) in ((REDUCED_GRID, (-64, 63)), (FULL_GRID, (-127, 127))):
        copy = ir.from_proto(ir.to_proto(model))
        insert_qdq(copy, with_grid(plan.tensors(), grid), params, *formats)
        codes = copy.graph.initializers["w1_quantized"].const_value.numpy()
        assert codes.dtype == np.int8 and codes.min() >= low and codes.max() == high
    choice = decide(_measured(42.0, 18.0, 37.0, 37.0), CpuInfo("avx2", ("avx2",)))
    assert apply_grid(plan, FULL_GRID) == 2 and apply_grid(plan, choice.grid) == 2
    insert_qdq(model, plan.tensors(), params, *formats)
    record_choice(model, choice)
    path = tmp_path / "q.onnx"
    onnx.save(ir.to_proto(model), path)
    stored = {p.key: p.value for p in onnx.load(path).metadata_props}
    record = json.loads(stored[METADATA_KEY])
    assert record["grid"] == REDUCED_GRID and record["cpu"] == "auto"
    assert record["measured"] == choice.measured
    assert record["measured_on"] == {"kind": "avx2", "flags": ["avx2"]}
    assert model.graph.initializers["w2_quantized"].const_value.numpy().max() <= 63
