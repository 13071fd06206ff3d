#!/usr/bin/env python3
"""Benchmark onnxq's calibration engine against ONNX Runtime's calibrators.

One run measures, on a seeded BERT-style transformer encoder built here with PyTorch (12 layers, hidden
384, 6 heads, FFN 1536, seq 128, opset 17, dynamic batch; hidden-state input with outlier channels):

1. memory and time: onnxq ``entropy`` calibration vs ONNX Runtime's ``Entropy`` calibrator on the same
   tensors (every float tensor, as ``create_calibrator(op_types_to_calibrate=None)`` selects them), each in
   its own child process whose peak RSS (``os.wait4`` ``ru_maxrss``) is measured, never estimated. When
   ONNX Runtime runs out of memory it is retried with fewer samples and onnxq is measured there too;
2. accuracy: output SNR on held-out data against FP32 for every onnxq method (``onnxq.quantize``, target
   ``tensorrt``) and every ONNX Runtime method (``quantize_static``: QDQ, per-channel, symmetric INT8), on
   the transformer and on the ResNet-style CNN of ``tools/bench_models.py`` when that file is present;
3. batch-size invariance: ranges at calibration batch 1 vs 32, bit-identical or not, with the largest
   relative difference (onnxq entropy, ONNX Runtime Entropy one-pass and per-batch, FP32 reference).

Every child runs under an address-space cap (``--mem-limit-gb``), so a calibrator that needs more memory
than the machine has fails with an allocation error (recorded as out of memory) instead of waking the OOM
killer. The parent stays small (see :class:`Runner`) so that the children's ``ru_maxrss`` is their own.

Usage::

    python tools/bench_calib.py --out bench_out            # full run, --samples 256
    python tools/bench_calib.py --quick --out bench_quick  # smoke run: 2 layers, 16 samples, about a minute
    python tools/bench_calib.py --help

The report is printed and written to ``OUT/bench_calib.md``; ``--keep-work`` keeps models, data, ranges
and per-child logs in ``OUT/work``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import logging
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

LOG = logging.getLogger("bench_calib")

REPO_ROOT = Path(__file__).resolve().parents[1]

# --- Model shape (BERT-small-like encoder) ---------------------------------------------------------------
FULL_LAYERS = 12
QUICK_LAYERS = 2
HIDDEN = 384
HEADS = 6
FFN = 1536
SEQ_LEN = 128
OPSET = 17
INPUT_NAME = "hidden_states"
OUTPUT_NAME = "last_hidden_state"
REFERENCE_KEY = "output"  # the first model output, FP32, on the held-out samples

# --- Realistic-ish activations --------------------------------------------------------------------------
MODEL_SEED = 0
DATA_SEED = 1234
CALIB_STREAM = 1
EVAL_STREAM = 2
VOCAB = 2048
TOKEN_STD = 0.8
POSITION_STD = 0.2
NOISE_STD = 0.1
SAMPLE_SCALE_SIGMA = 0.25
# A few "massive activation" channels, as in real BERT/OPT/LLaMA hidden states and LayerNorm weights.
OUTLIER_CHANNELS = (17, 101, 250, 308)
OUTLIER_INPUT_GAIN = 20.0
OUTLIER_LN_GAIN = 12.0
QK_GAIN = 2.5

# --- Run sizes ------------------------------------------------------------------------------------------
DEFAULT_SAMPLES = 256
QUICK_SAMPLES = 16
DEFAULT_EVAL_SAMPLES = 32
QUICK_EVAL_SAMPLES = 8
DEFAULT_CALIB_BATCH = 32
QUICK_CALIB_BATCH = 8
QUICK_JOBS = 2
# ONNX Runtime's histogram calibrators take minutes per pass at 256 samples on 2 cores; sections 2 and 3
# use the first samples of the calibration set (the same ones for both tools) to keep a run ~15 minutes.
DEFAULT_ACCURACY_SAMPLES = 32
DEFAULT_INVARIANCE_SAMPLES = 32
EVAL_BATCH = 8
MIN_FALLBACK_SAMPLES = 8
FALLBACK_DIVISOR = 4

# --- Calibration settings -------------------------------------------------------------------------------
ONNXQ_METHODS = ("max", "entropy", "percentile", "mse")
ORT_METHODS = ("MinMax", "Entropy", "Percentile", "Distribution")
PERCENTILE = 99.99
RSS_RATIO_TARGET = 0.25
TIME_RATIO_TARGET = 1.0

# --- Child processes ------------------------------------------------------------------------------------
DEFAULT_MEM_LIMIT_GB = 12.0
DEFAULT_CHILD_TIMEOUT_S = 900.0
POLL_INTERVAL_S = 0.1
KIB = 1024
MIB = 1024 * 1024
GIB = 1024 * MIB
OOM_MARKERS = (
    "memoryerror",
    "bad_alloc",
    "bad allocation",
    "out of memory",
    "failed to allocate",
    "std::bad",
)
LOG_TAIL_CHARS = 1500
CNN_BUILDER_FILE = "bench_models.py"
CHILD_SCRIPT = "bench_calib_child.py"


# ======================================================================================================
# Model and data
# ======================================================================================================


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Shape of the benchmark transformer encoder."""

    layers: int = FULL_LAYERS
    hidden: int = HIDDEN
    heads: int = HEADS
    ffn: int = FFN
    seq_len: int = SEQ_LEN


