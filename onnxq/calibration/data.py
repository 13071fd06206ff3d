"""Calibration data: where the sample inputs come from, and checking that they fit the model.

``open_calibration_data`` accepts:

* a path to an ``.npz`` file: one array per model input, named after it, first axis = samples;
* a path to an ``.npy`` file (single-input models only): the samples of that input;
* a directory of ``.npz`` files and/or ``.npy`` files (``.npy`` only for single-input models), read
  in file-name order. Each file holds one sample (without the batch axis) or several (with it);
  files may differ in the dynamic dimensions (e.g. sequence length);
* a ``dict`` of arrays (the in-memory form of an ``.npz``), or one array for a single-input model;
* a ``list``/``tuple`` of feed dicts ``{input_name: array}``, each a batch (first axis = batch);
* a callable returning a fresh iterable of feed dicts on every call (the way to stream data that
  is produced on the fly);
* any other iterable of feed dicts. A re-iterable object (whose ``iter()`` returns a new iterator)
  works like a list; a one-shot iterator or generator can be read only once and raises on the
  second pass. The calibrator reads the data twice (range pass, histogram pass) and the
  fingerprint is one more pass, so pass a list or a callable instead of a generator.

Files are read with ``np.load(..., allow_pickle=False)``: onnxq never unpickles anything, because
unpickling runs arbitrary code. Object arrays and pickle files are refused with an error.

Two modes, chosen when the data is opened:

* batched (inputs share a sample axis: every input's axis 0 is dynamic, or all are the same static
  size): samples lie along axis 0 and are cut and joined into batches as described below;
* as-is (``shares_sample_axis`` is False: a rank-0 input such as a sample rate, a state input whose
  batch is not axis 0 like ``state`` [2, B, 128], different static leading dims like ``input``
  [1, 576] beside ``state`` [2, 1, 128], a static leading dim beside a dynamic one; or, for data known
  at open, full-rank arrays with different leading sizes where the model does not give axis 0 one
  symbolic name): each file, dict or feed dict is one feed, every array in the model's full shape, run
  as it is (never cut, joined or given a batch axis). ``max_samples`` then counts feeds and a batch
  size is ignored (with a warning).

A declared dimension below 1 (``-1`` from paddle2onnx, 0) is dynamic. Files are read lazily, one
file (or, for a single ``.npz``, one array per input) at a time, so memory does not grow with the
number of files. ``CalibrationData.batches()`` re-slices the samples into
batches of ``batch_size`` without changing which samples are used or their order, so statistics
computed over the batches do not depend on the batch size. The one exception is a model with a
static batch dimension B > 1: a partial batch cannot run, so the samples left over where the shape
changes or the data ends are dropped (with a warning).

Validation (each failure an ``OnnxqError`` naming the input): every model input present (other keys
are ignored and logged), rank and static dimensions as in the model (axis 0 included in as-is mode),
one sample count per chunk (batched mode), no NaN/Inf. dtypes are cast within a kind (float64 ->
float32, int32 -> int64; logged once per input, integer overflow refused); across kinds (int <->
float, bool) they are refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol, TypeAlias, cast

import ml_dtypes
import numpy as np
import numpy.typing as npt

from onnxq.errors import OnnxqError

logger = logging.getLogger(__name__)

#: batch size used when the model's batch dimension is dynamic and the user did not choose one
DEFAULT_BATCH_SIZE = 32

NPZ_SUFFIX = ".npz"
NPY_SUFFIX = ".npy"
#: the first bytes of a zip archive (``.npz``): a local file header, or the end record of an empty zip
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
#: the first bytes of an ``.npy`` file
_NPY_MAGIC = b"\x93NUMPY"
#: pickle protocols 2 and above start with the PROTO opcode
_PICKLE_PROTO_OPCODE = b"\x80"
#: enough bytes to tell the formats above apart
_MAGIC_PROBE_BYTES = 8
#: how many ignored file names a log message lists before abbreviating
_MAX_NAMES_IN_MESSAGE = 5
#: bumped whenever the byte stream hashed by ``fingerprint`` changes
_FINGERPRINT_TAG = b"onnxq-calibration-data/1\n"

_PICKLE_FIX = "save plain numeric arrays with np.savez"

NDArray = npt.NDArray[Any]
Feed = dict[str, NDArray]
FeedIterable = Iterable[Mapping[str, Any]]
#: everything ``open_calibration_data`` accepts (see the module docstring)
CalibrationSource: TypeAlias = (
    str | os.PathLike[str] | Mapping[str, Any] | NDArray | Callable[[], FeedIterable] | FeedIterable
)


@dataclass(frozen=True)
class InputSpec:
    """What the model expects for one input: the caller builds these from the model's graph inputs.

    ``shape`` holds an int for a static dimension and a str (symbolic) or None for a dynamic one.
    An int below 1 is read as dynamic (None): some exporters (paddle2onnx) write ``dim_value: -1``
    for a dynamic dimension, and a static size of 0 could never hold a sample. Dimension 0 is the
    batch dimension when the model's inputs share a sample axis (see ``shares_sample_axis``).
    """

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | str | None, ...]

    def __post_init__(self) -> None:
        # Accept np.float32 and friends as well as dtype instances, so comparisons are reliable.
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(_dimension(dim) for dim in self.shape))

    @property
    def rank(self) -> int:
        """Number of dimensions, batch dimension included."""
        return len(self.shape)

    @property
    def fixed_batch(self) -> int | None:
        """The static batch size, or None when the batch dimension is dynamic."""
        first = self.shape[0] if self.shape else None
        return first if isinstance(first, int) else None

    def describe_shape(self) -> str:
        """The shape as users read it, dynamic dimensions by name (or '?')."""
        dims = ["?" if dim is None else str(dim) for dim in self.shape]
        return "[" + ", ".join(dims) + "]"


def _dimension(dim: Any) -> int | str | None:
    """One declared dimension: a static size >= 1, a symbolic name, or None (dynamic).

    Cases: int >= 1 -> static; int <= 0 (``-1`` from paddle2onnx, ``0``) -> None, since a batch of
    -1 or 0 samples would make the batch planner take no samples; str -> symbolic; None -> None.
    """
    if isinstance(dim, (int, np.integer)) and not isinstance(dim, bool):
        return int(dim) if dim >= 1 else None
    return dim if isinstance(dim, str) else None


def shares_sample_axis(specs: Sequence[InputSpec]) -> bool:
    """Whether samples of every input lie along axis 0, so feeds can be cut and joined into batches.

    Cases that do NOT share one (the data is then run as-is, one feed per run):
    * a rank-0 input (a sample rate): it has no axis to put samples on;
    * inputs with different static leading dims (``input`` [1, 576] beside ``state`` [2, 1, 128]);
    * a static leading dim beside a dynamic one (``input`` [seq, 576] beside ``h`` [1, 1, 128],
      ``state`` [2, B, 128] beside ``input`` [B, T]): axis 0 is not the same axis for all of them.
    Inputs whose leading dims are all dynamic, or all the same static size, share it.
    """
    if any(spec.rank == 0 for spec in specs):
        return False
    leading = [spec.shape[0] for spec in specs]
    static = {dim for dim in leading if isinstance(dim, int)}
    if len(static) > 1:
        return False
    return not static or all(isinstance(dim, int) for dim in leading)


Signature = tuple[tuple[int, ...], ...]


class _ChunkInfo(NamedTuple):
    """Samples in one chunk and the per-sample shape of every input (chunks of equal shape batch together)."""

    samples: int
    signature: Signature


class _Layout(NamedTuple):
    """Shape and dtype of one array, known from a file header without reading the data."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]


