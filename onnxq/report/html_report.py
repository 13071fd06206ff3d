"""The report as one self-contained HTML file: inline SVG drawn here, no script, no external resource.

Sections (each element carries its numbers in ``data-*`` attributes, full precision, so a test or a
script reads them back without parsing the drawing):

- ``table#summary``: samples, lowest output SNR, per-output SNR;
- ``svg#snr-plot``: per quantized tensor in graph order, its SNR against FP32 (``circle.snr``) and the
  noise its own quantizer adds (``circle.local``); infinite values are drawn at the top edge;
- ``table#layers``: layers ranked worst first (estimate, exact runs);
- ``table#tensors``: every quantized tensor (SNR, local SNR, clipped share, clip range);
- ``figure.histogram``: the ``HISTOGRAMS_SHOWN`` worst tensors' value histograms (``rect.bin``) with
  the chosen clip range (``line.clip``);
- ``ul#notes``: what the report could not compare.
"""

from __future__ import annotations

import math
import os
import tempfile
from html import escape
from pathlib import Path

from onnxq.report.build import LayerReport, Report, TensorReport

HISTOGRAMS_SHOWN = 6
#: rw-r--r--
READABLE = 0o644
PLOT_WIDTH, PLOT_HEIGHT, PLOT_MARGIN = 860, 280, 40
HIST_WIDTH, HIST_HEIGHT, HIST_MARGIN = 400, 180, 20
STYLE = """
body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
.snr{fill:#1f77b4}.local{fill:#ff7f0e}.bin{fill:#6a9fd4}.clip{stroke:#d62728;stroke-width:2}
.axis{stroke:#444}svg text{font-size:11px}figure{display:inline-block;margin:0 1em 1em 0}
"""


def number(value: float | None) -> str:
    """Full-precision text for data attributes: repr of the float, ``inf``/``-inf``/``nan``, or ``""``."""
    if value is None:
        return ""
    return repr(float(value)) if math.isfinite(value) else str(float(value))


def shown(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def render_html(report: Report) -> str:
    title = f"onnxq report: {escape(Path(report.quantized_path).name)}"
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>",
        f"<style>{STYLE}</style></head><body><h1>{title}</h1>",
        f"<p>FP32: {escape(report.fp32_path)}<br>quantized: {escape(report.quantized_path)}</p>",
        _summary(report),
        "<h2>SNR per quantized tensor, in graph order</h2>",
        _snr_plot(report.tensors),
        "<h2>Layers, worst first</h2>",
        _layers_table(report.ranked_layers()),
        "<h2>Quantized tensors</h2>",
        _tensors_table(report.tensors),
        "<h2>Worst tensors: values and chosen clip range</h2>",
        *(_histogram(t) for t in report.ranked_tensors()[:HISTOGRAMS_SHOWN] if t.metrics.counts is not None),
        "<h2>Notes</h2><ul id='notes'>",
        *(f"<li>{escape(note)}</li>" for note in report.notes),
        "</ul></body></html>",
    ]
    return "\n".join(parts)


def write_html(report: Report, path: Path) -> None:
    """Write atomically: a temp file beside ``path``, then a rename (no half-written report)."""
    text = render_html(report)
    handle, temporary = tempfile.mkstemp(prefix=".onnxq-report-", suffix=".html", dir=path.parent or ".")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temporary, READABLE)  # mkstemp makes it private; a report is for sharing
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _summary(report: Report) -> str:
    rows = [
        f"<tr><th>samples</th><td data-value='{report.samples}'>{report.samples}</td></tr>",
        f"<tr><th>lowest output SNR (dB)</th><td data-value='{number(report.output_snr_db)}'>"
        f"{shown(report.output_snr_db)}</td></tr>",
    ]
    rows += [
        f"<tr><th>output {escape(name)} SNR (dB)</th><td data-output='{escape(name, quote=True)}' "
        f"data-value='{number(m.snr_db)}'>{shown(m.snr_db)}</td></tr>"
        for name, m in report.outputs.items()
    ]
    return "<table id='summary'>" + "".join(rows) + "</table>"


def _snr_plot(tensors: list[TensorReport]) -> str:
    values = [v for t in tensors for v in (t.metrics.snr_db, t.metrics.local_snr_db) if math.isfinite(v)]
    top = max(values, default=1.0) + 5.0
    bottom = min(min(values, default=0.0) - 5.0, 0.0)
    width, height, margin = PLOT_WIDTH, PLOT_HEIGHT, PLOT_MARGIN
    step = (width - 2 * margin) / max(len(tensors), 1)

    def y(value: float) -> float:
        clamped = min(max(value, bottom), top)
        return height - margin - (clamped - bottom) / (top - bottom) * (height - 2 * margin)

    parts = [
        f"<svg id='snr-plot' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"data-top='{number(top)}' data-bottom='{number(bottom)}'>",
        f"<line class='axis' x1='{margin}' y1='{height - margin}' x2='{width - margin}' y2='{height - margin}'/>",
        f"<line class='axis' x1='{margin}' y1='{margin}' x2='{margin}' y2='{height - margin}'/>",
        f"<text x='2' y='{y(top):.1f}'>{top:.0f} dB</text><text x='2' y='{y(bottom):.1f}'>{bottom:.0f} dB</text>",
    ]
    for index, tensor in enumerate(tensors):
        x = margin + (index + 0.5) * step
        label = escape(tensor.name, quote=True)
        for css, value in (("snr", tensor.metrics.snr_db), ("local", tensor.metrics.local_snr_db)):
            parts.append(
                f"<circle class='{css}' cx='{x:.1f}' cy='{y(value):.1f}' r='3' data-tensor='{label}' "
                f"data-value='{number(value)}'><title>{label}: {shown(value)} dB</title></circle>"
            )
    parts.append(
        f"<text x='{width - 260}' y='14' class='snr'>&#9679; SNR vs FP32</text>"
        f"<text x='{width - 150}' y='14' class='local'>&#9679; own quantizer's noise</text></svg>"
    )
    return "".join(parts)


