"""The one place where onnxq touches protobuf: loading, saving and handing models to ONNX Runtime.

Everything else works on ``onnx_ir`` models. Weights stored as external data stay on disk as lazy
``ir.ExternalTensor`` objects; a model is never serialized as one protobuf over 2 GB: large models are
written with external data and handed to ONNX Runtime as a small proto that points at the weight files.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google.protobuf.message
import onnx
import onnx.checker
import onnx.version_converter
import onnx_ir as ir

from onnxq.errors import OnnxqError

logger = logging.getLogger(__name__)

#: Output IR version: ONNX Runtime 1.2x GPU builds load at most IR 10/13; onnx 1.23 would stamp 14.
DEFAULT_IR_VERSION = 10
#: Protobuf refuses messages over 2 GiB; leave headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 1536 * 1024 * 1024
#: Tensors smaller than this stay inside the .onnx file when external data is used.
EXTERNAL_TENSOR_MIN_BYTES = 1024

ModelSource = Any  # str | os.PathLike | onnx.ModelProto | ir.Model | onnx_graphsurgeon.Graph


def load_model(source: ModelSource) -> ir.Model:
    """Return an ``ir.Model`` the caller may modify without touching the user's object or file."""
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source))
    if isinstance(source, onnx.ModelProto):
        return ir.serde.deserialize_model(source)
    if isinstance(source, ir.Model):
        return clone_model(source)
    if type(source).__name__ == "Graph" and hasattr(source, "nodes") and hasattr(source, "tensors"):
        import onnx_graphsurgeon as gs

        return ir.serde.deserialize_model(gs.export_onnx(source))
    raise OnnxqError(
        f"cannot load a model from a {type(source).__name__}",
        "pass a path to a .onnx file, an onnx.ModelProto, an onnx_ir.Model or an onnx_graphsurgeon.Graph",
    )


def clone_model(model: ir.Model) -> ir.Model:
    """An independent copy of the graph (a proto round trip); external weights stay on disk, by reference."""
    return _from_proto(ir.serde.serialize_model(model), external_folder(model))


def convert_opset(model: ir.Model, target: int) -> ir.Model:
    """``onnx.version_converter`` on a proto whose external weights stay references on disk."""
    converted = onnx.version_converter.convert_version(ir.serde.serialize_model(model), target)
    return _from_proto(converted, external_folder(model))


def _from_proto(proto: onnx.ModelProto, folder: str | None) -> ir.Model:
    """Deserialize; external weights are resolved against ``folder`` (a proto does not carry it)."""
    model = ir.serde.deserialize_model(proto)
    if folder:
        ir.external_data.set_base_dir(model.graph, folder)
    return model


def external_folder(model: ir.Model) -> str | None:
    """The folder of the model's external weight files, None when all weights are in memory."""
    folders = {str(t.base_dir) for t in external_tensors(model)}
    if len(folders) > 1:
        raise OnnxqError("the model's external data lives in several folders", "save the model once first")
    return folders.pop() if folders else None


def _load_path(path: Path) -> ir.Model:
    if not path.exists():
        raise OnnxqError(f"model file {path} does not exist", "check the path")
    if path.is_dir():
        raise OnnxqError(f"model path {path} is a directory", "pass the .onnx file inside it")
    try:
        model = ir.load(path.resolve())
    except (google.protobuf.message.DecodeError, RuntimeError, ValueError) as error:
        raise OnnxqError(
            f"{path} is not a valid ONNX model ({type(error).__name__})",
            "pass a .onnx file exported by an ONNX exporter",
        ) from error
    if not model.graph.outputs and not len(model.graph):
        raise OnnxqError(f"{path} holds no ONNX graph (empty or not an ONNX file)", "pass a .onnx model")
    _check_external_data(model, path)
    return model


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Fail early, naming the file, when an external-data weight file is missing."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and not os.path.exists(tensor.path):
            raise OnnxqError(
                f"{path} stores weight {value.name} in {tensor.location}, which does not exist",
                "keep the external data file next to the model",
            )


def external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            yield value.const_value


def initializer_bytes(model: ir.Model) -> int:
    """Total size of the weights, read from their metadata (no data is loaded)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def needs_external_data(model: ir.Model) -> bool:
    return initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES


def session_model(model: ir.Model) -> tuple[bytes, str | None]:
    """Serialize for ``onnxruntime.InferenceSession``: proto bytes and the folder holding external data.

    External tensors stay references to their files (the folder goes into the session options), so
    this works for models over 2 GB without copying weights.
    """
    return ir.serde.serialize_model(model).SerializeToString(), external_folder(model)


def save_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Write atomically: everything goes to a temporary folder beside ``path`` and is renamed into place.

    ``external_data`` None decides from the weight size. No partial file survives a failure.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    check_output_folder(folder)
    use_external = needs_external_data(model) if external_data is None else external_data
    data_name = path.name + ".data" if use_external else None
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
    try:
        ir.save(
            model,
            temporary / path.name,
            external_data=data_name,
            size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES,
        )
        if data_name:
            os.replace(temporary / data_name, folder / data_name)
        os.replace(temporary / path.name, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def check_output_folder(folder: Path) -> None:
    """Fail before any work when the output cannot be written."""
    if not folder.is_dir():
        raise OnnxqError(f"output directory {folder} does not exist", "create it or choose another -o path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OnnxqError(f"output directory {folder} is not writable", "choose another -o path")


def check_model(path: str | os.PathLike) -> None:
    """``onnx.checker`` with full shape checking, by path so that >2 GB models are checked too."""
    onnx.checker.check_model(str(path), full_check=True)


def model_file_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a saved model, its external data file included."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def to_model_proto(model: ir.Model) -> onnx.ModelProto:
    """For callers of the Python API who want protobuf (small models only)."""
    return ir.serde.serialize_model(model)