@dataclass(frozen=True)
class _RawChunk:
    """Arrays of one unit of the source (a file, a fed batch), not yet validated.

    ``unbatched_ok`` allows an array to omit the batch axis (one sample per file in a directory).
    """

    arrays: Mapping[str, Any]
    origin: str
    unbatched_ok: bool = False


class _Source(Protocol):
    """A place calibration samples come from, read chunk by chunk on every pass."""

    description: str

    def plan(self) -> list[_ChunkInfo] | None:
        """Samples and shapes of every chunk, when known without reading the data."""
        ...

    def chunks(self) -> Iterator[_RawChunk]:
        """One pass over the data; loads each chunk only when it is requested."""
        ...


# ----------------------------------------------------------------------------------------------
# dtype families


def _is_float_dtype(dtype: np.dtype[Any]) -> bool:
    """True for numpy floats and for ml_dtypes floats (bfloat16, float8), which numpy reports as 'V'."""
    if dtype.kind == "f":
        return True
    if dtype.kind != "V" or dtype.fields is not None:
        return False
    try:
        ml_dtypes.finfo(dtype)
    except (ValueError, TypeError):
        return False
    return True


def _dtype_family(dtype: np.dtype[Any]) -> str:
    """Which dtypes may be cast into each other: within a family only, values keep their meaning."""
    if _is_float_dtype(dtype):
        return "float"
    if dtype.kind in "iu":
        return "integer"
    if dtype.kind == "b":
        return "bool"
    return dtype.name


# ----------------------------------------------------------------------------------------------
# validation and conversion


