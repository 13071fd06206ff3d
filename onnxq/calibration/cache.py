"""Calibration cache: the ranges of one calibration run, reused while model, data and settings match.

Calibrating a large model takes minutes; the cache lets a re-run (another format, another placement
rule set) skip it. The cache is keyed by everything the ranges depend on, so a stale cache is refused
rather than silently reused.

File format (UTF-8 JSON, keys sorted, two-space indent, meant to be read and diffed by people)::

    {
      "format": "onnxq-calibration-cache",    # identifies the file
      "version": 1,                           # bumped on incompatible changes
      "model_sha256": "…",                    # model_hash() of the model that was calibrated
      "data_sha256": "…",                     # CalibrationData.fingerprint() of the samples
      "method": "entropy",                    # calibration method name
      "options": {"percentile": 99.99, …},   # method/calibrator options that change the ranges
      "tensors": {
        "conv1_out": {"low": -3.25, "high": 7.5, …},   # chosen range, plus any observed statistics
        …
      }
    }

Floats are written by ``json`` with ``repr``, the shortest text that parses back to the same
float64, so ranges round-trip bit-exactly (float32 values too: float32 -> float64 is exact). JSON has
no NaN/Infinity, so non-finite floats are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``.
The file is written atomically (temporary file in the same directory, then ``os.replace``), so an
interrupted run never leaves a truncated cache behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.calibration.overrides import range_problem
from onnxq.errors import OnnxqError

logger = logging.getLogger(__name__)

CACHE_FORMAT = "onnxq-calibration-cache"
CACHE_VERSION = 1
#: hex digits of a sha256 shown in messages: enough to tell two hashes apart at a glance
_SHORT_HASH_DIGITS = 12
_NON_FINITE_NAMES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_RANGE_KEYS = ("low", "high")
_CACHE_FILE_MODE = 0o644
_UNSET = "<unset>"
_DELETE_FIX = "delete it or pass another --calib-cache path"
#: bumped whenever the byte stream hashed by ``model_hash`` changes
_MODEL_HASH_TAG = "onnxq-model-hash/1"

Ranges = dict[str, tuple[float, float]]


# ----------------------------------------------------------------------------------------------
# JSON encoding


def _encode_float(value: float) -> float | str:
    """Finite floats stay numbers (json writes them with repr); others become strings JSON allows."""
    number = float(value)
    if math.isfinite(number):
        return number
    return "nan" if math.isnan(number) else ("inf" if number > 0 else "-inf")


def _decode_float(value: Any) -> float | None:
    """The inverse of ``_encode_float``; None when ``value`` is not a float at all."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in _NON_FINITE_NAMES:
        return _NON_FINITE_NAMES[value]
    return None


