"""Block formats benchmark: onnxq's INT4/FP4/MXFP8 modes against ONNX Runtime's MatMulNBitsQuantizer.

Parts (``--parts``, comma-separated):

* ``snr``: every quantizer variant on every model (``--models``: the decoder of
  ``tools/block_models.py``, hidden 1024 and 8 layers, and the ViT/BERT models of
  ``tools/bench_models.py``): output SNR against FP32 on held-out samples, quantize time, peak RSS,
  output size and AWQ seconds per transformer layer.
  onnxq variants: int4 rtn / awq-lite / awq-clip / awq-full (target tensorrt: INT4 + DequantizeLinear),
  int4 rtn --target ort (MatMulNBits), nvfp4, nvfp4-w4a16, w4a8, int4-w4a8, mxfp8, int8, fp8.
  ONNX Runtime variants: ``MatMulNBitsQuantizer`` (MatMulNBits output) with its default algorithm, with
  RTN and with HQQ (HQQ imports torch), all 4 bit, block 128, symmetric where the algorithm allows
  (HQQ is asymmetric by design); the logits projection is excluded like onnxq excludes it.
* ``latency``: the decoder in FP32 against ORT-target INT4 (MatMulNBits) on ORT CPU, batch 1 and 8
  (sequence fixed by the model), median of repeated runs, all sessions in one process.
* ``big`` (or ``--big``): INT4 RTN on the 2.4 GB external-data model of ``bench_models.make_big_model``:
  peak RSS against the model's size.

Every quantization runs in its own child process (``bench_block.py --worker SPEC``) that reports its
time around the quantize call and its own peak RSS (``VmHWM``; ``ru_maxrss`` of ``wait4`` only as a
fallback, since Linux carries the parent's RSS at exec into it). ViT/BERT and the big model are built
with PyTorch (``tools/bench_models.py``): with ``--torch-python`` (a Python that imports torch), or
this Python if it has torch; otherwise those parts are skipped and the report says so.

Evaluation (parent process, ONNX Runtime CPU): sessions at ``ORT_ENABLE_BASIC`` (ORT 1.32 miscomputes
some FP8 Q/DQ graphs above it) with ``session.qdq_matmulnbits_accuracy_level=0`` (INT4 DQ->MatMul
fused to MatMulNBits with float activations, exact). A model ORT CPU cannot run (FP4 E2M1 kernels,
TensorRT's ``TRT_FP4DynamicQuantize``) is first rewritten by ``onnxq.emulate.emulate_file`` into
standard ops; the table says which models were emulated. Latency sessions use ORT's default
optimisation level (as deployed).

``--quick``: a small decoder (hidden 256, 2 layers) and few samples, decoder only, for tests.
Results are printed and written to ``--report`` (default ``tools/results/bench_block.md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

TOOLS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TOOLS_DIR.parent
if str(TOOLS_DIR) not in sys.path:
    sys.path.insert(0, str(TOOLS_DIR))

import block_models  # noqa: E402  (a sibling script, importable once tools/ is on the path)
from bench import fmt, ratio  # noqa: E402  (table cells formatted as in the main benchmark)

LOG = logging.getLogger("bench_block")

BLOCK_SIZE = 128
KB = 1024
BYTES_PER_MB = 1e6
ERROR_CHARS = 90
WORKER_TIMEOUT_S = 3600
WORKER_POLL_S = 0.2
ACCURACY_LEVEL_CONFIG = "session.qdq_matmulnbits_accuracy_level"
FLOAT_ACTIVATIONS_LEVEL = "0"
FLOAT_ACCURACY_LEVEL = 0  # MatMulNBits accuracy_level 0: float activations
INT8_ACCURACY_LEVEL = 4  # MatMulNBits accuracy_level 4: activations quantized to int8 per block
ACCURACY_MEANING = {FLOAT_ACCURACY_LEVEL: "float activations", INT8_ACCURACY_LEVEL: "int8 activations"}
LATENCY_BATCHES = (1, 8)  # with ORT's default intra-op threads (one per core)
LATENCY_WARMUP = 2
DECODE_STEP_SEQ = 1  # the latency part's second decoder: one token per sequence

DECODER_CALIB = 32
DECODER_EVAL = 16
DECODER_SEED = 0
QUICK_CONFIG = block_models.DecoderConfig(hidden=256, layers=2, heads=4, ffn=1024, vocab=1024, seq=32)
QUICK_CALIB = 8
QUICK_EVAL = 4
FULL_CONFIG = block_models.DecoderConfig()
LATENCY_RUNS = 10
QUICK_LATENCY_RUNS = 3

#: transformer layers of the torch-built models (tools/bench_models.py: VIT_LAYERS, BERT_LAYERS)
TORCH_MODEL_LAYERS = {"vit": 6, "bert": 4}
TORCH_MODELS = ("vit", "bert")
BIG_MODEL = "big"
DEFAULT_REPORT = TOOLS_DIR / "results" / "bench_block.md"
PARTS = ("snr", "latency", "big")


@dataclass(frozen=True)
class Variant:
    """One quantizer configuration."""

    key: str
    label: str
    quantizer: str  # "onnxq" or "ort"
    mode: str = ""
    algo: str = ""
    target: str = "tensorrt"
    ort_algorithm: str = ""  # "default", "rtn", "hqq"
    needs_torch: bool = False

    @property
    def is_awq(self) -> bool:
        """True for the AWQ algorithms (whose cost per layer the report shows)."""
        return self.algo.startswith("awq")


def _onnxq(key: str, mode: str, algo: str = "", target: str = "tensorrt", form: str = "") -> Variant:
    """An onnxq variant with a label that names mode, algorithm and form."""
    words = ["onnxq", mode, algo, form]
    return Variant(key, " ".join(word for word in words if word), "onnxq", mode, algo, target)


VARIANTS: tuple[Variant, ...] = (
    _onnxq("int4-rtn", "int4", "rtn", form="(DQ)"),
    _onnxq("int4-rtn-ort", "int4", "rtn", target="ort", form="(MatMulNBits)"),
    _onnxq("int4-awq-lite", "int4", "awq-lite", form="(DQ)"),
    _onnxq("int4-awq-clip", "int4", "awq-clip", form="(DQ)"),
    _onnxq("int4-awq-full", "int4", "awq-full", form="(DQ)"),
    _onnxq("nvfp4", "nvfp4"),
    _onnxq("nvfp4-w4a16", "nvfp4-w4a16"),
    _onnxq("w4a8", "w4a8"),
    _onnxq("int4-w4a8", "int4-w4a8", "awq-full"),
    _onnxq("mxfp8", "mxfp8"),
    _onnxq("int8", "int8"),
    _onnxq("fp8", "fp8"),
    Variant("ort-default", "ORT MatMulNBitsQuantizer default (sym)", "ort", ort_algorithm="default"),
    Variant("ort-rtn", "ORT MatMulNBitsQuantizer RTN (sym)", "ort", ort_algorithm="rtn"),
    Variant("ort-hqq", "ORT MatMulNBitsQuantizer HQQ (asym)", "ort", ort_algorithm="hqq", needs_torch=True),
)
VARIANTS_BY_KEY = {variant.key: variant for variant in VARIANTS}
LATENCY_VARIANTS = ("int4-rtn-ort", "ort-default")
BIG_VARIANTS = ("int4-rtn", "int4-rtn-ort", "ort-default")


@dataclass(frozen=True)
class ModelFiles:
    """A benchmark model with its calibration and held-out data (.npz) and its layer count."""

    name: str
    model_path: str
    calib_path: str
    eval_path: str
    layers: int


@dataclass(frozen=True)
class QuantJob:
    """What one worker process quantizes."""

    variant: str
    model_path: str
    calib_path: str
    output_path: str
    result_path: str
    exclude_nodes: list[str]
    external_data: bool


@dataclass
class Outcome:
    """One quantization and its evaluation."""

    model: str
    variant: str
    ok: bool = False
    seconds: float | None = None
    peak_rss_mb: float | None = None
    laps: dict[str, float] = field(default_factory=dict)
    error: str = ""
    output_path: str = ""
    output_mb: float | None = None
    snr_db: float | None = None
    evaluated_via: str = ""
    eval_error: str = ""


# --------------------------------------------------------------------------------------------------
# Worker side: one quantization per process
# --------------------------------------------------------------------------------------------------


def peak_rss_self_mb() -> float | None:
    """High-water RSS of this process (``VmHWM``) in MB, None where /proc is missing."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * KB / BYTES_PER_MB
    return None


