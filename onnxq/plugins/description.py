"""Reader of a TensorRT plugin description file (TOML), and the shape/type rules it states.

The file (``plugins/fp4_gemm/fp4_gemm_plugin.toml`` in a checkout, ``onnxq/_plugins/`` in the wheel)
names the plugin (ONNX op_type, TensorRT creator name, version, namespace, ONNX domain), its inputs and
outputs (types, symbolic shapes, which are constant or optional), its attributes (type, default,
allowed values, required) and the exact type combinations the plugin accepts. The C++ side is
generated from the same file (``plugins/fp4_gemm/gen_header.py``).

Cases handled by the rules: a type ``"x"`` means "the type of input x"; the optional trailing input
(bias) may be absent, giving a 4-input node; shape checks cover the rank of x, K = 2 * bytes per W row,
the scale shape [N, K / block], a one-element global scale, a bias of N values and K a multiple of
``rules.k_multiple``. A malformed description is a ValueError (a programming error: the file ships
with onnxq).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FP4_GEMM_FILE = "fp4_gemm_plugin.toml"
#: where the wheel carries the description files (pyproject force-include)
PACKAGED_FOLDER = "_plugins"
#: a checkout: <repo>/plugins/fp4_gemm/
CHECKOUT_FOLDER = Path(__file__).resolve().parents[2] / "plugins" / "fp4_gemm"
#: a type entry that stands for "the type of input x"
SAME_AS_X = "x"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    types: tuple[str, ...]
    shape: tuple[str | int, ...]
    constant: bool = False
    optional: bool = False
    min_rank: int | None = None
    max_rank: int | None = None


@dataclass(frozen=True)
class AttributeSpec:
    name: str
    type: str
    default: int | float | str | None = None
    allowed: tuple[int | float | str, ...] = ()
    required: bool = False


@dataclass(frozen=True)
class PluginDescription:
    name: str
    version: str
    namespace: str
    onnx_domain: str
    onnx_domain_version: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attributes: tuple[AttributeSpec, ...]
    k_multiple: int
    #: each row: the types of (inputs..., outputs...) in order, full length (with the optional input)
    type_combinations: tuple[tuple[str, ...], ...]
    source: Path

    def input_index(self, name: str) -> int:
        return next(i for i, spec in enumerate(self.inputs) if spec.name == name)

    def attribute(self, name: str) -> AttributeSpec:
        return next(a for a in self.attributes if a.name == name)

    @property
    def block_size(self) -> int:
        value = self.attribute("block_size").default
        assert isinstance(value, int)
        return value

    def x_types(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(row[0] for row in self.type_combinations))

    def onnx_attributes(self, values: dict[str, int | float | str]) -> dict[str, int | float | str]:
        """The node's attributes: ``values`` checked against the description, defaults filled in, plus
        ``plugin_version``/``plugin_namespace`` that TensorRT's ONNX parser reads."""
        attributes: dict[str, int | float | str] = {}
        for spec in self.attributes:
            value = values.get(spec.name, spec.default)
            if value is None:
                raise ValueError(f"attribute {spec.name} of {self.name} is required")
            if spec.allowed and value not in spec.allowed:
                raise ValueError(
                    f"attribute {spec.name}={value} of {self.name}: allowed {list(spec.allowed)}"
                )
            attributes[spec.name] = value
        unknown = set(values) - {a.name for a in self.attributes}
        if unknown:
            raise ValueError(f"{self.name} has no attributes {sorted(unknown)}")
        attributes["plugin_version"] = self.version
        attributes["plugin_namespace"] = self.namespace
        return attributes


def load_description(path: Path) -> PluginDescription:
    """Parse one description file (ValueError when a key is missing or malformed)."""
    with path.open("rb") as stream:
        data = tomllib.load(stream)
    try:
        return _parse(data, path)
    except (KeyError, TypeError) as error:
        raise ValueError(f"malformed plugin description {path}: {error!r}") from error


def fp4_gemm_description() -> PluginDescription:
    """The FP4 GEMM plugin's description, from the wheel or from the checkout."""
    packaged = resources.files("onnxq") / PACKAGED_FOLDER / FP4_GEMM_FILE
    if packaged.is_file():
        with resources.as_file(packaged) as path:
            return load_description(Path(path))
    return load_description(CHECKOUT_FOLDER / FP4_GEMM_FILE)


