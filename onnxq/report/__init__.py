"""``onnxq report``: where a quantized model lost accuracy, per tensor and per layer (see ``build``).

The public names are imported on first use: ``onnxq --help`` builds the report command's parser from
``onnxq.report.cli_report`` without paying for numpy, onnx and ONNX Runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "LayerReport": "onnxq.report.build",
    "Report": "onnxq.report.build",
    "TensorReport": "onnxq.report.build",
    "build_report": "onnxq.report.build",
    "render_html": "onnxq.report.html_report",
    "write_html": "onnxq.report.html_report",
}

__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:
    from onnxq.report.build import LayerReport as LayerReport
    from onnxq.report.build import Report as Report
    from onnxq.report.build import TensorReport as TensorReport
    from onnxq.report.build import build_report as build_report
    from onnxq.report.html_report import render_html as render_html
    from onnxq.report.html_report import write_html as write_html


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'onnxq.report' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
