"""onnxq: quantize ONNX models with explicit Q/DQ placed the way the target runtime fuses them.

The public names are imported on first use, so that ``onnxq --help`` and ``onnxq --version`` do not
pay for numpy, onnx and ONNX Runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "CompareResult": "onnxq.comparison",
    "OnnxqError": "onnxq.errors",
    "OutputMetrics": "onnxq.comparison",
    "QuantizeOptions": "onnxq.api",
    "QuantizeResult": "onnxq.api",
    "compare": "onnxq.comparison",
    "export": "onnxq.frontend.export",
    "quantize": "onnxq.api",
}

__all__ = ["__version__", *sorted(_PUBLIC)]

if TYPE_CHECKING:
    # "X as X": re-exported names for type checkers; at run time __getattr__ imports them
    from onnxq.api import QuantizeOptions as QuantizeOptions
    from onnxq.api import QuantizeResult as QuantizeResult
    from onnxq.api import quantize as quantize
    from onnxq.comparison import CompareResult as CompareResult
    from onnxq.comparison import OutputMetrics as OutputMetrics
    from onnxq.comparison import compare as compare
    from onnxq.errors import OnnxqError as OnnxqError
    from onnxq.frontend.export import export as export


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'onnxq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