def build_transformer(spec: ModelSpec) -> Any:
    """Build a seeded post-LayerNorm (BERT-style) encoder taking hidden states ``[batch, seq, hidden]``.

    Written with plain Linear/MatMul/Softmax/LayerNorm/GELU so that the exported graph has the classic
    MatMul + Add, Reshape/Transpose, Softmax, LayerNormalization and Erf-GELU patterns of exported BERTs.
    A few LayerNorm channels get large weights and the Q/K projections a gain, so that activations carry
    channel outliers and non-uniform attention like real trained transformers.
    """
    import torch
    from torch import nn

    torch.manual_seed(MODEL_SEED)

    class EncoderLayer(nn.Module):
        """One post-LN encoder layer: self-attention, residual, LN, GELU FFN, residual, LN."""

        def __init__(self) -> None:
            super().__init__()
            self.head_dim = spec.hidden // spec.heads
            self.q = nn.Linear(spec.hidden, spec.hidden)
            self.k = nn.Linear(spec.hidden, spec.hidden)
            self.v = nn.Linear(spec.hidden, spec.hidden)
            self.o = nn.Linear(spec.hidden, spec.hidden)
            self.ln1 = nn.LayerNorm(spec.hidden)
            self.fc1 = nn.Linear(spec.hidden, spec.ffn)
            self.fc2 = nn.Linear(spec.ffn, spec.hidden)
            self.ln2 = nn.LayerNorm(spec.hidden)

        def _heads(self, x: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape
            return x.reshape(b, s, spec.heads, self.head_dim).transpose(1, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape
            q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
            ctx = ctx.transpose(1, 2).reshape(b, s, spec.hidden)
            x = self.ln1(x + self.o(ctx))
            return self.ln2(x + self.fc2(nn.functional.gelu(self.fc1(x))))

    class Encoder(nn.Module):
        """A stack of encoder layers."""

        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(EncoderLayer() for _ in range(spec.layers))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    model = Encoder().eval()
    gen = torch.Generator().manual_seed(MODEL_SEED + 1)
    with torch.no_grad():
        for layer in model.layers:
            layer.q.weight.mul_(QK_GAIN)
            layer.k.weight.mul_(QK_GAIN)
            for ln in (layer.ln1, layer.ln2):
                ln.weight.copy_(1.0 + 0.1 * torch.randn(spec.hidden, generator=gen))
                ln.bias.copy_(0.05 * torch.randn(spec.hidden, generator=gen))
                for ch in OUTLIER_CHANNELS:
                    ln.weight[ch] = OUTLIER_LN_GAIN * (1.0 + 0.2 * torch.rand((), generator=gen).item())
    return model


def export_transformer(spec: ModelSpec, path: Path) -> None:
    """Export the encoder with the TorchScript exporter at opset 17 with a dynamic batch axis."""
    import warnings

    import torch

    model = build_transformer(spec)
    example = torch.zeros(2, spec.seq_len, spec.hidden)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            opset_version=OPSET,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


def make_hidden_states(spec: ModelSpec, count: int, stream: int) -> np.ndarray:
    """Seeded embedding-like hidden states ``[count, seq, hidden]`` with a few large outlier channels.

    A fixed token table and position table (shared by every stream) plus per-stream token ids, noise and a
    log-normal per-sample scale, so calibration and evaluation data differ but come from one distribution.
    """
    base = np.random.default_rng(DATA_SEED)
    table = base.standard_normal((VOCAB, spec.hidden)).astype(np.float32) * TOKEN_STD
    positions = base.standard_normal((spec.seq_len, spec.hidden)).astype(np.float32) * POSITION_STD
    signs = base.choice(np.array([-1.0, 1.0], dtype=np.float32), size=len(OUTLIER_CHANNELS))
    rng = np.random.default_rng([DATA_SEED, stream])
    ids = rng.integers(0, VOCAB, size=(count, spec.seq_len))
    x = table[ids] + positions[None]
    x += rng.standard_normal(x.shape, dtype=np.float32) * NOISE_STD
    for sign, ch in zip(signs, OUTLIER_CHANNELS):
        x[..., ch] = sign * OUTLIER_INPUT_GAIN * (1.0 + 0.25 * np.abs(x[..., ch]))
    x *= rng.lognormal(0.0, SAMPLE_SCALE_SIGMA, size=(count, 1, 1)).astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


def ort_calibration_tensors(model_path: Path) -> list[str]:
    """The tensors ONNX Runtime's calibrators select with ``op_types_to_calibrate=None``.

    Same rule as ``CalibraterBase.select_tensors_to_calibrate``: every float/float16 node input or output
    with a shape-inferred type that is not an initializer.
    """
    import onnx
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    model = load_model_with_shape_infer(model_path)
    infos = {vi.name: vi for vi in model.graph.value_info}
    infos.update({vi.name: vi for vi in model.graph.output})
    infos.update({vi.name: vi for vi in model.graph.input})
    inits = {init.name for init in model.graph.initializer}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    names: dict[str, None] = {}  # ordered set
    for node in model.graph.node:
        for name in [*node.input, *node.output]:
            vi = infos.get(name)
            if (
                vi is not None
                and name not in inits
                and vi.type.HasField("tensor_type")
                and vi.type.tensor_type.elem_type in float_types
            ):
                names[name] = None
    return list(names)


# ======================================================================================================
# Shared helpers (parent and children)
# ======================================================================================================


def current_rss_mb() -> float:
    """Current RSS of this process in MB (``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / MIB


def self_peak_rss_mb() -> float:
    """Peak RSS of this process so far, in MB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB / MIB


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run the body in ``path`` (ONNX Runtime's quantizer writes temporary files into the working dir)."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


Feeds = dict[str, np.ndarray]


def private_link(model: Path, folder: Path) -> Path:
    """A symlink to ``model`` in ``folder``: ONNX Runtime's quantization tools write ``<stem>-inferred.onnx``
    next to the model they load, which collides when two children load the same model at once."""
    link = folder / model.name
    link.symlink_to(model.resolve())
    return link


def load_feeds(path: Path | str, count: int | None = None) -> Feeds:
    """All arrays of an ``.npz`` file (input name -> samples on axis 0), optionally the first ``count``."""
    with np.load(path) as npz:
        return {k: np.ascontiguousarray(npz[k][:count] if count is not None else npz[k]) for k in npz.files}


def num_samples(feeds: Feeds) -> int:
    """Samples in a feed dict (length of axis 0)."""
    return len(next(iter(feeds.values())))


def batches(feeds: Feeds, batch_size: int) -> Iterator[Feeds]:
    """Feed dicts of ``batch_size`` consecutive samples (the last one may be smaller)."""
    for start in range(0, num_samples(feeds), batch_size):
        yield {k: v[start : start + batch_size] for k, v in feeds.items()}


def output_snr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    """Signal-to-noise ratio ``10 log10(sum(ref^2) / sum((ref - actual)^2))`` in dB."""
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - actual.astype(np.float64)) ** 2))
    signal_power = float(np.sum(ref**2))
    if noise == 0.0:
        return math.inf
    if not math.isfinite(noise):
        return -math.inf
    return 10.0 * math.log10(signal_power / noise)


def run_model(model_path: Path, data: Feeds, *, optimize: bool = True) -> np.ndarray:
    """Run ``model_path`` on ``data`` in batches with ONNX Runtime's CPU EP; return the first output."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    outs = [sess.run(None, feed)[0] for feed in batches(data, EVAL_BATCH)]
    return np.concatenate(outs, axis=0)


def is_oom(text: str) -> bool:
    """Whether an error message looks like an allocation failure."""
    low = text.lower()
    return any(marker in low for marker in OOM_MARKERS)


def save_ranges(path: Path, ranges: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Save per-tensor (low, high) ranges in one ``.npz``: ``names`` plus ``<i>_lo``/``<i>_hi`` arrays."""
    arrays: dict[str, np.ndarray] = {}
    for i, (_, (lo, hi)) in enumerate(sorted(ranges.items())):
        arrays[f"{i}_lo"] = np.asarray(lo)
        arrays[f"{i}_hi"] = np.asarray(hi)
    np.savez(path, names=np.array(sorted(ranges), dtype=object), **arrays)


