"""The one place where onnxq touches protobuf: loading, saving and handing models to ONNX Runtime.

Everything else works on ``onnx_ir`` models. Weights stored as external data stay on disk as lazy
``ir.ExternalTensor`` objects; a model is never serialized as one protobuf over 2 GB: large models are
written with external data and handed to ONNX Runtime as a small proto that points at the weight files.

Safety rules for files (the input is never modified, nothing outside the model's folder is read):

- every external tensor (initializers of the graph and of every subgraph, tensor attributes anywhere)
  is checked when a model is loaded, before any weight is read: its location must stay inside the
  model's folder (symlinks resolved), and its file must exist, be no hard link and hold its bytes;
- an output references only files written next to it under its own name (``<output>.data``);
- an output path, or its data file, that is the input or a file the input references is refused;
- an output is written into a temporary folder beside it, checked (``onnxq.output_check``), then
  renamed into place; temporary folders left by a killed run are removed by the next one once their
  marker proves that the run which made them is dead.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google.protobuf.message
import onnx
import onnx.checker
import onnx.version_converter
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.graph.walk import all_nodes
from onnxq.temporaries import make_temporary, remove_stale_temporaries

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
        model = ir.serde.deserialize_model(source)
    elif isinstance(source, ir.Model):
        model = clone_model(source)
    elif type(source).__name__ == "Graph" and hasattr(source, "nodes") and hasattr(source, "tensors"):
        import onnx_graphsurgeon as gs

        model = ir.serde.deserialize_model(gs.export_onnx(source))
    else:
        raise OnnxqError(
            f"cannot load a model from a {type(source).__name__}",
            "pass a path to a .onnx file, an onnx.ModelProto, an onnx_ir.Model or an onnx_graphsurgeon.Graph",
        )
    check_external_data(model, f"the {type(source).__name__}")
    return model


def clone_model(model: ir.Model) -> ir.Model:
    """An independent copy of the graph (a proto round trip); external weights stay on disk, by reference."""
    return _from_proto(ir.serde.serialize_model(model), external_folder(model))


#: float initializers at least this big are left out of the proto the version converter sees
DETACH_BYTES = 1024
_DETACHED_LOCATION = "__onnxq_detached_weight__"


def convert_opset(model: ir.Model, target: int) -> ir.Model:
    """``onnx.version_converter`` on a proto without the weights: external weights stay references on
    disk, and float weights held in memory are swapped for placeholders (the converter reads shapes,
    axes and other integer constants, never float weights), then put back by name. Converting a 471 MB
    embedded model went from 3.7 GB peak RSS and 14 s to about the model's size."""
    detached = _detach_weights(model)
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        _reattach(model, detached)
    converted = _from_proto(onnx.version_converter.convert_version(proto, target), external_folder(model))
    _reattach(converted, detached)
    return converted


#: integer types the version converter may read as values (shapes, axes, pads, indices): kept in the proto
_READ_BY_CONVERTER = frozenset({ir.DataType.INT64, ir.DataType.INT32})


def _detach_weights(model: ir.Model) -> dict[str, ir.TensorProtocol]:
    """Main-graph initializers of at least DETACH_BYTES held in memory, replaced by placeholders: float
    weights and quantized ones (INT8/UINT8/FP8/INT4 codes of a quantized model being upgraded for its
    FP16 rest); int64/int32 tensors stay, the converter may read them."""
    detached: dict[str, ir.TensorProtocol] = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.dtype in _READ_BY_CONVERTER:
            continue
        if tensor.nbytes < DETACH_BYTES:
            continue
        detached[name] = tensor
        value.const_value = ir.ExternalTensor(
            _DETACHED_LOCATION,
            0,
            tensor.nbytes,
            tensor.dtype,
            shape=ir.Shape(tensor.shape.numpy()),
            name=name,
        )
    return detached


def _reattach(model: ir.Model, detached: dict[str, ir.TensorProtocol]) -> None:
    for name, tensor in detached.items():
        value = model.graph.initializers.get(name)
        if value is not None:
            value.const_value = tensor


def _from_proto(proto: onnx.ModelProto, folder: str | None) -> ir.Model:
    """Deserialize; external weights are resolved against ``folder`` (a proto does not carry it)."""
    model = ir.serde.deserialize_model(proto)
    if folder:
        ir.external_data.set_base_dir(model.graph, folder)
        for function in model.functions.values():
            for slot in _function_slots(function):
                if isinstance(slot.tensor, ir.ExternalTensor):
                    slot.tensor.base_dir = folder
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
    _check_text_fields(model, path)
    check_external_data(model, str(path))
    return model