def short_error(error: BaseException) -> str:
    """``Type: first line``, shortened for a table cell."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    text = f"{type(error).__name__}: {first_line}".replace("|", "/")
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


def quantize_with_onnxq(job: QuantJob, variant: Variant) -> dict[str, float]:
    """``onnxq.quantize`` for the variant; returns the per-step seconds onnxq reports, if any."""
    import onnxq

    options: dict[str, Any] = {"target": variant.target}
    if variant.mode.startswith("int4") or variant.algo:
        options.update(algo=variant.algo or "rtn", block_size=BLOCK_SIZE, zero_point=False)
    result = onnxq.quantize(
        job.model_path,
        mode=variant.mode,
        calibration_data=job.calib_path,
        output_path=job.output_path,
        **options,
    )
    seconds = getattr(result, "seconds", {}) or {}
    return {str(name): float(value) for name, value in seconds.items()}


def quantize_with_ort(job: QuantJob, variant: Variant) -> dict[str, float]:
    """ORT's ``MatMulNBitsQuantizer``: 4 bit, block ``BLOCK_SIZE``, symmetric, MatMulNBits output."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    configs = {
        "default": lambda: nbits.DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True),
        "rtn": lambda: nbits.RTNWeightOnlyQuantConfig(),
        "hqq": lambda: nbits.HQQWeightOnlyQuantConfig(block_size=BLOCK_SIZE, bits=4),
    }
    quantizer = nbits.MatMulNBitsQuantizer(
        onnx.load(job.model_path),
        bits=4,
        block_size=BLOCK_SIZE,
        is_symmetric=True,
        nodes_to_exclude=job.exclude_nodes,
        algo_config=configs[variant.ort_algorithm](),
    )
    quantizer.process()
    quantizer.model.save_model_to_file(job.output_path, use_external_data_format=job.external_data)
    return {}


