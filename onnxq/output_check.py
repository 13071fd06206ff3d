"""The last step before an output is renamed into place: is the written model valid and loadable?

Two checks on the written files, by path (so models over 2 GB are checked without ever serializing a
proto over 2 GB): ``onnx.checker`` with full shape checking, then an ONNX Runtime CPU session, which
reads the external data from the output's own folder. A model with NVFP4/MXFP8 parts (FLOAT4E2M1 or
FLOAT8E8M0 tensors, TensorRT's ``trt`` dynamic-quantize ops), which no ONNX Runtime CPU kernel runs, is
loaded in its emulated form (``onnxq.emulate``: the same numbers in standard ops). The session is
skipped, with a debug line, where ONNX Runtime cannot run the model at all: ops of other custom
domains without a custom-op library.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx.checker
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.graph.walk import all_nodes, all_values

logger = logging.getLogger(__name__)

#: op domains ONNX Runtime's CPU build implements
ORT_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
FLOAT8_TYPES = frozenset(
    {ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E4M3FNUZ, ir.DataType.FLOAT8E5M2, ir.DataType.FLOAT8E5M2FNUZ}
)
#: no ONNX Runtime CPU kernel computes on these
UNRUNNABLE_TYPES = frozenset({ir.DataType.FLOAT4E2M1})
_FIX = "rerun with --debug and report it"
#: above this size the emulated load check (float32 weights, 8x the FP4 bytes) is skipped
EMULATED_CHECK_LIMIT_BYTES = 256 * 1024 * 1024


def check_output(path: Path, model: ir.Model, custom_ops: Sequence[str] = ()) -> None:
    """Raise ``OnnxqError`` when the model written at ``path`` (``model`` in memory) is not valid.

    Cases: the ONNX checker rejects it; ONNX Runtime cannot create a CPU session for it (skipped for
    models ORT cannot run, see the module docstring). ``custom_ops`` libraries are registered.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:  # ValidationError, InferenceError, and C++ errors of other kinds
        logger.debug("the ONNX checker rejected %s", path, exc_info=True)
        raise OnnxqError(
            f"the quantized model failed the ONNX checker: {_first_line(error)}", _FIX
        ) from error
    from onnxq.emulate import needs_emulation

    if needs_emulation(model):
        _load_emulated(path, model, custom_ops)
        return
    reason = _why_ort_cannot_run(model, custom_ops)
    if reason:
        logger.debug("ONNX Runtime load of the output skipped: %s", reason)
        return
    _load_in_ort(path, model, custom_ops)


def _load_emulated(path: Path, model: ir.Model, custom_ops: Sequence[str]) -> None:
    """Emulate a copy (external weights stay on disk) and load it from a temporary file beside ``path``."""
    import tempfile

    from onnxq.emulate import emulate
    from onnxq.model_io import clone_model, model_file_size

    size = model_file_size(path)
    if size > EMULATED_CHECK_LIMIT_BYTES:
        # emulation turns FP4 weights into float32 ones (8x): a big model is checked by the checker only
        logger.info(
            "ONNX Runtime load of the emulated output skipped: %.0f MB of FP4/MXFP8 model", size / 1e6
        )
        return
    copy = clone_model(model)
    try:
        emulate(copy)
    except OnnxqError as error:  # e.g. FP4 Q/DQ of activations kept from the input (--keep-quantized)
        logger.debug("ONNX Runtime load of the output skipped: no emulation for it (%s)", error.problem)
        return
    reason = _why_ort_cannot_run(copy, custom_ops)
    if reason:
        logger.debug("ONNX Runtime load of the emulated output skipped: %s", reason)
        return
    with tempfile.TemporaryDirectory(prefix=".onnxq-check-", dir=path.parent) as folder:
        emulated = Path(folder) / path.name
        ir.save(copy, emulated, external_data=f"{path.name}.data")
        _load_in_ort(emulated, copy, custom_ops)


def _load_in_ort(path: Path, model: ir.Model, custom_ops: Sequence[str]) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1  # a load, not a run
    # a load check: pre-packed weights would be a second copy of every weight for nothing
    options.add_session_config_entry("session.disable_prepacking", "1")
    level = optimization_level(model)
    if level is not None:
        options.graph_optimization_level = level
    for library in custom_ops:
        try:
            options.register_custom_ops_library(str(library))
        except Exception as error:
            raise OnnxqError(
                f"cannot load custom-op library {library}: {_first_line(error)}", _FIX
            ) from error
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises several private exception types
        logger.debug("ONNX Runtime could not load %s", path, exc_info=True)
        raise OnnxqError(
            f"the quantized model failed to load in ONNX Runtime: {_first_line(error)}", _FIX
        ) from error


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


def _why_ort_cannot_run(model: ir.Model, custom_ops: Sequence[str]) -> str | None:
    """Why an ONNX Runtime CPU session cannot be made for ``model``; None when it can."""
    functions = {(f.domain, f.name, f.overload) for f in model.functions.values()}
    if not custom_ops:
        for node in all_nodes(model):
            if node.domain not in ORT_DOMAINS and (node.domain, node.op_type, node.overload) not in functions:
                return f"node {node.name!r} is {node.domain}:{node.op_type}, a custom op"
    for value in all_values(model):
        if value.dtype == ir.DataType.BFLOAT16 and value.producer() is not None:
            return f"tensor {value.name!r} is computed in bfloat16, which ONNX Runtime's CPU kernels lack"
        if value.dtype in UNRUNNABLE_TYPES:
            return f"tensor {value.name!r} is {value.dtype.name}, which ONNX Runtime's CPU build cannot run"
    return None


def optimization_level(model: ir.Model, fused_kernels: bool = True) -> Any:
    """The ONNX Runtime graph optimization level every onnxq session and load check uses for ``model``;
    None: ORT's default (all levels, its fused CPU kernels).

    - float16/bfloat16 tensors: optimizations off. ORT 1.32 CPU miscomputes a float16
      DequantizeLinear -> Conv even at BASIC (ddddocr_common INT8 with an FP16 rest: -68 dB at the Conv
      against 72 dB as written), its QLinear* fusions refuse float16 scales, and its level-3 passes
      crash the process on an emulated FP16 CNN (aecmos_16k, nvfp4-w4a16);
    - FP8 tensors, or ``fused_kernels`` False: BASIC. ORT's extended fusions change FP8 Q/DQ -> Conv/Add
      numerics (32.3 dB at BASIC against 11.2 dB at EXTENDED on the same model); BASIC runs Q/DQ as
      written without ORT's CPU-specific integer kernels.
    """
    import onnxruntime as ort

    if has_half_precision(model):
        return ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not fused_kernels or has_float8(model):
        return ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return None


def has_half_precision(model: ir.Model) -> bool:
    """Any float16 or bfloat16 tensor, initializer or computed (the FP16/BF16 rest)."""
    return any(value.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16) for value in all_values(model))


def has_float8(model: ir.Model) -> bool:
    """Any FP8 tensor, initializer or computed, in the graph, its subgraphs or its functions."""
    return any(value.dtype in FLOAT8_TYPES for value in all_values(model))
