"""model_io and output_check: every tensor found (subgraphs, attributes), self-contained saves, external
data checked before reading, outputs checked before renaming, stale temporary folders removed safely."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import convert_model_to_external_data

from onnxq import model_io, output_check, temporaries
from onnxq.errors import OnnxqError

SIZE = 512  # floats: 2 KB tensors, over the inline threshold


def branchy_model(seed: int = 0) -> onnx.ModelProto:
    """An If whose then-branch holds a Constant node and whose else-branch holds an initializer."""
    rng = np.random.default_rng(seed)
    const = numpy_helper.from_array(rng.standard_normal(SIZE).astype(np.float32), "c")
    weight = numpy_helper.from_array(rng.standard_normal(SIZE).astype(np.float32), "w")
    out = helper.make_tensor_value_info

    then_graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["cv"], value=const, name="const"),
            helper.make_node("Add", ["x", "cv"], ["ty"], name="add"),
        ],
        "then",
        [],
        [out("ty", TensorProto.FLOAT, [SIZE])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["ey"], name="mul")],
        "else",
        [],
        [out("ey", TensorProto.FLOAT, [SIZE])],
        initializer=[weight],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph, name="if")],
        "branchy",
        [out("x", TensorProto.FLOAT, [SIZE]), out("cond", TensorProto.BOOL, [])],
        [out("y", TensorProto.FLOAT, [SIZE])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def save_all_external(model: onnx.ModelProto, path: Path) -> Path:
    """Every tensor external, Constant attributes included (onnx.save leaves attributes inline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    convert_model_to_external_data(
        model,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=0,
        convert_attribute=True,
    )
    onnx.save_model(model, path)
    return path


def run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def branch_feeds() -> list[dict[str, np.ndarray]]:
    x = np.random.default_rng(1).standard_normal(SIZE).astype(np.float32)
    return [{"x": x, "cond": np.array(flag)} for flag in (True, False)]


def all_locations(path: Path) -> set[str]:
    proto = onnx.load(path, load_external_data=False)
    found = set()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        found.update(e.value for e in tensor.external_data if e.key == "location")
    return found


# --- every tensor ----------------------------------------------------------------------------------


def test_tensor_slots_cover_subgraph_initializers_and_attributes(tmp_path: Path) -> None:
    source = save_all_external(branchy_model(), tmp_path / "m.onnx")
    model = model_io.load_model(source)
    slots = {slot.name: type(slot.tensor) for slot in model_io.tensor_slots(model)}
    assert slots == {"w": ir.ExternalTensor, "value of node const": ir.ExternalTensor}


# --- saving: self-contained ---------------------------------------------------------------------------


def test_saved_model_references_only_its_own_data_file(tmp_path: Path) -> None:
    source = save_all_external(branchy_model(), tmp_path / "in" / "m.onnx")
    expected = [run(source, feed) for feed in branch_feeds()]
    model = model_io.load_model(source)
    output = tmp_path / "out" / "q.onnx"
    output.parent.mkdir()
    model_io.save_model(model, output)
    assert all_locations(output) == {"q.onnx.data"}
    # the model in memory still reads the input's file: the save swapped tensors back
    assert {str(t.path) for t in model_io.external_tensors(model)} == {
        str((tmp_path / "in" / "m.onnx.data").resolve())
    }
    shutil.rmtree(tmp_path / "in")
    for feed, reference in zip(branch_feeds(), expected, strict=True):
        np.testing.assert_array_equal(run(output, feed), reference)


def test_save_without_external_data_inlines_external_tensors(tmp_path: Path) -> None:
    source = save_all_external(branchy_model(), tmp_path / "in" / "m.onnx")
    output = tmp_path / "q.onnx"
    model_io.save_model(model_io.load_model(source), output, external_data=False)
    assert all_locations(output) == set() and not model_io.data_path(output).exists()
    shutil.rmtree(tmp_path / "in")
    assert run(output, branch_feeds()[0]).shape == (SIZE,)


def test_save_of_an_in_memory_model_writes_no_data_file(tmp_path: Path) -> None:
    output = tmp_path / "q.onnx"
    model_io.save_model(ir.serde.deserialize_model(branchy_model()), output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]


# --- loading: external data checked before reading ------------------------------------------------


def edit_location(path: Path, tensor: str, **fields: str) -> None:
    proto = onnx.load(path, load_external_data=False)
    for found in onnx.external_data_helper._get_all_tensors(proto):
        if found.name == tensor:
            for entry in found.external_data:
                if entry.key in fields:
                    entry.value = fields[entry.key]
    onnx.save_model(proto, path)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"location": "../outside.bin", "offset": "0"}, "leaves the model's folder"),
        ({"location": "/etc/hostname", "offset": "0"}, "absolute"),
        ({"location": "missing.bin"}, "does not exist"),
        ({"offset": "1000000"}, "truncated"),
        ({"length": "8"}, "declares 8 bytes"),
    ],
)
def test_broken_external_data_in_a_subgraph_is_refused_naming_the_tensor(
    fields: dict[str, str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "outside.bin").write_bytes(bytes(4 * SIZE))
    source = save_all_external(branchy_model(), tmp_path / "in" / "m.onnx")
    edit_location(source, "c", **fields)  # the Constant inside the then-branch

    def refuse(self: ir.ExternalTensor) -> None:
        raise AssertionError("an external tensor was read before the check")

    monkeypatch.setattr(ir.ExternalTensor, "_load", refuse)
    with pytest.raises(OnnxqError, match=expected) as raised:
        model_io.load_model(source)
    assert "'value of node const'" in str(raised.value)


def test_hard_linked_data_file_is_refused(tmp_path: Path) -> None:
    source = save_all_external(branchy_model(), tmp_path / "m.onnx")
    os.link(tmp_path / "m.onnx.data", tmp_path / "copy.data")
    with pytest.raises(OnnxqError, match="hard links"):
        model_io.load_model(source)


def test_symlinked_data_inside_the_folder_is_accepted(tmp_path: Path) -> None:
    source = save_all_external(branchy_model(), tmp_path / "m.onnx")
    (tmp_path / "m.onnx.data").rename(tmp_path / "real.data")
    (tmp_path / "m.onnx.data").symlink_to("real.data")
    assert len(list(model_io.external_tensors(model_io.load_model(source)))) == 2


# --- the output check ------------------------------------------------------------------------------


def graph_model(text: str, opset: int = 17, domains: dict[str, int] | None = None) -> ir.Model:
    imports = ", ".join(f'"{d}" : {v}' for d, v in {"": opset, **(domains or {})}.items())
    return ir.serde.deserialize_model(
        onnx.parser.parse_model(f"<ir_version: 10, opset_import: [{imports}]>\n{text}")
    )


def test_model_ort_cannot_load_is_refused_and_nothing_left(tmp_path: Path) -> None:
    # valid ONNX (Relu takes int16 from opset 14) that ONNX Runtime's CPU build has no kernel for
    model = graph_model("g (int16[2] x) => (int16[2] y) { y = Relu(x) }")
    with pytest.raises(OnnxqError, match="failed to load in ONNX Runtime") as raised:
        model_io.save_model(model, tmp_path / "q.onnx")
    assert "--debug" in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_model_the_checker_rejects_is_refused_and_nothing_left(tmp_path: Path) -> None:
    model = graph_model("g (float[2] x) => (float[2] y) { y = Add(x, x) }")
    model.graph.append(ir.node("NoSuchOp", [model.graph.outputs[0]], name="broken"))
    with pytest.raises(OnnxqError, match="failed the ONNX checker"):
        model_io.save_model(model, tmp_path / "q.onnx")
    assert list(tmp_path.iterdir()) == []


class SessionSpy:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.levels: list[Any] = []
        real = ort.InferenceSession

        def spy(path: str, options: ort.SessionOptions, **kwargs: Any) -> ort.InferenceSession:
            self.levels.append(options.graph_optimization_level)
            return real(path, options, **kwargs)

        monkeypatch.setattr(ort, "InferenceSession", spy)


def test_fp8_outputs_load_at_basic_level_others_at_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = SessionSpy(monkeypatch)
    fp8 = graph_model(
        "g (float[4] x) => (float[4] y) <float s = {0.5}, float8e4m3fn z = {0}> "
        "{ q = QuantizeLinear(x, s, z)\n y = DequantizeLinear(q, s, z) }",
        opset=19,
    )
    model_io.save_model(fp8, tmp_path / "fp8.onnx")
    model_io.save_model(graph_model("g (float[2] x) => (float[2] y) { y = Add(x, x) }"), tmp_path / "f.onnx")
    assert spy.levels == [
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ]


def test_custom_domain_and_fp4_models_skip_the_ort_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = SessionSpy(monkeypatch)
    custom = graph_model(
        "g (float[2] x) => (float[2] y) { y = com.example.Fancy(x) }", domains={"com.example": 1}
    )
    fp4 = graph_model(
        "g (float[4] x) => (float[4] y) <float s = {0.5}, float4e2m1 z = {0}> "
        "{ q = QuantizeLinear(x, s, z)\n y = DequantizeLinear(q, s, z) }",
        opset=23,
    )
    for name, model in (("custom.onnx", custom), ("fp4.onnx", fp4)):
        model_io.save_model(model, tmp_path / name)
        assert (tmp_path / name).exists()
    assert spy.levels == []
    assert output_check._why_ort_cannot_run(custom, ["lib.so"]) is None  # a library may provide it


# --- stale temporary folders -------------------------------------------------------------------------


def dead_pid() -> int:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    return finished.pid


def temporary_with(folder: Path, name: str, marker: dict[str, Any] | None) -> Path:
    path = folder / name
    path.mkdir()
    (path / "q.onnx").write_bytes(b"partial")
    if marker is not None:
        (path / temporaries.OWNER_MARKER).write_text(json.dumps(marker))
    return path


def test_only_temporaries_of_dead_onnxq_runs_are_removed(tmp_path: Path) -> None:
    me = temporaries._owner()
    folders = {
        "dead": temporary_with(tmp_path, ".q.onnx.dead0000.tmp", {**me, "pid": dead_pid(), "start": None}),
        "pid reused": temporary_with(tmp_path, ".q.onnx.reuse000.tmp", {**me, "start": "1"}),
        "other boot": temporary_with(tmp_path, ".q.onnx.boot0000.tmp", {**me, "boot": "another-boot"}),
        "live": temporary_with(tmp_path, ".q.onnx.live0000.tmp", me),
        "no marker": temporary_with(tmp_path, ".q.onnx.nomark00.tmp", None),
        "other host": temporary_with(
            tmp_path, ".q.onnx.host0000.tmp", {**me, "pid": dead_pid(), "host": socket.gethostname() + "-x"}
        ),
        "other pid namespace": temporary_with(
            tmp_path, ".q.onnx.pidns000.tmp", {**me, "pid": dead_pid(), "pid_namespace": "pid:[1]"}
        ),
        "bad pid": temporary_with(tmp_path, ".q.onnx.badpid00.tmp", {**me, "pid": -1}),
        "other name": temporary_with(tmp_path, "q.onnx.dead0000.tmp", {**me, "pid": dead_pid()}),
    }
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = temporary_with(elsewhere, ".q.onnx.targ0000.tmp", {**me, "pid": dead_pid()})
    (tmp_path / ".q.onnx.link0000.tmp").symlink_to(target)  # a symlink is never followed
    removed = temporaries.remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([folders["dead"], folders["pid reused"], folders["other boot"]])
    survivors = {key for key, path in folders.items() if path.exists()}
    assert survivors == {"live", "no marker", "other host", "other pid namespace", "bad pid", "other name"}
    assert target.exists()


def test_save_removes_stale_temporaries_and_leaves_none_of_its_own(tmp_path: Path) -> None:
    stale = temporary_with(tmp_path, ".other.onnx.dead0000.tmp", {**temporaries._owner(), "pid": dead_pid()})
    model_io.save_model(graph_model("g (float[2] x) => (float[2] y) { y = Add(x, x) }"), tmp_path / "q.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]
    assert not stale.exists()


def test_a_full_disk_is_one_error_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ir, "save", no_space)
    with pytest.raises(OnnxqError, match="No space left"):
        model_io.save_model(
            graph_model("g (float[2] x) => (float[2] y) { y = Add(x, x) }"), tmp_path / "q.onnx"
        )
    assert list(tmp_path.iterdir()) == []
