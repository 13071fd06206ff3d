"""onnxq: quantize ONNX models with explicit Q/DQ placed the way the target runtime fuses them."""

from onnxq.api import QuantizeOptions, QuantizeResult, quantize
from onnxq.compare import CompareResult, OutputMetrics, compare
from onnxq.errors import OnnxqError

__version__ = "0.1.0"

__all__ = [
    "CompareResult",
    "OnnxqError",
    "OutputMetrics",
    "QuantizeOptions",
    "QuantizeResult",
    "__version__",
    "compare",
    "quantize",
]
