"""SmoothQuant benchmark: static INT8 with and without SmoothQuant against ONNX Runtime's quantizers.

Models (each with a calibration set and a held-out evaluation set drawn with different seeds):

* ``encoder``: a pretrained-like BERT-style encoder written with ``onnx.helper`` (no PyTorch): token
  and position embeddings, embedding LayerNorm, ``ENCODER.layers`` post-LN layers (separate Q/K/V
  MatMul + bias, softmax attention, output projection, residual, LayerNorm, Erf GELU FFN, residual,
  LayerNorm). As in real BERT checkpoints, a few hidden channels (``OUTLIER_CHANNELS``) carry
  LayerNorm gain and bias ``OUTLIER_GAIN_RANGE`` times the others' in every LayerNorm, and the weight
  rows reading those channels are correspondingly small (trained models learn that), so the float
  model stays sane while every LayerNorm output has huge per-channel outliers: the case where static
  per-tensor INT8 collapses.
* ``bert``: the existing BERT-style benchmark model of ``tools/bench_models.py`` (exported from
  PyTorch; needs a Python with torch: ``--torch-python``, built through ``bench_block.build_torch_model``).

Rows per model: onnxq static INT8 for ``--target tensorrt`` and ``--target ort`` without SmoothQuant,
with alpha 0.5 and ``auto`` (plus an alpha sweep that justifies the CLI's default); ONNX Runtime's
``quantize_dynamic`` INT8 (its recommendation for transformers) and ``quantize_static`` (QDQ,
per-channel, MinMax; its own SmoothQuant needs ``neural-compressor``: tried, skipped with a note when
missing).

How the SmoothQuant rows run: when ``onnxq.quantize`` accepts ``smoothquant=`` that option is used.
Otherwise the pass is applied by hand exactly where ``quantize`` will apply it: the model is prepared
and planned the way ``onnxq.api.quantize`` does (``_prepare``, ``plan_placement``), smoothed by
``run_smoothquant`` in the target's formats, and the smoothed model is then quantized by
``onnxq.quantize`` (which re-plans it; the report says which route ran).

SNR: 10 log10(|ref|^2 / |ref - q|^2) of the output on the held-out set, ONNX Runtime CPU, as written
(``ORT_ENABLE_BASIC``: Q/DQ run as written) and as deployed (``ORT_ENABLE_ALL``: fused integer kernels).

``python tools/bench_smoothquant.py --out out/bench_sq [--torch-python PY]`` writes the table to
``tools/results/bench_smoothquant.md`` (``--results``).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # sibling scripts, importable once tools/ is on the path
import bench_block

LOG = logging.getLogger("bench_smoothquant")
RESULTS = Path(__file__).resolve().parent / "results" / "bench_smoothquant.md"

OPSET = 17
IR_VERSION = 8
SEED = 0
CALIB_SAMPLES = 64
EVAL_SAMPLES = 32
EVAL_SEED_OFFSET = 1000
LAYERNORM_EPSILON = 1e-12  # BERT's
OUTLIER_CHANNELS = 4
#: outlier channels' LayerNorm gain and bias, as multiples of the others' (BERT-base: ~20-60x)
OUTLIER_GAIN_RANGE = (20.0, 60.0)
GAIN_JITTER = 0.1
BIAS_STD = 0.05
EMBEDDING_STD = 0.5
POSITION_STD = 0.1
ZIPF_OFFSET = 10.0
SWEEP_ALPHAS = (0.3, 0.4, 0.6, 0.7, 0.8)
SNR_DIGITS = 2


@dataclass(frozen=True)
class EncoderConfig:
    hidden: int = 384
    layers: int = 4
    heads: int = 6
    ffn: int = 1536
    vocab: int = 8192
    seq: int = 64


ENCODER = EncoderConfig()


# --------------------------------------------------------------------------------------------------
# The pretrained-like encoder
# --------------------------------------------------------------------------------------------------


class _Builder:
    """Collects nodes and initializers with unique names."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.require(array, requirements="C"), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attributes: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attributes))
        return name

    def linear(self, x: str, k: int, n: int, name: str, row_gain: np.ndarray | None = None) -> str:
        """``x @ W + b``, W ~ N(0, 1/k); rows reading outlier channels shrunk by their gain."""
        weight = self.rng.standard_normal((k, n)) / math.sqrt(k)
        if row_gain is not None:
            weight /= row_gain[:, None]
        w = self.constant(f"{name}.weight", weight.astype(np.float32))
        b = self.constant(f"{name}.bias", (self.rng.standard_normal(n) * BIAS_STD).astype(np.float32))
        return self.node("Add", [self.node("MatMul", [x, w], f"{name}/MatMul"), b], f"{name}/Add")

    def layer_norm(self, x: str, name: str, gain: np.ndarray) -> str:
        """LayerNorm whose gain and bias are ``gain`` times larger on the outlier channels."""
        hidden = gain.shape[0]
        gamma = (1 + self.rng.standard_normal(hidden) * GAIN_JITTER) * gain
        beta = self.rng.standard_normal(hidden) * BIAS_STD * gain
        inputs = [
            x,
            self.constant(f"{name}.weight", gamma.astype(np.float32)),
            self.constant(f"{name}.bias", beta.astype(np.float32)),
        ]
        return self.node(
            "LayerNormalization", inputs, f"{name}/LayerNormalization", axis=-1, epsilon=LAYERNORM_EPSILON
        )


