"""The FP4 GEMM plugin's description file against the Python rules and the generated C++ header.

Checked: the reader's fields (names, inputs, attributes, type rows), the attributes written on a node,
type_problem (every row accepted, with and without the optional bias; other types refused),
output_shape (dynamic leading dimensions; each broken rule refused), that gen_header.py turns the same
file into the constants the C++ plugin uses, that the C++ sources take names only from that header,
and that a malformed description is refused.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from onnxq.plugins.description import (
    CHECKOUT_FOLDER,
    FP4_GEMM_FILE,
    fp4_gemm_description,
    load_description,
    output_shape,
    type_problem,
)

PLUGIN_FOLDER = CHECKOUT_FOLDER
CPP_SOURCES = ("fp4_gemm_plugin.cpp", "fp4_gemm_plugin.h")


def generated_header(tmp_path: Path) -> str:
    header = tmp_path / "fp4_gemm_description.h"
    subprocess.run(
        [
            sys.executable,
            str(PLUGIN_FOLDER / "gen_header.py"),
            str(PLUGIN_FOLDER / FP4_GEMM_FILE),
            str(header),
        ],
        check=True,
    )
    return header.read_text()


def header_constant(text: str, name: str) -> str:
    match = re.search(rf"constexpr \S+(?: const\*)? {name} = (\"[^\"]*\"|-?\d+);", text)
    assert match, f"{name} missing from the generated header"
    return match.group(1).strip('"')


def test_reader_fields() -> None:
    description = fp4_gemm_description()
    assert [spec.name for spec in description.inputs] == ["x", "w_packed", "scales", "global_scale", "bias"]
    assert [spec.name for spec in description.inputs if spec.optional] == ["bias"]
    assert description.block_size == 16 and description.k_multiple % description.block_size == 0
    assert set(description.x_types()) == {"float16", "bfloat16"}


def test_node_attributes_carry_parser_fields() -> None:
    description = fp4_gemm_description()
    attributes = description.onnx_attributes({"k": 64, "n": 8})
    assert attributes["plugin_version"] == description.version
    assert attributes["plugin_namespace"] == description.namespace
    assert attributes["block_size"] == description.block_size
    with pytest.raises(ValueError):
        description.onnx_attributes({"k": 64})  # n is required
    with pytest.raises(ValueError):
        description.onnx_attributes({"k": 64, "n": 8, "block_size": 32})
    with pytest.raises(ValueError):
        description.onnx_attributes({"k": 64, "n": 8, "alpha": 1})


def test_every_type_row_is_accepted_with_and_without_bias() -> None:
    description = fp4_gemm_description()
    bias = description.input_index("bias")
    for row in description.type_combinations:
        assert type_problem(description, list(row)) is None
        without_bias = [t for i, t in enumerate(row) if i != bias]
        assert type_problem(description, without_bias) is None


@pytest.mark.parametrize(
    "types",
    [
        ["float", "uint8", "float8e4m3fn", "float", "float"],  # float32 activations
        ["float16", "uint8", "float8e4m3fn", "float", "bfloat16"],  # output differs from x
        ["float16", "float4e2m1", "float8e4m3fn", "float", "float16"],  # unpacked weights
        ["float16", "uint8", "float8e4m3fn", "float16"],  # too few inputs
    ],
)
def test_other_types_are_refused(types: list[str]) -> None:
    assert type_problem(fp4_gemm_description(), types) is not None


def test_output_shape_keeps_dynamic_leading_dimensions() -> None:
    description = fp4_gemm_description()
    assert output_shape(description, ["batch", "seq", 64], [24, 32], [24, 4], 1) == ("batch", "seq", 24)
    assert output_shape(description, [5, 64], [24, 32], [24, 4], 1, [24]) == (5, 24)


@pytest.mark.parametrize(
    ("x", "w", "s", "g", "bias"),
    [
        ([64], [24, 32], [24, 4], 1, None),  # rank 1
        ([1, 2, 3, 4, 64], [24, 32], [24, 4], 1, None),  # rank 5
        ([5, 48], [24, 32], [24, 4], 1, None),  # K mismatch
        ([5, 40], [24, 20], [24, 2], 1, None),  # K = 40 not a multiple of 16
        ([5, 64], [24, 32], [24, 2], 1, None),  # scales [N, K/32]
        ([5, 64], [24, 32], [24, 4], 2, None),  # two global scales
        ([5, 64], [24, 32], [24, 4], 1, [12]),  # bias of the wrong length
    ],
)
def test_output_shape_refuses_broken_rules(x: list, w: list, s: list, g: int, bias: list | None) -> None:
    with pytest.raises(ValueError):
        output_shape(fp4_gemm_description(), x, w, s, g, bias)


def test_generated_header_matches_the_description(tmp_path: Path) -> None:
    description = fp4_gemm_description()
    text = generated_header(tmp_path)
    assert header_constant(text, "kPluginName") == description.name
    assert header_constant(text, "kPluginVersion") == description.version
    assert header_constant(text, "kPluginNamespace") == description.namespace
    assert header_constant(text, "kOnnxDomain") == description.onnx_domain
    assert int(header_constant(text, "kNbInputs")) == len(description.inputs)
    assert int(header_constant(text, "kNbRequiredInputs")) == sum(not s.optional for s in description.inputs)
    assert int(header_constant(text, "kKMultiple")) == description.k_multiple
    assert int(header_constant(text, "kDefaultBlockSize")) == description.block_size
    for index, spec in enumerate(description.inputs):
        camel = "".join(part.capitalize() for part in spec.name.split("_"))
        assert int(header_constant(text, f"kInput{camel}")) == index
    for attribute in description.attributes:
        camel = "".join(part.capitalize() for part in attribute.name.split("_"))
        assert header_constant(text, f"kAttr{camel}") == attribute.name
    assert int(header_constant(text, "kNbTypeCombinations")) == len(description.type_combinations)
    rows = re.findall(r"\{(TypeName::[^}]*)\}", text)
    assert len(rows) == len(description.type_combinations)
    for row, types in zip(rows, description.type_combinations):
        assert len(row.split(",")) == len(types)


def test_cpp_sources_take_names_from_the_header() -> None:
    description = fp4_gemm_description()
    literals = [f'"{description.name}"', f'"{description.onnx_domain}"']
    literals += [f'"{attribute.name}"' for attribute in description.attributes]
    for source in CPP_SOURCES:
        text = (PLUGIN_FOLDER / source).read_text()
        for literal in literals:
            assert literal not in text, f"{source} restates {literal}: use fp4_gemm_description.h"


def test_malformed_description_is_refused(tmp_path: Path) -> None:
    source = (PLUGIN_FOLDER / FP4_GEMM_FILE).read_text()
    broken = tmp_path / "broken.toml"
    broken.write_text(
        source.replace(
            'types = ["float16", "uint8", "float8e4m3fn", "float", "float16", "float16"]',
            'types = ["float16"]',
        )
    )
    with pytest.raises(ValueError):
        load_description(broken)
    missing = tmp_path / "missing.toml"
    missing.write_text(source.replace("[plugin]", "[plugin_renamed]"))
    with pytest.raises(ValueError):
        load_description(missing)
