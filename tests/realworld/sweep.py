#!/usr/bin/env python3
"""Quantize every cached real model in every mode and target onnxq supports, check each output.

Usage:
    python tests/realworld/sweep.py [--models a,b] [--modes int8,fp8] [--targets tensorrt,ort]
                                    [--models-dir DIR] [--timeout S] [--out FILE]

Per model (fetched by ``fetch.py``), per mode x target (every pair of ``onnxq.choices.MODES`` x
``onnxq.placement.rules.TARGETS`` except ``unsupported_pairs()``):
  1. calibration data: a directory of ``.npz`` files, one feed each, shaped like the manifest's
     ``example_shape`` and filled as its preprocessing describes (see ``input_kind``);
  2. ``onnxq quantize`` in a subprocess with a time limit, on a private copy of the model;
  3. checks: exit code; no ``Traceback`` on stderr; on exit 0 the output passes ``onnx.checker`` (full
     check), loads and runs in ONNX Runtime CPU (see ``session``), its
     outputs are finite where the FP32 model's are, and the SNR of each output against the FP32 model
     on held-out feeds (another seed) is reported; on a non-zero exit the last stderr line must be one
     ``onnxq: error:`` line and nothing may be at the output path; either way nothing but the output
     (and its data file) may be left in its folder, and the input folder must be byte-identical.
Prints one Markdown table (model | mode | target | status | SNR dB | time s | DQ nodes, where 0 means
the output holds no quantization) and exits 1 when any row is FAIL. A clear refusal ("clear error")
passes. SNR on synthetic inputs tests the machinery, not accuracy: no SNR threshold fails a row.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fetch import default_models_dir, load_manifest  # this folder: run as a script or by pytest

#: (mode, target) pairs onnxq accepts but that are not a deployment: ONNX Runtime CPU has no FP8 kernels
NOT_A_DEPLOYMENT = frozenset({("fp8", "ort")})
CALIB_FEEDS = 4
HELDOUT_FEEDS = 2
DEFAULT_TIMEOUT_S = 180.0
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
STATE_NAMES = frozenset({"state", "h", "c", "h0", "c0", "hidden"})




def cached_models(models_dir: Path, entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries whose ``<name>.onnx`` is in ``models_dir`` (sha256 is checked by ``fetch.py``)."""
    return [e for e in entries if (models_dir / f"{e['name']}.onnx").is_file()]