def _to_json(value: Any) -> Any:
    """Plain JSON types from options/statistics that may hold numpy scalars, arrays or tuples."""
    if isinstance(value, Mapping):
        return {str(key): _to_json(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return [_to_json(item) for item in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    if isinstance(value, np.generic):
        return _to_json(value.item())
    if isinstance(value, float):
        return _encode_float(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a calibration cache")


def _canonical_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as they read back from JSON, so a tuple and a list (or np.float32 and float) compare equal."""
    canonical: dict[str, Any] = json.loads(json.dumps(_to_json(options), sort_keys=True))
    return canonical


def _tensor_entries(
    ranges: Mapping[str, tuple[float, float]], observed: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """One JSON object per tensor: the chosen range plus whatever statistics the caller observed."""
    unknown = sorted(set(observed) - set(ranges))
    if unknown:
        raise ValueError(f"observed statistics for tensors without a range: {unknown}")
    entries: dict[str, dict[str, Any]] = {}
    for name, (low, high) in ranges.items():
        extra = dict(_to_json(observed.get(name, {})))
        clash = [key for key in _RANGE_KEYS if key in extra]
        if clash:
            raise ValueError(f"observed statistics of {name!r} may not use the reserved keys {clash}")
        entries[name] = {**extra, "low": _encode_float(low), "high": _encode_float(high)}
    return entries


# ----------------------------------------------------------------------------------------------
# writing


def _write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path`` and rename it over ``path`` (atomic on POSIX/NTFS).

    Readers (and a concurrent run) see either the old cache or the new one, never half a file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file private (0600); a cache is an ordinary, shareable file.
        os.chmod(temp_name, _CACHE_FILE_MODE)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def save_cache(
    path: str | os.PathLike[str],
    ranges: Mapping[str, tuple[float, float]],
    *,
    model_hash: str,
    data_fingerprint: str,
    method: str,
    options: Mapping[str, Any],
    observed: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Store calibrated ``ranges`` (and optional per-tensor ``observed`` statistics) at ``path``.

    ``options`` must hold everything besides model, data and method that changes the ranges, since
    ``load_cache`` refuses the cache when any of them differs.
    """
    document = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "model_sha256": model_hash,
        "data_sha256": data_fingerprint,
        "method": method,
        "options": _canonical_options(options),
        "tensors": _tensor_entries(ranges, observed or {}),
    }
    text = json.dumps(document, sort_keys=True, indent=2, allow_nan=False) + "\n"
    try:
        _write_atomically(Path(path), text)
    except OSError as error:
        raise OnnxqError(
            f"cannot write calibration cache {path}: {error.strerror or error}",
            "pass a --calib-cache path in a writable directory",
        ) from error
    logger.info("wrote calibration cache %s (%d tensors)", path, len(ranges))


# ----------------------------------------------------------------------------------------------
# reading


def _short(digest: str) -> str:
    return digest[:_SHORT_HASH_DIGITS] + "…" if len(digest) > _SHORT_HASH_DIGITS else digest


def _read_document(path: Path) -> dict[str, Any]:
    """The parsed JSON object, or an error saying the file is not a usable cache."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise OnnxqError(
            f"calibration cache {path} does not exist", "run calibration once to create it"
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise OnnxqError(f"cannot read calibration cache {path}: {error}", _DELETE_FIX) from error
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise OnnxqError(f"calibration cache {path} is not valid JSON ({error})", _DELETE_FIX) from error
    if not isinstance(document, dict) or document.get("format") != CACHE_FORMAT:
        raise OnnxqError(f"{path} is not an onnxq calibration cache", _DELETE_FIX)
    version = document.get("version")
    if version != CACHE_VERSION:
        raise OnnxqError(
            f"calibration cache {path} has format version {version!r}; this onnxq reads version "
            f"{CACHE_VERSION}",
            _DELETE_FIX,
        )
    return document


def _option_differences(stored: Any, current: dict[str, Any]) -> list[str]:
    """Human-readable 'key: cached vs now' for every option that differs."""
    if not isinstance(stored, dict):
        return [f"options: {stored!r} in the cache vs {current!r} now"]
    differences = []
    for key in sorted(set(stored) | set(current)):
        before, now = stored.get(key, _UNSET), current.get(key, _UNSET)
        if before != now:
            differences.append(f"{key}: {before!r} in the cache vs {now!r} now")
    return differences


def _check_key(
    path: Path,
    document: dict[str, Any],
    *,
    model_hash: str,
    data_fingerprint: str,
    method: str,
    options: Mapping[str, Any],
) -> None:
    """Refuse a cache made for another model, other data, another method or other options."""
    stored_model = document.get("model_sha256")
    if stored_model != model_hash:
        raise OnnxqError(
            f"calibration cache {path} was made for a different model "
            f"(sha256 {_short(str(stored_model))} vs {_short(model_hash)})",
            _DELETE_FIX,
        )
    stored_data = document.get("data_sha256")
    if stored_data != data_fingerprint:
        raise OnnxqError(
            f"calibration cache {path} was made with different calibration data "
            f"(sha256 {_short(str(stored_data))} vs {_short(data_fingerprint)})",
            _DELETE_FIX,
        )
    stored_method = document.get("method")
    if stored_method != method:
        raise OnnxqError(
            f"calibration cache {path} was made with calibration method {stored_method!r}, not {method!r}",
            _DELETE_FIX,
        )
    differences = _option_differences(document.get("options"), _canonical_options(options))
    if differences:
        raise OnnxqError(
            f"calibration cache {path} was made with different calibration options "
            f"({'; '.join(differences)})",
            _DELETE_FIX,
        )


def _read_ranges(path: Path, tensors: Any) -> Ranges:
    """Validate the tensor entries: every one needs numeric low <= high."""
    if not isinstance(tensors, dict):
        raise OnnxqError(f"calibration cache {path} has no valid 'tensors' table", _DELETE_FIX)
    ranges: Ranges = {}
    for name, entry in tensors.items():
        low = _decode_float(entry.get("low")) if isinstance(entry, dict) else None
        high = _decode_float(entry.get("high")) if isinstance(entry, dict) else None
        if low is None or high is None:
            raise OnnxqError(f"calibration cache {path} has no valid range for tensor '{name}'", _DELETE_FIX)
        if low > high:
            raise OnnxqError(
                f"calibration cache {path} has low {low!r} > high {high!r} for tensor '{name}'", _DELETE_FIX
            )
        ranges[name] = (low, high)
    return ranges


def check_cached_ranges(path: str | os.PathLike[str], ranges: Mapping[str, tuple[float, float]]) -> None:
    """Refuse a cached range that no float32 scale can cover (NaN/inf, beyond float32's 3.4e38).

    ``load_cache`` returns what the file holds (non-finite values round-trip); this checks the ranges
    a run is about to use, so a hand-edited cache fails with the tensor's name, not deep in scaling.
    """
    for name, (low, high) in ranges.items():
        problem = range_problem(low, high)
        if problem is not None:
            raise OnnxqError(
                f"calibration cache {path}: the range of tensor '{name}': {problem}", _DELETE_FIX
            )


def load_cache(
    path: str | os.PathLike[str],
    *,
    model_hash: str,
    data_fingerprint: str,
    method: str,
    options: Mapping[str, Any],
) -> Ranges:
    """The ranges stored at ``path``, after checking the cache was made for exactly this run.

    Raises OnnxqError when the file is missing (check ``Path.exists`` first to treat that as a
    cache miss), corrupt, or made for another model, data, method or options.
    """
    cache_path = Path(path)
    document = _read_document(cache_path)
    _check_key(
        cache_path,
        document,
        model_hash=model_hash,
        data_fingerprint=data_fingerprint,
        method=method,
        options=options,
    )
    ranges = _read_ranges(cache_path, document.get("tensors"))
    logger.info("loaded %d calibrated ranges from %s", len(ranges), cache_path)
    return ranges


# ----------------------------------------------------------------------------------------------
# model hash


class _Hasher:
    """sha256 over length-prefixed fields, so different structures never produce the same stream."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def text(self, value: str) -> None:
        self.data(value.encode("utf-8"))

    def data(self, value: bytes) -> None:
        self._digest.update(len(value).to_bytes(8, "little"))
        self._digest.update(value)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _hash_tensor(hasher: _Hasher, tensor: ir.TensorProtocol | None) -> None:
    """dtype, shape and bytes of one tensor; ``tobytes`` loads one (maybe external) tensor at a time."""
    if tensor is None:
        hasher.text("<no data>")
        return
    hasher.text(str(tensor.dtype))
    hasher.text(str(tuple(tensor.shape)))
    hasher.data(tensor.tobytes())
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()  # unmap: hashing a model as large as memory must not keep it resident


def _hash_value(hasher: _Hasher, value: ir.Value | None, with_type: bool) -> None:
    """A value by name (empty for an omitted optional input), and its type/shape for graph I/O."""
    hasher.text("" if value is None else value.name or "")
    if with_type:
        hasher.text("" if value is None else f"{value.type}|{value.shape}")


def _hash_attribute(hasher: _Hasher, attr: ir.Attr) -> None:
    """Attribute name, type and value; graphs are hashed structurally, tensors by their bytes."""
    hasher.text(attr.name)
    hasher.text(str(attr.type))
    if attr.is_ref():
        hasher.text(f"ref:{attr.ref_attr_name}")
        return
    kind = attr.type
    if attr.value is None:
        # A function's attribute parameter without a default value.
        hasher.text("<no value>")
    elif kind == ir.AttributeType.TENSOR:
        _hash_tensor(hasher, attr.as_tensor())
    elif kind == ir.AttributeType.TENSORS:
        for tensor in attr.as_tensors():
            _hash_tensor(hasher, tensor)
    elif kind == ir.AttributeType.GRAPH:
        _hash_graph(hasher, attr.as_graph())
    elif kind == ir.AttributeType.GRAPHS:
        for graph in attr.as_graphs():
            _hash_graph(hasher, graph)
    elif kind == ir.AttributeType.FLOAT:
        hasher.text(repr(float(attr.value)))
    elif kind == ir.AttributeType.FLOATS:
        hasher.text(repr([float(item) for item in attr.value]))
    else:
        # INT(S), STRING(S), type protos: their repr is deterministic.
        hasher.text(repr(attr.value))


def _hash_nodes(hasher: _Hasher, nodes: Iterable[ir.Node]) -> None:
    """Each node's op, domain, inputs, outputs and attributes (sorted: their order has no meaning)."""
    for node in nodes:
        hasher.text(f"node|{node.domain}|{node.op_type}|{node.overload}")
        hasher.text(f"inputs|{len(node.inputs)}")
        for value in node.inputs:
            _hash_value(hasher, value, with_type=False)
        hasher.text(f"outputs|{len(node.outputs)}")
        for value in node.outputs:
            _hash_value(hasher, value, with_type=False)
        attributes = sorted(node.attributes.values(), key=lambda attribute: attribute.name)
        hasher.text(f"attributes|{len(attributes)}")
        for attribute in attributes:
            _hash_attribute(hasher, attribute)


def _hash_graph(hasher: _Hasher, graph: ir.Graph) -> None:
    """Inputs/outputs with types, initializers (sorted by name), then the nodes in graph order."""
    hasher.text(f"graph|inputs|{len(graph.inputs)}")
    for value in graph.inputs:
        _hash_value(hasher, value, with_type=True)
    hasher.text(f"outputs|{len(graph.outputs)}")
    for value in graph.outputs:
        _hash_value(hasher, value, with_type=True)
    hasher.text(f"initializers|{len(graph.initializers)}")
    for name in sorted(graph.initializers):
        hasher.text(name)
        _hash_tensor(hasher, graph.initializers[name].const_value)
    hasher.text(f"nodes|{len(graph)}")
    _hash_nodes(hasher, graph)


def _hash_function(hasher: _Hasher, function: ir.Function) -> None:
    """Model-local functions change what the graph computes, so they are part of the model."""
    hasher.text(f"function|{function.domain}|{function.name}|{function.overload}")
    hasher.text(repr(sorted(function.opset_imports.items())))
    hasher.text(repr([value.name for value in function.inputs]))
    hasher.text(repr([value.name for value in function.outputs]))
    attributes = sorted(function.attributes.values(), key=lambda attribute: attribute.name)
    hasher.text(f"attributes|{len(attributes)}")
    for attribute in attributes:
        _hash_attribute(hasher, attribute)
    _hash_nodes(hasher, function)


def model_hash(model: ir.Model) -> str:
    """sha256 of what determines calibration: graph structure, opsets, functions and every weight.

    Streams tensor by tensor instead of serializing the model, so a model with memory-mapped external
    weights is never held in memory twice. Names, docs and metadata that do not change the computation
    (producer, doc strings, node names) are left out.
    """
    hasher = _Hasher()
    hasher.text(_MODEL_HASH_TAG)
    hasher.text(repr(sorted(model.opset_imports.items())))
    _hash_graph(hasher, model.graph)
    for identifier in sorted(model.functions):
        _hash_function(hasher, model.functions[identifier])
    return hasher.hexdigest()