def _cell(value: float | None, digits: int = 2) -> str:
    return f"<td data-value='{number(value)}'>{shown(value, digits)}</td>"


def _layers_table(layers: list[LayerReport]) -> str:
    header = (
        "<tr><th>layer</th><th>op</th><th>quantized inputs</th><th>estimate: lowest own SNR (dB)</th>"
        "<th>output SNR, only this layer quantized (dB)</th><th>output SNR, only this layer float (dB)</th></tr>"
    )
    rows = [
        f"<tr data-layer='{escape(x.name, quote=True)}'><td>{escape(x.name)}</td><td>{escape(x.op_type)}</td>"
        f"<td>{escape(', '.join(x.tensors))}</td>{_cell(x.estimate_db)}{_cell(x.only_quantized_db)}"
        f"{_cell(x.only_float_db)}</tr>"
        for x in layers
    ]
    return "<table id='layers'>" + header + "".join(rows) + "</table>"


def _tensors_table(tensors: list[TensorReport]) -> str:
    header = (
        "<tr><th>tensor</th><th>kind</th><th>format</th><th>FP32 tensor (match)</th><th>SNR vs FP32 (dB)</th>"
        "<th>own quantizer SNR (dB)</th><th>clipped (%)</th><th>clip low</th><th>clip high</th></tr>"
    )
    rows = []
    for t in tensors:
        low, high = t.clip_range or (None, None)
        rows.append(
            f"<tr data-tensor='{escape(t.name, quote=True)}'><td>{escape(t.name)}</td><td>{t.point.kind}</td>"
            f"<td>{escape(t.point.fmt)}</td><td>{escape(str(t.point.fp32_name))} ({escape(t.point.match)})</td>"
            f"{_cell(t.metrics.snr_db)}{_cell(t.metrics.local_snr_db)}"
            f"{_cell(100.0 * t.metrics.clipped_share, 4)}{_cell(low, 5)}{_cell(high, 5)}</tr>"
        )
    return "<table id='tensors'>" + header + "".join(rows) + "</table>"


def _histogram(tensor: TensorReport) -> str:
    counts, edges = tensor.metrics.counts, tensor.metrics.edges
    assert counts is not None and edges is not None
    width, height, margin = HIST_WIDTH, HIST_HEIGHT, HIST_MARGIN
    low, high = float(edges[0]), float(edges[-1])
    peak = max(int(counts.max()), 1)

    def x(value: float) -> float:
        return margin + (value - low) / (high - low) * (width - 2 * margin)

    label = escape(tensor.name, quote=True)
    parts = [
        f"<figure class='histogram' data-tensor='{label}'><figcaption>{escape(tensor.name)} "
        f"({tensor.point.kind}, {escape(tensor.point.fmt)}): own SNR {shown(tensor.metrics.local_snr_db)} dB, "
        f"{100.0 * tensor.metrics.clipped_share:.4f}% clipped</figcaption>",
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"data-low='{number(low)}' data-high='{number(high)}'>",
    ]
    for index, count in enumerate(counts):
        # log scale: the tails (what clipping cuts) stay visible next to the peak
        bar = math.log1p(int(count)) / math.log1p(peak) * (height - 2 * margin)
        left, right = x(float(edges[index])), x(float(edges[index + 1]))
        parts.append(
            f"<rect class='bin' x='{left:.1f}' y='{height - margin - bar:.1f}' width='{max(right - left - 0.5, 0.5):.1f}' "
            f"height='{bar:.1f}' data-low='{number(float(edges[index]))}' data-count='{int(count)}'/>"
        )
    if tensor.clip_range is not None:
        for bound in tensor.clip_range:
            if low <= bound <= high:
                parts.append(
                    f"<line class='clip' x1='{x(bound):.1f}' y1='{margin / 2}' x2='{x(bound):.1f}' "
                    f"y2='{height - margin}' data-value='{number(bound)}'/>"
                )
    parts.append(f"<text x='{margin}' y='{height - 4}'>{low:.4g}</text>")
    parts.append(f"<text x='{width - margin - 40}' y='{height - 4}'>{high:.4g}</text></svg></figure>")
    return "".join(parts)