def _as_array(value: Any, name: str, origin: str) -> NDArray:
    """Accept anything numpy can turn into a regular array (lists, CPU tensors); explain the rest."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError, RuntimeError) as error:
        raise OnnxqError(
            f"{origin}: the data for input '{name}' cannot be converted to a numpy array ({error})",
            f"pass a regular numpy array for '{name}' (same length along each axis, on the CPU)",
        ) from error


class _SampleCountMismatchError(OnnxqError):
    """Inputs of one chunk hold different numbers of samples along axis 0.

    ``full_rank`` is True when every array had the model's full rank: the chunk may then be a feed
    the model takes as it is (``open_calibration_data`` retries the data in as-is mode).
    """

    def __init__(self, problem: str, fix: str, full_rank: bool) -> None:
        super().__init__(problem, fix)
        self.full_rank = full_rank


class _Validator:
    """Checks arrays against the model's inputs and converts them; logs each notice only once.

    ``as_is``: every chunk is one feed the model runs as it is (full rank, every static dim as
    declared, axis 0 included); it counts as one sample and is never cut or joined.
    """

    def __init__(self, specs: Sequence[InputSpec], as_is: bool = False) -> None:
        self.specs = list(specs)
        self.as_is = as_is
        self._logged_extras: set[str] = set()
        self._logged_casts: set[str] = set()

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    def check_layout(
        self, layouts: Mapping[str, _Layout], extra_names: Iterable[str], origin: str, unbatched_ok: bool
    ) -> _ChunkInfo:
        """Validate shapes and dtypes of one chunk and return its samples and per-sample shapes.

        Works on layouts (shape + dtype) so file sources can be checked from their headers before
        any data is read: a bad file fails when the data is opened, not halfway through calibration.
        """
        extras = list(extra_names)
        # The extras are listed in the message too: a misspelled input name is the usual cause.
        self._check_missing([*layouts, *extras], origin)
        self._log_extras(extras, origin)
        counts: dict[str, int] = {}
        sample_shapes: list[tuple[int, ...]] = []
        for spec in self.specs:
            layout = layouts[spec.name]
            if layout.dtype.hasobject:
                raise OnnxqError(
                    f"{origin}: the array for input '{spec.name}' contains pickled/object data, "
                    "which onnxq never loads",
                    _PICKLE_FIX,
                )
            if self.as_is:
                # A feed run as it is: the whole array is the "sample", every declared dim applies.
                self._check_rank(spec, layout.shape, origin, unbatched_ok=False)
                sample_shape, first_axis, count = layout.shape, 0, 1
            else:
                batched = self._check_rank(spec, layout.shape, origin, unbatched_ok)
                sample_shape = layout.shape[1:] if batched else layout.shape
                first_axis, count = 1, layout.shape[0] if batched else 1
            self._check_static_dims(spec, sample_shape, origin, first_axis)
            self._check_dtype(spec, layout.dtype, origin)
            counts[spec.name] = count
            sample_shapes.append(sample_shape)
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"'{name}': {count}" for name, count in counts.items())
            full_rank = all(len(layouts[spec.name].shape) == spec.rank for spec in self.specs)
            raise _SampleCountMismatchError(
                f"{origin}: inputs have different numbers of samples along the first axis ({listed})",
                "give every input the same number of samples along the first axis, or save one feed "
                "per .npz file with every array in the model's full shape",
                full_rank,
            )
        return _ChunkInfo(next(iter(counts.values())), tuple(sample_shapes))

    def _check_missing(self, present: Iterable[str], origin: str) -> None:
        """Every model input needs data; name both what is missing and what the model expects."""
        present_set = set(present)
        missing = [name for name in self.names if name not in present_set]
        if not missing:
            return
        found = ", ".join(sorted(present_set)) or "nothing"
        raise OnnxqError(
            f"{origin} has no data for model input(s) {', '.join(repr(n) for n in missing)} "
            f"(the model expects {', '.join(repr(n) for n in self.names)}; found {found})",
            "provide one array per model input, keyed by the input name",
        )

    def _log_extras(self, extra_names: Iterable[str], origin: str) -> None:
        """Unknown keys are harmless (often labels), but a typo would otherwise go unnoticed."""
        new = sorted(set(extra_names) - self._logged_extras)
        if new:
            self._logged_extras.update(new)
            logger.info("%s: ignoring arrays that are not model inputs: %s", origin, ", ".join(new))

    def _check_rank(self, spec: InputSpec, shape: tuple[int, ...], origin: str, unbatched_ok: bool) -> bool:
        """Return whether the array has the batch axis; a rank that fits neither way is an error."""
        if len(shape) == spec.rank:
            return True
        if unbatched_ok and len(shape) == spec.rank - 1:
            return False
        expected = f"rank {spec.rank}" + (f" or {spec.rank - 1} (one sample)" if unbatched_ok else "")
        layout = (
            "as one feed (the model's inputs share no sample axis, so each feed runs as it is)"
            if self.as_is
            else "with the samples along the first axis"
        )
        raise OnnxqError(
            f"{origin}: the array for input '{spec.name}' has shape {shape} (rank {len(shape)}), "
            f"but the model expects {expected} for shape {spec.describe_shape()} {layout}",
            f"reshape the data for '{spec.name}' to {spec.describe_shape()}",
        )

    @staticmethod
    def _check_static_dims(
        spec: InputSpec, sample_shape: tuple[int, ...], origin: str, first_axis: int = 1
    ) -> None:
        """Static dimensions from ``first_axis`` on (1: all but the batch dim; 0: all) must match."""
        for axis, (actual, wanted) in enumerate(zip(sample_shape, spec.shape[first_axis:]), start=first_axis):
            if isinstance(wanted, int) and actual != wanted:
                raise OnnxqError(
                    f"{origin}: the array for input '{spec.name}' has size {actual} in dimension {axis}, "
                    f"but the model's shape {spec.describe_shape()} fixes it to {wanted}",
                    f"resize or reshape the data for '{spec.name}' to {spec.describe_shape()}",
                )

    @staticmethod
    def _check_dtype(spec: InputSpec, dtype: np.dtype[Any], origin: str) -> None:
        """Casting across kinds (float <-> int, bool) would silently change what the data means."""
        if _dtype_family(dtype) != _dtype_family(spec.dtype):
            raise OnnxqError(
                f"{origin}: the array for input '{spec.name}' has dtype {dtype.name}, "
                f"but the model expects {spec.dtype.name}",
                f"convert the data for '{spec.name}' with .astype(np.{spec.dtype.name})",
            )

    def _arrays_and_info(self, raw: _RawChunk) -> tuple[dict[str, NDArray], _ChunkInfo]:
        """The model inputs' arrays of one in-memory chunk, and its validated samples and shapes."""
        arrays = {
            name: _as_array(raw.arrays[name], name, raw.origin) for name in self.names if name in raw.arrays
        }
        extras = [str(key) for key in raw.arrays if key not in arrays]
        layouts = {name: _Layout(tuple(array.shape), array.dtype) for name, array in arrays.items()}
        return arrays, self.check_layout(layouts, extras, raw.origin, raw.unbatched_ok)

    def inspect(self, raw: _RawChunk) -> _ChunkInfo:
        """Validate the structure of an in-memory chunk without touching its values (cheap, at open)."""
        return self._arrays_and_info(raw)[1]

    def convert(self, raw: _RawChunk, limit: int | None) -> tuple[Feed, int]:
        """Validate one chunk, keep at most ``limit`` samples, add a missing batch axis, cast, check."""
        arrays, info = self._arrays_and_info(raw)
        count = info.samples
        if limit is not None and count > limit:
            count = limit
        feed: Feed = {}
        for spec in self.specs:
            array = arrays[spec.name]
            if not self.as_is:
                # An array without the batch axis is one sample (only allowed for files in a directory).
                array = array[:count] if array.ndim == spec.rank else array[np.newaxis]
            self._check_finite(spec, array, raw.origin)
            feed[spec.name] = self._cast(spec, array, raw.origin)
        return feed, count

    @staticmethod
    def _check_finite(spec: InputSpec, array: NDArray, origin: str) -> None:
        """NaN/Inf would poison min/max and histograms; better to stop and say where they are."""
        if not _is_float_dtype(array.dtype) or array.size == 0:
            return
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise OnnxqError(
                f"calibration data for input '{spec.name}' contains {bad} NaN/Inf values ({origin})",
                "clean the data (e.g. np.nan_to_num) or drop those samples",
            )

    def _cast(self, spec: InputSpec, array: NDArray, origin: str) -> NDArray:
        """Cast within a dtype family (float64 -> float32, int32 -> int64), refusing lossy overflow."""
        if array.dtype == spec.dtype:
            return array
        if array.dtype.kind in "iu" and not np.can_cast(array.dtype, spec.dtype, casting="safe"):
            self._check_integer_range(spec, array, origin)
        with np.errstate(over="ignore", invalid="ignore"):
            # Overflow to Inf is reported below, as a user error naming the input.
            converted = array.astype(spec.dtype)
        if _is_float_dtype(spec.dtype) and converted.size:
            overflow = int(converted.size - np.count_nonzero(np.isfinite(converted)))
            if overflow:
                raise OnnxqError(
                    f"calibration data for input '{spec.name}' has {overflow} values beyond the range "
                    f"of {spec.dtype.name} ({origin})",
                    f"scale the data for '{spec.name}' into the range of {spec.dtype.name}",
                )
        if spec.name not in self._logged_casts:
            self._logged_casts.add(spec.name)
            logger.info(
                "casting calibration data for input '%s' from %s to %s",
                spec.name,
                array.dtype.name,
                spec.dtype.name,
            )
        return converted

    @staticmethod
    def _check_integer_range(spec: InputSpec, array: NDArray, origin: str) -> None:
        """An int64 -> int32 cast is fine for token ids but must not wrap around silently."""
        if array.size == 0:
            return
        info = np.iinfo(spec.dtype)
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            raise OnnxqError(
                f"calibration data for input '{spec.name}' has values in [{low}, {high}], "
                f"outside the range of {spec.dtype.name} ({origin})",
                f"provide data for '{spec.name}' that fits {spec.dtype.name}",
            )