def _check_text_fields(model: ir.Model, path: Path) -> None:
    """Protobuf hands back bytes, not text, for a name that is not valid UTF-8 (a corrupt file)."""
    for node in all_nodes(model):
        fields = {"op type": node.op_type, "domain": node.domain, "name": node.name}
        fields.update({f"input {i}": v.name for i, v in enumerate(node.inputs) if v is not None})
        fields.update({f"output {i}": v.name for i, v in enumerate(node.outputs)})
        for field_name, text in fields.items():
            if text is not None and not isinstance(text, str):
                raise OnnxqError(
                    f"{path} is corrupt: a node's {field_name} is not UTF-8 text ({text!r})",
                    "re-export the model or restore the file from its source",
                )


# --- every tensor of a model --------------------------------------------------------------------


@dataclass
class TensorSlot:
    """One place in a model that holds a tensor, and how to put another tensor there."""

    name: str
    tensor: ir.TensorProtocol
    replace: Callable[[ir.TensorProtocol], None]


def tensor_slots(model: ir.Model) -> Iterator[TensorSlot]:
    """Every tensor of the model, in a fixed order.

    Cases: initializers of the main graph and of every subgraph (If/Loop/Scan bodies, at any depth);
    tensor and tensor-list attributes of every node (Constant nodes), in graphs, subgraphs and
    local functions.
    """
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield TensorSlot(value.name or "", value.const_value, _initializer_setter(value))
    yield from _attribute_slots(model.graph)
    for function in model.functions.values():
        yield from _function_slots(function)


def _function_slots(function: ir.Function) -> Iterator[TensorSlot]:
    for graph in function.subgraphs():  # functions hold no initializers, their subgraphs may
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield TensorSlot(value.name or "", value.const_value, _initializer_setter(value))
    yield from _attribute_slots(function)


def _initializer_setter(value: ir.Value) -> Callable[[ir.TensorProtocol], None]:
    def replace(tensor: ir.TensorProtocol) -> None:
        value.const_value = tensor

    return replace


def _attribute_slots(graph_like: ir.Graph | ir.Function) -> Iterator[TensorSlot]:
    for node in ir.traversal.RecursiveGraphIterator(graph_like):
        for key, attribute in list(node.attributes.items()):
            if attribute.is_ref() or attribute.value is None:
                continue
            label = f"{key} of node {node.name or node.op_type}"
            if attribute.type == ir.AttributeType.TENSOR:
                yield TensorSlot(label, attribute.value, _attribute_setter(node, key, None))
            elif attribute.type == ir.AttributeType.TENSORS:
                items = list(attribute.value)
                for index, tensor in enumerate(items):
                    yield TensorSlot(
                        f"{label}[{index}]", tensor, _attribute_setter(node, key, (items, index))
                    )


def _attribute_setter(
    node: ir.Node, key: str, element: tuple[list[ir.TensorProtocol], int] | None
) -> Callable[[ir.TensorProtocol], None]:
    doc = node.attributes[key].doc_string

    def replace(tensor: ir.TensorProtocol) -> None:
        if element is None:
            node.attributes[key] = ir.AttrTensor(key, tensor, doc_string=doc)
            return
        items, index = element
        items[index] = tensor
        node.attributes[key] = ir.AttrTensors(key, list(items), doc_string=doc)

    return replace


def external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    for slot in tensor_slots(model):
        if isinstance(slot.tensor, ir.ExternalTensor):
            yield slot.tensor


def initializer_bytes(model: ir.Model) -> int:
    """Total size of the weights, read from their metadata (no data is loaded)."""
    return sum(slot.tensor.nbytes for slot in tensor_slots(model))


def needs_external_data(model: ir.Model) -> bool:
    return initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES


# --- external data: where it may live, whether it is whole ---------------------------------------