def _parse(data: dict[str, Any], path: Path) -> PluginDescription:
    plugin = data["plugin"]
    rows = tuple(tuple(row["types"]) for row in data["type_combinations"])
    description = PluginDescription(
        name=plugin["name"], version=str(plugin["version"]), namespace=plugin["namespace"],
        onnx_domain=plugin["onnx_domain"], onnx_domain_version=int(plugin["onnx_domain_version"]),
        inputs=tuple(_tensor(t) for t in data["inputs"]), outputs=tuple(_tensor(t) for t in data["outputs"]),
        attributes=tuple(_attribute(a) for a in data["attributes"]),
        k_multiple=int(data["rules"]["k_multiple"]), type_combinations=rows, source=path,
    )  # fmt: skip
    width = len(description.inputs) + len(description.outputs)
    if any(len(row) != width for row in rows):
        raise ValueError(f"{path}: every type combination must list {width} types")
    return description


def _tensor(entry: dict[str, Any]) -> TensorSpec:
    return TensorSpec(
        name=entry["name"], types=tuple(entry["types"]), shape=tuple(entry["shape"]),
        constant=bool(entry.get("constant", False)), optional=bool(entry.get("optional", False)),
        min_rank=entry.get("min_rank"), max_rank=entry.get("max_rank"),
    )  # fmt: skip


def _attribute(entry: dict[str, Any]) -> AttributeSpec:
    return AttributeSpec(
        name=entry["name"], type=entry["type"], default=entry.get("default"),
        allowed=tuple(entry.get("allowed", ())), required=bool(entry.get("required", False)),
    )  # fmt: skip


# --- rules ----------------------------------------------------------------------------------------


def type_problem(description: PluginDescription, types: Sequence[str]) -> str | None:
    """Why the node's (input types..., output type) are not a supported combination, or None.

    ``types`` lists the present inputs then the output: 4 inputs without the optional bias, 5 with it.
    """
    optional = [i for i, spec in enumerate(description.inputs) if spec.optional]
    inputs = list(types[:-1])
    if len(inputs) == len(description.inputs) - len(optional):
        for index in optional:  # an absent optional input matches whatever its row says
            inputs.insert(index, "")
    elif len(inputs) != len(description.inputs):
        return f"{description.name} takes {len(description.inputs)} inputs, got {len(inputs)}"
    wanted = (*inputs, types[-1])
    for row in description.type_combinations:
        if all(w == "" or w == r for w, r in zip(wanted, row)):
            return None
    return f"{description.name} does not support the types {list(types)}"


def output_shape(
    description: PluginDescription,
    x_shape: Sequence[int | str | None],
    w_shape: Sequence[int],
    scales_shape: Sequence[int],
    global_scale_size: int,
    bias_shape: Sequence[int] | None = None,
) -> tuple[int | str | None, ...]:
    """Y's shape ``x_shape[:-1] + [N]``; ValueError with the broken rule otherwise."""
    x_spec = description.inputs[description.input_index("x")]
    rank = len(x_shape)
    if (x_spec.min_rank is not None and rank < x_spec.min_rank) or (
        x_spec.max_rank is not None and rank > x_spec.max_rank
    ):
        raise ValueError(
            f"x has rank {rank}, {description.name} takes rank {x_spec.min_rank}..{x_spec.max_rank}"
        )
    if len(w_shape) != 2 or len(scales_shape) != 2:
        raise ValueError(f"w_packed {list(w_shape)} and scales {list(scales_shape)} must be 2-D")
    n, k = w_shape[0], 2 * w_shape[1]
    if k % description.k_multiple:
        raise ValueError(f"K = {k} is not a multiple of {description.k_multiple}")
    if isinstance(x_shape[-1], int) and x_shape[-1] != k:
        raise ValueError(f"x's last axis {x_shape[-1]} differs from K = {k} (2 x w_packed's bytes per row)")
    if tuple(scales_shape) != (n, k // description.block_size):
        raise ValueError(
            f"scales {list(scales_shape)} must be [N, K / {description.block_size}] = [{n}, {k // description.block_size}]"
        )
    if global_scale_size != 1:
        raise ValueError(f"global_scale must hold one value, it holds {global_scale_size}")
    if bias_shape is not None and tuple(bias_shape) != (n,):
        raise ValueError(f"bias {list(bias_shape)} must be [N] = [{n}]")
    return (*x_shape[:-1], n)