# ----------------------------------------------------------------------------------------------
# files


def _probe_format(path: Path) -> str:
    """Tell npz, npy and pickle apart by content, so a renamed pickle is refused, never loaded."""
    try:
        with path.open("rb") as handle:
            head = handle.read(_MAGIC_PROBE_BYTES)
    except OSError as error:
        raise OnnxqError(
            f"cannot read calibration data file {path}: {error.strerror or error}",
            "check the path and its permissions",
        ) from error
    if head.startswith(_ZIP_MAGICS):
        return "npz"
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head.startswith(_PICKLE_PROTO_OPCODE):
        return "pickle"
    return "unknown"


def _refuse_unknown_file(path: Path, kind: str) -> OnnxqError:
    """The error for a file that is neither .npz nor .npy; pickles get the explanation why."""
    if kind == "pickle":
        return OnnxqError(
            f"calibration data file {path} contains pickled/object data, which onnxq never loads "
            "(unpickling can run arbitrary code)",
            _PICKLE_FIX,
        )
    return OnnxqError(
        f"calibration data file {path} is not a readable .npz or .npy file",
        "save the calibration data with np.savez (one array per model input)",
    )


def _corrupt_file_error(path: Path, error: Exception) -> OnnxqError:
    """Wrap low-level read errors (bad zip, truncated header) into one user-facing line."""
    return OnnxqError(
        f"calibration data file {path} is corrupt or unreadable ({type(error).__name__}: {error})",
        "re-create it with np.savez",
    )


def _read_npy_layout(handle: IO[bytes]) -> _Layout:
    """Shape and dtype from an .npy header; the header is a literal, parsed without unpickling."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, _fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        # Versions 2.0 and 3.0 share the 4-byte header length; 3.0 only allows utf-8 field names.
        shape, _fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    return _Layout(tuple(int(dim) for dim in shape), np.dtype(dtype))


def _npz_member_key(member_name: str) -> str:
    """np.savez stores array 'x' as member 'x.npy'; np.load strips the suffix the same way."""
    return member_name[: -len(NPY_SUFFIX)] if member_name.endswith(NPY_SUFFIX) else member_name


def _check_loaded(path: Path, array: Any) -> NDArray:
    """np.load returns raw bytes for a zip member that is not an array: refuse it."""
    if not isinstance(array, np.ndarray):
        raise _corrupt_file_error(path, ValueError("a member is not a numpy array"))
    return array


class _NpzFileSource:
    """One .npz archive: arrays named after the model inputs, samples along the first axis."""

    def __init__(self, path: Path, validator: _Validator, unbatched_ok: bool = False) -> None:
        self.path = path
        self.description = f"calibration data file {path}"
        self._validator = validator
        self._unbatched_ok = unbatched_ok
        self._info = self._inspect()

    def _inspect(self) -> _ChunkInfo:
        """Validate from the array headers only, so a wrong file fails before any data is read."""
        wanted = set(self._validator.names)
        layouts: dict[str, _Layout] = {}
        extras: list[str] = []
        try:
            with zipfile.ZipFile(self.path) as archive:
                for info in archive.infolist():
                    if info.is_dir():
                        continue
                    key = _npz_member_key(info.filename)
                    if key not in wanted:
                        extras.append(key)
                        continue
                    with archive.open(info) as member:
                        layouts[key] = _read_npy_layout(member)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as error:
            raise _corrupt_file_error(self.path, error) from error
        return self._validator.check_layout(layouts, extras, self.description, self._unbatched_ok)

    def plan(self) -> list[_ChunkInfo] | None:
        return [self._info]

    def chunks(self) -> Iterator[_RawChunk]:
        """Load each input's array once per pass (np.load of a member reads it whole), never unpickling."""
        try:
            with np.load(self.path, allow_pickle=False, mmap_mode=None) as archive:
                arrays = {name: _check_loaded(self.path, archive[name]) for name in self._validator.names}
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as error:
            raise _corrupt_file_error(self.path, error) from error
        yield _RawChunk(arrays, self.description, self._unbatched_ok)


