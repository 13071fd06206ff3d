"""TensorRT plugins that onnxq writes into models, with their numpy references and CPU emulation.

- :mod:`onnxq.plugins.description`: reads a plugin's description file (``plugins/<name>/*.toml``), the
  names, types and shape rules that the C++ plugin is generated from;
- :mod:`onnxq.plugins.fp4_gemm`: the FP4 GEMM op's numpy reference and its ``onnx.reference`` op;
- :mod:`onnxq.plugins.replace`: turns NVFP4 weight DQ chains + MatMul/Gemm into FP4 GEMM plugin nodes;
- :mod:`onnxq.plugins.emulation`: rewrites plugin nodes into standard ops that ONNX Runtime CPU runs.
"""

from onnxq.plugins.description import PluginDescription, fp4_gemm_description, load_description
from onnxq.plugins.emulation import emulate_fp4_gemm_plugins
from onnxq.plugins.fp4_gemm import dequantize_fp4_weight, fp4_gemm_reference, pack_fp4_weight
from onnxq.plugins.replace import ReplaceSummary, replace_fp4_gemms

__all__ = [
    "PluginDescription",
    "ReplaceSummary",
    "dequantize_fp4_weight",
    "emulate_fp4_gemm_plugins",
    "fp4_gemm_description",
    "fp4_gemm_reference",
    "load_description",
    "pack_fp4_weight",
    "replace_fp4_gemms",
]
