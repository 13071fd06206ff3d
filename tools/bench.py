"""Side-by-side benchmark: onnxq against ONNX Runtime's ``quantize_static`` on the same models and data.

Models come from ``tools/bench_models.py`` (ResNet-style CNN, ViT-style transformer, BERT-style encoder
with a ``Where(mask, 0, -inf)`` attention mask, and a > 2 GB MatMul chain with external data).

Two like-for-like pairs per model:

* ``tensorrt``: ``onnxq quantize --mode int8`` (TensorRT placement, symmetric INT8) against
  ``quantize_static`` with QDQ, per-channel, MinMax, QInt8 activations and weights, both symmetric.
* ``ort``: ``onnxq quantize --mode int8 --target ort`` (uint8 asymmetric activations) against
  ``quantize_static`` with QUInt8 asymmetric activations and QInt8 symmetric per-channel weights.

Every quantization runs in its own child process (``python tools/bench.py --worker SPEC``) so that its
peak RSS is its own: the worker reports ``VmHWM`` (the high-water RSS of its address space) from
``/proc/self/status``. ``ru_maxrss`` from ``os.wait4`` is only a fallback for a worker that dies: on Linux
it also counts the parent's RSS at fork/exec time, which here (torch, FP32 sessions) would dominate.
The quantize time is measured inside the child around the quantize call (model loading, calibration and
writing included, interpreter start-up excluded). Both
quantizers calibrate on the same .npz (fed to ORT through a ``CalibrationDataReader`` in batches of
``CALIB_BATCH``). The parent then measures, with ONNX Runtime on CPU, the output SNR against FP32 on the
held-out eval set and the median latency of each model.

The results are printed and written to ``--out/bench.md`` (and ``bench.json``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LOG = logging.getLogger("bench")

CALIB_BATCH = 8
LATENCY_WARMUP = 3
LATENCY_RUNS = 20
BIG_LATENCY_RUNS = 5
WORKER_TIMEOUT_S = 900
WORKER_POLL_S = 0.2
ERROR_CHARS = 80
BYTES_PER_MB = 1e6
KB = 1024
SMALL_MODELS = ("resnet", "vit", "bert")
BIG_MODEL = "big"
PRESETS = ("tensorrt", "ort")
QUANTIZERS = ("onnxq", "ort")
REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER_MODULES = {"onnxq": "onnxq", "ort": "onnxruntime.quantization"}
QUANTIZER_LABELS = {
    ("onnxq", "tensorrt"): "onnxq int8 (TensorRT, sym)",
    ("ort", "tensorrt"): "ORT quantize_static QInt8 sym",
    ("onnxq", "ort"): "onnxq int8 --target ort (u8 asym)",
    ("ort", "ort"): "ORT quantize_static QUInt8 asym",
}


# --------------------------------------------------------------------------------------------------
# Worker side: one quantization per process
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantJob:
    """What one worker process quantizes."""

    model: str
    quantizer: str
    preset: str
    model_path: str
    calib_path: str
    output_path: str
    external_data: bool
    result_path: str


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz file, loaded into memory."""
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def make_calibration_reader(calib_path: str, batch: int = CALIB_BATCH) -> Any:
    """An ORT ``CalibrationDataReader`` that yields the .npz in batches of ``batch`` samples."""
    from onnxruntime.quantization import CalibrationDataReader

    class NpzReader(CalibrationDataReader):
        """Feeds consecutive slices of every array in the .npz."""

        def __init__(self) -> None:
            self.arrays = load_npz(calib_path)
            self.count = len(next(iter(self.arrays.values())))
            self.position = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            """The next batch, or None at the end."""
            if self.position >= self.count:
                return None
            end = self.position + batch
            feeds = {name: array[self.position : end] for name, array in self.arrays.items()}
            self.position = end
            return feeds

        def rewind(self) -> None:
            """Start over."""
            self.position = 0

    return NpzReader()


def quantize_with_ort(job: QuantJob) -> None:
    """``quantize_static`` with QDQ, per-channel, MinMax; symmetric QInt8 or asymmetric QUInt8 activations."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    symmetric = job.preset == "tensorrt"
    quantize_static(
        job.model_path,
        job.output_path,
        make_calibration_reader(job.calib_path),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=job.external_data,
        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
    )


def quantize_with_onnxq(job: QuantJob) -> None:
    """``onnxq.quantize`` in INT8 for the preset's target."""
    import onnxq

    onnxq.quantize(
        job.model_path,
        mode="int8",
        calibration_data=job.calib_path,
        target=job.preset,
        calib_method="max",
        output_path=job.output_path,
    )