def check_external_data(model: ir.Model, label: str) -> None:
    """Refuse, naming the tensor, any external tensor that is unsafe or broken. Reads no weight.

    Cases: an absolute location; a location that leaves the model's folder (``..``, or a symlink
    resolving outside it); a missing or unreadable file; a hard-linked file (onnx_ir refuses to read
    those); a declared length that differs from the tensor's size; a file too short for offset +
    length. A tensor without a folder (built in memory by the caller) is only checked for its file.
    """
    files: dict[str, os.stat_result] = {}  # one stat per file, however many tensors it holds
    for slot in tensor_slots(model):
        tensor = slot.tensor
        if isinstance(tensor, ir.ExternalTensor):
            what = f"{label}: tensor {slot.name!r}"
            try:
                _check_external_tensor(tensor, what, files)
            except (OSError, ValueError) as error:  # a NUL in the location, a file we may not read
                raise OnnxqError(
                    f"{what}: cannot read external data location {tensor.location!r}: {error}",
                    "re-export the model",
                ) from error


def _check_external_tensor(tensor: ir.ExternalTensor, what: str, files: dict[str, os.stat_result]) -> None:
    location = str(tensor.location)
    fix = "re-export the model so that its data files sit in its folder, complete"
    if tensor.base_dir:
        if os.path.isabs(location):
            raise OnnxqError(f"{what} points at an absolute external data location {location!r}", fix)
        folder = os.path.realpath(tensor.base_dir)
        target = os.path.realpath(os.path.join(tensor.base_dir, location))
        if os.path.commonpath([folder, target]) != folder:
            raise OnnxqError(f"{what}: external data location {location!r} leaves the model's folder", fix)
    path = tensor.path
    if path not in files:
        if not os.path.isfile(path):
            raise OnnxqError(
                f"{what} is stored in {location}, which does not exist", "keep it next to the model"
            )
        files[path] = os.stat(path)
    stat = files[path]
    if stat.st_nlink > 1:
        raise OnnxqError(
            f"{what} is stored in {location}, a file with {stat.st_nlink} hard links (onnx_ir refuses them)",
            "replace the hard link with a copy of the file",
        )
    offset = tensor.offset or 0
    if tensor.length is not None and tensor.length != tensor.nbytes:
        raise OnnxqError(
            f"{what} declares {tensor.length} bytes in {location} but its shape needs {tensor.nbytes}", fix
        )
    if offset + tensor.nbytes > stat.st_size:
        raise OnnxqError(
            f"{what} needs bytes {offset}..{offset + tensor.nbytes} of {location}, which holds only "
            f"{stat.st_size} (truncated file)",
            fix,
        )


def referenced_files(source: ModelSource) -> set[Path]:
    """Every file a model reads: the model file itself and its external data files (resolved).

    A path that is not a loadable model references only itself (loading will report it).
    """
    files: set[Path] = set()
    if isinstance(source, (str, os.PathLike)):
        files.add(Path(source).resolve())
        try:
            model = ir.load(Path(source).resolve())
        except Exception:  # loading reports it, with the right message
            return files
    elif isinstance(source, onnx.ModelProto):
        model = ir.serde.deserialize_model(source)
    elif isinstance(source, ir.Model):
        model = source
    else:
        return files
    files.update(Path(t.path).resolve() for t in external_tensors(model))
    return files


def session_model(model: ir.Model) -> tuple[bytes, str | None]:
    """Serialize for ``onnxruntime.InferenceSession``: proto bytes and the folder holding external data.

    External tensors stay references to their files (the folder goes into the session options), so
    this works for models over 2 GB without copying weights.
    """
    return ir.serde.serialize_model(model).SerializeToString(), external_folder(model)


# --- output paths ---------------------------------------------------------------------------------