def build_encoder(config: EncoderConfig = ENCODER, seed: int = SEED) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    builder = _Builder(rng)
    h = config.hidden
    gain = np.ones(h)
    outliers = rng.choice(h, OUTLIER_CHANNELS, replace=False)
    gain[outliers] = rng.uniform(*OUTLIER_GAIN_RANGE, size=OUTLIER_CHANNELS)
    words = builder.constant(
        "word_embeddings", (rng.standard_normal((config.vocab, h)) * EMBEDDING_STD).astype(np.float32)
    )
    positions = builder.constant(
        "position_embeddings", (rng.standard_normal((1, config.seq, h)) * POSITION_STD).astype(np.float32)
    )
    hidden = builder.node("Gather", [words, "input_ids"], "embed/Gather")
    hidden = builder.node("Add", [hidden, positions], "embed/Add")
    hidden = builder.layer_norm(hidden, "embed_norm", gain)
    for index in range(config.layers):
        hidden = _encoder_layer(builder, hidden, f"layers.{index}", config, gain)
    first = builder.constant("first_token", np.array(0, np.int64))
    cls = builder.node("Gather", [hidden, first], "pooler/Gather", axis=1)
    pooled = builder.node("Tanh", [builder.linear(cls, h, h, "pooler.dense", gain)], "pooler_output")
    graph = helper.make_graph(
        builder.nodes,
        "pretrained_like_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", config.seq])],
        [
            helper.make_tensor_value_info(hidden, TensorProto.FLOAT, ["batch", config.seq, h]),
            helper.make_tensor_value_info(pooled, TensorProto.FLOAT, ["batch", h]),
        ],
        builder.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def _encoder_layer(builder: _Builder, x: str, name: str, config: EncoderConfig, gain: np.ndarray) -> str:
    h, heads = config.hidden, config.heads
    head_dim = h // heads
    split = builder.constant(f"{name}.split_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge = builder.constant(f"{name}.merge_shape", np.array([0, 0, h], np.int64))

    def heads_of(tensor: str, role: str, perm: list[int]) -> str:
        shaped = builder.node("Reshape", [tensor, split], f"{name}/{role}/Reshape")
        return builder.node("Transpose", [shaped], f"{name}/{role}/Transpose", perm=perm)

    q = heads_of(builder.linear(x, h, h, f"{name}.query", gain), "q", [0, 2, 1, 3])
    k = heads_of(builder.linear(x, h, h, f"{name}.key", gain), "k", [0, 2, 3, 1])
    v = heads_of(builder.linear(x, h, h, f"{name}.value", gain), "v", [0, 2, 1, 3])
    scores = builder.node("MatMul", [q, k], f"{name}/scores/MatMul")
    inv_sqrt = builder.constant(f"{name}.inv_sqrt", np.array(1 / math.sqrt(head_dim), np.float32))
    scores = builder.node("Mul", [scores, inv_sqrt], f"{name}/scores/Mul")
    probs = builder.node("Softmax", [scores], f"{name}/Softmax", axis=-1)
    context = builder.node("MatMul", [probs, v], f"{name}/context/MatMul")
    context = builder.node("Transpose", [context], f"{name}/context/Transpose", perm=[0, 2, 1, 3])
    context = builder.node("Reshape", [context, merge], f"{name}/context/Reshape")
    attention = builder.linear(context, h, h, f"{name}.attention_output")
    x = builder.layer_norm(builder.node("Add", [x, attention], f"{name}/residual1"), f"{name}.norm1", gain)
    up = builder.linear(x, h, config.ffn, f"{name}.intermediate", gain)
    down = builder.linear(_gelu(builder, up, f"{name}/gelu"), config.ffn, h, f"{name}.output")
    return builder.layer_norm(builder.node("Add", [x, down], f"{name}/residual2"), f"{name}.norm2", gain)


def _gelu(builder: _Builder, x: str, name: str) -> str:
    """Exact GELU with standard ops: x * 0.5 * (1 + erf(x / sqrt 2))."""
    inv_sqrt2 = builder.constant(f"{name}.inv_sqrt2", np.array(1 / math.sqrt(2), np.float32))
    one = builder.constant(f"{name}.one", np.array(1, np.float32))
    half = builder.constant(f"{name}.half", np.array(0.5, np.float32))
    erf = builder.node("Erf", [builder.node("Mul", [x, inv_sqrt2], f"{name}/Div")], f"{name}/Erf")
    shifted = builder.node("Add", [erf, one], f"{name}/Add")
    return builder.node("Mul", [builder.node("Mul", [x, half], f"{name}/Half"), shifted], f"{name}/Mul")


def token_ids(count: int, seed: int, config: EncoderConfig = ENCODER) -> dict[str, np.ndarray]:
    """Zipf-like token ids (frequent tokens dominate, as in text)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / (np.arange(config.vocab) + ZIPF_OFFSET)
    ids = rng.choice(config.vocab, size=(count, config.seq), p=weights / weights.sum())
    return {"input_ids": ids.astype(np.int64)}


def make_encoder(model_dir: Path) -> bench_block.ModelFiles:
    model_dir.mkdir(parents=True, exist_ok=True)
    paths = [model_dir / f"encoder{suffix}" for suffix in (".onnx", "_calib.npz", "_eval.npz")]
    onnx.save(build_encoder(), paths[0])
    np.savez(paths[1], input_ids=token_ids(CALIB_SAMPLES, SEED)["input_ids"])
    np.savez(paths[2], input_ids=token_ids(EVAL_SAMPLES, SEED + EVAL_SEED_OFFSET)["input_ids"])
    model_path, calib_path, eval_path = (str(p) for p in paths)
    return bench_block.ModelFiles("encoder", model_path, calib_path, eval_path, ENCODER.layers)


# --------------------------------------------------------------------------------------------------
# Quantizers
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    quantizer: str
    snr_written: float = math.nan
    snr_deployed: float = math.nan
    seconds: float = math.nan
    note: str = ""


@dataclass
class Context:
    files: bench_block.ModelFiles
    out_dir: Path
    routes: set[str] = field(default_factory=set)


def onnxq_int8(context: Context, target: str, alpha: float | str | None, output: Path) -> str:
    """onnxq static INT8 for ``target``; SmoothQuant with ``alpha`` (None: without). Returns a note."""
    import onnxq
    from onnxq.api import QuantizeOptions

    files = context.files
    if alpha is None or "smoothquant" in QuantizeOptions.__dataclass_fields__:
        extra = {} if alpha is None else {"smoothquant": alpha}
        onnxq.quantize(
            files.model_path,
            mode="int8",
            calibration_data=files.calib_path,
            target=target,
            output_path=output,
            **extra,
        )
        if alpha is not None:
            context.routes.add("onnxq.quantize(smoothquant=...)")
        return ""
    smoothed, summary = smooth_by_hand(files, target, alpha)
    context.routes.add("run_smoothquant by hand, then onnxq.quantize on the smoothed model")
    onnxq.quantize(
        smoothed, mode="int8", calibration_data=files.calib_path, target=target, output_path=output
    )
    chosen = sorted({g.alpha for g in summary.smoothed if g.alpha is not None})
    kept = len(summary.groups) - len(summary.smoothed)
    span = f"alpha {chosen[0]:g}-{chosen[-1]:g}" if chosen else "no group smoothed"
    return f"{len(summary.smoothed)} groups ({span}), {summary.explicit_muls} explicit Mul, {kept} left"


def smooth_by_hand(files: bench_block.ModelFiles, target: str, alpha: float | str) -> tuple[Any, Any]:
    """What ``onnxq.quantize`` does before calibration, with SmoothQuant where the lead wires it."""
    from onnxq import api
    from onnxq.algorithms.apply_smoothquant import run_smoothquant
    from onnxq.algorithms.smoothquant import check_smoothquant_options
    from onnxq.calibration.data import open_calibration_data
    from onnxq.model_io import load_model
    from onnxq.modes import mode_spec
    from onnxq.placement.planner import plan_placement
    from onnxq.placement.rules import load_rule_set

    settings = api.QuantizeOptions(mode="int8", target=target)
    model = load_model(files.model_path)
    checked = check_smoothquant_options(alpha, "int8", model)
    api._prepare(model, settings, mode_spec("int8"))
    rules = load_rule_set(target)
    plan = plan_placement(model, rules, api._placement(settings))
    data = open_calibration_data(files.calib_path, api.input_specs(model))
    activation_format, weight_format = api.formats_for("int8", rules.activation_symmetric)
    summary = run_smoothquant(
        model, plan, data, api._calibration_settings(settings), checked,
        activation_format=activation_format, weight_format=weight_format, symmetric=rules.activation_symmetric,
    )  # fmt: skip
    return model, summary


def ort_dynamic(context: Context, output: Path, per_channel: bool) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        context.files.model_path, str(output), weight_type=QuantType.QInt8, per_channel=per_channel
    )
    return f"QInt8 weights per {'channel' if per_channel else 'tensor (the default)'}"


def ort_static(context: Context, output: Path, smooth: bool) -> str:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    extra: dict[str, Any] = {"SmoothQuant": True, "SmoothQuantAlpha": 0.5} if smooth else {}
    quantize_static(
        context.files.model_path,
        str(output),
        bench.make_calibration_reader(context.files.calib_path),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options=extra,
    )
    return "QDQ, QUInt8 activations, per-channel QInt8 weights, MinMax"


def evaluate(
    reference: dict[str, np.ndarray], model_path: Path, feeds: dict[str, np.ndarray]
) -> tuple[float, float]:
    """Worst output's SNR (dB), as written and as deployed."""
    import onnxruntime as ort

    results = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        outputs = bench.run_model(session, feeds)
        snrs = {name: bench.snr_db(expected, outputs[name]) for name, expected in reference.items()}
        LOG.debug("%s: %s", model_path.name, snrs)
        results.append(min(snrs.values()))
    return results[0], results[1]


def _onnxq_job(context: Context, target: str, alpha: float | str | None) -> Callable[[Path], str]:
    def job(output: Path) -> str:
        return onnxq_int8(context, target, alpha, output)

    return job


def benchmark(files: bench_block.ModelFiles, out_dir: Path, sweep: bool) -> tuple[list[Row], set[str]]:
    context = Context(files, out_dir)
    feeds = bench.load_npz(files.eval_path)
    reference = bench.run_model(bench.make_session(files.model_path), feeds)
    jobs: list[tuple[str, Callable[[Path], str]]] = []
    for target in ("tensorrt", "ort"):
        alphas: list[float | str | None] = [None, 0.5, "auto", *(SWEEP_ALPHAS if sweep else ())]
        for alpha in alphas:
            label = f"onnxq int8 --target {target}" + ("" if alpha is None else f" --smoothquant {alpha}")
            jobs.append((label, _onnxq_job(context, target, alpha)))
    jobs.append(("ORT quantize_dynamic INT8", lambda out: ort_dynamic(context, out, False)))
    jobs.append(("ORT quantize_dynamic INT8 per channel", lambda out: ort_dynamic(context, out, True)))
    jobs.append(("ORT quantize_static QDQ u8/s8", lambda out: ort_static(context, out, False)))
    jobs.append(("ORT quantize_static + its SmoothQuant 0.5", lambda out: ort_static(context, out, True)))
    rows = []
    for index, (label, job) in enumerate(jobs):
        output = out_dir / f"{files.name}_{index}.onnx"
        row = Row(files.name, label)
        started = time.perf_counter()
        try:
            row.note = job(output)
            row.seconds = time.perf_counter() - started
            row.snr_written, row.snr_deployed = evaluate(reference, output, feeds)
        except Exception as error:  # a quantizer that fails is a row with its error, not a crash
            row.note = f"skipped: {bench_block.short_error(error)}"
        LOG.info("%s | %s: %.2f / %.2f dB %s", files.name, label, row.snr_written, row.snr_deployed, row.note)
        rows.append(row)
    return rows, context.routes


def render(rows: list[Row], routes: set[str], notes: list[str]) -> str:
    lines = [
        "# SmoothQuant: static INT8 with and without it, against ONNX Runtime's quantizers",
        "",
        "| model | quantizer | SNR as written (dB) | SNR deployed (dB) | quantize time (s) | note |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            row.model,
            row.quantizer,
            _fmt(row.snr_written),
            _fmt(row.snr_deployed),
            _fmt(row.seconds),
            row.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    import onnxruntime

    from onnxq.choices import DEFAULT_CALIB_METHOD

    lines += [
        "",
        f"- Models: `encoder` (pretrained-like, hidden {ENCODER.hidden}, {ENCODER.layers} post-LN layers, "
        f"{OUTLIER_CHANNELS} LayerNorm outlier channels with gain and bias {OUTLIER_GAIN_RANGE[0]:g}-"
        f"{OUTLIER_GAIN_RANGE[1]:g}x, seq {ENCODER.seq}) and `bert` (tools/bench_models.py). "
        f"{CALIB_SAMPLES} calibration samples, {EVAL_SAMPLES} held-out samples (other seed).",
        "- SNR: 10 log10(|ref|^2 / |ref - q|^2) of the output on the held-out set, ONNX Runtime "
        f"{onnxruntime.__version__} CPU: as written (ORT_ENABLE_BASIC) and deployed (ORT_ENABLE_ALL, fused kernels).",
        f"- onnxq rows: onnxq's default calibration method ({DEFAULT_CALIB_METHOD}), the rest in "
        f"{_rest_types()}. SmoothQuant route: " + ("; ".join(sorted(routes)) or "n/a") + ".",
        *notes,
    ]
    return "\n".join(lines) + "\n"


def _rest_types() -> str:
    """The non-quantized rest's type per target, as onnxq's defaults give it."""
    from onnxq.api import QuantizeOptions, high_precision_for

    return ", ".join(f"{high_precision_for(QuantizeOptions(target=t))} ({t})" for t in ("tensorrt", "ort"))


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.{SNR_DIGITS}f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench_sq"), help="work directory")
    parser.add_argument("--models", default="encoder,bert", help="comma-separated: encoder, bert")
    parser.add_argument("--torch-python", default=None, help="a Python that imports torch (builds bert)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the alpha sweep rows")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to write")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("onnxq").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    routes: set[str] = set()
    notes: list[str] = []
    for name in args.models.split(","):
        if name == "encoder":
            files: bench_block.ModelFiles | str = make_encoder(args.out / "models")
        else:
            files = bench_block.build_torch_model(
                name, args.out / "models", bench_block.find_torch_python(args.torch_python)
            )
        if isinstance(files, str):
            notes.append(f"- `{name}`: {files}")
            continue
        model_rows, model_routes = benchmark(files, args.out, not args.no_sweep)
        rows += model_rows
        routes |= model_routes
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(render(rows, routes, notes))
    print(args.results.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
