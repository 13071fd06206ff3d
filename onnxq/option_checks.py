"""Checks of the quantize options, run before any work so that a typo fails in a second, not after
calibration: each problem is one ``OnnxqError`` naming the option and the fix.

Cases: a regular expression that does not compile; an op type ONNX does not define (near matches are
suggested); a memory budget, percentile, batch size or sample count that is not a positive finite
number; an option file that does not exist; a cache whose folder does not exist.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from onnxq.errors import OnnxqError


def check_exclude_regex(pattern: str | None) -> None:
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as error:
        raise OnnxqError(
            f"--exclude-nodes {pattern!r} is not a valid regular expression ({error})",
            "escape special characters with a backslash, e.g. 'conv\\.1|fc'",
        ) from error


def check_op_types(op_types: Sequence[str] | None) -> None:
    """Every op type must be one ONNX defines (any domain), spelled as ONNX spells it."""
    if not op_types:
        return
    import onnx.defs

    known = sorted({schema.name for schema in onnx.defs.get_all_schemas()})
    for op_type in op_types:
        if op_type in known:
            continue
        near = difflib.get_close_matches(op_type, known, n=3) or [
            k for k in known if k.lower() == op_type.lower()
        ]
        hint = f"use {' or '.join(near)}" if near else "use ONNX op type names, e.g. Conv,MatMul,Gemm"
        raise OnnxqError(f"--op-types names {op_type!r}, which is not an ONNX op type", hint)


def check_positive(name: str, value: float | None, *, integer: bool = False) -> None:
    if value is None:
        return
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise OnnxqError(
            f"{name} must be a whole number, got {value!r}", f"pass {name} as a positive integer"
        )
    if not math.isfinite(value) or value <= 0:
        raise OnnxqError(f"{name} must be a positive number, got {value!r}", f"pass a positive {name}")


def check_percentile(value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and 0.0 < value <= 100.0):
        raise OnnxqError(f"--percentile must be in (0, 100], got {value!r}", "pass e.g. --percentile 99.99")


def check_existing_file(option: str, path: str | os.PathLike[str] | None, what: str = "file") -> None:
    if path is None:
        return
    if not Path(path).is_file():
        problem = "is a directory" if Path(path).is_dir() else "does not exist"
        raise OnnxqError(f"{option} {what} {path} {problem}", f"check the path given to {option}")


def check_parent_folder(option: str, path: str | os.PathLike[str] | None) -> None:
    if path is None:
        return
    folder = Path(path).parent if str(Path(path).parent) else Path(".")
    if not folder.is_dir():
        raise OnnxqError(f"the folder of {option} {path} does not exist", "create it or choose another path")
    if Path(path).is_dir():
        raise OnnxqError(f"{option} {path} is a directory", "pass a file path")


def check_not_same_file(option: str, written: Path, read: Path, what: str) -> None:
    """A file the run writes must not be one it reads (or a file inside a data folder it reads)."""
    if not written.exists():
        return
    inside = read.is_dir() and written.resolve().parent == read.resolve()
    if inside or (read.exists() and os.path.samefile(written, read)):
        raise OnnxqError(
            f"{option} {written} would overwrite {what} file {read}",
            f"choose another path for {option}; onnxq never overwrites what it reads",
        )