def peak_rss_self_mb() -> float | None:
    """High-water RSS of this process's address space (``VmHWM``) in MB, None where unavailable."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * KB / BYTES_PER_MB
    return None


def run_worker(spec_path: Path) -> int:
    """Child entry point: run one job, write {ok, seconds, peak_rss_mb, error} to the job's result path."""
    job = QuantJob(**json.loads(spec_path.read_text()))
    quantize = quantize_with_onnxq if job.quantizer == "onnxq" else quantize_with_ort
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))  # onnxq from this checkout when it is not installed
    importlib.import_module(WORKER_MODULES[job.quantizer])  # keep import time out of the measurement
    start = time.perf_counter()
    try:
        quantize(job)
    except Exception as error:  # any failure is a benchmark result, not a crash
        logging.exception("quantization failed")
        result = {"ok": False, "seconds": time.perf_counter() - start, "error": short_error(error)}
    else:
        result = {"ok": True, "seconds": time.perf_counter() - start, "error": ""}
    result["peak_rss_mb"] = peak_rss_self_mb()
    Path(job.result_path).write_text(json.dumps(result))
    return 0 if result["ok"] else 1


def short_error(error: BaseException) -> str:
    """``Type: first line of message``, shortened for a table cell."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    text = f"{type(error).__name__}: {first_line}".replace("|", "/")
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


# --------------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------------


@dataclass
class QuantOutcome:
    """Result of one quantization and of evaluating its output."""

    model: str
    quantizer: str
    preset: str
    ok: bool = False
    seconds: float | None = None
    peak_rss_mb: float | None = None
    error: str = ""
    output_path: str = ""
    snr_db: float | None = None
    snr_emulated_db: float | None = None
    latency_ms: float | None = None
    eval_error: str = ""


@dataclass
class ModelReport:
    """Everything measured on one model."""

    name: str
    size_mb: float
    fp32_latency_ms: float
    latency_batch: int
    outcomes: list[QuantOutcome] = field(default_factory=list)


def run_child(command: list[str], log_path: Path, timeout_s: float) -> tuple[int, float]:
    """Run ``command``; return (exit code, ``ru_maxrss`` in MB from ``os.wait4``).

    That ``ru_maxrss`` is an upper bound only: Linux carries the parent's RSS at exec time into it.
    """
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(WORKER_POLL_S)
    process.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
    return process.returncode, usage.ru_maxrss * KB / BYTES_PER_MB  # ru_maxrss is in KiB on Linux


def quantize_in_child(job: QuantJob, work_dir: Path, timeout_s: float) -> QuantOutcome:
    """Run one quantization in a worker process and collect time, peak RSS and errors."""
    stem = f"{job.model}_{job.quantizer}_{job.preset}"
    spec_path = work_dir / f"{stem}.spec.json"
    result_path = Path(job.result_path)
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(asdict(job)))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)]
    start = time.perf_counter()
    code, peak_mb = run_child(command, work_dir / f"{stem}.log", timeout_s)
    outcome = QuantOutcome(
        job.model, job.quantizer, job.preset, peak_rss_mb=peak_mb, output_path=job.output_path
    )
    if result_path.exists():
        result = json.loads(result_path.read_text())
        outcome.ok, outcome.seconds, outcome.error = result["ok"], result["seconds"], result["error"]
        if result.get("peak_rss_mb") is not None:
            outcome.peak_rss_mb = result["peak_rss_mb"]
    else:
        outcome.error = f"worker exit code {code} after {time.perf_counter() - start:.0f} s (see {stem}.log)"
    if outcome.ok and not Path(job.output_path).exists():
        outcome.ok, outcome.error = False, "no output model written"
    return outcome


def make_session(model_path: str | Path, optimize: bool = True) -> Any:
    """A CPU ONNX Runtime session, with all graph optimisations or with none (Q/DQ run as written)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def run_model(session: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name for ``feeds``."""
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def median_latency_ms(session: Any, feeds: dict[str, np.ndarray], runs: int) -> float:
    """Median wall time of ``runs`` inferences after ``LATENCY_WARMUP`` warm-up runs."""
    for _ in range(LATENCY_WARMUP):
        session.run(None, feeds)
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        timings.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(timings)


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10 log10(signal power / error power) in float64; NaN when the test output is not finite."""
    reference64, test64 = reference.astype(np.float64), test.astype(np.float64)
    if not np.all(np.isfinite(test64)):
        return math.nan
    noise = float(np.sum((reference64 - test64) ** 2))
    signal = float(np.sum(reference64**2))
    return math.inf if noise == 0.0 else 10.0 * math.log10(signal / noise)


def latency_feeds(eval_data: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The first ``batch`` eval samples."""
    return {name: array[:batch] for name, array in eval_data.items()}


def evaluate_outcome(
    outcome: QuantOutcome,
    reference: dict[str, np.ndarray],
    eval_data: dict[str, np.ndarray],
    batch: int,
    runs: int,
) -> None:
    """Fill in SNR (worst output) and latency of a quantized model; record load/run errors.

    SNR is measured twice: as deployed (all ORT optimisations, fused integer kernels) and with graph
    optimisations off, where ORT runs every Q/DQ as written, so the quantization error alone shows.
    """
    if not outcome.ok:
        return
    try:
        session = make_session(outcome.output_path)
        outputs = run_model(session, eval_data)
        outcome.snr_db = min(snr_db(reference[name], outputs[name]) for name in reference)
        outcome.latency_ms = median_latency_ms(session, latency_feeds(eval_data, batch), runs)
        del session, outputs
        emulated = run_model(make_session(outcome.output_path, optimize=False), eval_data)
        outcome.snr_emulated_db = min(snr_db(reference[name], emulated[name]) for name in reference)
    except Exception as error:  # a model ORT cannot run is a benchmark result
        outcome.eval_error = short_error(error)
    LOG.info(
        "  %s: SNR %s dB (Q/DQ emulated: %s dB), latency %s ms",
        QUANTIZER_LABELS[(outcome.quantizer, outcome.preset)],
        fmt(outcome.snr_db, 1),
        fmt(outcome.snr_emulated_db, 1),
        fmt(outcome.latency_ms, 2),
    )


def benchmark_model(
    bench_model: Any, out_dir: Path, quantizers: tuple[str, ...], timeout_s: float
) -> ModelReport:
    """Quantize one model with every quantizer and preset, then evaluate everything."""
    from bench_models import model_size_bytes

    is_big = bench_model.name == BIG_MODEL
    runs = BIG_LATENCY_RUNS if is_big else LATENCY_RUNS
    eval_data = load_npz(bench_model.eval_path)
    LOG.info("%s: FP32 reference and latency", bench_model.name)
    session = make_session(bench_model.model_path)
    reference = run_model(session, eval_data)
    fp32_latency = median_latency_ms(session, latency_feeds(eval_data, bench_model.latency_batch), runs)
    del session
    report = ModelReport(
        name=bench_model.name,
        size_mb=model_size_bytes(bench_model.model_path) / BYTES_PER_MB,
        fp32_latency_ms=fp32_latency,
        latency_batch=bench_model.latency_batch,
    )
    quant_dir = out_dir / "quantized"
    work_dir = out_dir / "work"
    quant_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    for preset in PRESETS:
        for quantizer in quantizers:
            stem = f"{bench_model.name}_{quantizer}_{preset}"
            job = QuantJob(
                model=bench_model.name,
                quantizer=quantizer,
                preset=preset,
                model_path=str(bench_model.model_path),
                calib_path=str(bench_model.calib_path),
                output_path=str(quant_dir / f"{stem}.onnx"),
                external_data=is_big,
                result_path=str(work_dir / f"{stem}.result.json"),
            )
            LOG.info("%s: quantizing with %s", bench_model.name, QUANTIZER_LABELS[(quantizer, preset)])
            outcome = quantize_in_child(job, work_dir, timeout_s)
            LOG.info(
                "  %s in %s s, peak RSS %.0f MB %s",
                "done" if outcome.ok else "FAILED",
                fmt(outcome.seconds, 1),
                outcome.peak_rss_mb or 0.0,
                outcome.error,
            )
            evaluate_outcome(outcome, reference, eval_data, bench_model.latency_batch, runs)
            report.outcomes.append(outcome)
    return report


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int) -> str:
    """A number for the table, '-' when missing, 'NaN' / 'inf' spelled out."""
    if value is None:
        return "-"
    if math.isnan(value):
        return "NaN (non-finite output)"
    if math.isinf(value):
        return "inf (exact)"
    return f"{value:.{digits}f}"


def ratio(numerator: float | None, denominator: float | None) -> str:
    """numerator / denominator with two decimals, '-' when either is missing."""
    if numerator is None or denominator is None or denominator == 0:
        return "-"
    return f"{numerator / denominator:.2f}"


def _find(report: ModelReport, quantizer: str, preset: str) -> QuantOutcome | None:
    """The outcome of ``quantizer`` on ``preset``, if it was run."""
    for outcome in report.outcomes:
        if outcome.quantizer == quantizer and outcome.preset == preset:
            return outcome
    return None


TABLE_HEADER = (
    "model",
    "quantizer",
    "quantize time (s)",
    "time onnxq/ORT",
    "peak RSS (MB)",
    "RSS onnxq/ORT",
    "SNR vs FP32 (dB)",
    "SNR, Q/DQ emulated (dB)",
    "ORT CPU latency (ms)",
    "speed-up vs FP32",
)


def _outcome_row(report: ModelReport, outcome: QuantOutcome) -> list[str]:
    """Table cells of one quantization."""
    label = QUANTIZER_LABELS[(outcome.quantizer, outcome.preset)]
    time_ratio = rss_ratio = ""
    if outcome.quantizer == "onnxq":
        peer = _find(report, "ort", outcome.preset)
        if peer is not None:
            time_ratio = ratio(outcome.seconds, peer.seconds if peer.ok else None)
            rss_ratio = ratio(outcome.peak_rss_mb, peer.peak_rss_mb if peer.ok else None)
    if not outcome.ok:
        return [
            report.name,
            label,
            f"FAILED: {outcome.error}",
            "-",
            fmt(outcome.peak_rss_mb, 0),
            "-",
            "-",
            "-",
            "-",
            "-",
        ]
    snr = f"ORT load/run failed: {outcome.eval_error}" if outcome.eval_error else fmt(outcome.snr_db, 1)
    speedup = ratio(report.fp32_latency_ms, outcome.latency_ms)
    return [
        report.name,
        label,
        fmt(outcome.seconds, 2),
        time_ratio or "",
        fmt(outcome.peak_rss_mb, 0),
        rss_ratio or "",
        snr,
        fmt(outcome.snr_emulated_db, 1),
        fmt(outcome.latency_ms, 2),
        speedup,
    ]


def markdown_table(reports: list[ModelReport]) -> str:
    """The main comparison table."""
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for report in reports:
        fp32 = [report.name, "FP32 (reference)", *[""] * 6, fmt(report.fp32_latency_ms, 2), "1.00"]
        lines.append("| " + " | ".join(fp32) + " |")
        lines += ["| " + " | ".join(_outcome_row(report, outcome)) + " |" for outcome in report.outcomes]
    return "\n".join(lines)


def big_model_section(report: ModelReport) -> str:
    """Peak RSS relative to model size and whether each output loads and runs in ORT."""
    lines = [
        f"Big model: {report.size_mb / 1000:.2f} GB of float32 weights in external data.",
        "",
        "| quantizer | peak RSS (MB) | peak RSS / model size | output loads and runs in ORT |",
        "|---|---|---|---|",
    ]
    for outcome in report.outcomes:
        runs = "yes" if outcome.ok and not outcome.eval_error and outcome.snr_db is not None else "no"
        if outcome.ok and outcome.snr_db is not None and math.isnan(outcome.snr_db):
            runs = "runs, non-finite output"
        cells = [
            QUANTIZER_LABELS[(outcome.quantizer, outcome.preset)],
            fmt(outcome.peak_rss_mb, 0),
            ratio(outcome.peak_rss_mb, report.size_mb),
            runs if outcome.ok else f"quantization failed: {outcome.error}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_report(reports: list[ModelReport], notes: list[str]) -> str:
    """The whole Markdown report."""
    parts = ["# onnxq vs ONNX Runtime quantize_static", "", markdown_table(reports), ""]
    parts += [f"- {note}" for note in notes]
    for report in reports:
        if report.name == BIG_MODEL:
            parts += ["", big_model_section(report)]
    return "\n".join(parts) + "\n"


def report_notes(reports: list[ModelReport]) -> list[str]:
    """Explanations printed under the table."""
    batches = ", ".join(f"{report.name} batch {report.latency_batch}" for report in reports)
    return [
        f"Latency: ONNX Runtime {_ort_version()} CPU EP, {os.cpu_count()} cores, "
        f"median of {LATENCY_RUNS} runs ({BIG_LATENCY_RUNS} for the big model) "
        f"after {LATENCY_WARMUP} warm-up runs; {batches}.",
        "SNR: 10 log10(sum ref^2 / sum (ref - q)^2) of the output on the held-out eval set (worst output), "
        "as deployed (ORT_ENABLE_ALL: fused integer kernels) and with graph optimisations off "
        "(ORT_DISABLE_ALL: every Q/DQ run as written, i.e. the quantization error alone).",
        "Quantize time is measured inside each worker process around the quantize call; peak RSS is the "
        "worker's VmHWM (its own high-water RSS: interpreter and imports included for both quantizers; "
        "wait4's ru_maxrss would include the parent's RSS inherited at exec).",
        "Compare SNR only within a pair: symmetric INT8 (TensorRT) and asymmetric uint8 (ORT CPU) differ by "
        "design. CPU latency of TensorRT-style graphs says nothing about TensorRT speed.",
    ]


def _ort_version() -> str:
    """The installed onnxruntime version."""
    import onnxruntime as ort

    return ort.__version__


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def build_models(model_dir: Path, names: list[str], rebuild: bool) -> list[Any]:
    """Build (or reuse, when all files exist) the benchmark models."""
    import bench_models

    models = []
    for name in names:
        marker = model_dir / f"{name}.built.json"
        if marker.exists() and not rebuild:
            info = json.loads(marker.read_text())
            paths_exist = all(Path(info[key]).exists() for key in ("model_path", "calib_path", "eval_path"))
            if paths_exist:
                LOG.info("%s: reusing %s", name, info["model_path"])
                models.append(
                    bench_models.BenchModel(
                        **{k: Path(v) if k.endswith("_path") else v for k, v in info.items()}
                    )
                )
                continue
        LOG.info("%s: building", name)
        start = time.perf_counter()
        bench_model = bench_models.BUILDERS[name](model_dir)
        LOG.info("%s: built in %.1f s", name, time.perf_counter() - start)
        marker.write_text(
            json.dumps(
                {
                    key: str(value) if isinstance(value, Path) else value
                    for key, value in asdict(bench_model).items()
                }
            )
        )
        models.append(bench_model)
    return models


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out/bench"), help="output directory (default: out/bench)"
    )
    parser.add_argument("--skip-big", action="store_true", help="skip the > 2 GB model")
    parser.add_argument(
        "--models",
        default=",".join(SMALL_MODELS),
        help="comma-separated small models (default: resnet,vit,bert)",
    )
    parser.add_argument(
        "--quantizers",
        default=",".join(QUANTIZERS),
        help="comma-separated subset of onnxq,ort (default: both)",
    )
    parser.add_argument("--rebuild", action="store_true", help="re-export the models even if they exist")
    parser.add_argument("--timeout", type=float, default=WORKER_TIMEOUT_S, help="seconds per quantization")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build models, quantize with both tools, evaluate, print and write the report."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    if args.worker is not None:
        return run_worker(args.worker)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    names = [name for name in args.models.split(",") if name]
    if not args.skip_big:
        names.append(BIG_MODEL)
    quantizers = tuple(name for name in args.quantizers.split(",") if name)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    models = build_models(args.out / "models", names, args.rebuild)
    reports = [benchmark_model(model, args.out, quantizers, args.timeout) for model in models]
    text = render_report(reports, report_notes(reports))
    print(text)
    (args.out / "bench.md").write_text(text)
    (args.out / "bench.json").write_text(json.dumps([asdict(report) for report in reports], indent=2))
    LOG.info("benchmark finished in %.0f s; report in %s", time.perf_counter() - start, args.out / "bench.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