def data_path(path: str | os.PathLike) -> Path:
    """The external data file of an output: ``<output>.data`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def output_folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def check_output_path(source: ModelSource, output: Path) -> None:
    """Fail before any work when ``output`` cannot be written or would destroy part of the input.

    Cases: the output or its data file is a directory; its folder is missing, not a folder or not
    writable; the output or ``<output>.data`` is (symlinks and hard links resolved) the input model
    or a file the input references. Only existing files can be overwritten, so the input is parsed
    for its references only when one of the two exists.
    """
    _refuse_directories(output)
    check_output_folder(output_folder(output))
    existing = [c for c in (output, data_path(output)) if c.exists()]
    if not existing:
        return
    model_file = Path(source).resolve() if isinstance(source, (str, os.PathLike)) else None
    for protected in sorted(referenced_files(source)):
        for candidate in existing:
            if not _same_file(candidate, protected):
                continue
            what = "output path" if candidate == output else "the output's data file"
            if protected == model_file:
                raise OnnxqError(
                    f"{what} {candidate} is the input model",
                    "choose another -o path; the input is never overwritten",
                )
            raise OnnxqError(
                f"{what} {candidate} is {protected}, a file the input model references",
                "choose another -o path; the input is never overwritten",
            )


def _refuse_directories(output: Path) -> None:
    for candidate in (output, data_path(output)):
        if candidate.is_dir():
            raise OnnxqError(
                f"output path {candidate} is a directory", f"pass a file path, e.g. {output / 'model.onnx'}"
            )


def _same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except (OSError, ValueError):
        return first.resolve() == second.resolve()


def check_output_folder(folder: Path) -> None:
    """Fail before any work when the output cannot be written."""
    if folder.exists() and not folder.is_dir():
        raise OnnxqError(f"output directory {folder} is not a directory", "choose another -o path")
    if not folder.is_dir():
        raise OnnxqError(f"output directory {folder} does not exist", "create it or choose another -o path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OnnxqError(f"output directory {folder} is not writable", "choose another -o path")


# --- saving ---------------------------------------------------------------------------------------


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    check: bool = True,
    custom_ops: Sequence[str] = (),
) -> None:
    """Write atomically: everything goes to a temporary folder beside ``path``, is checked, then renamed.

    ``external_data`` None decides: external data when the weights are large or when any tensor is
    still external (the input was saved so). The output references no file but ``<path>.data``:
    external tensors are rewritten there (or inline when ``external_data`` is False). ``check``
    runs the ONNX checker and an ONNX Runtime load on the written files (``onnxq.output_check``),
    registering ``custom_ops`` libraries. No partial file survives a failure.
    """
    path = Path(path)
    folder = output_folder(path)
    _refuse_directories(path)
    check_output_folder(folder)
    remove_stale_temporaries(folder)
    if external_data is None:
        external_data = needs_external_data(model) or any(True for _ in external_tensors(model))
    temporary = make_temporary(folder, path.name)
    try:
        try:
            data_name = _write(model, temporary / path.name, data_path(path).name if external_data else None)
        except OSError as error:
            raise OnnxqError(f"cannot write {path}: {error.strerror or error}", "check free space") from error
        if check:
            from onnxq.output_check import check_output

            check_output(temporary / path.name, model, custom_ops)
        try:
            if data_name:
                os.replace(temporary / data_name, folder / data_name)
            os.replace(temporary / path.name, path)
        except OSError as error:
            raise OnnxqError(
                f"cannot write {path}: {error.strerror or error}", "choose another -o path"
            ) from error
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _write(model: ir.Model, path: Path, data_name: str | None) -> str | None:
    """Serialize to ``path``; return the data file's name when one was written beside it.

    With ``data_name`` every tensor over the size threshold goes into that file (read one at a time,
    memory-mapped when external), smaller external ones inline; without it every external tensor
    inline. The model is left as it was: tensors are swapped for the write and put back.
    """
    slots = list(tensor_slots(model))
    originals = [slot.tensor for slot in slots]
    large = [] if data_name is None else [s for s in slots if s.tensor.nbytes > EXTERNAL_TENSOR_MIN_BYTES]
    going_external = {id(s) for s in large}
    inline = [s for s in slots if isinstance(s.tensor, ir.ExternalTensor) and id(s) not in going_external]
    try:
        if large:
            written = ir.external_data.convert_tensors_to_external(
                [s.tensor for s in large], path.parent, data_name or ""
            )
            for slot, tensor in zip(large, written, strict=True):
                slot.replace(tensor)
        for slot in inline:
            array = slot.tensor.numpy().copy()  # a copy: the mapped file is released
            slot.replace(ir.Tensor(array, name=slot.tensor.name, dtype=slot.tensor.dtype))
        ir.save(model, path)
    finally:
        for slot, original in zip(slots, originals, strict=True):
            slot.replace(original)
    return data_name if large else None


def model_file_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a saved model and of every external data file it references (once each)."""
    return sum(file.stat().st_size for file in referenced_files(path) if file.is_file())


def check_model(path: str | os.PathLike) -> None:
    """``onnx.checker`` with full shape checking, by path so that >2 GB models are checked too."""
    onnx.checker.check_model(str(path), full_check=True)


def to_model_proto(model: ir.Model) -> onnx.ModelProto:
    """For callers of the Python API who want protobuf (small models only)."""
    return ir.serde.serialize_model(model)
