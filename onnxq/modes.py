"""What each ``--mode`` quantizes, and in which number format.

A mode has up to two parts:

- the **base** format (INT8 or FP8, per tensor for activations, per channel for weights) of the Q/DQ
  that the target's rule set places (Conv, residual Add, pooling, attention BMMs, and the activations
  of the GEMMs that take them);
- the **block weight** format of MatMul/Gemm weights (INT4 per block of ``--block-size``, NVFP4 per
  16, MXFP8 per 32), with the GEMM's activation input in float, in the base format, or quantized at
  run time per block (NVFP4: ``TRT_FP4DynamicQuantize`` with a calibrated global scale; MXFP8:
  ``TRT_MXFP8DynamicQuantize``).

| mode        | GEMM weights | GEMM activations | everything else (Conv, BMM, Add) |
|-------------|--------------|------------------|----------------------------------|
| int8        | INT8/channel | INT8             | INT8                             |
| fp8         | FP8/channel  | FP8              | FP8                              |
| int4        | INT4 block   | float            | float                            |
| nvfp4       | NVFP4        | NVFP4 dynamic    | FP8 (TensorRT has no FP4 Conv)   |
| nvfp4-w4a16 | NVFP4        | float            | float                            |
| w4a8        | NVFP4        | FP8              | FP8                              |
| int4-w4a8   | INT4 block   | FP8              | FP8                              |
| mxfp8       | MXFP8        | MXFP8 dynamic    | FP8                              |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from onnxq.choices import ALGORITHMS, DEFAULT_INT4_BLOCK_SIZE, MODES
from onnxq.errors import OnnxqError

BlockWeight = Literal["int4", "nvfp4", "mxfp8"]
GemmActivation = Literal["float", "base", "nvfp4", "mxfp8"]

NVFP4_BLOCK = 16
MXFP8_BLOCK = 32
#: blocked DequantizeLinear (INT4) needs opset 21; FLOAT4E2M1 23; FLOAT8E8M0 scales 24
INT4_OPSET, NVFP4_OPSET, MXFP8_OPSET = 21, 23, 24
#: INT4/UINT4 tensors need IR 10; FLOAT4E2M1 and FLOAT8E8M0 need IR 11
INT4_IR, FP4_IR = 10, 11


@dataclass(frozen=True)
class ModeSpec:
    name: str
    #: format of the rule set's Q/DQ ("int8", "fp8"), None for weight-only modes (the rest stays float)
    base: str | None
    block_weight: BlockWeight | None = None
    gemm_activation: GemmActivation = "base"
    targets: tuple[str, ...] = ("tensorrt", "ort")
    algorithms: tuple[str, ...] = ()
    min_opset: int = 0
    min_ir_version: int = 0
    #: a fixed block size (NVFP4 16, MXFP8 32); None: --block-size chooses (INT4)
    fixed_block_size: int | None = None

    @property
    def weight_only(self) -> bool:
        return self.base is None

    def describe(self) -> str:
        weights = self.block_weight or self.base or "float"
        activation = {"float": "float", "base": self.base or "float"}.get(
            self.gemm_activation, self.gemm_activation
        )
        return (
            f"{self.name}: GEMM weights {weights}, GEMM activations {activation}, rest {self.base or 'float'}"
        )


_INT4_ALGORITHMS = ALGORITHMS
MODE_SPECS: dict[str, ModeSpec] = {
    "int8": ModeSpec("int8", "int8"),
    "fp8": ModeSpec("fp8", "fp8", min_opset=19),
    "int4": ModeSpec(
        "int4", None, "int4", "float", algorithms=_INT4_ALGORITHMS, min_opset=INT4_OPSET, min_ir_version=INT4_IR
    ),
    "nvfp4": ModeSpec(
        "nvfp4", "fp8", "nvfp4", "nvfp4", ("tensorrt",), min_opset=NVFP4_OPSET, min_ir_version=FP4_IR,
        fixed_block_size=NVFP4_BLOCK,
    ),
    "nvfp4-w4a16": ModeSpec(
        "nvfp4-w4a16", None, "nvfp4", "float", ("tensorrt",), min_opset=NVFP4_OPSET, min_ir_version=FP4_IR,
        fixed_block_size=NVFP4_BLOCK,
    ),
    "w4a8": ModeSpec(
        "w4a8", "fp8", "nvfp4", "base", ("tensorrt",), min_opset=NVFP4_OPSET, min_ir_version=FP4_IR,
        fixed_block_size=NVFP4_BLOCK,
    ),
    "int4-w4a8": ModeSpec(
        "int4-w4a8", "fp8", "int4", "base", ("tensorrt",), algorithms=_INT4_ALGORITHMS, min_opset=INT4_OPSET,
        min_ir_version=INT4_IR,
    ),
    "mxfp8": ModeSpec(
        "mxfp8", "fp8", "mxfp8", "mxfp8", ("tensorrt",), min_opset=MXFP8_OPSET, min_ir_version=FP4_IR,
        fixed_block_size=MXFP8_BLOCK,
    ),
}  # fmt: skip
assert tuple(MODE_SPECS) == MODES, "choices.MODES and MODE_SPECS must list the same modes"


def mode_spec(mode: str) -> ModeSpec:
    if mode not in MODE_SPECS:
        raise OnnxqError(f"unknown mode {mode!r}", f"use one of {', '.join(MODES)}")
    return MODE_SPECS[mode]


def check_mode_options(
    spec: ModeSpec,
    target: str,
    algorithm: str | None,
    block_size: int | None,
    zero_point: bool,
    opset: int | None,
) -> None:
    """One-line refusals for option combinations a mode cannot honour (before any work)."""
    if target not in spec.targets:
        raise OnnxqError(
            f"--mode {spec.name} is a TensorRT format: ONNX Runtime has no kernels for it",
            "use --target tensorrt (evaluate on a CPU with onnxq emulate / onnxq compare), "
            "or --mode int4 for ONNX Runtime's MatMulNBits",
        )
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise OnnxqError(f"unknown --algo {algorithm!r}", f"use one of {', '.join(ALGORITHMS)}")
    if algorithm is not None and algorithm not in spec.algorithms:
        supported = ", ".join(m for m, s in MODE_SPECS.items() if algorithm in s.algorithms)
        raise OnnxqError(
            f"--algo {algorithm} does not apply to --mode {spec.name} (its weights are not INT4)",
            f"drop --algo, or use it with --mode {supported}",
        )
    if zero_point and spec.block_weight != "int4":
        raise OnnxqError(
            f"--zero-point does not apply to --mode {spec.name}", "use it with --mode int4 or int4-w4a8"
        )
    _check_block_size(spec, target, block_size)
    if opset is not None and opset < spec.min_opset:
        raise OnnxqError(
            f"--mode {spec.name} needs opset >= {spec.min_opset}, but --opset {opset} was asked for",
            f"pass --opset {spec.min_opset} or higher, or drop --opset",
        )


def _check_block_size(spec: ModeSpec, target: str, block_size: int | None) -> None:
    if block_size is None:
        return
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise OnnxqError(
            f"--block-size {block_size!r} is not a positive integer", "pass e.g. --block-size 128"
        )
    if spec.block_weight is None:
        raise OnnxqError(
            f"--block-size does not apply to --mode {spec.name} (per-channel weights)",
            "use it with --mode int4 or int4-w4a8",
        )
    if spec.fixed_block_size is not None and block_size != spec.fixed_block_size:
        raise OnnxqError(
            f"--mode {spec.name} has a fixed block size of {spec.fixed_block_size}, not {block_size}",
            "drop --block-size",
        )
    if spec.block_weight == "int4" and (block_size < 16 or block_size & (block_size - 1)):
        runtime = "ONNX Runtime's MatMulNBits" if target == "ort" else "TensorRT's INT4 GEMM kernels"
        raise OnnxqError(
            f"--block-size {block_size} is not a power of two >= 16, which {runtime} need",
            f"pass 32, 64, 128 (default {DEFAULT_INT4_BLOCK_SIZE}) or 256",
        )