class _NpyFileSource:
    """One .npy file holding the samples of the only model input."""

    def __init__(self, path: Path, validator: _Validator, unbatched_ok: bool = False) -> None:
        if len(validator.specs) != 1:
            raise OnnxqError(
                f"calibration data file {path} is a single .npy array, but the model has "
                f"{len(validator.specs)} inputs ({', '.join(repr(n) for n in validator.names)})",
                "save one array per input in an .npz file with np.savez",
            )
        self.path = path
        self.description = f"calibration data file {path}"
        self._validator = validator
        self._unbatched_ok = unbatched_ok
        self._name = validator.names[0]
        self._info = self._inspect()

    def _inspect(self) -> _ChunkInfo:
        """Validate from the header only (object dtypes are refused here, before any load)."""
        try:
            with self.path.open("rb") as handle:
                layout = _read_npy_layout(handle)
        except (OSError, EOFError, ValueError) as error:
            raise _corrupt_file_error(self.path, error) from error
        return self._validator.check_layout({self._name: layout}, (), self.description, self._unbatched_ok)

    def plan(self) -> list[_ChunkInfo] | None:
        return [self._info]

    def chunks(self) -> Iterator[_RawChunk]:
        try:
            array = np.load(self.path, allow_pickle=False, mmap_mode=None)
        except (OSError, EOFError, ValueError) as error:
            raise _corrupt_file_error(self.path, error) from error
        yield _RawChunk({self._name: _check_loaded(self.path, array)}, self.description, self._unbatched_ok)


def _open_file(path: Path, validator: _Validator, unbatched_ok: bool) -> _NpzFileSource | _NpyFileSource:
    """Dispatch on the file's content, not its name, so nothing is ever handed to pickle."""
    kind = _probe_format(path)
    if kind == "npz":
        return _NpzFileSource(path, validator, unbatched_ok)
    if kind == "npy":
        return _NpyFileSource(path, validator, unbatched_ok)
    raise _refuse_unknown_file(path, kind)


class _DirectorySource:
    """A directory of .npz/.npy files read in file-name order, one file in memory at a time."""

    def __init__(self, path: Path, validator: _Validator) -> None:
        self.path = path
        self.description = f"calibration data directory {path}"
        files, ignored = self._list(path)
        if ignored:
            shown = ", ".join(ignored[:_MAX_NAMES_IN_MESSAGE]) + (
                ", ..." if len(ignored) > _MAX_NAMES_IN_MESSAGE else ""
            )
            logger.warning("%s: ignoring %d files that are not .npz/.npy: %s", path, len(ignored), shown)
        if not files:
            raise OnnxqError(
                f"calibration data directory {path} contains no .npz or .npy files",
                "put the calibration samples there as .npz files (one array per model input)",
            )
        # Opening every file validates its header now: a bad file fails before calibration starts.
        self._files = [_open_file(file, validator, unbatched_ok=True) for file in files]

    @staticmethod
    def _list(path: Path) -> tuple[list[Path], list[str]]:
        """Data files sorted by name (deterministic order), plus the names of other files."""
        files: list[Path] = []
        ignored: list[str] = []
        for entry in sorted(path.iterdir(), key=lambda item: item.name):
            if not entry.is_file():
                continue
            if entry.suffix.lower() in (NPZ_SUFFIX, NPY_SUFFIX):
                files.append(entry)
            else:
                ignored.append(entry.name)
        return files, ignored

    def plan(self) -> list[_ChunkInfo] | None:
        return [info for file in self._files for info in file.plan() or []]

    def chunks(self) -> Iterator[_RawChunk]:
        for file in self._files:
            yield from file.chunks()


# ----------------------------------------------------------------------------------------------
# in-memory sources


class _ArraysSource:
    """A dict of arrays: the in-memory equivalent of one .npz file."""

    def __init__(self, arrays: Mapping[str, Any], validator: _Validator) -> None:
        self.description = "the calibration arrays"
        self._arrays = arrays
        self._info = validator.inspect(_RawChunk(arrays, self.description))

    def plan(self) -> list[_ChunkInfo] | None:
        return [self._info]

    def chunks(self) -> Iterator[_RawChunk]:
        yield _RawChunk(self._arrays, self.description)


class _FeedsSource:
    """Feed dicts (each a batch) from a list, a re-iterable, a callable or a one-shot iterator."""

    def __init__(
        self,
        factory: Callable[[], FeedIterable],
        *,
        one_shot: bool,
        plan: list[_ChunkInfo] | None = None,
    ) -> None:
        self.description = "the calibration feeds"
        self._factory = factory
        self._one_shot = one_shot
        self._consumed = False
        self._plan = plan

    def plan(self) -> list[_ChunkInfo] | None:
        return self._plan

    def chunks(self) -> Iterator[_RawChunk]:
        if self._one_shot:
            if self._consumed:
                raise OnnxqError(
                    "the calibration data is a one-shot iterator/generator that was already consumed, "
                    "but calibration reads the data more than once",
                    "pass a list of feed dicts or a function that returns a fresh iterator on each call",
                )
            self._consumed = True
        iterable = self._factory()
        if not isinstance(iterable, Iterable) or isinstance(iterable, (str, bytes, Mapping)):
            raise OnnxqError(
                f"the calibration data function returned {type(iterable).__name__}, "
                "not an iterable of feed dicts",
                "return an iterable (list, generator) of {input_name: array} dicts",
            )
        for index, feed in enumerate(iterable):
            if not isinstance(feed, Mapping):
                raise OnnxqError(
                    f"calibration feed #{index} is a {type(feed).__name__}, not a dict of arrays",
                    "yield {input_name: array} dicts, each a batch with the samples along the first axis",
                )
            yield _RawChunk(feed, f"calibration feed #{index}")


