"""TensorRT optimization profiles from ``--shapes`` options and the model's declared input shapes.

A profile gives every input a (min, opt, max) shape. Cases handled:

* ``name:MIN,OPT,MAX`` with each shape written ``1x3x224x224`` (trtexec's spelling);
* ``name:SHAPE``: min = opt = max (one fixed shape for a dynamic input);
* names holding ``:`` (``input:0``): the shapes follow the last ``:``; trtexec's own spelling
  ``'input:0'`` (single quotes around the name) is accepted too;
* several inputs: one option per input, or several ``name:...`` entries joined with ``;``;
* a rank-0 input: an empty shape (``name:``), although such inputs are static and need no entry;
* an input with no option: its static dims (the model's); an input with a dynamic dim (symbolic,
  ``None``) and no option is refused with one line naming the input and the fix;
* checks: known input names, each input at most once, ranks as in the model, static dims as in the
  model, every dim >= 1, min <= opt <= max per dimension, and one symbolic dimension name (``batch``)
  sized alike across inputs in each of min/opt/max (TensorRT refuses a profile that disagrees).

``Profile.dynamic_inputs`` lists the inputs that need a TensorRT optimization profile (those with a
dynamic dim); a model without any builds without a profile.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from onnxq.calibration.data import InputSpec
from onnxq.errors import OnnxqError

Shape = tuple[int, ...]

#: separates the dims of one shape (``1x3x224x224``), as trtexec writes them
DIM_SEPARATOR = "x"
#: separates min, opt and max
SHAPE_SEPARATOR = ","
#: separates the entries of several inputs inside one option
ENTRY_SEPARATOR = ";"
#: how many shapes a full range gives (min, opt, max)
RANGE_SHAPES = 3
_DIM = re.compile(r"^[0-9]+$")
_SHAPES_FIX = "write --shapes NAME:MIN,OPT,MAX with shapes like 1x3x224x224, or NAME:1x3x224x224"


@dataclass(frozen=True)
class ShapeRange:
    """The (min, opt, max) shapes of one input; all three equal for a static input."""

    name: str
    min: Shape
    opt: Shape
    max: Shape

    @property
    def is_fixed(self) -> bool:
        return self.min == self.opt == self.max


@dataclass(frozen=True)
class Profile:
    """One optimization profile: a shape range for every model input, in the model's input order.

    ``dynamic_inputs`` names the inputs that have a dynamic dimension in the model: only these go
    into TensorRT's optimization profile and trtexec's ``--minShapes``/``--optShapes``/``--maxShapes``
    (trtexec refuses shapes for static inputs).
    """

    ranges: tuple[ShapeRange, ...]
    dynamic_inputs: tuple[str, ...]

    def __getitem__(self, name: str) -> ShapeRange:
        for shape_range in self.ranges:
            if shape_range.name == name:
                return shape_range
        raise KeyError(name)

    @property
    def needs_profile(self) -> bool:
        """True when the model has a dynamic input, so TensorRT needs an optimization profile."""
        return bool(self.dynamic_inputs)

    def dynamic_ranges(self) -> tuple[ShapeRange, ...]:
        return tuple(self[name] for name in self.dynamic_inputs)


def format_shape(shape: Shape) -> str:
    """``(1, 3, 224, 224)`` -> ``1x3x224x224`` (trtexec's spelling)."""
    return DIM_SEPARATOR.join(str(dim) for dim in shape)


def parse_shape(text: str, name: str = "") -> Shape:
    """``1x3x224x224`` -> ``(1, 3, 224, 224)``; the empty string is a rank-0 shape."""
    text = text.strip()
    if not text:
        return ()
    dims = [part.strip() for part in text.lower().split(DIM_SEPARATOR)]
    if not all(_DIM.match(dim) for dim in dims):
        where = f" for input '{name}'" if name else ""
        raise OnnxqError(f"cannot read shape '{text}'{where}: dims must be whole numbers", _SHAPES_FIX)
    shape = tuple(int(dim) for dim in dims)
    if any(dim < 1 for dim in shape):
        raise OnnxqError(f"shape '{text}' for input '{name}' has a dim below 1", "use sizes of 1 or more")
    return shape


def parse_shape_option(text: str) -> ShapeRange:
    """One ``name:MIN,OPT,MAX`` or ``name:SHAPE`` entry (the name may itself hold ``:``)."""
    name, separator, shapes = text.strip().rpartition(":")
    if not separator or not name:
        raise OnnxqError(f"cannot read --shapes entry '{text}': no input name before ':'", _SHAPES_FIX)
    name = _unquote(name)
    parts = shapes.split(SHAPE_SEPARATOR)
    if len(parts) == 1:
        shape = parse_shape(parts[0], name)
        return ShapeRange(name, shape, shape, shape)
    if len(parts) != RANGE_SHAPES:
        raise OnnxqError(
            f"--shapes entry '{text}' has {len(parts)} shapes; it needs 1 or 3 (min,opt,max)", _SHAPES_FIX
        )
    low, opt, high = (parse_shape(part, name) for part in parts)
    return ShapeRange(name, low, opt, high)


def parse_shape_options(options: Iterable[str]) -> list[ShapeRange]:
    """Every entry of every ``--shapes`` option; entries inside one option are joined with ``;``."""
    entries = [entry for option in options for entry in option.split(ENTRY_SEPARATOR) if entry.strip()]
    return [parse_shape_option(entry) for entry in entries]


def _unquote(name: str) -> str:
    """trtexec lets users wrap a name in single quotes ('Input:0'); onnxq accepts that spelling too."""
    if len(name) >= 2 and name[0] == name[-1] == "'":
        return name[1:-1]
    return name


def build_profile(specs: Sequence[InputSpec], shape_options: Iterable[str] = ()) -> Profile:
    """The profile for a model with inputs ``specs`` from the user's ``--shapes`` options.

    Inputs without an option get their static shape; a dynamic input without one is an error.
    """
    given = _index_by_name(parse_shape_options(shape_options), specs)
    ranges = []
    for spec in specs:
        shape_range = given.get(spec.name) or _static_range(spec)
        _check_range(shape_range, spec)
        ranges.append(shape_range)
    _check_shared_dims(ranges, specs)
    dynamic = tuple(spec.name for spec in specs if not all(isinstance(dim, int) for dim in spec.shape))
    return Profile(tuple(ranges), dynamic)


def _index_by_name(ranges: list[ShapeRange], specs: Sequence[InputSpec]) -> dict[str, ShapeRange]:
    known = [spec.name for spec in specs]
    indexed: dict[str, ShapeRange] = {}
    for shape_range in ranges:
        if shape_range.name not in known:
            raise OnnxqError(
                f"--shapes names input '{shape_range.name}', which the model does not have",
                f"use one of the model's inputs: {', '.join(known)}",
            )
        if shape_range.name in indexed:
            raise OnnxqError(
                f"--shapes gives input '{shape_range.name}' more than once", "give each input once"
            )
        indexed[shape_range.name] = shape_range
    return indexed


def _static_range(spec: InputSpec) -> ShapeRange:
    dynamic = [
        str(dim if dim is not None else f"dim {axis}")
        for axis, dim in enumerate(spec.shape)
        if not isinstance(dim, int)
    ]
    if dynamic:
        raise OnnxqError(
            f"input '{spec.name}' has dynamic dims ({', '.join(dynamic)}) in {spec.describe_shape()} "
            "and no --shapes entry",
            f"pass --shapes {spec.name}:MIN,OPT,MAX, e.g. --shapes {_example(spec)} "
            "(set the dynamic dims to the sizes you run)",
        )
    shape = tuple(int(dim) for dim in spec.shape)  # type: ignore[arg-type]
    return ShapeRange(spec.name, shape, shape, shape)


def _example(spec: InputSpec) -> str:
    """``x:1x3x224x224,8x3x224x224,32x3x224x224`` for ``x`` [batch, 3, 224, 224]."""
    example_sizes = (1, 8, 32)
    shapes = [
        format_shape(tuple(dim if isinstance(dim, int) else size for dim in spec.shape))
        for size in example_sizes
    ]
    return f"{spec.name}:{SHAPE_SEPARATOR.join(shapes)}"


def _check_range(shape_range: ShapeRange, spec: InputSpec) -> None:
    for label, shape in (("min", shape_range.min), ("opt", shape_range.opt), ("max", shape_range.max)):
        if len(shape) != spec.rank:
            raise OnnxqError(
                f"--shapes {label} shape {format_shape(shape) or '(scalar)'} for input '{spec.name}' has "
                f"rank {len(shape)}, the model's input {spec.describe_shape()} has rank {spec.rank}",
                f"give {spec.rank} dims",
            )
        for axis, (dim, declared) in enumerate(zip(shape, spec.shape)):
            if isinstance(declared, int) and dim != declared:
                raise OnnxqError(
                    f"--shapes {label} shape {format_shape(shape)} for input '{spec.name}' sets dim {axis} "
                    f"to {dim}, but the model fixes it at {declared} in {spec.describe_shape()}",
                    f"keep dim {axis} at {declared}",
                )
    for axis, (low, opt, high) in enumerate(zip(shape_range.min, shape_range.opt, shape_range.max)):
        if not low <= opt <= high:
            raise OnnxqError(
                f"--shapes for input '{spec.name}': dim {axis} has min {low}, opt {opt}, max {high}",
                "order them so that min <= opt <= max",
            )


def _check_shared_dims(ranges: Sequence[ShapeRange], specs: Sequence[InputSpec]) -> None:
    """A symbolic dim name used by several inputs (``batch``) must get one size per profile shape."""
    seen: dict[str, tuple[str, Shape]] = {}  # dim name -> (first input, its (min, opt, max) sizes)
    for shape_range, spec in zip(ranges, specs):
        for axis, declared in enumerate(spec.shape):
            if not isinstance(declared, str):
                continue
            sizes = (shape_range.min[axis], shape_range.opt[axis], shape_range.max[axis])
            first = seen.setdefault(declared, (spec.name, sizes))
            if first[1] != sizes:
                raise OnnxqError(
                    f"--shapes gives dim '{declared}' min/opt/max {_slashed(first[1])} on input "
                    f"'{first[0]}' but {_slashed(sizes)} on input '{spec.name}'",
                    f"give '{declared}' the same sizes on every input",
                )


def _slashed(sizes: Shape) -> str:
    return "/".join(str(size) for size in sizes)
