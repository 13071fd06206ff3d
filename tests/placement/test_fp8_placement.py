"""FP8 placement for TensorRT (patterns/tensorrt.toml's [rules.modes.fp8] tables), on small seeded CNNs.

Cases: a depthwise or grouped convolution with fewer than 16 channels per group stays in high precision
for FP8 and is quantized for INT8; a grouped convolution with 16 channels per group is quantized in both;
the other layers (dense, pointwise, ConvTranspose) are quantized in both; the INT8 plan is the same with and without the mode
tables; FP8 with the tables measures a higher output SNR than FP8 without them; per-mode tables that
name an unknown mode or kind, or change op_types, are refused when read.

Tests marked ``needs_mode_tables`` need ``RuleSet.for_mode`` (the rules.py / matchers.py / api.py change
proposed with this file); without it they are skipped, and the shipped file parses and plans as before.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from model_builders import build, randn, run, snr_db
from onnx import numpy_helper

import onnxq
from onnxq.errors import OnnxqError
from onnxq.placement.rules import RuleSet, load_rule_set, parse_rule_set, patterns_dir

needs_mode_tables = pytest.mark.skipif(
    not hasattr(RuleSet, "for_mode"), reason="needs RuleSet.for_mode (per-mode rule tables, planner change)"
)

CHANNELS = 32
SEED = 7
CALIBRATION_SAMPLES, HELD_SAMPLES = 8, 8
DQ = "DequantizeLinear"
NODE_NAMES = ("dense", "relu_dense", "grouped", "relu_grouped", "point", "up")
#: a [rules.modes.<mode>] table and its keys, up to the next [[rules]] or the end of the file
MODE_TABLE = re.compile(r"^\[rules\.modes\.\w+\]\n(?:(?!\[\[rules\]\]).*\n?)*", re.M)


def grouped_cnn(group: int, seed: int = SEED) -> onnx.ModelProto:
    """16 -> 32 conv, Relu, a 3x3 conv with ``group`` groups, Relu, 1x1 conv, 2x2 stride-2 ConvTranspose."""
    rng = np.random.default_rng(seed)
    text = f"""
    grouped (float[N, 16, 8, 8] x) => (float[N, {CHANNELS}, 16, 16] y) {{
        a = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w_dense)
        ra = Relu (a)
        g = Conv <group = {group}, kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (ra, w_grouped)
        rg = Relu (g)
        p = Conv <kernel_shape = [1, 1]> (rg, w_point)
        y = ConvTranspose <kernel_shape = [2, 2], strides = [2, 2]> (p, w_up)
    }}
    """
    initializers = {
        "w_dense": randn(rng, CHANNELS, 16, 3, 3, scale=0.2),
        "w_grouped": randn(rng, CHANNELS, CHANNELS // group, 3, 3, scale=0.3),
        "w_point": randn(rng, CHANNELS, CHANNELS, 1, 1, scale=0.2),
        "w_up": randn(rng, CHANNELS, CHANNELS, 2, 2, scale=0.2),
    }
    model = build(text, initializers)
    for node, name in zip(model.graph.node, NODE_NAMES, strict=True):
        node.name = name
    return model


def for_mode(rules: RuleSet, mode: str | None) -> RuleSet:
    return rules.for_mode(mode)  # type: ignore[attr-defined,unused-ignore]  # the proposed RuleSet method


def inputs(seed: int, samples: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((samples, 16, 8, 8)).astype(np.float32)}


def quantize(model: onnx.ModelProto, mode: str, patterns: Path | None = None) -> onnxq.api.QuantizeResult:
    # high_precision fp32: only the Q/DQ differ from the original, as in tools/bench_fp8_placement.py
    return onnxq.quantize(
        model, mode=mode, calibration_data=inputs(SEED, CALIBRATION_SAMPLES), high_precision="fp32",
        patterns=None if patterns is None else str(patterns),
    )  # fmt: skip


def without_mode_tables(folder: Path) -> Path:
    """The shipped TensorRT rules with every [rules.modes.*] table removed."""
    text = (patterns_dir() / "tensorrt.toml").read_text()
    stripped = MODE_TABLE.sub("", text)
    assert stripped != text, "the shipped rules hold no mode table"
    path = folder / "tensorrt_no_modes.toml"
    path.write_text(stripped)
    return path


def decisions(result: onnxq.api.QuantizeResult) -> dict[str, tuple[bool, str, str]]:
    return {d.node: (d.quantized, d.reason, d.category) for d in result.plan.decisions}


def producer_ops(result: onnxq.api.QuantizeResult, node_name: str) -> list[str | None]:
    proto = ir.serde.serialize_model(result.model)
    producers = {out: n.op_type for n in proto.graph.node for out in n.output}
    node = next(n for n in proto.graph.node if n.name == node_name)
    return [producers.get(name) for name in node.input]


def held_snr(model: onnx.ModelProto, result: onnxq.api.QuantizeResult) -> float:
    feed = inputs(SEED + 1, HELD_SAMPLES)
    quantized = ir.serde.serialize_model(result.model)
    return snr_db(run(model, feed)[0], run(quantized, feed)[0])


# ----------------------------------------------------------------------------------------------


@needs_mode_tables
@pytest.mark.parametrize("group", [CHANNELS, 4])  # depthwise (1 channel per group), 8 per group
def test_fp8_keeps_few_channel_groups_in_high_precision(group: int) -> None:
    model = grouped_cnn(group)
    result = quantize(model, "fp8")
    plan = decisions(result)
    per_group = CHANNELS // group
    assert plan["grouped"] == (
        False,
        f"grouped convolution with {per_group} channels per group (< 16)",
        "few channels per group",
    )
    assert plan["dense"][0] and plan["point"][0] and plan["up"][0]
    # the grouped conv reads its original float weight and an unquantized activation
    assert producer_ops(result, "grouped") == ["Relu", None]
    proto = ir.serde.serialize_model(result.model)
    weight_name = next(n for n in proto.graph.node if n.name == "grouped").input[1]
    weight = next(t for t in proto.graph.initializer if t.name == weight_name)
    original = next(t for t in model.graph.initializer if t.name == "w_grouped")
    np.testing.assert_array_equal(numpy_helper.to_array(weight), numpy_helper.to_array(original))
    assert producer_ops(result, "point")[:2] == [DQ, DQ]


@needs_mode_tables
def test_fp8_quantizes_groups_of_sixteen_channels() -> None:
    result = quantize(grouped_cnn(group=2), "fp8")
    assert decisions(result)["grouped"][0]
    assert producer_ops(result, "grouped")[:2] == [DQ, DQ]


@pytest.mark.parametrize("group", [CHANNELS, 4])
def test_int8_plan_is_the_same_with_and_without_mode_tables(group: int, tmp_path: Path) -> None:
    model = grouped_cnn(group)
    shipped, plain = quantize(model, "int8"), quantize(model, "int8", without_mode_tables(tmp_path))
    assert decisions(shipped) == decisions(plain)
    assert decisions(shipped)["grouped"][0] and decisions(shipped)["up"][0]
    assert producer_ops(shipped, "grouped")[:2] == [DQ, DQ]


@needs_mode_tables
def test_fp8_mode_tables_raise_output_snr(tmp_path: Path) -> None:
    model = grouped_cnn(CHANNELS)
    shipped = held_snr(model, quantize(model, "fp8"))
    everything_fp8 = held_snr(model, quantize(model, "fp8", without_mode_tables(tmp_path)))
    assert shipped > everything_fp8


@needs_mode_tables
def test_for_mode_applies_only_the_named_mode() -> None:
    rules = load_rule_set("tensorrt")
    conv_fp8 = for_mode(rules, "fp8").rule_for("Conv")
    conv_int8 = for_mode(rules, "int8").rule_for("Conv")
    assert conv_fp8 is not None and conv_int8 is not None
    assert conv_fp8.get("min_group_channels") == 16 and conv_int8.get("min_group_channels") is None
    assert for_mode(rules, None) == rules


@needs_mode_tables
@pytest.mark.parametrize(
    "table, complaint",
    [
        ({"int4": {"min_channels": 8}}, "unknown mode 'int4'"),
        ({"fp8": {"op_types": ["Conv"]}}, "sets op_types"),
        ({"fp8": {"kind": "sometimes"}}, "unknown kind 'sometimes'"),
        ("fp8", "is not a table"),
    ],
)
def test_bad_mode_tables_are_refused(table: object, complaint: str) -> None:
    data = {"rules": [{"name": "conv", "kind": "weighted", "op_types": ["Conv"], "modes": table}]}
    with pytest.raises(OnnxqError, match=complaint):
        parse_rule_set(data, "test.toml")
