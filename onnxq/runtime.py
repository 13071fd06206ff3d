"""ONNX Runtime sessions for calibration and comparison: providers, custom ops, readable errors."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

import onnx_ir as ir
import onnxruntime as ort

from onnxq.errors import OnnxqError
from onnxq.model_io import session_model
from onnxq.output_check import optimization_level

logger = logging.getLogger(__name__)

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
#: GPU first when the installed build has it
DEFAULT_PROVIDER_ORDER = ("CUDAExecutionProvider", "CPUExecutionProvider")
_MISSING_KERNEL = re.compile(r"implementation for (\S+?)\((\d+)\) node with name '([^']*)'")
_UNREGISTERED_OP = re.compile(r"(\S+):(\S+?)\((-?\d+)\) is not a registered function/op")


def resolve_providers(names: Sequence[str] | None) -> list[str]:
    """Execution providers by short or full name; unavailable ones are an error naming what exists."""
    available = ort.get_available_providers()
    if not names:
        return [p for p in DEFAULT_PROVIDER_ORDER if p in available]
    providers = [PROVIDER_NAMES.get(n.strip().lower(), n.strip()) for n in names if n.strip()]
    missing = [p for p in providers if p not in available]
    if missing:
        raise OnnxqError(
            f"execution provider(s) {', '.join(missing)} not available in this onnxruntime build",
            f"use one of {', '.join(available)} (install onnxq[gpu] for CUDA)",
        )
    return providers


def make_session(
    model: ir.Model,
    providers: Sequence[str] | None = None,
    custom_ops: Sequence[str] = (),
    threads: int | None = None,
    fused_kernels: bool = True,
    streaming: bool = False,
) -> ort.InferenceSession:
    """A session over ``model``; external weights are read from their folder, not copied.

    ``streaming`` configures calibration models (see below). ``fused_kernels`` False runs Q/DQ as written (graph optimizations at BASIC): the numerics every
    runtime must reproduce, without ORT's CPU-specific integer kernels (which on x86 without VNNI
    lose accuracy: measured 20.6 dB vs 40.1 dB on an INT8 MatMul model).
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if streaming:
        # Calibration models read every tensor twice (model + statistics). The default order runs the
        # statistics last, keeping all tensors alive; priority order frees each one early (measured,
        # 12-layer encoder, 396 tensors, batch 32: 4111 MB default, 669 MB priority-based). Without
        # the arena, the big outputs' memory goes back to the system after each run.
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        options.enable_cpu_mem_arena = False
        # Pre-packed GEMM weights are a second copy of every weight, and a calibration run is too short
        # to gain from them (measured on a 537 MB model: peak RSS 1204 MB with pre-packing).
        options.add_session_config_entry("session.disable_prepacking", "1")
    # Exact INT4 block DQ -> MatMul instead of silent int8 compute (ORT's MatMulNBits default).
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        options.intra_op_num_threads = threads
    level = optimization_level(model, fused_kernels)
    if level is not None:
        options.graph_optimization_level = level
    for library in custom_ops:
        _register_custom_ops(options, library)
    # resolved outside the try below: its own error must not be wrapped as a model-load failure
    resolved = resolve_providers(providers)
    proto_bytes, folder = session_model(model)
    if folder:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    try:
        return ort.InferenceSession(proto_bytes, options, providers=resolved)
    except Exception as error:  # ORT raises several private exception types
        raise _session_error(error) from error


def _register_custom_ops(options: ort.SessionOptions, library: str) -> None:
    if not os.path.isfile(library):
        raise OnnxqError(
            f"custom-op library {library} does not exist", "pass the path of the compiled .so/.dll"
        )
    try:
        options.register_custom_ops_library(library)
    except Exception as error:
        raise OnnxqError(
            f"cannot load custom-op library {library}: {error}", "check it matches this onnxruntime"
        ) from error


def _session_error(error: Exception) -> OnnxqError:
    message = str(error)
    fix = (
        "register its kernels with --ort-custom-ops LIB, pick a provider that has them with --providers, "
        "or give the ranges with --calib-cache/--calib-overrides"
    )
    if match := _MISSING_KERNEL.search(message):
        op, version, node = match.groups()
        return OnnxqError(f"ONNX Runtime has no kernel for {op} (opset {version}, node {node!r})", fix)
    if match := _UNREGISTERED_OP.search(message):
        domain, op, _ = match.groups()
        return OnnxqError(f"ONNX Runtime does not know op {domain}:{op}", fix)
    first_line = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    return OnnxqError(f"ONNX Runtime cannot load the model: {first_line[:300]}", fix)
