"""The HTML report parsed back (structure and numbers, not pixels) and the CLI's bad-input paths."""

from __future__ import annotations

import argparse
import math
from html.parser import HTMLParser
from pathlib import Path

import model_builders
import numpy as np
import onnx
import pytest

import onnxq
from onnxq.errors import OnnxqError
from onnxq.report import build_report, render_html
from onnxq.report.build import Report
from onnxq.report.cli_report import add_report_parser, run_report
from onnxq.report.html_report import HISTOGRAMS_SHOWN

SAMPLES = 10


class _Elements(HTMLParser):
    """Every start tag with its attributes and the ids/classes of the tags it sits in."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str], tuple[str, ...]]] = []
        self._open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.found.append((tag, attributes, tuple(self._open)))
        if tag not in ("circle", "rect", "line", "meta", "br"):
            self._open.append(attributes.get("id") or attributes.get("class") or tag)

    def handle_endtag(self, tag: str) -> None:
        if self._open and tag not in ("circle", "rect", "line"):
            self._open.pop()

    def inside(self, container: str, tag: str) -> list[dict[str, str]]:
        return [a for t, a, path in self.found if t == tag and container in path]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Report]:
    folder = tmp_path_factory.mktemp("report")
    fp32, npz, quantized = folder / "fp32.onnx", folder / "data.npz", folder / "q.onnx"
    onnx.save(model_builders.residual_cnn(), fp32)
    np.savez(npz, **model_builders.cnn_inputs(7, SAMPLES))
    onnxq.quantize(fp32, mode="int8", calibration_data=npz, output_path=quantized, high_precision="fp32")
    return fp32, npz, quantized, build_report(fp32, quantized, npz, exact_layers=2)


def _parse(text: str) -> _Elements:
    parser = _Elements()
    parser.feed(text)
    return parser


def _value(text: str) -> float:
    return float(text)  # repr of a float, or inf/-inf/nan: float() reads all of them


def test_html_numbers_and_structure(made: tuple[Path, Path, Path, Report]) -> None:
    report = made[3]
    text = render_html(report)
    parsed = _parse(text)
    assert "<script" not in text.lower() and "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    summary = parsed.inside("summary", "td")
    assert int(summary[0]["data-value"]) == report.samples == SAMPLES
    assert _value(summary[1]["data-value"]) == report.output_snr_db
    rows = [a for t, a, _ in parsed.found if t == "tr" and "data-tensor" in a]
    assert [r["data-tensor"] for r in rows] == [t.name for t in report.tensors]
    cells = parsed.inside("tensors", "td")
    numeric = [c for c in cells if "data-value" in c]
    per_row = len(numeric) // len(report.tensors)
    for index, tensor in enumerate(report.tensors):
        snr, local, clipped = (
            _value(c["data-value"]) for c in numeric[index * per_row : index * per_row + 3]
        )
        assert snr == tensor.metrics.snr_db and local == tensor.metrics.local_snr_db
        assert clipped == 100.0 * tensor.metrics.clipped_share
    circles = parsed.inside("snr-plot", "circle")
    assert len(circles) == 2 * len(report.tensors)
    assert [_value(c["data-value"]) for c in circles if c["class"] == "snr"] == [
        t.metrics.snr_db for t in report.tensors
    ]
    layer_rows = [a["data-layer"] for t, a, _ in parsed.found if t == "tr" and "data-layer" in a]
    assert layer_rows == [x.name for x in report.ranked_layers()]


def test_html_histograms_count_every_value_and_mark_the_clip_range(
    made: tuple[Path, Path, Path, Report],
) -> None:
    report = made[3]
    parsed = _parse(render_html(report))
    figures = [a["data-tensor"] for t, a, _ in parsed.found if t == "figure"]
    ranked = report.ranked_tensors()
    assert figures == [t.name for t in ranked[:HISTOGRAMS_SHOWN]]
    tensors = {t.name: t for t in report.tensors}
    groups: dict[str, list[tuple[str, dict[str, str]]]] = {}
    current = ""
    for tag, attributes, _ in parsed.found:
        if tag == "figure":
            current = attributes["data-tensor"]
        elif current and tag in ("rect", "line"):
            groups.setdefault(current, []).append((tag, attributes))
    for name in figures:
        bins = [int(a["data-count"]) for tag, a in groups[name] if tag == "rect"]
        assert sum(bins) == tensors[name].metrics.elements
        clip = sorted(_value(a["data-value"]) for tag, a in groups[name] if tag == "line")
        assert clip == sorted(tensors[name].clip_range or ())


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["report", *argv])


def test_cli_writes_the_html(
    made: tuple[Path, Path, Path, Report], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fp32, npz, quantized, _ = made
    output = tmp_path / "report.html"
    assert (
        run_report(
            _args(str(fp32), str(quantized), "--data", str(npz), "-o", str(output), "--exact-layers", "1")
        )
        == 0
    )
    assert output.read_text().startswith("<!DOCTYPE html>")
    printed = capsys.readouterr().out
    assert "layers, worst first" in printed and "report.html" in printed


def _renamed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every internal tensor and node renamed (inputs and outputs kept)."""
    keep = {v.name for v in [*model.graph.input, *model.graph.output]}
    rename = lambda name: name if name in keep or not name else f"other_{name}"  # noqa: E731
    for node in model.graph.node:
        node.name = f"other_{node.name}"
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for initializer in model.graph.initializer:
        initializer.name = rename(initializer.name)
    return model


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("other inputs", "take different inputs"),
        ("no shared tensor", "share no quantized tensor"),
        ("not quantized", "holds no QuantizeLinear"),
        ("bad output", "is not an .html file"),
        ("missing folder", "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    made: tuple[Path, Path, Path, Report], tmp_path: Path, case: str, message: str
) -> None:
    fp32, npz, quantized, _ = made
    output = tmp_path / "report.html"
    reference, target = str(fp32), str(quantized)
    if case == "other inputs":
        onnx.save(model_builders.masked_attention(), tmp_path / "attention.onnx")
        reference = str(tmp_path / "attention.onnx")
    elif case == "no shared tensor":
        onnx.save(_renamed(model_builders.residual_cnn()), tmp_path / "renamed.onnx")
        reference = str(tmp_path / "renamed.onnx")
    elif case == "not quantized":
        target = str(fp32)
    elif case == "bad output":
        output = tmp_path / "report.onnx"
    else:
        output = tmp_path / "missing" / "report.html"
    with pytest.raises(OnnxqError, match=message) as raised:
        run_report(_args(reference, target, "--data", str(npz), "-o", str(output)))
    assert "\n" not in str(raised.value)
    assert not output.exists() and not list(tmp_path.glob("*.html"))


def test_exact_layers_must_be_a_count(made: tuple[Path, Path, Path, Report]) -> None:
    fp32, npz, quantized, _ = made
    with pytest.raises(OnnxqError, match="not a count"):
        build_report(fp32, quantized, npz, exact_layers=-1)
    assert math.isfinite(made[3].output_snr_db)
