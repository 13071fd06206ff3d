"""NVFP4: global/block scale formulas, FP8-rounded block scales, and agreement with onnx.reference."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxq.formats.fp4_e2m1 import FLOAT4_E2M1FN, fp4_codes, pack_fp4, saturate_to_fp4
from onnxq.formats.fp8_e4m3 import FLOAT8_E4M3FN, FP8_E4M3_MAX, FP8_E4M3_MIN_SUBNORMAL
from onnxq.formats.nvfp4 import (
    NVFP4_BLOCK_SIZE,
    NVFP4_GLOBAL_DIVISOR,
    NVFP4_MIN_IR_VERSION,
    NVFP4_MIN_OPSET,
    Nvfp4Tensor,
    dequantize_nvfp4,
    effective_scale,
    fake_quantize_nvfp4,
    nvfp4_block_scale,
    nvfp4_global_scale,
    quantize_nvfp4,
    round_block_scale,
)

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None)


def test_scale_formulas() -> None:
    assert NVFP4_GLOBAL_DIVISOR == 6 * 448 == 2688
    assert float(nvfp4_global_scale(2688.0)) == 1.0
    assert float(nvfp4_global_scale(0.0)) == 1.0  # an all-zero tensor: any positive scale
    g = nvfp4_global_scale(np.float32(5.0))
    assert g == np.float32(5.0) / np.float32(2688)
    # the tensor's largest block lands on 448 (up to one float32 rounding), the top of FP8 E4M3
    assert float(nvfp4_block_scale(np.float32(5.0), g)) == pytest.approx(448.0, rel=1e-6)
    assert float(round_block_scale(nvfp4_block_scale(np.float32(5.0), g)).astype(np.float32)) == 448.0


# (unrounded block scale, stored FP8 value): ties to even, clamped to [2**-9, 448], never 0
BLOCK_SCALE_GOLDEN = [
    (8.5, 8.0),  # tie 8 / 9: even mantissa
    (9.5, 10.0),
    (448.0, 448.0),
    (460.0, 448.0),  # above FP8's range (data beyond a calibrated amax)
    (1e9, 448.0),
    (0.0, FP8_E4M3_MIN_SUBNORMAL),  # all-zero block: positive (TensorRT requires scales > 0)
    (1e-6, FP8_E4M3_MIN_SUBNORMAL),  # would round to 0 in FP8
    (2.0**-9, 2.0**-9),
]


@pytest.mark.parametrize(("scale", "stored"), BLOCK_SCALE_GOLDEN)
def test_block_scale_rounding_golden(scale: float, stored: float) -> None:
    rounded = round_block_scale(np.array([scale], np.float32))
    assert rounded.dtype == FLOAT8_E4M3FN and float(rounded.astype(np.float32)[0]) == stored


def test_values_use_the_fp8_rounded_block_scale() -> None:
    """Global scale 1 (amax 2688); block scales computed by hand.

    Block 0: amax 51 -> scale 8.5 -> FP8 8 (tie to even). 21 / 8 = 2.625 -> 3 (deq 24); with the
    unrounded scale 21 / 8.5 = 2.47 would give code 2 (deq 16 once deployed). 20 / 8 = 2.5 -> 2 (tie).
    51 / 8 = 6.375 saturates to 6. Block 1: all zero. Block 2: amax 1e-4 -> scale 1.7e-5, lifted to
    2**-9 (never 0), values round to 0. Block 3: amax 6000 > 2688 -> scale 1000 clamps to 448.
    """
    w = np.zeros((64,), np.float32)
    w[0:5] = [51.0, 21.0, 20.0, 0.0, -21.0]
    w[32] = 1e-4
    w[48:50] = [6000.0, -448.0]
    q = quantize_nvfp4(w, axis=0, amax=2688.0)
    assert float(q.global_scale) == 1.0
    assert q.block_scales.astype(np.float32).tolist() == [8.0, 2.0**-9, 2.0**-9, 448.0]
    assert q.values[:5].astype(np.float32).tolist() == [6.0, 3.0, 2.0, 0.0, -3.0]
    deq = dequantize_nvfp4(q)
    assert deq[:5].tolist() == [48.0, 24.0, 16.0, 0.0, -24.0]
    assert deq[16:48].tolist() == [0.0] * 32
    assert deq[48:50].tolist() == [2688.0, -448.0]


def test_all_zero_tensor() -> None:
    q = quantize_nvfp4(np.zeros((32, 3), np.float32), axis=0)
    assert float(q.global_scale) == 1.0 and (q.block_scales.astype(np.float32) > 0).all()
    assert (fp4_codes(q.values) == 0).all() and (dequantize_nvfp4(q) == 0).all()


def nvfp4_reference_model(q: Nvfp4Tensor, shape: tuple[int, ...]) -> onnx.ModelProto:
    """x -> QuantizeLinear(x, s) and the deployed two-DQ chain, with s = DQ(block_scales, global)."""
    attrs = {"axis": q.axis, "block_size": q.block_size}
    nodes = [
        helper.make_node("DequantizeLinear", ["bs", "g"], ["s"]),
        helper.make_node("QuantizeLinear", ["x", "s"], ["y"], output_dtype=TensorProto.FLOAT4E2M1, **attrs),
        helper.make_node("DequantizeLinear", ["w", "s"], ["deq"], **attrs),
    ]
    graph = helper.make_graph(
        nodes, "nvfp4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT4E2M1, shape),
         helper.make_tensor_value_info("deq", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(q.block_scales, "bs"), numpy_helper.from_array(q.global_scale, "g"),
         numpy_helper.from_array(q.values, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", NVFP4_MIN_OPSET)])
    model.ir_version = NVFP4_MIN_IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


@st.composite
def tensors(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    """Tensors of rank 1-3 with lengths that 16 may not divide, values spread over many magnitudes."""
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40))
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1000, 1000, width=32)))
    magnitudes = draw(hnp.arrays(np.float32, shape, elements=st.sampled_from([1e-6, 1e-2, 1.0, 1e3])))
    return (x * magnitudes).astype(np.float32), draw(st.integers(-len(shape), len(shape) - 1))


@FAST
@given(tensors())
# a one-element block whose FP8 block scale is subnormal (0.0049 rounds to 0.0039): 7.5 steps saturate
@example((np.array([[1.01, 1.1e-5]], np.float32), 0))
def test_matches_onnx_reference(case: tuple[np.ndarray, int]) -> None:
    """Codes equal QuantizeLinear with the deployed scale; dequantization equals the two-DQ chain bit for bit."""
    x, axis = case
    q = quantize_nvfp4(x, axis)
    assert q.values.dtype == FLOAT4_E2M1FN and q.block_scales.dtype == FLOAT8_E4M3FN
    assert q.block_scales.shape[q.axis] == -(-x.shape[q.axis] // NVFP4_BLOCK_SIZE)
    y, deq = ReferenceEvaluator(nvfp4_reference_model(q, x.shape)).run(None, {"x": x})
    np.testing.assert_array_equal(fp4_codes(q.values), fp4_codes(y))
    ours = dequantize_nvfp4(q)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.uint32), deq.view(np.uint32))
    # within one scale step (E2M1's widest half-gap, 4 -> 6, is 1.0) unless beyond 6 steps, where it
    # saturates; FP8 rounding of a small (subnormal) block scale can push a block's amax past 6 steps
    scale = q.granularity.expand(effective_scale(q.block_scales, q.global_scale), x.shape)
    inside = np.abs(x) <= 6 * scale
    assert (np.abs(ours - x)[inside] <= scale[inside]).all()
    np.testing.assert_array_equal(ours[~inside], np.copysign(6 * scale, x)[~inside])
    np.testing.assert_array_equal(fake_quantize_nvfp4(x, axis), ours)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_nvfp4(np.array([1.0, np.nan], np.float32), axis=0)
    with pytest.raises(ValueError, match="not positive"):
        quantize_nvfp4(np.ones(16, np.float32), axis=0, block_size=0)
    with pytest.raises(ValueError, match="out of range"):
        quantize_nvfp4(np.ones((16, 2), np.float32), axis=2)
    assert FP8_E4M3_MAX == 448.0


# NVIDIA's host reference conversions (CUDA's cuda_fp4.h / cuda_fp8.h, the same headers the GPU kernels
# use): float32 bit patterns on stdin, FP4 E2M1 (round to nearest even) and FP8 E4M3 (satfinite) codes out.
NVIDIA_REFERENCE = r"""
#include <cuda_fp4.h>
#include <cuda_fp8.h>
#include <cstdio>
#include <cstring>
int main() {
  unsigned int bits;
  while (fread(&bits, 4, 1, stdin) == 1) {
    float x; memcpy(&x, &bits, 4);
    unsigned char out[2] = {__nv_cvt_float_to_fp4(x, __NV_E2M1, cudaRoundNearest),
                            __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3)};
    fwrite(out, 1, 2, stdout);
  }
  float2 pair = make_float2(1.0f, -6.0f);
  unsigned char packed = __nv_cvt_float2_to_fp4x2(pair, __NV_E2M1, cudaRoundNearest);
  fwrite(&packed, 1, 1, stdout);
  return 0;
}
"""
CUDA_INCLUDE = Path("/usr/local/cuda/include")


def test_matches_nvidia_cuda_conversions(tmp_path: Path) -> None:
    """FP4 values, FP8 block scales and the pair packing order agree with CUDA's own conversion code.

    Inputs: every float32 sign/exponent/top-11-mantissa-bit pattern with low bits 0, 1, 0x7FF,
    0x800 (ties of every narrower format lie among them) and 0xFFF, NaN excluded. (An exhaustive
    sweep of all 2**32 float32 values, run once, also matched.)
    """
    compiler = shutil.which("g++")
    if compiler is None or not (CUDA_INCLUDE / "cuda_fp4.h").exists():
        pytest.skip("needs g++ and CUDA's cuda_fp4.h (host code only, no GPU)")
    source, binary = tmp_path / "conv.cpp", tmp_path / "conv"
    source.write_text(NVIDIA_REFERENCE)
    subprocess.run(
        [compiler, "-O1", "-std=c++17", f"-I{CUDA_INCLUDE}", str(source), "-o", str(binary)], check=True
    )
    top = np.arange(1 << 20, dtype=np.uint32) << np.uint32(12)
    bits = np.concatenate([top | np.uint32(low) for low in (0, 1, 0x7FF, 0x800, 0xFFF)])
    x = bits.view(np.float32)
    x = x[~np.isnan(x)]  # FP4 has no NaN: CUDA gives +6, ml_dtypes a zero; onnxq refuses NaN
    out = np.frombuffer(
        subprocess.run([str(binary)], input=x.tobytes(), capture_output=True, check=True).stdout, np.uint8
    )
    nv_fp4, nv_fp8, nv_pair = out[:-1:2], out[1:-1:2], out[-1]
    np.testing.assert_array_equal(fp4_codes(saturate_to_fp4(x)), nv_fp4)
    # block scales: CUDA's satfinite FP8 rounding wherever onnxq's clamp to [2**-9, 448] does not apply
    usable = (np.abs(x) >= FP8_E4M3_MIN_SUBNORMAL) & (x > 0)
    np.testing.assert_array_equal(round_block_scale(x[usable]).view(np.uint8), nv_fp8[usable])
    assert int(nv_pair) == int(pack_fp4(saturate_to_fp4(np.array([1.0, -6.0], np.float32)))[0]) == 0xF2