def _feeds_from_sequence(feeds: Sequence[Any], validator: _Validator) -> _FeedsSource:
    """A list of feeds is re-iterable and its size is known: validate every feed's layout up front."""
    plan: list[_ChunkInfo] = []
    for index, feed in enumerate(feeds):
        if not isinstance(feed, Mapping):
            raise OnnxqError(
                f"calibration feed #{index} is a {type(feed).__name__}, not a dict of arrays",
                "pass a list of {input_name: array} dicts, each a batch with samples along the first axis",
            )
        plan.append(validator.inspect(_RawChunk(feed, f"calibration feed #{index}")))
    return _FeedsSource(lambda: feeds, one_shot=False, plan=plan)


def _source_from_path(path: Path, validator: _Validator) -> _Source:
    """A path is a directory of files or one file; anything else is reported, not guessed at."""
    if not path.exists():
        raise OnnxqError(
            f"calibration data path {path} does not exist",
            "pass an existing .npz file or a directory of .npz files",
        )
    if path.is_dir():
        return _DirectorySource(path, validator)
    return _open_file(path, validator, unbatched_ok=False)


def _make_source(source: object, validator: _Validator) -> _Source:
    """Pick the reader for ``source``; see the module docstring for the accepted kinds."""
    if isinstance(source, (str, os.PathLike)):
        return _source_from_path(Path(source), validator)
    if isinstance(source, Mapping):
        return _ArraysSource(source, validator)
    if isinstance(source, np.ndarray):
        if len(validator.specs) != 1:
            raise OnnxqError(
                f"the calibration data is a single array, but the model has {len(validator.specs)} inputs",
                "pass a dict {input_name: array} with one array per model input",
            )
        return _ArraysSource({validator.names[0]: source}, validator)
    if isinstance(source, (list, tuple)):
        return _feeds_from_sequence(source, validator)
    if callable(source):
        return _FeedsSource(cast(Callable[[], FeedIterable], source), one_shot=False)
    if isinstance(source, Iterable) and not isinstance(source, (bytes, bytearray)):
        iterable: FeedIterable = source
        return _FeedsSource(lambda: iterable, one_shot=iter(iterable) is iterable)
    raise OnnxqError(
        f"unsupported calibration data of type {type(source).__name__}",
        "pass an .npz path, a directory, a dict of arrays, or a list/function of feed dicts",
    )


# ----------------------------------------------------------------------------------------------
# batching


class _Piece(NamedTuple):
    """Samples ``start:stop`` of chunk number ``chunk``."""

    chunk: int
    start: int
    stop: int


class _PlannedBatch(NamedTuple):
    """Consecutive pieces forming one batch; ``keep`` is False for a partial batch that cannot run."""

    pieces: tuple[_Piece, ...]
    keep: bool

    @property
    def size(self) -> int:
        return sum(piece.stop - piece.start for piece in self.pieces)


def _plan_batches(chunks: Iterable[_ChunkInfo], batch_size: int, fixed: bool) -> Iterator[_PlannedBatch]:
    """Cut the sample stream into batches; the one rule used both to read data and to count batches.

    Samples stay in source order and are all used. Consecutive chunks with the same per-sample shapes
    share batches; a shape change ends the current batch early (a batch never mixes shapes). With a
    fixed (static) batch size such a partial batch cannot run through the model and is marked dropped.
    Every step of the inner loop takes at least one sample (``batch_size`` >= 1 is checked), so the
    loop ends after at most ``samples`` steps per chunk.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    pending: list[_Piece] = []
    pending_count = 0
    signature: Signature | None = None
    for index, info in enumerate(chunks):
        if info.samples == 0:
            continue
        if pending and info.signature != signature:
            yield _PlannedBatch(tuple(pending), keep=not fixed)
            pending, pending_count = [], 0
        signature = info.signature
        offset = 0
        while offset < info.samples:
            take = min(batch_size - pending_count, info.samples - offset)
            if take <= 0:  # unreachable while 0 <= pending_count < batch_size; never loop on it
                raise RuntimeError(f"batch planner made no progress (batch size {batch_size})")
            pending.append(_Piece(index, offset, offset + take))
            pending_count += take
            offset += take
            if pending_count == batch_size:
                yield _PlannedBatch(tuple(pending), keep=True)
                pending, pending_count = [], 0
    if pending:
        yield _PlannedBatch(tuple(pending), keep=not fixed)


def _limit_plan(plan: Iterable[_ChunkInfo], max_samples: int | None) -> Iterator[_ChunkInfo]:
    """The chunks as ``max_samples`` truncates them (the first samples in order)."""
    remaining = max_samples
    for info in plan:
        if remaining is None:
            yield info
            continue
        if remaining <= 0:
            return
        yield info._replace(samples=min(info.samples, remaining))
        remaining -= info.samples


def _shape_signature(feed: Feed) -> Signature:
    """Per-sample shape of every input, in the model's input order."""
    return tuple(array.shape[1:] for array in feed.values())


def _join(pieces: list[Feed]) -> Feed:
    """One batch from consecutive pieces; a single piece is passed on without copying."""
    if len(pieces) == 1:
        return {name: np.ascontiguousarray(array) for name, array in pieces[0].items()}
    return {name: np.concatenate([piece[name] for piece in pieces]) for name in pieces[0]}


class _Totals(NamedTuple):
    """What one pass yields: batches and samples that run, samples dropped (static batch remainder)."""

    batches: int
    samples: int
    dropped: int


