"""``onnxq convert model.onnx --to fp16|bf16``: the float16/bfloat16 baseline of an unquantized model
(also works on an onnxq-quantized model whose rest is float32).

Cases handled: the output path is checked before any work (never the input nor a file it uses);
without data, ops listed in ``DEFAULT_KEEP_FP32_OPS`` stay float32 and out-of-range initializer
values are clamped; with calibration data (same forms as ``onnxq quantize --calib``) every float32
tensor's observed ``max |value|`` is measured in ONNX Runtime first, and tensors beyond the float16
limit keep their nodes float32; models over 2 GB are read and written with external data.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import onnx.checker
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.graph import passes
from onnxq.graph.float_conversion import (
    DEFAULT_KEEP_FP32_OPS,
    TARGET_TYPES,
    ConversionReport,
    convert_float_precision,
)
from onnxq.model_io import check_output_path, data_path, load_model, save_model


def convert_file(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    to: str,
    low_precision_io: bool = False,
    data: Any = None,
    *,
    keep_ops: Iterable[str] = DEFAULT_KEEP_FP32_OPS,
    keep_nodes: Iterable[str] = (),
) -> ConversionReport:
    """Convert the model at ``source`` to ``to`` ("fp16" or "bf16") and write it to ``destination``."""
    if to not in TARGET_TYPES:
        raise OnnxqError(f"--to {to!r} is not a conversion target", f"pass one of {', '.join(TARGET_TYPES)}")
    check_output_path(Path(source), Path(destination))
    model = load_model(source)
    ranges = observed_ranges(model, data) if data is not None else None
    report = convert_float_precision(
        model,
        to,
        tensor_ranges=ranges,
        keep_ops=keep_ops,
        keep_nodes=keep_nodes,
        low_precision_io=low_precision_io,
    )
    model.producer_name = "onnxq"
    if to == "bf16":
        _save_bfloat16(model, Path(destination))
    else:
        save_model(model, destination)
    return report


def _save_bfloat16(model: ir.Model, destination: Path) -> None:
    """ONNX Runtime's CPU build has no bfloat16 MatMul/Conv/Add kernels, so the load check that
    ``save_model`` runs would refuse every bfloat16 model: the ONNX checker (full check, strict shape
    inference) checks it instead, and a model it rejects is removed."""
    save_model(model, destination, check=False)
    try:
        onnx.checker.check_model(str(destination), full_check=True)
    except Exception as error:  # ValidationError, InferenceError and C++ errors of other kinds
        destination.unlink(missing_ok=True)
        data_path(destination).unlink(missing_ok=True)
        raise OnnxqError(
            f"the bfloat16 model failed the ONNX checker: {str(error).strip().splitlines()[0]}",
            "rerun with --debug and report it",
        ) from error


def observed_ranges(model: ir.Model, data: Any) -> Mapping[str, float]:
    """``max |value|`` of every float32 tensor of the main graph over ``data`` (finite values only:
    -inf from attention masks is fine in float16 and says nothing about overflow)."""
    from onnxq.api import input_specs
    from onnxq.calibration.calibrator import CalibrationSettings, calibrate
    from onnxq.calibration.data import open_calibration_data
    from onnxq.calibration.methods import get_method
    from onnxq.formats import get_format

    passes.lift_constant_nodes(model)
    passes.infer_shapes(model)
    tensors = [v.name for v in model.graph.inputs if v.dtype == ir.DataType.FLOAT and v.name]
    tensors += [v.name for n in model.graph for v in n.outputs if v.dtype == ir.DataType.FLOAT and v.name]
    if not tensors:
        return {}
    opened = open_calibration_data(data, input_specs(model))
    found = calibrate(model, tensors, opened, get_method("max"), get_format("int8"), CalibrationSettings())
    return {name: found[name].stats.amax for name in tensors if found[name].stats.has_data}
