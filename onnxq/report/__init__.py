"""``onnxq report``: where a quantized model lost accuracy, per tensor and per layer (see ``build``)."""

from onnxq.report.build import LayerReport, Report, TensorReport, build_report
from onnxq.report.html_report import render_html, write_html

__all__ = ["LayerReport", "Report", "TensorReport", "build_report", "render_html", "write_html"]