class CalibrationData:
    """Validated calibration samples, re-batched on every pass; build it with ``open_calibration_data``.

    In as-is mode (``as_is``) every chunk (file, feed dict) is one feed run as it is: a "sample" is
    then a whole feed, ``batch_size`` is 1 and feeds are never cut or joined.
    """

    def __init__(
        self,
        source: _Source,
        validator: _Validator,
        batch_size: int,
        fixed_batch: bool,
        max_samples: int | None,
    ) -> None:
        self._source = source
        self._validator = validator
        self._batch_size = batch_size
        self._fixed_batch = fixed_batch
        self._max_samples = max_samples
        self._passes = 0
        self._first_pass_samples: int | None = None

    @property
    def specs(self) -> list[InputSpec]:
        return list(self._validator.specs)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def as_is(self) -> bool:
        """True when every feed runs as it is (the model's inputs share no sample axis)."""
        return self._validator.as_is

    def samples_in(self, feed: Mapping[str, NDArray]) -> int:
        """Samples one feed of ``batches()`` holds: 1 in as-is mode, else the length of axis 0."""
        if self.as_is:
            return 1
        first = next(iter(feed.values()))
        return max(1, first.shape[0]) if first.ndim else 1

    def split(self, feed: Feed, rows: int) -> Iterator[Feed]:
        """``feed`` in runs of at most ``rows`` samples (views, no copies); as-is feeds stay whole.

        Cases: rows < 1 -> ValueError (no run could advance); as-is or a feed of <= rows samples
        -> the feed itself; otherwise consecutive slices along axis 0, each advancing by ``rows``.
        """
        if rows < 1:
            raise ValueError(f"a run must hold at least one sample, got {rows}")
        total = self.samples_in(feed)
        if self.as_is or total <= rows:
            yield feed
            return
        for start in range(0, total, rows):
            yield {name: array[start : start + rows] for name, array in feed.items()}

    @property
    def description(self) -> str:
        """Where the data comes from, for log messages."""
        return self._source.description

    def _planned_totals(self) -> _Totals | None:
        """Totals of a pass computed from headers/shapes alone, or None when only a pass can tell."""
        plan = self._source.plan()
        if plan is None:
            return None
        batches = samples = dropped = 0
        limited = _limit_plan(plan, self._max_samples)
        for batch in _plan_batches(limited, self._batch_size, self._fixed_batch):
            if batch.keep:
                batches += 1
                samples += batch.size
            else:
                dropped += batch.size
        return _Totals(batches, samples, dropped)

    @property
    def num_samples(self) -> int | None:
        """Samples one pass feeds to the model, or None when it is only known by reading the data.

        That is every sample (up to ``max_samples``), except that with a static batch dimension
        larger than 1 a partial batch cannot run through the model and is dropped with a warning.
        """
        totals = self._planned_totals()
        return None if totals is None else totals.samples

    @property
    def num_batches(self) -> int | None:
        """Batches one pass yields (for progress bars), or None when unknown."""
        totals = self._planned_totals()
        return None if totals is None else totals.batches

    def _validated_chunks(self) -> Iterator[tuple[Feed, int]]:
        """Validated chunks in source order, stopping once ``max_samples`` samples were read."""
        remaining = self._max_samples
        for raw in self._source.chunks():
            feed, count = self._validator.convert(raw, remaining)
            yield feed, count
            if remaining is not None:
                remaining -= count
                if remaining <= 0:
                    return

    def batches(self) -> Iterator[Feed]:
        """One pass over the data as feed dicts of ``batch_size`` samples (fewer at a shape change/end).

        Chunks are read lazily; only the chunks the current batch draws from stay referenced. The
        order and set of samples never depend on ``batch_size`` (see ``_plan_batches``).
        """
        pass_index = self._passes
        self._passes += 1
        if self.as_is:
            yield from self._feeds_as_is(pass_index)
            return
        loaded: dict[int, Feed] = {}

        def infos() -> Iterator[_ChunkInfo]:
            for index, (feed, count) in enumerate(self._validated_chunks()):
                loaded[index] = feed
                yield _ChunkInfo(count, _shape_signature(feed))

        samples = dropped = 0
        for batch in _plan_batches(infos(), self._batch_size, self._fixed_batch):
            if batch.keep:
                pieces = [
                    {name: array[piece.start : piece.stop] for name, array in loaded[piece.chunk].items()}
                    for piece in batch.pieces
                ]
                yield _join(pieces)
                samples += batch.size
            else:
                dropped += batch.size
            last_chunk = batch.pieces[-1].chunk
            for index in [index for index in loaded if index < last_chunk]:
                del loaded[index]
        self._finish_pass(pass_index, _Totals(0, samples, dropped))

    def _feeds_as_is(self, pass_index: int) -> Iterator[Feed]:
        """One pass in as-is mode: every validated chunk, unchanged, as one feed."""
        feeds = 0
        for feed, _count in self._validated_chunks():
            yield feed
            feeds += 1
        self._finish_pass(pass_index, _Totals(0, feeds, 0))

    def _finish_pass(self, pass_index: int, totals: _Totals) -> None:
        """Report dropped samples once, and refuse a pass that produced nothing."""
        if totals.dropped and pass_index == 0:
            logger.warning(
                "%s: dropped %d samples that do not fill a batch of the model's fixed batch size %d",
                self.description,
                totals.dropped,
                self._batch_size,
            )
        if totals.samples == 0:
            if self._first_pass_samples:
                raise OnnxqError(
                    f"{self.description} produced no samples on pass {pass_index + 1} "
                    f"after {self._first_pass_samples} on the first",
                    "pass a list of feed dicts or a function that returns a fresh iterator on each call",
                )
            raise self._no_samples_error(totals.dropped)
        if self._first_pass_samples is None:
            self._first_pass_samples = totals.samples

    def _no_samples_error(self, dropped: int) -> OnnxqError:
        """Empty data, or too few samples to fill one batch of the model's static batch size."""
        if dropped:
            return OnnxqError(
                f"{self.description} has {dropped} usable samples, fewer than the model's fixed "
                f"batch size {self._batch_size}",
                f"provide at least {self._batch_size} samples of the same shape",
            )
        return OnnxqError(
            f"{self.description} contains no samples",
            "provide at least one sample per model input",
        )

    def check_not_empty(self) -> None:
        """Fail at open, where the size is known without reading the data, rather than mid-calibration."""
        totals = self._planned_totals()
        if totals is not None and totals.samples == 0:
            raise self._no_samples_error(totals.dropped)

    def fingerprint(self) -> str:
        """sha256 of every sample (input names, dtypes, shapes, bytes) in order, as the model sees them.

        Hashed sample by sample, so the digest does not depend on ``batch_size``; in as-is mode each
        feed is hashed whole (shapes included, so rank-0 inputs hash too). This reads the data once
        more (one pass). Used as the calibration cache key.
        """
        digest = hashlib.sha256(_FINGERPRINT_TAG)
        for feed in self.batches():
            if self.as_is:
                _hash_sample(digest, feed)
                continue
            for index in range(self.samples_in(feed)):
                _hash_sample(digest, {name: array[index] for name, array in feed.items()})
        return digest.hexdigest()