def load_ranges(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Inverse of :func:`save_ranges`."""
    with np.load(path, allow_pickle=True) as npz:
        names = list(npz["names"])
        return {name: (npz[f"{i}_lo"], npz[f"{i}_hi"]) for i, name in enumerate(names)}


# ======================================================================================================
# onnxq adapter (onnxq.calibration's streaming calibrator, called the way onnxq.quantize calls it)
# ======================================================================================================


def onnxq_status() -> tuple[bool, bool, str]:
    """(low-level calibration usable, ``onnxq.quantize`` usable, one-line description)."""
    notes: list[str] = []
    calib_ok = quant_ok = True
    try:
        for module in ONNXQ_CALIBRATION_MODULES:
            importlib.import_module(module)
    except Exception as exc:
        calib_ok = False
        notes.append(f"calibration modules not importable ({type(exc).__name__}: {exc})")
    try:
        if not callable(getattr(importlib.import_module("onnxq"), "quantize", None)):
            raise ImportError("onnxq has no quantize()")
    except Exception as exc:
        quant_ok = False
        notes.append(f"onnxq.quantize not usable ({type(exc).__name__}: {exc})")
    return calib_ok, quant_ok, "; ".join(notes) or "ok (onnxq.quantize and onnxq.calibration importable)"


ONNXQ_CALIBRATION_MODULES = (
    "onnxq.calibration.calibrator",
    "onnxq.calibration.data",
    "onnxq.calibration.methods",
    "onnxq.formats",
    "onnxq.model_io",
)


def onnxq_input_specs(model: Any) -> list[Any]:
    """The model inputs as onnxq's data loader wants them (``onnxq.api.input_specs`` when present)."""
    try:
        return importlib.import_module("onnxq.api").input_specs(model)
    except ImportError:
        from onnxq.calibration.data import InputSpec

        specs = []
        for value in model.graph.inputs:
            if value.name in model.graph.initializers:
                continue
            shape = tuple(
                d if isinstance(d, int) else (str(d) if d is not None else None) for d in value.shape
            )
            specs.append(InputSpec(value.name, value.dtype.numpy(), shape))
        return specs


def call_onnxq_calibrate(
    model_path: Path, names: Sequence[str], data_path: Path, method: str, batch_size: int | None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """onnxq's streaming calibration of ``names`` with one method: the chosen (low, high) per tensor."""
    from onnxq.calibration.calibrator import CalibrationSettings, calibrate
    from onnxq.calibration.data import open_calibration_data
    from onnxq.calibration.methods import get_method
    from onnxq.formats import get_format
    from onnxq.model_io import load_model

    model = load_model(model_path)
    data = open_calibration_data(data_path, onnxq_input_specs(model), batch_size)
    options = {"percentile": PERCENTILE} if method == "percentile" else {}
    ranges = calibrate(
        model, list(names), data, get_method(method, **options), get_format("int8"), CalibrationSettings()
    )
    return {
        name: (np.asarray(r.chosen_low, np.float64), np.asarray(r.chosen_high, np.float64))
        for name, r in ranges.items()
    }


# ======================================================================================================
# Child jobs (each runs in its own process; the parent measures its peak RSS with os.wait4)
# ======================================================================================================


class ArrayReader:
    """ONNX Runtime ``CalibrationDataReader`` over an in-memory array, ``batch_size`` samples per feed."""

    def __init__(self, data: Feeds, batch_size: int) -> None:
        self.data = data
        self.batch_size = batch_size
        self.start = 0
        self.stop = num_samples(data)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """Next feed dict, or ``None`` at the end of the current range."""
        if self.start >= self.stop:
            return None
        end = min(self.start + self.batch_size, self.stop)
        feed = {k: v[self.start : end] for k, v in self.data.items()}
        self.start = end
        return feed

    def set_range(self, start_index: int, end_index: int) -> None:
        """Restrict the reader to samples ``[start_index, end_index)`` (used by ``CalibStridedMinMax``)."""
        self.start, self.stop = start_index, min(end_index, num_samples(self.data))

    def __len__(self) -> int:
        return num_samples(self.data)


def ort_ranges(tensors_data: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (low, high)}`` from ONNX Runtime's ``TensorsData``."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, td in tensors_data.items():
        lo, hi = td.range_value
        out[name] = (np.asarray(lo), np.asarray(hi))
    return out


def job_ort_calibrate(spec: dict[str, Any]) -> dict[str, Any]:
    """ONNX Runtime calibrator (``create_calibrator`` + ``collect_data`` + ``compute_data``).

    ``streaming`` calls ``collect_data`` once per batch (bounded memory; what ``CalibStridedMinMax`` does);
    otherwise one ``collect_data`` call over every sample, as ``quantize_static`` does by default.
    """
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    data = load_feeds(spec["data"], spec["samples"])
    tmp = Path(tempfile.mkdtemp(dir=spec["workdir"]))
    baseline = self_peak_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    calibrator = create_calibrator(
        private_link(Path(spec["model"]), tmp),
        None,
        augmented_model_path=str(tmp / "augmented.onnx"),
        calibrate_method=CalibrationMethod[spec["method"]],
        extra_options={"symmetric": True},
    )
    reader = ArrayReader(data, spec["batch_size"])
    if spec.get("streaming"):
        while reader.start < num_samples(data):
            begin = reader.start
            reader.set_range(begin, begin + spec["batch_size"])
            calibrator.collect_data(reader)
            reader.stop = num_samples(data)
    else:
        calibrator.collect_data(reader)
    t_collect = time.perf_counter() - t0
    result = calibrator.compute_data()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    ranges = ort_ranges(result)
    del calibrator
    shutil.rmtree(tmp, ignore_errors=True)
    if spec.get("ranges_out"):
        save_ranges(Path(spec["ranges_out"]), ranges)
    return {
        "baseline_rss_mb": baseline,
        "calib_s": elapsed,
        "cpu_s": cpu,
        "collect_s": t_collect,
        "tensors": len(ranges),
        "samples": num_samples(data),
    }


def job_onnxq_calibrate(spec: dict[str, Any]) -> dict[str, Any]:
    """onnxq's low-level calibration on the given tensor names."""
    names = json.loads(Path(spec["tensors"]).read_text())
    importlib.import_module("onnxq")
    data_path = Path(spec["data"])  # the parent wrote a file with exactly spec["samples"] samples
    baseline = self_peak_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    ranges = call_onnxq_calibrate(Path(spec["model"]), names, data_path, spec["method"], spec["batch_size"])
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    if spec.get("ranges_out"):
        save_ranges(Path(spec["ranges_out"]), ranges)
    return {
        "baseline_rss_mb": baseline,
        "calib_s": elapsed,
        "cpu_s": cpu,
        "tensors": len(ranges),
        "samples": spec["samples"],
    }


def job_ort_quantize(spec: dict[str, Any]) -> dict[str, Any]:
    """ONNX Runtime ``quantize_static``: QDQ, per-channel, symmetric INT8, then SNR on held-out data."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationMethod

    data = load_feeds(spec["data"], spec["samples"])
    out = Path(spec["workdir"]) / f"{spec['name']}.onnx"
    extra: dict[str, Any] = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "CalibTensorRangeSymmetric": True,
        "CalibPercentile": PERCENTILE,
    }
    if spec.get("stride"):
        extra["CalibStridedMinMax"] = spec["stride"]
    baseline = self_peak_rss_mb()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=spec["workdir"]) as tmp, working_directory(Path(tmp)):
        quantize_static(
            str(private_link(Path(spec["model"]), Path(tmp))),
            str(out),
            ArrayReader(data, spec["batch_size"]),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod[spec["method"]],
            extra_options=extra,
        )
    elapsed = time.perf_counter() - t0
    return {"baseline_rss_mb": baseline, "calib_s": elapsed, **evaluate(out, spec)}


def job_onnxq_quantize(spec: dict[str, Any]) -> dict[str, Any]:
    """``onnxq.quantize`` INT8 for TensorRT with one calibration method, then SNR on held-out data."""
    onnxq = importlib.import_module("onnxq")
    out = Path(spec["workdir"]) / f"{spec['name']}.onnx"
    baseline = self_peak_rss_mb()
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {
        "mode": "int8",
        "calibration_data": spec["data"],
        "target": "tensorrt",
        "calib_method": spec["method"],
        "output_path": str(out),
    }
    if spec["method"] == "percentile":
        kwargs["percentile"] = PERCENTILE
    if spec.get("batch_size"):
        kwargs["calib_batch_size"] = spec["batch_size"]
    result = onnxq.quantize(spec["model"], **kwargs)
    elapsed = time.perf_counter() - t0
    if not out.exists():
        import onnx_ir as ir

        ir.save(result.model, out)
    calibrated = getattr(result, "calibration", None)
    info = {
        "baseline_rss_mb": baseline,
        "calib_s": elapsed,
        "tensors": len(calibrated) if calibrated is not None and hasattr(calibrated, "__len__") else None,
    }
    return {**info, **evaluate(out, spec)}


def job_fp32_batches(spec: dict[str, Any]) -> dict[str, Any]:
    """The FP32 model's output at batch 1 vs ``batch_size``: are ONNX Runtime's own numerics batch-invariant?"""
    import onnxruntime as ort

    data = load_feeds(spec["data"], spec["samples"])
    sess = ort.InferenceSession(spec["model"], providers=["CPUExecutionProvider"])
    outs = {
        b: np.concatenate([sess.run(None, feed)[0] for feed in batches(data, b)])
        for b in (1, spec["batch_size"])
    }
    small, big = outs[1], outs[spec["batch_size"]]
    rel = np.abs(small.astype(np.float64) - big) / np.maximum(np.abs(small), np.abs(big)).clip(min=1e-30)
    return {"identical": small.tobytes() == big.tobytes(), "max_rel": float(rel.max())}


def evaluate(model_path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """SNR of ``model_path`` against the saved FP32 reference outputs on the held-out samples."""
    eval_data = load_feeds(spec["eval"])
    with np.load(spec["reference"]) as npz:
        reference = npz[REFERENCE_KEY]
    actual = run_model(model_path, eval_data)
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return {
        "snr_db": output_snr_db(reference, actual),
        "q_nodes": sum(1 for n in graph.node if n.op_type == "QuantizeLinear"),
        "dq_nodes": sum(1 for n in graph.node if n.op_type == "DequantizeLinear"),
    }


def child_main(spec_path: Path) -> int:
    """Entry point of a child: run one job, write its result JSON (error included), exit 0."""
    spec = json.loads(spec_path.read_text())
    # Cap the address space first, so that over-allocation raises instead of waking the OOM killer.
    limit = int(spec["mem_limit_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.basicConfig(level=logging.INFO, format=f"  [{spec['name']}] %(message)s", stream=sys.stderr)
    result: dict[str, Any]
    try:
        result = {"ok": True, **JOBS[spec["job"]](spec)}
    except BaseException as exc:
        text = f"{type(exc).__name__}: {exc}"
        LOG.error("failed: %s", text[:LOG_TAIL_CHARS])
        result = {
            "ok": False,
            "error": text[:LOG_TAIL_CHARS],
            "oom": isinstance(exc, MemoryError) or is_oom(text),
        }
    result["self_peak_rss_mb"] = self_peak_rss_mb()
    Path(spec["result"]).write_text(json.dumps(result, default=float))
    return 0


# ======================================================================================================
# Parent: run children, measure, report
# ======================================================================================================


@dataclasses.dataclass
class ChildOutcome:
    """What one child process did: its result payload plus the parent's measurements of it."""

    name: str
    ok: bool
    peak_rss_mb: float
    wall_s: float
    payload: dict[str, Any]
    error: str = ""
    oom: bool = False
    mem_limit_gb: float = 0.0

    def get(self, key: str, default: Any = None) -> Any:
        """A field of the child's result payload."""
        return self.payload.get(key, default)


class Runner:
    """Runs child jobs under a memory limit and measures each child's peak RSS.

    Linux seeds a child's ``ru_maxrss`` with the RSS of the process that forked it (the copied address
    space's high-water mark is carried over by exec), so the parent must stay small: it never imports
    torch, onnx, onnxruntime or onnxq, and the model and data are built in a ``prepare`` child. The
    largest parent RSS seen at a spawn is reported; it is a floor under every measured peak.
    """

    def __init__(self, workdir: Path, mem_limit_gb: float, timeout_s: float) -> None:
        self.workdir = workdir
        self.mem_limit_bytes = int(mem_limit_gb * GIB)
        self.timeout_s = timeout_s
        self.max_parent_rss_mb = 0.0
        # Children run a frozen copy of this script, so editing it during a run cannot mix versions.
        self.script = workdir / CHILD_SCRIPT
        shutil.copyfile(Path(__file__).resolve(), self.script)

    def run_many(
        self, jobs: Sequence[tuple[str, str, dict[str, Any]]], parallel: int = 1
    ) -> list[ChildOutcome]:
        """Run ``(name, job, spec)`` children, ``parallel`` at a time (peak RSS stays per child)."""
        if parallel <= 1:
            return [self.run(name, job, **spec) for name, job, spec in jobs]
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            return list(pool.map(lambda item: self.run(item[0], item[1], **item[2]), jobs))

    def run(self, name: str, job: str, **spec: Any) -> ChildOutcome:
        """Run ``job`` in a fresh interpreter; return its payload with the measured peak RSS and wall time."""
        spec_path = self.workdir / f"{name}.spec.json"
        result_path = self.workdir / f"{name}.result.json"
        log_path = self.workdir / f"{name}.log"
        result_path.unlink(missing_ok=True)
        spec.update(
            name=name,
            job=job,
            result=str(result_path),
            workdir=str(self.workdir),
            mem_limit_bytes=self.mem_limit_bytes,
        )
        spec_path.write_text(json.dumps(spec, default=str))
        parent_rss = current_rss_mb()
        self.max_parent_rss_mb = max(self.max_parent_rss_mb, parent_rss)
        LOG.info("▶ %s (parent RSS %.0f MB)", name, parent_rss)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        t0 = time.perf_counter()
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, str(self.script), "--child", str(spec_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
            )
            status, usage = self._wait(proc, t0)
        wall = time.perf_counter() - t0
        peak = usage.ru_maxrss * KIB / MIB if usage is not None else float("nan")
        return self._outcome(name, status, peak, wall, result_path, log_path)

    def _wait(self, proc: subprocess.Popen[bytes], t0: float) -> tuple[int, Any]:
        """Reap ``proc`` with ``os.wait4`` (killing it after the timeout); return (exit code, rusage)."""
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode, usage
            if time.perf_counter() - t0 > self.timeout_s:
                LOG.warning("  timeout after %.0f s: killing pid %d", self.timeout_s, proc.pid)
                os.kill(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode, usage
            time.sleep(POLL_INTERVAL_S)

    def _outcome(
        self, name: str, status: int, peak: float, wall: float, result_path: Path, log_path: Path
    ) -> ChildOutcome:
        """Combine the child's result file (if any) with the parent's measurements."""
        limit_gb = self.mem_limit_bytes / GIB
        if result_path.exists():
            payload = json.loads(result_path.read_text())
            ok, error, oom = bool(payload.get("ok")), payload.get("error", ""), bool(payload.get("oom"))
        else:
            tail = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:].strip()
            timed_out = wall >= self.timeout_s
            reason = (
                f"timed out after {self.timeout_s:.0f} s"
                if timed_out
                else f"child exited with status {status}"
            )
            payload, ok, error = {}, False, f"{reason}: {tail[-300:]}"
            oom = not timed_out and (is_oom(tail) or status == -signal.SIGKILL)
        outcome = ChildOutcome(name, ok, peak, wall, payload, error, oom, limit_gb)
        if ok:
            LOG.info("  done in %.1f s, peak RSS %.0f MB", wall, peak)
        else:
            LOG.warning("  FAILED in %.1f s (peak RSS %.0f MB): %s", wall, peak, first_line(error, 200))
        return outcome


@dataclasses.dataclass
class BenchConfig:
    """Everything a run needs to know."""

    spec: ModelSpec
    samples: int
    eval_samples: int
    accuracy_samples: int
    invariance_samples: int
    calib_batch: int
    jobs: int
    mem_limit_gb: float
    out: Path
    skip_accuracy: bool
    skip_invariance: bool
    cnn: bool
    ort_streaming: bool
    ort_methods: tuple[str, ...]
    onnxq_methods: tuple[str, ...]


@dataclasses.dataclass
class Prepared:
    """Files the children share: model, tensor list, calibration/eval data and FP32 reference."""

    model: Path
    tensors: Path
    tensor_count: int
    calib: Path
    eval: Path
    reference: Path
    node_count: int
    samples: int
    ort_version: str
    #: models of the accuracy section: the transformer first, then the optional CNN
    accuracy: list[AccuracyModel] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class AccuracyModel:
    """One model of the accuracy section with its calibration set, held-out set and FP32 reference."""

    name: str
    model: Path
    calib: Path
    eval: Path
    reference: Path
    samples: int

    def spec(self) -> dict[str, Any]:
        """Spec fields of an accuracy child."""
        return {
            "model": str(self.model),
            "data": str(self.calib),
            "eval": str(self.eval),
            "reference": str(self.reference),
            "samples": self.samples,
        }


def subset_file(calib: Path, samples: int, workdir: Path) -> Path:
    """``calib`` itself, or a file next to it with its first ``samples`` samples (written once)."""
    if samples >= num_samples(load_feeds(calib)):
        return calib
    path = workdir / f"calib_{samples}.npz"
    if not path.exists():
        np.savez(path, **load_feeds(calib, samples))
    return path


def write_reference(model: Path, eval_path: Path, out: Path) -> Path:
    """Run the FP32 model (no graph optimisation) on the held-out set and save its first output."""
    np.savez(out, **{REFERENCE_KEY: run_model(model, load_feeds(eval_path), optimize=False)})
    return out


def prepare_cnn(workdir: Path, tools_dir: Path) -> AccuracyModel | None:
    """The ResNet-style CNN of ``tools/bench_models.py`` (another tool's builder), if that file is usable."""
    builder = tools_dir / CNN_BUILDER_FILE
    if not builder.exists():
        LOG.info("no %s: CNN accuracy skipped", CNN_BUILDER_FILE)
        return None
    try:
        spec = importlib.util.spec_from_file_location("bench_models", builder)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        built = module.make_resnet(workdir / "cnn")
    except Exception as exc:
        LOG.warning(
            "CNN builder of %s failed, CNN accuracy skipped: %s: %s",
            CNN_BUILDER_FILE,
            type(exc).__name__,
            exc,
        )
        return None
    reference = write_reference(built.model_path, built.eval_path, workdir / "cnn_reference.npz")
    samples = num_samples(load_feeds(built.calib_path))
    LOG.info("CNN: %s with %d calibration samples", built.model_path.name, samples)
    return AccuracyModel(
        "ResNet-style CNN", built.model_path, built.calib_path, built.eval_path, reference, samples
    )


def prepare(cfg: BenchConfig, workdir: Path, tools_dir: Path) -> Prepared:
    """Export the model, generate the data, compute the FP32 reference and ONNX Runtime's tensor list."""
    import onnx
    import onnxruntime as ort

    spec = cfg.spec
    model = workdir / "transformer.onnx"
    LOG.info(
        "building transformer: %d layers, hidden %d, %d heads, FFN %d, seq %d (opset %d)",
        *(spec.layers, spec.hidden, spec.heads, spec.ffn, spec.seq_len, OPSET),
    )
    export_transformer(spec, model)
    calib, held_out = workdir / "calib.npz", workdir / "eval.npz"
    np.savez(calib, **{INPUT_NAME: make_hidden_states(spec, cfg.samples, CALIB_STREAM)})
    np.savez(held_out, **{INPUT_NAME: make_hidden_states(spec, cfg.eval_samples, EVAL_STREAM)})
    LOG.info("data: %d calibration + %d held-out samples", cfg.samples, cfg.eval_samples)
    reference = write_reference(model, held_out, workdir / "reference.npz")
    names = ort_calibration_tensors(model)
    tensors = workdir / "tensors.json"
    tensors.write_text(json.dumps(names))
    nodes = len(onnx.load(str(model)).graph.node)
    LOG.info("model: %d nodes; ONNX Runtime calibrates %d tensors", nodes, len(names))
    prep = Prepared(
        model, tensors, len(names), calib, held_out, reference, nodes, cfg.samples, ort.__version__
    )
    acc_calib = subset_file(calib, cfg.accuracy_samples, workdir)
    prep.accuracy.append(
        AccuracyModel("transformer", model, acc_calib, held_out, reference, cfg.accuracy_samples)
    )
    if cfg.cnn and not cfg.skip_accuracy:
        cnn = prepare_cnn(workdir, tools_dir)
        if cnn is not None:
            prep.accuracy.append(cnn)
    return prep


def job_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Child job: :func:`prepare` (torch, onnx and the data stay out of the parent, see :class:`Runner`)."""
    cfg = config_from_json(spec["config"])
    status = onnxq_status()  # before torch is imported, so that the check sees onnxq as a user would
    prepared = to_jsonable(dataclasses.asdict(prepare(cfg, Path(spec["workdir"]), Path(spec["tools_dir"]))))
    return {"prepared": prepared, "onnxq": list(status)}


def to_jsonable(value: Any) -> Any:
    """Dataclass dicts with ``Path`` values -> JSON-ready values."""
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def prepared_from_json(data: dict[str, Any]) -> Prepared:
    """Inverse of ``to_jsonable(dataclasses.asdict(prepared))``."""
    paths = {"model", "tensors", "calib", "eval", "reference"}
    fields = {k: Path(v) if k in paths else v for k, v in data.items() if k != "accuracy"}
    accuracy = [
        AccuracyModel(**{k: Path(v) if k in paths else v for k, v in am.items()}) for am in data["accuracy"]
    ]
    return Prepared(**fields, accuracy=accuracy)


def config_to_json(cfg: BenchConfig) -> dict[str, Any]:
    """A :class:`BenchConfig` as JSON-ready values."""
    return to_jsonable(dataclasses.asdict(cfg))


def config_from_json(data: dict[str, Any]) -> BenchConfig:
    """Inverse of :func:`config_to_json`."""
    fields = dict(data)
    fields["spec"] = ModelSpec(**data["spec"])
    fields["out"] = Path(data["out"])
    fields["ort_methods"] = tuple(data["ort_methods"])
    fields["onnxq_methods"] = tuple(data["onnxq_methods"])
    return BenchConfig(**fields)


def fallback_counts(samples: int) -> list[int]:
    """Smaller sample counts to retry a single-pass ONNX Runtime calibration with after an OOM."""
    counts, n = [], samples // FALLBACK_DIVISOR
    while n >= MIN_FALLBACK_SAMPLES:
        counts.append(n)
        n //= 2
    return counts


ORT_SINGLE = "ONNX Runtime Entropy (one collect_data)"
ORT_STREAM = "ONNX Runtime Entropy (collect_data per batch)"
ONNXQ_ENTROPY = "onnxq entropy"
#: calibration-only variants: label -> (child job, job options)
CALIB_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    ORT_SINGLE: ("ort_calibrate", {"method": "Entropy"}),
    ORT_STREAM: ("ort_calibrate", {"method": "Entropy", "streaming": True}),
    ONNXQ_ENTROPY: ("onnxq_calibrate", {"method": "entropy"}),
}


class CalibRuns:
    """Calibration-only child runs, each done once per (variant, samples, batch) and shared by sections."""

    def __init__(self, runner: Runner, prep: Prepared) -> None:
        self.runner = runner
        self.prep = prep
        self.done: dict[tuple[str, int, int], tuple[ChildOutcome, Path]] = {}

    def data(self, samples: int) -> Path:
        """A calibration file with the first ``samples`` samples (written once)."""
        return subset_file(self.prep.calib, samples, self.runner.workdir)

    @staticmethod
    def key(variant: str, samples: int, batch: int) -> tuple[str, int, int]:
        """Cache key; per-batch collect_data over a single batch is the one-pass calibration."""
        if variant == ORT_STREAM and samples <= batch:
            variant = ORT_SINGLE
        return variant, samples, batch

    def run(self, variant: str, samples: int, batch: int) -> tuple[ChildOutcome, Path]:
        """Run (or reuse) one calibration; returns the outcome and the file its ranges were saved to."""
        self.run_all([(variant, samples, batch)])
        return self.done[self.key(variant, samples, batch)]

    def run_all(self, wanted: Sequence[tuple[str, int, int]], parallel: int = 1) -> None:
        """Run the calibrations of ``wanted`` not done yet, ``parallel`` at a time."""
        keys = list(dict.fromkeys(self.key(*w) for w in wanted if self.key(*w) not in self.done))
        jobs, paths = [], []
        for variant, samples, batch in keys:
            job, options = CALIB_VARIANTS[variant]
            tag = "_".join(variant.split()[:2]).lower().replace("onnx_runtime", "ort")
            tag += "_stream" if options.get("streaming") else ""
            name = f"calib_{tag}_{samples}_b{batch}"
            paths.append(self.runner.workdir / f"{name}.ranges.npz")
            spec = {
                "model": str(self.prep.model),
                "tensors": str(self.prep.tensors),
                "data": str(self.data(samples)),
                "samples": samples,
                "batch_size": batch,
                "ranges_out": str(paths[-1]),
                **options,
            }
            jobs.append((name, job, spec))
        for key, outcome, path in zip(keys, self.runner.run_many(jobs, parallel), paths):
            self.done[key] = (outcome, path)


def bench_memory(cfg: BenchConfig, runs: CalibRuns, onnxq_ok: bool) -> list[dict[str, Any]]:
    """Section 1: entropy calibration memory/time, onnxq vs ONNX Runtime (one pass and streaming).

    ONNX Runtime's one-pass calibrator keeps every calibrated tensor of every sample in memory; when it
    runs out of memory at ``--samples`` it is retried with fewer samples and onnxq is measured at that
    count too, so that one ratio compares equal work.
    """
    rows: list[dict[str, Any]] = []
    b, n_full = cfg.calib_batch, cfg.samples
    single: ChildOutcome | None = None
    for n in [n_full, *fallback_counts(n_full)]:
        outcome, _ = runs.run(ORT_SINGLE, n, min(b, n))
        rows.append(mem_row(ORT_SINGLE, n, min(b, n), outcome))
        if outcome.ok:
            single = outcome
            break
    stream: ChildOutcome | None = None
    if cfg.ort_streaming:
        stream, _ = runs.run(ORT_STREAM, n_full, b)
        rows.append(mem_row(ORT_STREAM, n_full, b, stream))
    if not onnxq_ok:
        return rows
    full, _ = runs.run(ONNXQ_ENTROPY, n_full, b)
    row = mem_row(ONNXQ_ENTROPY, n_full, b, full)
    row["ratios"] = [r for r in (ratio(row, stream, ORT_STREAM), ratio(row, single, ORT_SINGLE)) if r]
    rows.append(row)
    if single is not None and single.get("samples") != n_full:
        n = single.get("samples")
        small, _ = runs.run(ONNXQ_ENTROPY, n, min(b, n))
        row = mem_row(ONNXQ_ENTROPY, n, min(b, n), small)
        row["ratios"] = [r for r in (ratio(row, single, ORT_SINGLE),) if r]
        rows.append(row)
    return rows


def mem_row(tool: str, samples: int, batch: int, outcome: ChildOutcome) -> dict[str, Any]:
    """One row of the memory/time table."""
    if outcome.ok:
        status = "ok"
    elif outcome.oom:
        status = (
            f"**out of memory** after {outcome.wall_s:.0f} s ({outcome.mem_limit_gb:g} GB address-space cap): "
            f"{oom_reason(outcome.error)}"
        )
    else:
        status = f"failed: {first_line(outcome.error, 90)}"
    return {
        "tool": tool,
        "samples": samples,
        "batch": batch,
        "tensors": outcome.get("tensors"),
        "peak_rss_mb": outcome.peak_rss_mb,
        "baseline_rss_mb": outcome.get("baseline_rss_mb"),
        "calib_s": outcome.get("calib_s"),
        "cpu_s": outcome.get("cpu_s"),
        "status": status,
        "ok": outcome.ok,
    }


def oom_reason(error: str) -> str:
    """The informative part of an allocation failure message."""
    for pattern in (r"Failed to allocate memory for requested buffer of size \d+", r"MemoryError[^\n]{0,60}"):
        found = re.search(pattern, error)
        if found:
            return found.group(0)
    return first_line(error, 70)


def ratio(row: dict[str, Any], ort: ChildOutcome | None, label: str) -> dict[str, Any] | None:
    """onnxq/ONNX Runtime peak-RSS and time ratios for one onnxq row, when both ran with the same samples."""
    if ort is None or not ort.ok or not row["ok"] or ort.get("samples") != row["samples"]:
        return None
    return {
        "vs": label,
        "samples": row["samples"],
        "rss": row["peak_rss_mb"] / ort.peak_rss_mb,
        "time": row["calib_s"] / ort.get("calib_s"),
        "cpu": row["cpu_s"] / ort.get("cpu_s"),
    }


def bench_accuracy(cfg: BenchConfig, prep: Prepared, runner: Runner, onnxq_ok: bool) -> list[dict[str, Any]]:
    """Section 2: held-out output SNR of every onnxq and ONNX Runtime calibration method, per model.

    ONNX Runtime calibrates with ``CalibStridedMinMax`` (one ``collect_data`` per calibration batch; despite
    its name it applies to every method), so its memory stays bounded when ``--accuracy-samples`` is raised.
    """
    b = cfg.calib_batch
    jobs: list[tuple[str, str, dict[str, Any]]] = []
    labels: list[tuple[AccuracyModel, str, str, str]] = []
    for am in prep.accuracy:
        tag = am.name.split()[0].split("-")[0].lower()
        for method in cfg.onnxq_methods if onnxq_ok else ():
            jobs.append(
                (
                    f"acc_{tag}_onnxq_{method}",
                    "onnxq_quantize",
                    {**am.spec(), "method": method, "batch_size": b},
                )
            )
            labels.append((am, "onnxq (target tensorrt)", method_label(method), ""))
        for method in cfg.ort_methods:
            spec = {**am.spec(), "method": method, "batch_size": b, "stride": b}
            jobs.append((f"acc_{tag}_ort_{method}", "ort_quantize", spec))
            labels.append((am, "ONNX Runtime QDQ", method_label(method), f"CalibStridedMinMax={b}"))
    outcomes = runner.run_many(jobs, cfg.jobs)
    return [
        acc_row(am, tool, method, outcome, note)
        for (am, tool, method, note), outcome in zip(labels, outcomes)
    ]


def method_label(method: str) -> str:
    """Method name for the table (percentile methods with their percentile)."""
    return f"{method} {PERCENTILE}" if method.lower() == "percentile" else method


def acc_row(am: AccuracyModel, tool: str, method: str, outcome: ChildOutcome, note: str) -> dict[str, Any]:
    """One row of the accuracy table."""
    return {
        "model": am.name,
        "tool": tool,
        "method": method,
        "samples": am.samples,
        "snr_db": outcome.get("snr_db") if outcome.ok else None,
        "q_nodes": outcome.get("q_nodes"),
        "time_s": outcome.get("calib_s"),
        "peak_rss_mb": outcome.peak_rss_mb,
        "status": "ok" if outcome.ok else ("OOM" if outcome.oom else "failed: " + first_line(outcome.error)),
        "note": note,
    }


def first_line(text: str, limit: int = 120) -> str:
    """First line of a message, shortened, with table pipes escaped."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit].replace("|", "\\|")


def max_rel_diff(
    a: dict[str, tuple[np.ndarray, np.ndarray]], b: dict[str, tuple[np.ndarray, np.ndarray]]
) -> float:
    """Largest ``|a - b| / max(|a|, |b|)`` over the low and high ends of every common tensor's range."""
    worst = 0.0
    for name in a.keys() & b.keys():
        for x, y in zip(a[name], b[name]):
            x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
            denom = np.maximum(np.maximum(np.abs(x64), np.abs(y64)), np.finfo(np.float64).tiny)
            worst = max(worst, float(np.max(np.abs(x64 - y64) / denom)))
    return worst


def bit_identical(
    a: dict[str, tuple[np.ndarray, np.ndarray]], b: dict[str, tuple[np.ndarray, np.ndarray]]
) -> bool:
    """Same tensors and byte-for-byte equal ranges."""
    if a.keys() != b.keys():
        return False
    return all(
        np.asarray(x).tobytes() == np.asarray(y).tobytes() for name in a for x, y in zip(a[name], b[name])
    )


def bench_invariance(cfg: BenchConfig, runs: CalibRuns, onnxq_ok: bool) -> list[dict[str, Any]]:
    """Section 3: ranges at calibration batch 1 vs the default batch, on the first ``invariance_samples``."""
    n = cfg.invariance_samples
    big = min(cfg.calib_batch, n)
    variants = [ORT_STREAM, ORT_SINGLE, *([ONNXQ_ENTROPY] if onnxq_ok else [])]
    runs.run_all([(v, n, batch) for v in variants for batch in (1, big)], cfg.jobs)
    rows = []
    for variant in variants:
        (small_out, small_path), (big_out, big_path) = runs.run(variant, n, 1), runs.run(variant, n, big)
        row: dict[str, Any] = {"tool": variant, "samples": n, "batches": f"1 vs {big}"}
        if small_out.ok and big_out.ok:
            r1, r2 = load_ranges(small_path), load_ranges(big_path)
            row.update(
                identical=bit_identical(r1, r2), max_rel=max_rel_diff(r1, r2), tensors=len(r1), status="ok"
            )
        else:
            failed = small_out if not small_out.ok else big_out
            row.update(identical=None, max_rel=None, tensors=None, status=first_line(failed.error, 100))
        rows.append(row)
    check = runs.runner.run(
        "fp32_batches",
        "fp32_batches",
        model=str(runs.prep.model),
        data=str(runs.data(n)),
        samples=n,
        batch_size=big,
    )
    rows.append(
        {
            "tool": "(reference) FP32 model output in ONNX Runtime",
            "samples": n,
            "batches": f"1 vs {big}",
            "tensors": 1,
            "identical": check.get("identical"),
            "max_rel": check.get("max_rel"),
            "status": "ok" if check.ok else first_line(check.error, 100),
        }
    )
    return rows


# ======================================================================================================
# Report
# ======================================================================================================


NOTES = (
    "- `HistogramCalibrater.collect_data` keeps every calibrated output of every sample of the call in "
    "memory and only then builds the histograms; `quantize_static` makes one call over the whole reader "
    "unless `CalibStridedMinMax` is set (which, despite its name, strides every method).",
    "- ONNX Runtime's Entropy defaults are `num_bins=128`, `num_quantized_bins=128` (`quantize_static` does "
    "not forward `num_bins`). A one-call histogram has exactly 128 bins, so the KL search has a single "
    "candidate and returns the observed max: one-pass Entropy equals symmetric MinMax. Later calls widen the "
    "histogram when they see larger values, which is why per-batch calls depend on batch size and order.",
    "- Section 2 compares whole recipes: ONNX Runtime's QDQ quantizer and onnxq's TensorRT placement put Q/DQ "
    "on different tensors (column Q nodes), so an SNR gap is not due to calibration alone.",
)


def fmt(value: Any, digits: int = 1) -> str:
    """Format a number for the table (``-`` when missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_rel(value: float | None) -> str:
    """Format a relative difference with three significant digits."""
    return "-" if value is None else f"{value:.3g}"


def verdict(value: float | None, target: float) -> str:
    """``PASS``/``FAIL`` against an upper-bound target."""
    if value is None:
        return "n/a"
    return "PASS" if value <= target else "FAIL"


def render(
    cfg: BenchConfig,
    prep: Prepared,
    status: str,
    mem: list[dict[str, Any]],
    acc: list[dict[str, Any]],
    inv: list[dict[str, Any]],
    total_s: float,
    load: tuple[float, float],
    parent_rss: float,
) -> str:
    """The Markdown report."""
    spec = cfg.spec
    lines = [
        "# Calibration benchmark: onnxq vs ONNX Runtime",
        "",
        f"- Model: transformer encoder, {spec.layers} layers, hidden {spec.hidden}, {spec.heads} heads, "
        f"FFN {spec.ffn}, seq {spec.seq_len}, post-LN, GELU (Erf), opset {OPSET}, {prep.node_count} nodes; "
        f"input float32 `[batch, {spec.seq_len}, {spec.hidden}]` hidden states with {len(OUTLIER_CHANNELS)} "
        f"outlier channels (x{OUTLIER_INPUT_GAIN:g} input, x{OUTLIER_LN_GAIN:g} LayerNorm weight)",
        f"- Data: {cfg.samples} calibration samples, {cfg.eval_samples} held-out samples (seed {DATA_SEED}, "
        f"streams {CALIB_STREAM}/{EVAL_STREAM}); calibration batch {cfg.calib_batch}; the accuracy section "
        f"calibrates both tools on the first {cfg.accuracy_samples} samples, the invariance section on the "
        f"first {cfg.invariance_samples}",
        f"- ONNX Runtime {prep.ort_version} calibrates {prep.tensor_count} tensors with "
        "`op_types_to_calibrate=None`; onnxq's low-level calibration is given the same tensor names",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; each "
        "measurement in its own child process; peak RSS = that child's `ru_maxrss` (os.wait4); address space "
        f"capped at {cfg.mem_limit_gb:g} GB per child; the parent's RSS at a spawn (a floor under every peak, "
        f"see `Runner`) was at most {parent_rss:.0f} MB; load average at start/end {load[0]:.1f}/{load[1]:.1f}",
        f"- onnxq: {status}",
        f"- Total benchmark time: {total_s:.0f} s",
        "",
        "## 1. Entropy calibration: peak memory and time",
        "",
        "Wall and CPU time (all threads, `time.process_time`) span the calibration call inside the child: "
        "model loading, session creation, inference and range computation, not interpreter start-up. CPU "
        "time is the better guide when other processes share the cores (see the load average above).",
        "",
        "| calibrator | samples | batch | tensors | peak RSS (MB) | RSS before calibration (MB) "
        "| wall time (s) | CPU time (s) | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in mem:
        lines.append(
            f"| {r['tool']} | {r['samples']} | {r['batch']} | {fmt(r['tensors'])} "
            f"| {fmt(r['peak_rss_mb'], 0)} "
            f"| {fmt(r['baseline_rss_mb'], 0)} | {fmt(r['calib_s'])} | {fmt(r['cpu_s'])} | {r['status']} |"
        )
    lines += [
        "",
        *ratio_lines(mem),
        "",
        "## 2. Accuracy: output SNR vs FP32 on held-out data (INT8 symmetric)",
        "",
    ]
    if cfg.jobs > 1:
        lines += [f"Children of this section ran {cfg.jobs} at a time: their times are not comparable.", ""]
    lines += [
        "| model | tool | method | calib samples | Q nodes | SNR (dB) | quantize time (s) | peak RSS (MB) "
        "| status | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in acc:
        lines.append(
            f"| {r['model']} | {r['tool']} | {r['method']} | {r['samples']} | {fmt(r['q_nodes'])} "
            f"| {fmt(r['snr_db'], 2)} | {fmt(r['time_s'])} | {fmt(r['peak_rss_mb'], 0)} | {r['status']} "
            f"| {r['note']} |"
        )
    lines += ["", f"## 3. Batch-size invariance (calibration batch 1 vs {cfg.calib_batch})", ""]
    lines += [
        "| calibrator | samples | batches | tensors | bit-identical | max relative range difference "
        "| status |",
        "|---|---:|---|---:|---|---:|---|",
    ]
    for r in inv:
        lines.append(
            f"| {r['tool']} | {r['samples']} | {r['batches']} | {fmt(r['tensors'])} | {fmt(r['identical'])} "
            f"| {fmt_rel(r['max_rel'])} | {r['status']} |"
        )
    lines += ["", "## Notes (from ONNX Runtime's quantization source, not measured)", "", *NOTES]
    return "\n".join(lines) + "\n"


def ratio_lines(mem: list[dict[str, Any]]) -> list[str]:
    """Bullet lines with the onnxq/ONNX Runtime ratios and their verdicts against the targets."""
    out: list[str] = []
    for row in mem:
        for r in row.get("ratios", []):
            out.append(
                f"- onnxq / {r['vs']} at {r['samples']} samples: peak RSS ratio **{r['rss']:.3f}** "
                f"(target <= {RSS_RATIO_TARGET}: {verdict(r['rss'], RSS_RATIO_TARGET)}), time ratio "
                f"**{r['time']:.2f}** (target <= {TIME_RATIO_TARGET}: "
                f"{verdict(r['time'], TIME_RATIO_TARGET)}; CPU-time ratio {r['cpu']:.2f})"
            )
    for row in mem:
        if row["tool"] == ORT_SINGLE and not row["ok"]:
            onnxq = [
                r for r in mem if r["tool"] == ONNXQ_ENTROPY and r["samples"] == row["samples"] and r["ok"]
            ]
            done = f"; onnxq entropy peaked at {onnxq[0]['peak_rss_mb']:.0f} MB there" if onnxq else ""
            out.append(
                f"- at {row['samples']} samples ONNX Runtime's one-pass Entropy did not run: {row['status']}{done}"
            )
    if not out:
        out.append("- no onnxq/ONNX Runtime ratio: one side did not run")
    return out


# ======================================================================================================
# CLI
# ======================================================================================================


JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "ort_calibrate": job_ort_calibrate,
    "onnxq_calibrate": job_onnxq_calibrate,
    "ort_quantize": job_ort_quantize,
    "onnxq_quantize": job_onnxq_quantize,
    "prepare": job_prepare,
    "fp32_batches": job_fp32_batches,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", type=Path, default=Path("bench_calib_out"), help="output directory for bench_calib.md"
    )
    p.add_argument(
        "--samples", type=int, default=None, help=f"calibration samples (default {DEFAULT_SAMPLES})"
    )
    p.add_argument(
        "--eval-samples", type=int, default=None, help=f"held-out samples (default {DEFAULT_EVAL_SAMPLES})"
    )
    p.add_argument(
        "--accuracy-samples",
        type=int,
        default=None,
        help=f"calibration samples of the accuracy section, both tools (default {DEFAULT_ACCURACY_SAMPLES})",
    )
    p.add_argument(
        "--invariance-samples",
        type=int,
        default=None,
        help=f"calibration samples of the batch-invariance section (default {DEFAULT_INVARIANCE_SAMPLES})",
    )
    p.add_argument("--layers", type=int, default=None, help=f"encoder layers (default {FULL_LAYERS})")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 layers, 16 samples, batch 8, no CNN, about a minute",
    )
    p.add_argument(
        "--calib-batch",
        type=int,
        default=None,
        help=f"calibration batch size (default {DEFAULT_CALIB_BATCH})",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="children of sections 2 and 3 run at once (default 1; --quick: 2); >1 skews section 2 times",
    )
    p.add_argument(
        "--mem-limit-gb", type=float, default=DEFAULT_MEM_LIMIT_GB, help="address-space cap per child"
    )
    p.add_argument(
        "--timeout", type=float, default=DEFAULT_CHILD_TIMEOUT_S, help="seconds before a child is killed"
    )
    p.add_argument("--skip-accuracy", action="store_true", help="skip the SNR section")
    p.add_argument("--skip-invariance", action="store_true", help="skip the batch-invariance section")
    p.add_argument(
        "--ort-streaming",
        action="store_true",
        help="section 1 also measures ONNX Runtime with one collect_data per batch at --samples "
        "(about 7 extra minutes at 256 samples on 2 cores; on in --quick)",
    )
    p.add_argument("--no-cnn", action="store_true", help=f"skip the CNN of tools/{CNN_BUILDER_FILE}")
    p.add_argument("--keep-work", action="store_true", help="keep models, data and child logs in OUT/work")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Resolve defaults (``--quick`` shrinks the model and the data)."""
    layers = args.layers or (QUICK_LAYERS if args.quick else FULL_LAYERS)
    samples = args.samples or (QUICK_SAMPLES if args.quick else DEFAULT_SAMPLES)
    eval_samples = args.eval_samples or (QUICK_EVAL_SAMPLES if args.quick else DEFAULT_EVAL_SAMPLES)
    return BenchConfig(
        spec=ModelSpec(layers=layers),
        samples=samples,
        eval_samples=eval_samples,
        accuracy_samples=min(args.accuracy_samples or DEFAULT_ACCURACY_SAMPLES, samples),
        invariance_samples=min(args.invariance_samples or DEFAULT_INVARIANCE_SAMPLES, samples),
        calib_batch=min(
            args.calib_batch or (QUICK_CALIB_BATCH if args.quick else DEFAULT_CALIB_BATCH), samples
        ),
        jobs=args.jobs or (QUICK_JOBS if args.quick else 1),
        mem_limit_gb=args.mem_limit_gb,
        out=args.out,
        skip_accuracy=args.skip_accuracy,
        skip_invariance=args.skip_invariance,
        cnn=not (args.no_cnn or args.quick),
        ort_streaming=args.ort_streaming or args.quick,
        ort_methods=ORT_METHODS,
        onnxq_methods=ONNXQ_METHODS,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write ``OUT/bench_calib.md``."""
    args = parse_args(argv)
    if args.child is not None:
        return child_main(args.child)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = config_from_args(args)
    cfg.out.mkdir(parents=True, exist_ok=True)
    workdir = (cfg.out / "work").resolve()
    workdir.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    runner = Runner(workdir, cfg.mem_limit_gb, args.timeout)
    tools_dir = Path(__file__).resolve().parent
    prepared = runner.run("prepare", "prepare", config=config_to_json(cfg), tools_dir=str(tools_dir))
    if not prepared.ok:
        LOG.error("preparing the model and data failed: %s", prepared.error)
        return 1
    prep = prepared_from_json(prepared.get("prepared"))
    calib_ok, quant_ok, status = prepared.get("onnxq")
    LOG.info("onnxq: %s", status)
    LOG.info("== 1. entropy calibration memory/time")
    runs = CalibRuns(runner, prep)
    mem = bench_memory(cfg, runs, calib_ok)
    acc: list[dict[str, Any]] = []
    if not cfg.skip_accuracy:
        LOG.info("== 2. accuracy")
        acc = bench_accuracy(cfg, prep, runner, quant_ok)
    inv: list[dict[str, Any]] = []
    if not cfg.skip_invariance:
        LOG.info("== 3. batch-size invariance")
        inv = bench_invariance(cfg, runs, calib_ok)
    load = (load_start, os.getloadavg()[0])
    report = render(
        cfg, prep, status, mem, acc, inv, time.perf_counter() - t0, load, runner.max_parent_rss_mb
    )
    (cfg.out / "bench_calib.md").write_text(report)
    raw = {"config": config_to_json(cfg), "memory": mem, "accuracy": acc, "invariance": inv, "onnxq": status}
    (cfg.out / "bench_calib.json").write_text(json.dumps(raw, indent=1, default=str))
    print(report)
    LOG.info("wrote %s", cfg.out / "bench_calib.md")
    if not args.keep_work:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