def combinations(modes: Sequence[str] | None = None, targets: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """Every (mode, target) onnxq supports today, read from the package so new modes join the sweep."""
    from onnxq.choices import MODES
    from onnxq.placement.rules import TARGETS

    unsupported = unsupported_pairs()
    return [(m, t) for t in (targets or TARGETS) for m in (modes or MODES) if (m, t) not in unsupported]


def unsupported_pairs() -> frozenset[tuple[str, str]]:
    """Pairs left out: not a deployment, or refused by onnxq itself (TensorRT-only block formats on ORT)."""
    from onnxq.modes import MODE_SPECS
    from onnxq.placement.rules import TARGETS

    refused = {(m, t) for m, spec in MODE_SPECS.items() for t in TARGETS if t not in spec.targets}
    return NOT_A_DEPLOYMENT | frozenset(refused)


# ---------------------------------------------------------------------------------------------- feeds


def input_kind(spec: dict[str, Any], preprocessing: str) -> str:
    """How to fill one input, from its name, dtype, shape and the package's preprocessing text.

    Cases: ``sample_rate`` (rank-0 ``sr``), ``ids`` (integer inputs), ``state`` (recurrent state names),
    ``bits`` ("0/1" after the name), ``normal`` ("standard normal" after the name), ``image`` (rank >= 4
    and "image"/"grayscale"), ``audio`` (rank <= 2 and "PCM", "waveform", "audio" or "kHz"),
    ``spectrogram`` (mel/STFT features, "frames"), else ``noise``.
    """
    name, dtype, shape = spec["name"], np.dtype(spec["dtype"]), spec["example_shape"]
    text = preprocessing.lower()
    if name == "sr" or (dtype.kind in "iu" and not shape):
        return "sample_rate"
    if dtype.kind in "iub":
        return "ids"
    if name in STATE_NAMES:
        return "state"
    if name in text and "0/1" in text.split(name, 1)[1][:40]:
        return "bits"
    if name in text and "standard normal" in text.split(name, 1)[1][:40]:
        return "normal"
    if len(shape) >= 4 and any(word in text for word in ("image", "grayscale")):
        return "image"
    if len(shape) <= 2 and any(word in text for word in ("pcm", "waveform", "audio", "khz")):
        return "audio"
    if any(word in text for word in ("mel", "stft", "spectrogram", "frames")):
        return "spectrogram"
    return "noise"


def id_range(preprocessing: str) -> tuple[int, int]:
    """Inclusive id range: "Values A..B" in the preprocessing text, else bytes 0..255."""
    found = re.search(r"values (\d+)\s*\.\.\s*(\d+)", preprocessing.lower())
    return (int(found.group(1)), int(found.group(2))) if found else (0, 255)


def audio(rng: np.random.Generator, size: int, rate: float = 16000.0) -> np.ndarray:
    """A sine sweep (random start/end frequency and level) plus noise, clipped to [-1, 1]."""
    seconds = np.arange(size) / rate
    low, high = rng.uniform(50, 500), rng.uniform(1000, 7000)
    duration = max(size / rate, 1e-3)
    phase = 2 * np.pi * (low * seconds + (high - low) * seconds**2 / (2 * duration))
    wave = rng.uniform(0.2, 0.8) * np.sin(phase) + 0.05 * rng.standard_normal(size)
    return np.clip(wave, -1.0, 1.0)


def smooth_pattern(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth image in [0, 1]: a few random 2-D sinusoids plus a gradient."""
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    image = rng.uniform(-1, 1) * x + rng.uniform(-1, 1) * y
    for _ in range(4):
        fy, fx = rng.uniform(0.5, 8, size=2)
        image = image + rng.uniform(0.2, 1) * np.sin(2 * np.pi * (fy * y + fx * x) + rng.uniform(0, 2 * np.pi))
    return (image - image.min()) / max(float(np.ptp(image)), 1e-6)


def image(rng: np.random.Generator, shape: Sequence[int], preprocessing: str) -> np.ndarray:
    """Patterns over the last two axes, scaled like the package: ImageNet mean/std, x/127.5-1, x/255, 0..255."""
    height, width = shape[-2], shape[-1]
    lead = int(np.prod(shape[:-2]))
    pixels = np.stack([smooth_pattern(rng, height, width) for _ in range(lead)]).reshape(shape) * 255.0
    text = preprocessing.lower()
    if "mean" in text and "std" in text and len(shape) == 4 and shape[1] == 3:
        return (pixels / 255.0 - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    if "127.5" in text:
        return pixels / 127.5 - 1.0
    if "/255" in text.replace(" ", ""):
        return pixels / 255.0
    return pixels


def fill(kind: str, spec: dict[str, Any], preprocessing: str, rng: np.random.Generator, index: int) -> np.ndarray:
    """One input's value for feed number ``index`` (the first state feed is zeros, later ones small noise)."""
    dtype, shape = np.dtype(spec["dtype"]), tuple(spec["example_shape"])
    size = int(np.prod(shape)) if shape else 1
    if kind == "sample_rate":
        value: np.ndarray = np.full(shape, 16000)
    elif kind == "ids":
        low, high = id_range(preprocessing)
        value = rng.integers(low, high + 1, size=shape)
    elif kind == "state":
        value = np.zeros(shape) if index == 0 else 0.1 * rng.standard_normal(shape)
    elif kind == "bits":
        value = rng.integers(0, 2, size=shape)
    elif kind == "normal":
        value = rng.standard_normal(shape)
    elif kind == "audio":
        value = audio(rng, size).reshape(shape)
    elif kind == "image":
        value = image(rng, shape, preprocessing)
    elif kind == "spectrogram":
        value = 2.0 * image(rng, shape, "x/255") - 1.0 + 0.05 * rng.standard_normal(shape)
    else:
        value = 0.5 * rng.standard_normal(shape)
    return np.asarray(value).astype(dtype)


def make_feeds(entry: dict[str, Any], count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``count`` feeds for the model, each input shaped as the manifest's ``example_shape``."""
    rng = np.random.default_rng(seed)
    text = entry.get("preprocessing", "")
    kinds = {spec["name"]: input_kind(spec, text) for spec in entry["inputs"]}
    return [
        {spec["name"]: fill(kinds[spec["name"]], spec, text, rng, i) for spec in entry["inputs"]}
        for i in range(count)
    ]


def write_feeds(feeds: Sequence[dict[str, np.ndarray]], folder: Path) -> Path:
    """A directory of ``.npz`` files, one feed each."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i:03d}.npz", **feed)  # type: ignore[arg-type]
    return folder


# ---------------------------------------------------------------------------------------------- checks


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> digest)."""
    digests = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digests[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def session(path: Path, as_written: bool) -> Any:
    """An ONNX Runtime CPU session; ``as_written`` runs Q/DQ as written (no graph optimization, no fusions).

    The TensorRT target's outputs are measured as written (ORT's CPU integer kernels are not what TensorRT
    runs, its extended fusions miscompute FP8 Q/DQ -> Conv, and even its BASIC ones miscompute a float16
    DequantizeLinear -> Conv of the FP16 rest): no graph optimization; the ORT target's with ORT's
    fusions, as deployed.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if as_written:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # INT4 DequantizeLinear -> MatMul exactly as written (ORT otherwise computes it with int8 activations)
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(emulated_if_needed(path)), options, providers=["CPUExecutionProvider"])


def emulated_if_needed(path: Path) -> Path:
    """NVFP4/MXFP8 outputs have no ONNX Runtime CPU kernels: ``onnxq emulate`` writes a copy in standard
    ops into an ``emulated`` folder beside the output's folder, which is what runs."""
    from onnxq.emulate import emulate_file, needs_emulation
    from onnxq.model_io import load_model

    if not needs_emulation(load_model(path)):
        return path
    folder = path.parent.parent / "emulated"
    folder.mkdir(exist_ok=True)
    emulated = folder / path.name
    emulate_file(path, emulated)
    return emulated


def run_feeds(sess: Any, feeds: Sequence[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    names = [o.name for o in sess.get_outputs()]
    return [[np.asarray(v) for v in sess.run(names, feed)] for feed in feeds]


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10 log10(signal / noise) in float64; +inf for an exact match, nan for an all-zero reference."""
    ref, got = reference.astype(np.float64).ravel(), test.astype(np.float64).ravel()
    noise = float(np.sum((ref - got) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else math.nan


def output_snrs(reference: list[list[np.ndarray]], quantized: list[list[np.ndarray]]) -> list[float]:
    """Per output: SNR over all held-out feeds. Raises ValueError for a shape or finiteness mismatch."""
    snrs = []
    for k in range(len(reference[0])):
        ref = [run[k] for run in reference]
        got = [run[k] for run in quantized]
        if [r.shape for r in ref] != [g.shape for g in got]:
            raise ValueError(f"output {k} shape {got[0].shape} != FP32 {ref[0].shape}")
        ref_all = np.concatenate([r.ravel() for r in ref]).astype(np.float64)
        got_all = np.concatenate([g.ravel() for g in got]).astype(np.float64)
        if np.any(np.isfinite(ref_all) & ~np.isfinite(got_all)):
            raise ValueError(f"output {k} holds NaN/inf where the FP32 model's is finite")
        finite = np.isfinite(ref_all)
        snrs.append(snr_db(ref_all[finite], got_all[finite]))
    return snrs


#: nodes that hold quantized weights or activations (MatMulNBits replaces an INT4 DequantizeLinear + MatMul)
QUANTIZED_OPS = frozenset({"DequantizeLinear", "MatMulNBits", "TRT_MXFP8DequantizeLinear"})


def count_dq(path: Path) -> int:
    """Dequantizing nodes (``QUANTIZED_OPS``) in the model and all its subgraphs (0: nothing was quantized)."""
    import onnx

    def walk(graph: onnx.GraphProto) -> int:
        total = 0
        for node in graph.node:
            total += node.op_type in QUANTIZED_OPS
            for attribute in node.attribute:
                total += sum(walk(g) for g in [*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs])
        return total

    model = onnx.load(str(path), load_external_data=False)
    return walk(model.graph) + sum(walk(onnx.helper.make_graph(f.node, f.name, [], [])) for f in model.functions)


def check_output(model: Path, output: Path, as_written: bool, heldout: Sequence[dict[str, np.ndarray]]) -> tuple[str, float]:
    """("ok", min SNR) or ("FAIL: why", nan) for a model onnxq wrote."""
    import onnx

    try:
        onnx.checker.check_model(str(output), full_check=True)
    except Exception as error:
        return f"FAIL: checker: {one_line(str(error))}", math.nan
    try:
        quantized = run_feeds(session(output, as_written), heldout)
    except Exception as error:
        return f"FAIL: ORT: {one_line(str(error))}", math.nan
    reference = run_feeds(session(model, False), heldout)
    try:
        snrs = output_snrs(reference, quantized)
    except ValueError as error:
        return f"FAIL: {error}", math.nan
    known = [s for s in snrs if not math.isnan(s)]
    return "ok", min(known) if known else math.nan


def one_line(text: str, width: int = 150) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def judge_failure(returncode: int, stderr: str, output: Path) -> str:
    """A non-zero exit: "clear error: <message>" or "FAIL: <why>"."""
    lines = [line for line in stderr.split("\n") if line.strip()]  # splitlines() also splits on \x1c-\x1e
    last = lines[-1] if lines else ""
    if output.exists():
        return f"FAIL: exit {returncode} left a file at the output path"
    if last.startswith("onnxq: internal error:"):  # the CLI's catch-all: an exception onnxq did not expect
        return f"FAIL: {one_line(last[len('onnxq: '):])}"
    if last.startswith("onnxq: error:") and "report it" in last:  # onnxq's check of its own output failed
        return f"FAIL: onnxq refused its own output: {one_line(last[len('onnxq: error:'):].strip())}"
    if not last.startswith("onnxq: error:"):
        return f"FAIL: exit {returncode} without an 'onnxq: error:' line: {one_line(last)}"
    return f"clear error: {one_line(last[len('onnxq: error:'):].strip())}"


# ---------------------------------------------------------------------------------------------- sweep


@dataclass
class Row:
    model: str
    mode: str
    target: str
    status: str
    snr_db: float
    seconds: float
    dq_nodes: int | None = None

    @property
    def failed(self) -> bool:
        return self.status.startswith("FAIL")

    def markdown(self) -> str:
        snr = "-" if math.isnan(self.snr_db) else ("inf" if math.isinf(self.snr_db) else f"{self.snr_db:.1f}")
        status = self.status.replace("|", "\\|")
        dq = "-" if self.dq_nodes is None else str(self.dq_nodes)
        return f"| {self.model} | {self.mode} | {self.target} | {status} | {snr} | {self.seconds:.1f} | {dq} |"


def onnxq_command() -> list[str]:
    """The ``onnxq`` script beside this interpreter, else ``python -m onnxq``."""
    script = Path(sys.executable).with_name("onnxq")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "onnxq"]


def quantize_one(entry: dict[str, Any], model_src: Path, mode: str, target: str, work: Path, timeout: float) -> Row:
    """Quantize a private copy of the model once and judge the result."""
    name = entry["name"]
    inputs, outputs = work / "in", work / "out"
    inputs.mkdir()
    outputs.mkdir()
    model = inputs / model_src.name
    shutil.copyfile(model_src, model)
    before = folder_digest(inputs)
    calib = write_feeds(make_feeds(entry, CALIB_FEEDS, seed=0), work / "calib")
    output = outputs / f"{name}.{mode}.{target}.onnx"
    command = [*onnxq_command(), "quantize", str(model), "--mode", mode, "--target", target,
               "--calib", str(calib), "-o", str(output)]
    start = time.perf_counter()
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"})
    except subprocess.TimeoutExpired:
        return Row(name, mode, target, f"FAIL: no answer in {timeout:g} s (hang?)", math.nan, timeout)
    seconds = time.perf_counter() - start
    if "Traceback" in run.stderr:
        last = [line for line in run.stderr.split("\n") if line.strip()][-1]
        status, snr = f"FAIL: traceback: {one_line(last)}", math.nan
    elif run.returncode != 0:
        status, snr = judge_failure(run.returncode, run.stderr, output), math.nan
    elif not output.is_file():
        status, snr = "FAIL: exit 0 but no output file", math.nan
    else:
        as_written = target != "ort"
        status, snr = check_output(model, output, as_written, make_feeds(entry, HELDOUT_FEEDS, seed=1))
    dq_nodes = count_dq(output) if status == "ok" else None
    # the output and its own external data file may stay; temp folders and other files may not
    litter = sorted(p.name for p in outputs.iterdir() if not p.name.startswith(output.name))
    if litter and not status.startswith("FAIL"):
        status, snr = f"FAIL: left {litter} beside the output", math.nan
    if folder_digest(inputs) != before:
        status, snr = "FAIL: the input folder was modified", math.nan
    return Row(name, mode, target, status, snr, seconds, dq_nodes)


def sweep_model(entry: dict[str, Any], models_dir: Path, pairs: Sequence[tuple[str, str]],
                timeout: float = DEFAULT_TIMEOUT_S) -> list[Row]:
    """Every (mode, target) for one model, each in a fresh temporary folder.

    Block modes all refuse a model without quantizable MatMul/Gemm weights with the same check: once one
    block mode was refused for that reason, the model's other block modes are listed as such, not rerun.
    """
    rows: list[Row] = []
    no_gemm: Row | None = None
    for mode, target in pairs:
        if no_gemm is not None and is_block_mode(mode):
            rows.append(Row(entry["name"], mode, target, f"{NO_GEMM_STATUS} (as {no_gemm.mode})", math.nan, 0.0))
            continue
        with tempfile.TemporaryDirectory(prefix=f"onnxq-sweep-{entry['name']}-") as work:
            row = quantize_one(entry, models_dir / f"{entry['name']}.onnx", mode, target, Path(work), timeout)
        rows.append(row)
        if is_block_mode(mode) and row.status.startswith("clear error") and NO_GEMM_REFUSAL.search(row.status):
            no_gemm = row
    return rows


#: how onnxq refuses a block mode for a model with no MatMul/Gemm weight it can quantize
NO_GEMM_REFUSAL = re.compile(r"has no MatMul or Gemm|found no MatMul/Gemm weight")
NO_GEMM_STATUS = "clear error: no MatMul/Gemm weight for block modes"


def is_block_mode(mode: str) -> bool:
    from onnxq.modes import mode_spec

    return mode_spec(mode).block_weight is not None


def table(rows: Sequence[Row]) -> str:
    header = (
        "| model | mode | target | status | SNR dB (min over outputs) | time s | DQ nodes |\n"
        "|---|---|---|---|---|---|---|"
    )
    ok = sum(r.status == "ok" for r in rows)
    clear = sum(r.status.startswith("clear error") for r in rows)
    failed = sum(r.failed for r in rows)
    summary = f"\n\n{len(rows)} runs: {ok} ok, {clear} clear error, {failed} FAIL"
    return header + "\n" + "\n".join(r.markdown() for r in rows) + summary + "\n"


def _names(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated model names (default: every cached model)")
    parser.add_argument("--modes", help="comma-separated modes (default: onnxq.choices.MODES)")
    parser.add_argument("--targets", help="comma-separated targets (default: onnxq.placement.rules.TARGETS)")
    parser.add_argument("--models-dir", type=Path, default=None, help="default: $ONNXQ_REALMODELS or ~/.cache/onnxq-realmodels")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per quantize run")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("--jobs", type=int, default=1, help="models swept at once (each run is a subprocess)")
    args = parser.parse_args(argv)
    models_dir = args.models_dir or default_models_dir()
    entries = load_manifest()
    wanted = _names(args.models)
    if wanted:
        unknown = set(wanted) - {e["name"] for e in entries}
        if unknown:
            parser.error(f"unknown model(s): {', '.join(sorted(unknown))}")
        entries = [e for e in entries if e["name"] in wanted]
    present = cached_models(models_dir, entries)
    if not present:
        print(f"no real models in {models_dir}: run python tests/realworld/fetch.py", file=sys.stderr)
        return 2
    pairs = combinations(_names(args.modes), _names(args.targets))
    rows: list[Row] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(sweep_model, entry, models_dir, pairs, args.timeout) for entry in present]
        for future in futures:  # the table keeps the manifest's order whatever finishes first
            for row in future.result():
                print(row.markdown(), file=sys.stderr, flush=True)  # progress while the table builds
                rows.append(row)
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    failed = sum(1 for r in rows if r.failed)
    # the closing line CI reads: a clear refusal counts as passed, like a valid model
    print(f"sweep: {len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