def _hash_sample(digest: Any, sample: Mapping[str, NDArray]) -> None:
    """Names, dtypes, shapes and bytes of one sample, in the model's input order."""
    for name, array in sample.items():
        contiguous = np.ascontiguousarray(array)
        header = f"{name}\0{contiguous.dtype.str}\0{contiguous.shape}\0{contiguous.nbytes}\n"
        digest.update(header.encode("utf-8"))
        digest.update(contiguous.tobytes())


# ----------------------------------------------------------------------------------------------
# entry point


def _check_specs(specs: Sequence[InputSpec]) -> None:
    """The specs come from the model: at least one input, each name once."""
    if not specs:
        raise OnnxqError("the model has no inputs to calibrate", "check the model's graph inputs")
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise OnnxqError(
            f"the model declares input(s) {', '.join(repr(n) for n in duplicates)} more than once",
            "fix the model's graph inputs",
        )


def _resolve_batch_size(specs: Sequence[InputSpec], requested: int | None) -> tuple[int, bool]:
    """The model's static batch dimension wins; otherwise the request, otherwise the default.

    Only called for inputs that share a sample axis, so there is at most one static batch size.
    """
    fixed = {spec.fixed_batch for spec in specs if spec.fixed_batch is not None}
    if requested is not None and requested < 1:
        raise OnnxqError(f"batch size must be at least 1, got {requested}", "pass a positive batch size")
    if fixed:
        static = fixed.pop()
        if requested is not None and requested != static:
            raise OnnxqError(
                f"batch size {requested} was requested, but the model's batch dimension is fixed to {static}",
                f"omit the batch size or set it to {static}",
            )
        return static, True
    return (requested if requested is not None else DEFAULT_BATCH_SIZE), False


def open_calibration_data(
    source: CalibrationSource,
    specs: Sequence[InputSpec],
    batch_size: int | None = None,
    max_samples: int | None = None,
) -> CalibrationData:
    """Open and validate calibration data for a model with inputs ``specs``.

    Structure (names, ranks, static dims, dtypes, sample counts) is checked now wherever it is known
    without reading the data (files, dicts, lists); values (NaN/Inf) are checked as the data is read.
    ``batch_size`` defaults to the model's static batch dimension, else ``DEFAULT_BATCH_SIZE``;
    ``max_samples`` keeps the first samples in order.

    Mode: inputs that share a sample axis (``shares_sample_axis``) are batched along axis 0. Where
    they do not, or where a file/dict/list holds full-rank arrays with different leading sizes, each
    chunk (file, dict, feed) is one feed run as it is (``max_samples`` then counts feeds and
    ``batch_size`` is ignored).
    """
    _check_specs(specs)
    if max_samples is not None and max_samples < 1:
        raise OnnxqError(f"max samples must be at least 1, got {max_samples}", "pass a positive number")
    if not shares_sample_axis(specs):
        return _open_as_is(source, specs, batch_size, max_samples, "the model's inputs share no sample axis")
    size, fixed = _resolve_batch_size(specs, batch_size)
    validator = _Validator(specs)
    try:
        data = CalibrationData(_make_source(source, validator), validator, size, fixed, max_samples)
    except _SampleCountMismatchError as error:
        if not error.full_rank or _one_named_batch(specs):
            raise
        # Full-rank arrays with different leading sizes: feeds the model takes as they are.
        return _open_as_is(source, specs, batch_size, max_samples, error.problem)
    data.check_not_empty()
    return data


def _one_named_batch(specs: Sequence[InputSpec]) -> bool:
    """True when every input's axis 0 carries the same symbolic name ("batch"): the model says they
    share it, so different sample counts are a data error, never feeds to run as they are."""
    leading = {spec.shape[0] for spec in specs}
    return len(leading) == 1 and isinstance(next(iter(leading)), str)


def _open_as_is(
    source: CalibrationSource,
    specs: Sequence[InputSpec],
    batch_size: int | None,
    max_samples: int | None,
    why: str,
) -> CalibrationData:
    """Calibration data whose every chunk runs as it is (one feed per file, dict or list entry)."""
    logger.info("calibration feeds run as they are, one per file or feed dict (%s)", why)
    if batch_size is not None:
        logger.warning("batch size %d ignored: each calibration feed runs as it is (%s)", batch_size, why)
    validator = _Validator(specs, as_is=True)
    data = CalibrationData(_make_source(source, validator), validator, 1, False, max_samples)
    data.check_not_empty()
    return data
