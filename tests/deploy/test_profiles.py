"""Optimization profiles from --shapes: parsing, defaults from static dims, and every refusal."""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.calibration.data import InputSpec
from onnxq.deploy.profiles import (
    ShapeRange,
    build_profile,
    format_shape,
    parse_shape,
    parse_shape_option,
    parse_shape_options,
)
from onnxq.errors import OnnxqError

IMAGE = InputSpec("images", np.dtype(np.float32), ("batch", 3, 224, 224))
STATIC = InputSpec("scale", np.dtype(np.float32), (1, 3))
IDS = InputSpec("input_ids", np.dtype(np.int64), ("batch", "sequence"))
MASK = InputSpec("attention_mask", np.dtype(np.int64), ("batch", "sequence"))


def test_shape_round_trip_with_random_shapes() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        shape = tuple(int(d) for d in rng.integers(1, 4096, size=int(rng.integers(1, 6))))
        assert parse_shape(format_shape(shape)) == shape
    assert parse_shape("") == ()


def test_min_opt_max_entry() -> None:
    entry = parse_shape_option("images:1x3x224x224,8x3x224x224,32x3x224x224")
    assert entry == ShapeRange("images", (1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))
    assert not entry.is_fixed


def test_single_shape_is_min_opt_max() -> None:
    entry = parse_shape_option("images:4x3x224x224")
    assert entry.min == entry.opt == entry.max == (4, 3, 224, 224)
    assert entry.is_fixed


@pytest.mark.parametrize(("text", "name"), [("input:0:1x4", "input:0"), ("'input:0':1x4", "input:0")])
def test_names_with_colons(text: str, name: str) -> None:
    assert parse_shape_option(text).name == name


def test_several_entries_in_one_option() -> None:
    entries = parse_shape_options(["input_ids:1x8,4x128,8x512;attention_mask:1x8,4x128,8x512"])
    assert [entry.name for entry in entries] == ["input_ids", "attention_mask"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1x3x224x224", "no input name"),
        ("images:1x3xAx224", "whole numbers"),
        ("images:1x3,2x3", "needs 1 or 3"),
        ("images:0x3x224x224", "below 1"),
        ("images:1x-3x224x224", "whole numbers"),
    ],
)
def test_unreadable_entries(text: str, message: str) -> None:
    with pytest.raises(OnnxqError, match=message):
        parse_shape_option(text)


def test_static_model_needs_no_option() -> None:
    profile = build_profile([STATIC])
    assert profile["scale"].min == profile["scale"].max == (1, 3)
    assert not profile.needs_profile
    assert profile.dynamic_ranges() == ()


def test_dynamic_input_gets_the_given_range_and_static_input_its_dims() -> None:
    profile = build_profile([IMAGE, STATIC], ["images:1x3x224x224,8x3x224x224,32x3x224x224"])
    assert profile.dynamic_inputs == ("images",)
    assert profile["images"].max == (32, 3, 224, 224)
    assert profile["scale"].opt == (1, 3)
    assert [r.name for r in profile.dynamic_ranges()] == ["images"]


def test_dynamic_input_without_option_is_refused_in_one_line() -> None:
    with pytest.raises(OnnxqError) as caught:
        build_profile([IMAGE, STATIC])
    message = str(caught.value)
    assert "\n" not in message
    assert "'images'" in message and "batch" in message
    assert "--shapes images:1x3x224x224,8x3x224x224,32x3x224x224" in message


def test_unknown_dynamic_dim_named_by_axis() -> None:
    spec = InputSpec("x", np.dtype(np.float32), (None, 16))
    with pytest.raises(OnnxqError, match=r"dim 0"):
        build_profile([spec])


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("images:1x3x224,8x3x224,32x3x224", "rank 3"),
        ("images:1x3x224x224,8x3x224x224,32x4x224x224", "fixes it at 3"),
        ("images:8x3x224x224,1x3x224x224,32x3x224x224", "min <= opt <= max"),
        ("images:1x3x224x224,64x3x224x224,32x3x224x224", "min <= opt <= max"),
        ("pixels:1x3x224x224", "does not have"),
    ],
)
def test_invalid_ranges(option: str, message: str) -> None:
    with pytest.raises(OnnxqError, match=message):
        build_profile([IMAGE], [option])


def test_static_input_given_other_dims_is_refused() -> None:
    with pytest.raises(OnnxqError, match="fixes it at 1"):
        build_profile([STATIC], ["scale:2x3"])


def test_input_given_twice_is_refused() -> None:
    with pytest.raises(OnnxqError, match="more than once"):
        build_profile([IMAGE], ["images:1x3x224x224", "images:2x3x224x224"])


def test_shared_dim_names_must_agree() -> None:
    agreeing = ["input_ids:1x8,4x128,8x512", "attention_mask:1x8,4x128,8x512"]
    assert build_profile([IDS, MASK], agreeing).dynamic_inputs == ("input_ids", "attention_mask")
    with pytest.raises(OnnxqError, match="'batch'"):
        build_profile([IDS, MASK], ["input_ids:1x8,4x128,8x512", "attention_mask:1x8,2x128,8x512"])