def run_worker(spec_path: Path) -> int:
    """Child entry point: run one job and write {ok, seconds, peak_rss_mb, laps, error} as JSON."""
    job = QuantJob(**json.loads(spec_path.read_text()))
    variant = VARIANTS_BY_KEY[job.variant]
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))  # onnxq from this checkout when it is not installed
    quantize = quantize_with_onnxq if variant.quantizer == "onnxq" else quantize_with_ort
    __import__("onnxq" if variant.quantizer == "onnxq" else "onnxruntime.quantization")  # not timed
    start = time.perf_counter()
    result: dict[str, Any] = {"ok": False, "laps": {}, "error": ""}
    try:
        result["laps"] = quantize(job, variant)
        result["ok"] = True
    except Exception as error:  # any failure is a benchmark result, not a crash
        logging.exception("quantization failed")
        result["error"] = short_error(error)
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = peak_rss_self_mb()
    Path(job.result_path).write_text(json.dumps(result))
    return 0 if result["ok"] else 1


# --------------------------------------------------------------------------------------------------
# Parent side: running workers
# --------------------------------------------------------------------------------------------------


def run_child(command: list[str], log_path: Path, timeout_s: float) -> tuple[int, float]:
    """Run ``command`` with its output in ``log_path``; return (exit code, wait4 ``ru_maxrss`` in MB)."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
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


def quantize_in_child(job: QuantJob, model: str, python: str, work_dir: Path) -> Outcome:
    """Run one job in a worker process and collect its time, peak RSS and error."""
    stem = Path(job.output_path).stem
    spec_path = work_dir / f"{stem}.spec.json"
    result_path = Path(job.result_path)
    result_path.unlink(missing_ok=True)
    Path(job.output_path).unlink(missing_ok=True)
    spec_path.write_text(json.dumps(asdict(job)))
    command = [python, str(Path(__file__).resolve()), "--worker", str(spec_path)]
    code, wait_rss_mb = run_child(command, work_dir / f"{stem}.log", WORKER_TIMEOUT_S)
    outcome = Outcome(model, job.variant, peak_rss_mb=wait_rss_mb, output_path=job.output_path)
    if not result_path.exists():
        outcome.error = f"worker exit code {code} (see {stem}.log)"
        return outcome
    result = json.loads(result_path.read_text())
    outcome.ok, outcome.seconds, outcome.error = result["ok"], result["seconds"], result["error"]
    outcome.laps = result.get("laps") or {}
    if result.get("peak_rss_mb") is not None:
        outcome.peak_rss_mb = result["peak_rss_mb"]
    if outcome.ok and not Path(job.output_path).exists():
        outcome.ok, outcome.error = False, "no output model written"
    if outcome.ok:
        outcome.output_mb = model_file_size(Path(job.output_path)) / BYTES_PER_MB
    return outcome


def model_file_size(path: Path) -> int:
    """onnxq's own count (the file plus its external data), imported here because the HQQ worker runs
    under a Python that has torch but not onnxq."""
    from onnxq.model_io import model_file_size as size_on_disk

    return size_on_disk(path)


def logits_projections(model_path: str) -> list[str]:
    """MatMul nodes whose output (directly or through one Add) is a graph output: the logits projection."""
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    outputs = {value.name for value in model.graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        reached = {node.output[0]} | {
            add.output[0] for add in consumers.get(node.output[0], []) if add.op_type == "Add"
        }
        if reached & outputs:
            found.append(node.name)
    return found


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write named arrays to an uncompressed .npz file."""
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz file."""
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def make_session(model_path: str | Path, deployed: bool = False) -> Any:
    """ORT CPU session: BASIC + exact INT4 DQ fusion for accuracy, ORT's defaults when ``deployed``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not deployed:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.add_session_config_entry(ACCURACY_LEVEL_CONFIG, FLOAT_ACTIVATIONS_LEVEL)
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def run_outputs(session: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name; FP8 outputs (raw uint8 bit patterns) are not expected: outputs stay float."""
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10 log10(signal power / error power) in float64; NaN when the test output is not finite."""
    reference64, test64 = reference.astype(np.float64), test.astype(np.float64)
    if not np.all(np.isfinite(test64)):
        return math.nan
    noise = float(np.sum((reference64 - test64) ** 2))
    signal = float(np.sum(reference64**2))
    return math.inf if noise == 0.0 else 10.0 * math.log10(signal / noise)


def emulated_copy(model_path: str) -> str:
    """Rewrite a model ORT CPU cannot run into standard ops with onnxq's emulation; return its path."""
    from onnxq.emulate import emulate_file

    destination = Path(model_path).with_suffix(".emulated.onnx")
    emulate_file(Path(model_path), destination)
    return str(destination)


def evaluate(outcome: Outcome, reference: dict[str, np.ndarray], feeds: dict[str, np.ndarray]) -> None:
    """Fill in the worst-output SNR, running the model in ORT directly or after emulation."""
    if not outcome.ok:
        return
    try:
        try:
            session = make_session(outcome.output_path)
            outcome.evaluated_via = "ORT"
        except Exception as direct_error:  # no CPU kernel (FP4, TRT op): emulate, then run
            LOG.info("  ORT cannot run it (%s): emulating", short_error(direct_error))
            session = make_session(emulated_copy(outcome.output_path))
            outcome.evaluated_via = "onnxq emulation + ORT"
        outputs = run_outputs(session, feeds)
        outcome.snr_db = min(snr_db(reference[name], outputs[name]) for name in reference)
    except Exception as error:  # a model that cannot be evaluated is a benchmark result
        outcome.eval_error = short_error(error)


def reference_outputs(model: ModelFiles) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """FP32 outputs on the held-out set, and that set."""
    feeds = load_npz(model.eval_path)
    return run_outputs(make_session(model.model_path), feeds), feeds


def interleaved_median_ms(sessions: list[Any], feeds: dict[str, np.ndarray], runs: int) -> list[float]:
    """Median wall time of each session over ``runs`` rounds that run every session once in turn.

    Rounds rather than one session after the other, so that load from other processes on the machine
    falls on all sessions alike and the ratios stay fair.
    """
    for session in sessions:
        for _ in range(LATENCY_WARMUP):
            session.run(None, feeds)
    timings: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for session, times in zip(sessions, timings):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(1000.0 * (time.perf_counter() - start))
    return [statistics.median(times) for times in timings]


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def build_decoder(model_dir: Path, quick: bool, seq: int | None = None) -> ModelFiles:
    """The decoder of tools/block_models.py with calibration and held-out data (reused when present).

    ``seq`` overrides the sequence length (1: a decode step, for latency); such a model is named
    ``decoder_seq<N>`` and has its own weights (the position table's size changes the seeded draws).
    """
    config = QUICK_CONFIG if quick else FULL_CONFIG
    model_name = "decoder"
    if seq is not None:
        config, model_name = replace(config, seq=seq), f"decoder_seq{seq}"
    calib_count, eval_count = (QUICK_CALIB, QUICK_EVAL) if quick else (DECODER_CALIB, DECODER_EVAL)
    name = f"{model_name}_quick" if quick else model_name
    path = model_dir / f"{name}.onnx"
    files = ModelFiles(
        model_name,
        str(path),
        str(model_dir / f"{name}_calib.npz"),
        str(model_dir / f"{name}_eval.npz"),
        config.layers,
    )
    if all(Path(p).exists() for p in (files.model_path, files.calib_path, files.eval_path)):
        LOG.info("%s: reusing %s", model_name, path)
        return files
    LOG.info("%s: building %s", model_name, config)
    block_models.make_decoder(path, **asdict(config), seed=DECODER_SEED)
    splits = block_models.make_splits(calib_count, eval_count, config.seq, config.vocab, DECODER_SEED + 1)
    save_npz(files.calib_path, splits.calibration)
    save_npz(files.eval_path, splits.evaluation)
    return files


TORCH_BUILD_SCRIPT = """
import json, sys
from dataclasses import asdict
from pathlib import Path
sys.path.insert(0, {tools!r})
import bench_models
name, out = sys.argv[1], Path(sys.argv[2])
built = bench_models.make_big_model(out / "big.onnx") if name == "big" else bench_models.BUILDERS[name](out)
print(json.dumps({{k: str(v) for k, v in asdict(built).items()}}))
"""


def build_torch_model(name: str, model_dir: Path, torch_python: str | None) -> ModelFiles | str:
    """A model of tools/bench_models.py built by a Python that has torch; a reason string if impossible."""
    layers = TORCH_MODEL_LAYERS.get(name, 0)
    marker = model_dir / f"{name}.built.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if all(Path(info[key]).exists() for key in ("model_path", "calib_path", "eval_path")):
            LOG.info("%s: reusing %s", name, info["model_path"])
            return ModelFiles(name, info["model_path"], info["calib_path"], info["eval_path"], layers)
    if torch_python is None:
        return "skipped: no Python with torch (pass --torch-python; tools/bench_models.py needs torch)"
    LOG.info("%s: building with %s", name, torch_python)
    script = TORCH_BUILD_SCRIPT.format(tools=str(TOOLS_DIR))
    model_dir.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(
        [torch_python, "-c", script, name, str(model_dir)], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        tail = (completed.stderr.strip().splitlines() or ["?"])[-1]
        return f"build failed: {tail[:ERROR_CHARS]}"
    marker.write_text(completed.stdout.strip().splitlines()[-1])
    info = json.loads(marker.read_text())
    return ModelFiles(name, info["model_path"], info["calib_path"], info["eval_path"], layers)


def find_torch_python(requested: str | None) -> str | None:
    """The Python to build torch models and run torch-based quantizers with, None when there is none."""
    candidates = [requested] if requested else [sys.executable]
    for python in candidates:
        probe = subprocess.run([python, "-c", "import torch"], capture_output=True, check=False)
        if probe.returncode == 0:
            return python
    return None


# --------------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------------


def quantize_variant(
    model: ModelFiles, variant: Variant, out_dir: Path, torch_python: str | None, external_data: bool = False
) -> Outcome:
    """Quantize ``model`` with ``variant`` in a worker; a variant that needs torch without it is skipped."""
    python = sys.executable
    if variant.needs_torch:
        if torch_python is None:
            return Outcome(model.name, variant.key, error="skipped: needs torch (pass --torch-python)")
        python = torch_python
    stem = f"{model.name}_{variant.key}"
    job = QuantJob(
        variant=variant.key,
        model_path=model.model_path,
        calib_path=model.calib_path,
        output_path=str(out_dir / "quantized" / f"{stem}.onnx"),
        result_path=str(out_dir / "work" / f"{stem}.result.json"),
        exclude_nodes=logits_projections(model.model_path) if variant.quantizer == "ort" else [],
        external_data=external_data,
    )
    LOG.info("%s: %s", model.name, variant.label)
    outcome = quantize_in_child(job, model.name, python, out_dir / "work")
    LOG.info(
        "  %s in %s s, peak RSS %s MB %s",
        "done" if outcome.ok else "FAILED",
        fmt(outcome.seconds, 1),
        fmt(outcome.peak_rss_mb, 0),
        outcome.error,
    )
    return outcome


def run_snr_part(
    models: list[ModelFiles], variants: list[Variant], out_dir: Path, torch_python: str | None
) -> dict[str, list[Outcome]]:
    """Quantize every model with every variant and measure SNR on the held-out set."""
    results: dict[str, list[Outcome]] = {}
    for model in models:
        reference, feeds = reference_outputs(model)
        outcomes = []
        for variant in variants:
            outcome = quantize_variant(model, variant, out_dir, torch_python)
            evaluate(outcome, reference, feeds)
            LOG.info(
                "  SNR %s dB via %s %s", fmt(outcome.snr_db, 2), outcome.evaluated_via, outcome.eval_error
            )
            outcomes.append(outcome)
        results[model.name] = outcomes
    return results


@dataclass
class LatencyForm:
    """One quantized model to time (``path`` None when its quantization failed)."""

    label: str
    path: str | None
    error: str


@dataclass
class LatencyRow:
    """Median latency of one model form at one sequence length and batch size."""

    label: str
    seq: int
    batch: int
    latency_ms: float | None
    fp32_ms: float
    snr_db: float | None = None
    note: str = ""


def written_accuracy_level(model_path: str) -> int:
    """The ``accuracy_level`` of the first MatMulNBits node (0, the schema default, when absent)."""
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    return int(attribute.i)
            return FLOAT_ACCURACY_LEVEL
    return FLOAT_ACCURACY_LEVEL


def with_accuracy_level(model_path: str, level: int) -> str:
    """A copy of a MatMulNBits model with every node's ``accuracy_level`` set to ``level``."""
    import onnx

    model = onnx.load(model_path)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [attribute for attribute in node.attribute if attribute.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])
    destination = str(Path(model_path).with_suffix(f".acc{level}.onnx"))
    onnx.save_model(model, destination)
    return destination


def latency_forms(decoder: ModelFiles, snr_outcomes: list[Outcome], out_dir: Path) -> list[LatencyForm]:
    """The INT4 forms timed on ``decoder``: reused from the snr part where it ran, else quantized now."""
    done = {outcome.variant: outcome for outcome in snr_outcomes if outcome.ok}
    forms: list[LatencyForm] = []
    for key in LATENCY_VARIANTS:
        outcome = done.get(key) or quantize_variant(decoder, VARIANTS_BY_KEY[key], out_dir, None)
        path = outcome.output_path if outcome.ok else None
        forms.append(LatencyForm(VARIANTS_BY_KEY[key].label, path, outcome.error))
        if key == "int4-rtn-ort" and path is not None:
            written = written_accuracy_level(path)
            forms[-1] = LatencyForm(f"{forms[-1].label}, accuracy_level {written} as written", path, "")
            other = FLOAT_ACCURACY_LEVEL if written != FLOAT_ACCURACY_LEVEL else INT8_ACCURACY_LEVEL
            label = f"{VARIANTS_BY_KEY[key].label}, accuracy_level {other} ({ACCURACY_MEANING[other]})"
            forms.append(LatencyForm(label, with_accuracy_level(path, other), ""))
    return forms


def time_decoder(decoder: ModelFiles, forms: list[LatencyForm], seq: int, runs: int) -> list[LatencyRow]:
    """Median latency of FP32 and of each form at every batch size, plus each form's SNR as deployed."""
    eval_feeds = load_npz(decoder.eval_path)
    fp32 = make_session(decoder.model_path, deployed=True)
    reference = run_outputs(fp32, eval_feeds)
    ready = [form for form in forms if form.path is not None]
    sessions = [make_session(form.path or "", deployed=True) for form in ready]
    snrs = [
        min(snr_db(reference[n], v) for n, v in run_outputs(session, eval_feeds).items())
        for session in sessions
    ]
    rows = []
    for batch in LATENCY_BATCHES:
        feeds = {name: np.resize(array, (batch, *array.shape[1:])) for name, array in eval_feeds.items()}
        fp32_ms, *latencies = interleaved_median_ms([fp32, *sessions], feeds, runs)
        LOG.info("latency %s batch %d: FP32 %.1f ms, INT4 %s ms", decoder.name, batch, fp32_ms, latencies)
        rows += [
            LatencyRow(form.label, seq, batch, latency, fp32_ms, snr)
            for form, latency, snr in zip(ready, latencies, snrs)
        ]
        rows += [
            LatencyRow(form.label, seq, batch, None, fp32_ms, note=f"quantization failed: {form.error}")
            for form in forms
            if form.path is None
        ]
    return rows


def run_latency_part(
    decoder: ModelFiles, snr_outcomes: list[Outcome], out_dir: Path, quick: bool, runs: int
) -> list[LatencyRow]:
    """FP32 against ORT-target INT4 (MatMulNBits) on ORT CPU, batch 1 and 8, default session options:
    on the benchmark decoder (a prefill of its whole sequence) and on the same shape with sequence 1
    (one decode step, where weight-only INT4 is meant to pay off)."""
    seq = (QUICK_CONFIG if quick else FULL_CONFIG).seq
    rows = time_decoder(decoder, latency_forms(decoder, snr_outcomes, out_dir), seq, runs)
    step = build_decoder(out_dir / "models", quick, seq=DECODE_STEP_SEQ)
    rows += time_decoder(step, latency_forms(step, [], out_dir), DECODE_STEP_SEQ, runs)
    return rows


def run_big_part(out_dir: Path, torch_python: str | None) -> tuple[ModelFiles | str, list[Outcome], float]:
    """INT4 on the 2.4 GB external-data model: outcomes and the model's size in MB."""
    built = build_torch_model(BIG_MODEL, out_dir / "models", torch_python)
    if isinstance(built, str):
        return built, [], 0.0
    size_mb = model_file_size(Path(built.model_path)) / BYTES_PER_MB
    outcomes = [
        quantize_variant(built, VARIANTS_BY_KEY[key], out_dir, torch_python, external_data=True)
        for key in BIG_VARIANTS
    ]
    reference, feeds = reference_outputs(built)
    for outcome in outcomes:
        evaluate(outcome, reference, feeds)
    return built, outcomes, size_mb


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def awq_seconds_per_layer(outcome: Outcome, rtn: Outcome | None, layers: int) -> float | None:
    """AWQ time per transformer layer: onnxq's own AWQ lap when it reports one, else time over RTN."""
    if not outcome.ok or layers == 0 or not VARIANTS_BY_KEY[outcome.variant].is_awq:
        return None
    awq_laps = [seconds for name, seconds in outcome.laps.items() if "awq" in name.lower()]
    if awq_laps:
        return sum(awq_laps) / layers
    if rtn is None or not rtn.ok or outcome.seconds is None or rtn.seconds is None:
        return None
    return (outcome.seconds - rtn.seconds) / layers


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


SNR_HEADER = [
    "quantizer",
    "SNR vs FP32 (dB)",
    "evaluated via",
    "quantize time (s)",
    "peak RSS (MB)",
    "output (MB)",
    "AWQ s/layer",
]


def snr_rows(outcomes: list[Outcome], layers: int) -> list[list[str]]:
    """Rows of one model's SNR table."""
    rtn = next((o for o in outcomes if o.variant == "int4-rtn"), None)
    rows = []
    for outcome in outcomes:
        label = VARIANTS_BY_KEY[outcome.variant].label
        if not outcome.ok:
            rows.append(
                [
                    label,
                    f"FAILED: {outcome.error}",
                    "-",
                    fmt(outcome.seconds, 1),
                    fmt(outcome.peak_rss_mb, 0),
                    "-",
                    "-",
                ]
            )
            continue
        snr = f"eval failed: {outcome.eval_error}" if outcome.eval_error else fmt(outcome.snr_db, 2)
        per_layer = awq_seconds_per_layer(outcome, rtn, layers)
        rows.append(
            [
                label,
                snr,
                outcome.evaluated_via or "-",
                fmt(outcome.seconds, 1),
                fmt(outcome.peak_rss_mb, 0),
                fmt(outcome.output_mb, 1),
                fmt(per_layer, 2),
            ]
        )
    return rows


def latency_table(rows: list[LatencyRow]) -> str:
    """The latency table."""
    cells = [
        [
            row.label,
            str(row.seq),
            str(row.batch),
            fmt(row.fp32_ms, 2),
            fmt(row.latency_ms, 2) if row.latency_ms is not None else row.note,
            ratio(row.fp32_ms, row.latency_ms),
            fmt(row.snr_db, 2),
        ]
        for row in rows
    ]
    header = [
        "model form",
        "tokens per sequence",
        "batch",
        "FP32 (ms)",
        "INT4 (ms)",
        "speed-up vs FP32",
        "SNR as deployed (dB)",
    ]
    return table(header, cells)


def big_table(outcomes: list[Outcome], size_mb: float) -> str:
    """Peak RSS against the big model's size."""
    cells = []
    for outcome in outcomes:
        label = VARIANTS_BY_KEY[outcome.variant].label
        status = (
            fmt(outcome.snr_db, 2)
            if outcome.ok and not outcome.eval_error
            else (outcome.eval_error or outcome.error)
        )
        cells.append(
            [
                label,
                fmt(outcome.seconds, 1),
                fmt(outcome.peak_rss_mb, 0),
                ratio(outcome.peak_rss_mb, size_mb),
                fmt(outcome.output_mb, 0),
                status,
            ]
        )
    header = [
        "quantizer",
        "quantize time (s)",
        "peak RSS (MB)",
        "peak RSS / model size",
        "output (MB)",
        "SNR (dB)",
    ]
    return table(header, cells)


@dataclass
class BenchResults:
    """Everything one run measured, and why parts are missing."""

    models: dict[str, ModelFiles] = field(default_factory=dict)
    snr: dict[str, list[Outcome]] = field(default_factory=dict)
    latency: list[LatencyRow] = field(default_factory=list)
    big_outcomes: list[Outcome] = field(default_factory=list)
    big_size_mb: float = 0.0
    skipped: list[str] = field(default_factory=list)
    environment: list[str] = field(default_factory=list)


def render_report(results: BenchResults, command: str) -> str:
    """The whole Markdown report."""
    parts = ["# Block formats: onnxq vs ONNX Runtime MatMulNBitsQuantizer", "", f"Command: `{command}`", ""]
    parts += [f"- {line}" for line in results.environment]
    for name, outcomes in results.snr.items():
        model = results.models[name]
        size_mb = model_file_size(Path(model.model_path)) / BYTES_PER_MB
        parts += [
            "",
            f"## {name} ({model.layers} layers, {size_mb:.0f} MB FP32): output SNR on held-out samples",
            "",
        ]
        parts.append(table(SNR_HEADER, snr_rows(outcomes, model.layers)))
    if results.latency:
        parts += ["", "## Decoder latency on ORT CPU (default session options, as deployed)", ""]
        parts.append(latency_table(results.latency))
    if results.big_outcomes:
        parts += ["", f"## INT4 on the external-data model ({results.big_size_mb / 1000:.2f} GB FP32)", ""]
        parts.append(big_table(results.big_outcomes, results.big_size_mb))
    if results.skipped:
        parts += ["", "## Not measured in this run", ""]
        parts += [f"- {line}" for line in results.skipped]
    parts += ["", "## How to read it", ""]
    parts += [f"- {line}" for line in NOTES]
    return "\n".join(parts) + "\n"


NOTES = (
    "SNR: 10 log10(sum ref^2 / sum (ref - q)^2) of the output on held-out samples (worst output), ORT CPU at "
    "ORT_ENABLE_BASIC with session.qdq_matmulnbits_accuracy_level=0 (FP8 Q/DQ miscomputed above BASIC in ORT 1.32; "
    "INT4 DQ->MatMul fused exactly). 'onnxq emulation + ORT': ORT CPU has no kernel for the deployable graph "
    "(FP4 E2M1, TRT_FP4DynamicQuantize), so onnxq.emulate rewrote it into standard ops first.",
    "Quantize time: inside the worker process around the quantize call (loading, calibration, writing "
    "included; interpreter start-up and imports excluded). Peak RSS: the worker's VmHWM (imports included).",
    "AWQ s/layer: onnxq's own AWQ step time when it reports one, otherwise (AWQ time - RTN time) / "
    "transformer layers.",
    "ORT MatMulNBitsQuantizer: 4 bit, block 128, is_symmetric=True, MatMulNBits (QOperator) output, the "
    "logits projection excluded (onnxq keeps it in high precision). Its RTN path is the bundled neural-compressor "
    "rtn_quantize; HQQ fits zero points (asymmetric) and imports torch.",
    "Latency: the decoder's sequence length is fixed by the model. With its full sequence a run is a prefill "
    "(MatMul M = batch x seq); the 'tokens per sequence 1' rows time a decoder of the same sizes built with "
    "sequence 1 (own seeded weights), i.e. one decode step without a KV cache (M = batch). The onnxq "
    "MatMulNBits model is timed as written and with its accuracy_level attribute switched (0: float "
    "activations; 4: int8 activations, ORT's fast CPU path); the SNR tables show it as written. "
    "Median over rounds that run FP32 and every INT4 model once each in turn (load from other processes "
    "falls on all alike).",
    "Compare SNR within one deployment form; CPU latency of TensorRT-style graphs says nothing about TensorRT speed.",
)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("out/bench_block"), help="work directory")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT, help="Markdown report path")
    parser.add_argument("--parts", default="snr,latency", help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--big", action="store_true", help="add the 2.4 GB model part (slow)")
    parser.add_argument("--models", default="decoder,vit,bert", help="models of the snr part")
    parser.add_argument("--variants", default=",".join(VARIANTS_BY_KEY), help="variant keys of the snr part")
    parser.add_argument("--torch-python", help="a Python that imports torch (ViT/BERT/big build, ORT HQQ)")
    parser.add_argument("--quick", action="store_true", help="small decoder, few samples, decoder only")
    return parser.parse_args(argv)


def selected(text: str, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    """Comma-separated names, each checked against ``allowed``."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return names


def environment_lines(torch_python: str | None) -> list[str]:
    """Versions and machine facts for the report."""
    import onnx
    import onnxruntime as ort

    return [
        f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPU cores, load average at start {os.getloadavg()[0]:.2f} (other processes may "
        "share the machine: times are indicative)",
        f"torch-built models and HQQ: {'via ' + torch_python if torch_python else 'unavailable (no torch)'}",
    ]


def gather_models(
    args: argparse.Namespace, torch_python: str | None, results: BenchResults
) -> list[ModelFiles]:
    """The models of the snr part; torch models that cannot be built are listed as skipped."""
    names = ["decoder"] if args.quick else selected(args.models, ["decoder", *TORCH_MODELS], "models")
    models = []
    for name in names:
        built = (
            build_decoder(args.out / "models", args.quick)
            if name == "decoder"
            else build_torch_model(name, args.out / "models", torch_python)
        )
        if isinstance(built, str):
            results.skipped.append(f"{name}: {built}")
            continue
        results.models[name] = built
        models.append(built)
    return models


def run(args: argparse.Namespace, checkpoint: Callable[[BenchResults], object]) -> BenchResults:
    """Run the selected parts, calling ``checkpoint`` after each so a long run leaves partial results."""
    parts = selected(args.parts, PARTS, "parts") + ([BIG_MODEL] if args.big else [])
    torch_python = find_torch_python(args.torch_python)
    results = BenchResults(environment=environment_lines(torch_python))
    for folder in ("models", "quantized", "work"):
        (args.out / folder).mkdir(parents=True, exist_ok=True)
    if "snr" in parts:
        variants = [
            VARIANTS_BY_KEY[key] for key in selected(args.variants, list(VARIANTS_BY_KEY), "variants")
        ]
        for model in gather_models(args, torch_python, results):
            results.snr.update(run_snr_part([model], variants, args.out, torch_python))
            checkpoint(results)
    if "latency" in parts:
        decoder = results.models.get("decoder") or build_decoder(args.out / "models", args.quick)
        results.models["decoder"] = decoder
        runs = QUICK_LATENCY_RUNS if args.quick else LATENCY_RUNS
        results.latency = run_latency_part(
            decoder, results.snr.get("decoder", []), args.out, args.quick, runs
        )
        checkpoint(results)
    if BIG_MODEL in parts:
        built, results.big_outcomes, results.big_size_mb = run_big_part(args.out, torch_python)
        if isinstance(built, str):
            results.skipped.append(f"big: {built}")
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point (parent, or ``--worker SPEC`` in a child process)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.worker is not None:
        return run_worker(args.worker)
    command = "python tools/bench_block.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def write_report(results: BenchResults) -> str:
        """Render, write and return the report (also called after each part)."""
        report = render_report(results, command.strip())
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(report)
        return report

    report = write_report(run(args, write_report))
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
