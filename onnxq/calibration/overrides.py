"""Ranges that do not come from calibration statistics.

* ``load_overrides``: ranges the user fixes by hand in a JSON file, for tensors whose calibration data
  is unrepresentative (``{"tensor": [low, high]}`` or ``{"tensor": {"low": .., "high": ..}}``).
* ``warn_unmatched_overrides``: a warning, with near matches, for override names that name no tensor.
* ``range_problem``: why a range cannot become a scale (not finite, beyond float32), shared with the
  calibration cache.
* ``known_ranges``: bounds implied by the op that produces a tensor (Softmax lies in [0, 1], Relu is
  never negative, ...). The calibrator intersects observed statistics with them and a known bound
  wins, so e.g. a Sigmoid output is quantized over exactly [0, 1] even if the data never reached 1.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError

logger = logging.getLogger(__name__)

Bound = float | None
KnownRange = tuple[Bound, Bound]

#: ONNX's default domain, as onnx_ir spells it ("ai.onnx" is an alias of it)
_ONNX_DOMAINS = ("", "ai.onnx")
#: ops whose output range does not depend on the input: (low, high), None = unbounded
_FIXED_OUTPUT_RANGES: dict[str, KnownRange] = {
    "Softmax": (0.0, 1.0),
    "Sigmoid": (0.0, 1.0),
    "HardSigmoid": (0.0, 1.0),
    "Tanh": (-1.0, 1.0),
    "Relu": (0.0, None),
}
#: Clip's bounds are inputs 1 and 2 since opset 11 (attributes before)
_CLIP_MIN_INPUT = 1
_CLIP_MAX_INPUT = 2
_OVERRIDE_FORMAT_FIX = 'write {"tensor_name": [low, high], ...} with finite numbers and low <= high'
#: activations are float32 when quantized; a bound beyond this has no float32 scale
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: how many near matches a warning about an unknown tensor name lists
_NEAR_MATCHES = 3


def range_problem(low: float, high: float) -> str | None:
    """Why [low, high] cannot be quantized, or None when it can.

    Cases: NaN/inf bound -> "is not a finite number"; finite but |bound| > 3.4e38 -> beyond
    float32's range (a float32 tensor never holds it, and its scale overflows); low > high.
    """
    for bound in (low, high):
        if not math.isfinite(bound):
            return f"bound {bound!r} is not a finite number"
        if abs(bound) > FLOAT32_MAX:
            return f"bound {bound!r} exceeds float32's range (+/-{FLOAT32_MAX:.1e})"
    if low > high:
        return f"low {low!r} > high {high!r}"
    return None


# ----------------------------------------------------------------------------------------------
# user overrides


def _finite_number(value: Any) -> float | None:
    """A JSON number as float, or None for anything else (bools, strings, NaN/Infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _bounds_of(entry: Any) -> tuple[Any, Any] | None:
    """The raw (low, high) of one entry in either accepted form, or None if it has neither form."""
    if isinstance(entry, list) and len(entry) == 2:
        return entry[0], entry[1]
    if isinstance(entry, dict) and set(entry) == {"low", "high"}:
        return entry["low"], entry["high"]
    return None


def _parse_override(path: Path, name: str, entry: Any) -> tuple[float, float]:
    """Validate one tensor's override; the message names the tensor so the user finds the line."""
    bounds = _bounds_of(entry)
    if bounds is None:
        raise OnnxqError(
            f"range override for tensor '{name}' in {path} is {json.dumps(entry)}, "
            'expected [low, high] or {"low": .., "high": ..}',
            _OVERRIDE_FORMAT_FIX,
        )
    low, high = (_finite_number(bound) for bound in bounds)
    if low is None or high is None:
        raise OnnxqError(
            f"range override for tensor '{name}' in {path} has a bound that is not a finite number "
            f"({json.dumps(entry)})",
            _OVERRIDE_FORMAT_FIX,
        )
    if low > high:
        raise OnnxqError(
            f"range override for tensor '{name}' in {path} has low {low!r} > high {high!r}",
            f"swap the bounds of '{name}'",
        )
    problem = range_problem(low, high)
    if problem is not None:
        raise OnnxqError(
            f"range override for tensor '{name}' in {path}: {problem}",
            f"give '{name}' bounds within +/-{FLOAT32_MAX:.1e} (activations are float32)",
        )
    return low, high


def _reject_constant(token: str) -> float:
    """json accepts NaN/Infinity by default; a range override must not."""
    raise ValueError(f"{token} is not allowed")


def load_overrides(path: str | os.PathLike[str]) -> dict[str, tuple[float, float]]:
    """User-fixed ranges from a JSON object mapping tensor names to ``[low, high]`` (or low/high objects)."""
    override_path = Path(path)
    try:
        text = override_path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise OnnxqError(
            f"range override file {override_path} does not exist", "pass an existing JSON file"
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise OnnxqError(
            f"cannot read range override file {override_path}: {error}", "check the file"
        ) from error
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except ValueError as error:
        raise OnnxqError(
            f"range override file {override_path} is not valid JSON ({error})", _OVERRIDE_FORMAT_FIX
        ) from error
    if not isinstance(document, dict):
        raise OnnxqError(
            f"range override file {override_path} holds a JSON {type(document).__name__}, not an object",
            _OVERRIDE_FORMAT_FIX,
        )
    overrides = {name: _parse_override(override_path, name, entry) for name, entry in document.items()}
    logger.info("loaded %d range overrides from %s", len(overrides), override_path)
    return overrides


def value_names(model: ir.Model) -> set[str]:
    """Names of every value in the model, subgraphs included: what an override may name."""
    names = {value.name for value in model.graph.inputs if value.name}
    names.update(name for name in model.graph.initializers if name)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        names.update(
            value.name for value in (*node.inputs, *node.outputs) if value is not None and value.name
        )
    return names


def warn_unmatched_overrides(
    overrides: Iterable[str], names: Collection[str], calibrated: Collection[str] = ()
) -> list[str]:
    """Warn about override names that match no tensor (listing near matches); return them.

    Cases: a name in ``names`` but not ``calibrated`` is logged at info level (the tensor exists
    but is not quantized, so the override has no effect); a name in neither is a warning, with up
    to three close spellings from ``names`` (a typo or a name from another export is the usual cause).
    """
    unknown = []
    for name in overrides:
        if name in calibrated:
            continue
        if name in names:
            logger.info("range override for '%s' is unused: that tensor is not quantized", name)
            continue
        unknown.append(name)
        near = difflib.get_close_matches(name, list(names), n=_NEAR_MATCHES)
        hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        logger.warning("range override for '%s' matches no tensor in the model%s", name, hint)
    return unknown


# ----------------------------------------------------------------------------------------------
# ranges implied by the producing op


def _scalar_bound(value: ir.Value | None) -> Bound:
    """The value of a constant scalar Clip bound; None when absent, not constant, or not finite.

    An initializer that is also a graph input can be overridden at run time, so it is not constant.
    """
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    array = np.asarray(tensor.numpy())
    if array.size != 1:
        return None
    bound = float(array.reshape(()).item())
    return bound if math.isfinite(bound) else None


def _attribute_bound(node: ir.Node, name: str) -> Bound:
    """Clip before opset 11 carried its bounds as float attributes."""
    attribute = node.attributes.get(name)
    if attribute is None or attribute.is_ref():
        return None
    bound = float(attribute.as_float())
    return bound if math.isfinite(bound) else None


def _clip_range(node: ir.Node) -> KnownRange:
    """Clip's output lies within its constant bounds; a missing or dynamic bound stays unknown."""
    inputs = list(node.inputs)
    low = _scalar_bound(inputs[_CLIP_MIN_INPUT]) if len(inputs) > _CLIP_MIN_INPUT else None
    high = _scalar_bound(inputs[_CLIP_MAX_INPUT]) if len(inputs) > _CLIP_MAX_INPUT else None
    if low is None:
        low = _attribute_bound(node, "min")
    if high is None:
        high = _attribute_bound(node, "max")
    return low, high


def _node_range(node: ir.Node) -> KnownRange | None:
    """The known output range of ``node``, or None for ops that imply nothing."""
    if node.domain not in _ONNX_DOMAINS:
        return None
    if node.op_type == "Clip":
        return _clip_range(node)
    return _FIXED_OUTPUT_RANGES.get(node.op_type)


def known_ranges(model: ir.Model) -> dict[str, tuple[float | None, float | None]]:
    """Bounds of tensors implied by their producing op, including ops inside subgraphs.

    Keys are output tensor names; a None bound is unknown. Ops covered: Softmax, Sigmoid,
    HardSigmoid [0, 1]; Tanh [-1, 1]; Relu [0, None]; Clip [min, max] for constant bounds.
    """
    ranges: dict[str, KnownRange] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        known = _node_range(node)
        if known is None or not node.outputs or not node.outputs[0].name:
            continue
        if known == (None, None):
            continue
        ranges[node.outputs[0].name] = known
    return ranges
