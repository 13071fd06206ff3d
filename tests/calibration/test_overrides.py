"""User range overrides and ranges known from the producing op."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.calibration.overrides import known_ranges, load_overrides
from onnxq.errors import OnnxqError


def assert_user_error(error: pytest.ExceptionInfo[OnnxqError], *fragments: str) -> None:
    message = str(error.value)
    assert "Fix:" in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def write(tmp_path: Path, content: Any) -> Path:
    path = tmp_path / "overrides.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


# ----------------------------------------------------------------------------------------------
# load_overrides


def test_both_entry_forms(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {"attn_probs": [0, 1], "logits": {"low": -12.5, "high": 30.25}, "constant": [2.0, 2.0]},
    )
    overrides = load_overrides(path)
    assert overrides == {"attn_probs": (0.0, 1.0), "logits": (-12.5, 30.25), "constant": (2.0, 2.0)}
    assert all(isinstance(bound, float) for pair in overrides.values() for bound in pair)


def test_empty_object_is_no_overrides(tmp_path: Path) -> None:
    assert load_overrides(write(tmp_path, {})) == {}


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ([0.0, 1.0, 2.0], "expected [low, high]"),
        ([0.0], "expected [low, high]"),
        (1.0, "expected [low, high]"),
        ({"low": 0.0}, "expected [low, high]"),
        ({"low": 0.0, "high": 1.0, "hi": 2.0}, "expected [low, high]"),
        (["0", 1.0], "not a finite number"),
        ([False, 1.0], "not a finite number"),
        ([None, 1.0], "not a finite number"),
        ({"low": 0.0, "high": "inf"}, "not a finite number"),
        ([3.0, 1.0], "low 3.0 > high 1.0"),
    ],
)
def test_bad_entries_name_the_tensor(tmp_path: Path, entry: Any, fragment: str) -> None:
    path = write(tmp_path, {"good": [0, 1], "conv3_out": entry})
    with pytest.raises(OnnxqError) as error:
        load_overrides(path)
    assert_user_error(error, "'conv3_out'", fragment)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_refused(tmp_path: Path, literal: str) -> None:
    path = write(tmp_path, f'{{"x": [0, {literal}]}}')
    with pytest.raises(OnnxqError) as error:
        load_overrides(path)
    assert_user_error(error, "overrides.json")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(OnnxqError) as error:
        load_overrides(tmp_path / "nope.json")
    assert_user_error(error, "nope.json", "does not exist")


def test_invalid_json(tmp_path: Path) -> None:
    with pytest.raises(OnnxqError) as error:
        load_overrides(write(tmp_path, '{"x": [0, 1],}'))
    assert_user_error(error, "not valid JSON")


def test_top_level_must_be_an_object(tmp_path: Path) -> None:
    with pytest.raises(OnnxqError) as error:
        load_overrides(write(tmp_path, [["x", 0, 1]]))
    assert_user_error(error, "JSON list, not an object")


# ----------------------------------------------------------------------------------------------
# known_ranges


def _scalar(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=np.float32), name)


def build_model() -> ir.Model:
    """One of every op known_ranges understands, plus cases that must stay unknown."""
    nodes = [
        helper.make_node("Softmax", ["x"], ["softmax_out"], axis=-1),
        helper.make_node("Sigmoid", ["x"], ["sigmoid_out"]),
        helper.make_node("HardSigmoid", ["x"], ["hardsigmoid_out"]),
        helper.make_node("Tanh", ["x"], ["tanh_out"]),
        helper.make_node("Relu", ["x"], ["relu_out"]),
        helper.make_node("Exp", ["x"], ["exp_out"]),
        # Relu6 as exported by PyTorch: bounds from initializers.
        helper.make_node("Clip", ["x", "zero", "six"], ["relu6_out"]),
        # Lower bound from a Constant node, upper bound omitted.
        helper.make_node("Constant", [], ["minus_one"], value=_scalar("minus_one_value", -1.0)),
        helper.make_node("Clip", ["x", "minus_one"], ["clip_low_out"]),
        # Lower bound omitted (empty name), upper bound constant.
        helper.make_node("Clip", ["x", "", "six"], ["clip_high_out"]),
        # Upper bound from a graph input: dynamic, so unknown.
        helper.make_node("Clip", ["x", "zero", "dynamic_max"], ["clip_dynamic_out"]),
        # Upper bound from an initializer that is also a graph input: overridable, so unknown.
        helper.make_node("Clip", ["x", "", "overridable"], ["clip_overridable_out"]),
        # No bounds at all: nothing known.
        helper.make_node("Clip", ["x"], ["clip_none_out"]),
        # A Relu from another domain is not ONNX's Relu.
        helper.make_node("Relu", ["x"], ["custom_relu_out"], domain="custom"),
        helper.make_node(
            "If", ["cond"], ["if_out"], then_branch=_branch("Sigmoid"), else_branch=_branch("Tanh")
        ),
    ]
    outputs = [name for node in nodes for name in node.output if name != "minus_one"]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("dynamic_max", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("overridable", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        initializer=[_scalar("zero", 0.0), _scalar("six", 6.0), _scalar("overridable", 3.0)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 19), helper.make_opsetid("custom", 1)]
    )
    model.ir_version = 10
    return ir.serde.deserialize_model(model)


def _branch(op_type: str) -> onnx.GraphProto:
    output = f"branch_{op_type.lower()}_out"
    return helper.make_graph(
        [helper.make_node(op_type, ["x"], [output])],
        f"branch_{op_type}",
        [],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
    )


def test_known_ranges() -> None:
    assert known_ranges(build_model()) == {
        "softmax_out": (0.0, 1.0),
        "sigmoid_out": (0.0, 1.0),
        "hardsigmoid_out": (0.0, 1.0),
        "tanh_out": (-1.0, 1.0),
        "relu_out": (0.0, None),
        "relu6_out": (0.0, 6.0),
        "clip_low_out": (-1.0, None),
        "clip_high_out": (None, 6.0),
        "clip_dynamic_out": (0.0, None),
        "branch_sigmoid_out": (0.0, 1.0),
        "branch_tanh_out": (-1.0, 1.0),
    }


def test_clip_with_attribute_bounds_before_opset_11() -> None:
    graph = helper.make_graph(
        [helper.make_node("Clip", ["x"], ["y"], min=-2.5, max=2.5)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
    model.ir_version = 10
    assert known_ranges(ir.serde.deserialize_model(model)) == {"y": (-2.5, 2.5)}
