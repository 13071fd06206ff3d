"""A decoder-style (GPT-like) transformer written directly with ``onnx.helper``, and its token data.

The model is what INT4/FP4 weight quantizers are made for: a stack of large MatMuls whose inputs have
a few outlier channels. It needs no PyTorch. Cases handled:

* Graph (opset ``OPSET``, IR ``IR_VERSION``): ``input_ids`` [batch, seq] int64 -> token embedding
  ``Gather`` + learned position embedding -> ``layers`` pre-LN blocks -> final ``LayerNormalization``
  -> ``lm_head`` MatMul -> ``logits`` [batch, seq, vocab]. Each block:
  ``LayerNormalization``; separate Q/K/V ``MatMul`` + bias ``Add``; ``Reshape``/``Transpose`` into
  heads; ``MatMul`` scores, ``Mul`` by 1/sqrt(head_dim); an exported-style causal mask
  ``Where(causal, 0, -inf)`` added before ``Softmax``; ``MatMul`` with V, heads merged back; output
  projection ``MatMul`` + bias; residual ``Add``; ``LayerNormalization``; FFN ``MatMul`` + bias ->
  tanh-approximated GELU written with standard ops (``Gelu`` needs opset 20) -> ``MatMul`` + bias;
  residual ``Add``.
* Weights as in trained LLMs, seeded: std 1/sqrt(fan_in), normal except for ``HEAVY_TAIL_FRACTION``
  of the entries drawn ``HEAVY_TAIL_SCALE`` times wider (heavy tails: kurtosis about 3.9, so a
  block's maximum sits well above its bulk, which is what costs RTN accuracy); residual output projections scaled by
  1/sqrt(2 * layers) (GPT-2) so the residual stream does not grow with depth; every LayerNorm gain has
  the same ``OUTLIER_FRACTION`` of channels multiplied by a gain drawn from ``OUTLIER_GAIN_RANGE``,
  so the MatMul inputs carry outlier channels, the case AWQ's per-channel scales exist for.
* Files: weights inline when they total at most ``external_data_threshold`` bytes (1.5 GB by
  default), otherwise in one external data file ``<name>.data`` beside the model.
* Data: token ids drawn from a Zipf-like distribution (frequent tokens dominate, as in text);
  :func:`make_calibration` for one set, :func:`make_splits` for a calibration set and a held-out
  evaluation set drawn with different seeds.

``python tools/block_models.py --out DIR`` builds the default model (hidden 1024, 8 layers), runs it
in ONNX Runtime and prints statistics of its logits.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 10
EXTERNAL_DATA_THRESHOLD_BYTES = 1_500_000_000  # 1.5 GB: well below protobuf's 2 GB limit
EXTERNAL_DATA_MIN_TENSOR_BYTES = 1024  # smaller tensors (shapes, scalars) stay inline for shape inference
LAYERNORM_EPSILON = 1e-5

OUTLIER_FRACTION = 0.01  # share of hidden channels with a large LayerNorm gain, same ones in every layer
OUTLIER_GAIN_RANGE = (8.0, 20.0)
GAIN_JITTER = 0.05  # ordinary channels: gain 1 +- a little
BIAS_STD = 0.02
EMBEDDING_STD = 1.0
POSITION_STD = 0.1
HEAVY_TAIL_FRACTION = 0.005  # share of weight entries drawn with a wider normal (heavy tails) ...
HEAVY_TAIL_SCALE = 3.0  # ... this many times wider: kurtosis about 3.9 instead of a normal's 3
ZIPF_OFFSET = 10.0  # token probability ~ 1 / (rank + offset)
SPLIT_SEED_OFFSET = 1000  # the held-out set's seed differs from the calibration set's by this

GELU_TANH_COEFF = 0.044715
GELU_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

INPUT_NAME = "input_ids"
OUTPUT_NAME = "logits"
LM_HEAD_NODE = "lm_head"


@dataclass(frozen=True)
class DecoderConfig:
    """Sizes of the decoder."""

    hidden: int = 1024
    layers: int = 8
    heads: int = 16
    ffn: int = 4096
    vocab: int = 8192
    seq: int = 64

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.heads


@dataclass(frozen=True)
class DecoderSplits:
    """Calibration feeds and held-out evaluation feeds."""

    calibration: dict[str, np.ndarray]
    evaluation: dict[str, np.ndarray]


class _GraphBuilder:
    """Collects nodes and initializers; every node gets a unique, readable name."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.weight_bytes = 0

    def constant(self, name: str, array: np.ndarray) -> str:
        """Add an initializer and return its name."""
        self.initializers.append(numpy_helper.from_array(array, name))
        self.weight_bytes += array.nbytes
        return name

    def node(self, op_type: str, inputs: list[str], name: str, **attributes: Any) -> str:
        """Add a node with one output named after the node, and return that output."""
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attributes))
        return name

    def weight(self, name: str, fan_in: int, fan_out: int, gain: float = 1.0) -> str:
        """A [fan_in, fan_out] weight with std gain/sqrt(fan_in): normal, a few entries drawn wider."""
        values = self.rng.standard_normal((fan_in, fan_out), dtype=np.float32)
        wide = self.rng.random((fan_in, fan_out)) < HEAVY_TAIL_FRACTION
        values[wide] *= np.float32(HEAVY_TAIL_SCALE)
        # the wide entries raise the variance by this factor: divide it out so the std is as documented
        variance_gain = 1.0 + HEAVY_TAIL_FRACTION * (HEAVY_TAIL_SCALE**2 - 1.0)
        values *= np.float32(gain / math.sqrt(fan_in * variance_gain))
        return self.constant(name, values)

    def bias(self, name: str, size: int) -> str:
        """A small random bias."""
        return self.constant(name, (BIAS_STD * self.rng.standard_normal(size)).astype(np.float32))

    def linear(self, name: str, x: str, fan_in: int, fan_out: int, gain: float = 1.0) -> str:
        """``MatMul(x, W) + b`` as two nodes, the way exporters write ``nn.Linear`` on 3-D inputs."""
        weight = self.weight(f"{name}.weight", fan_in, fan_out, gain)
        product = self.node("MatMul", [x, weight], f"{name}.matmul")
        return self.node("Add", [product, self.bias(f"{name}.bias", fan_out)], f"{name}.add")

    def layer_norm(self, name: str, x: str, gains: np.ndarray) -> str:
        """``LayerNormalization`` over the last axis with the given gains and a small bias."""
        gamma = self.constant(f"{name}.weight", gains.astype(np.float32))
        beta = self.bias(f"{name}.bias", gains.size)
        return self.node("LayerNormalization", [x, gamma, beta], name, axis=-1, epsilon=LAYERNORM_EPSILON)


def layernorm_gains(hidden: int, outlier_channels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gains near 1, with the outlier channels multiplied by a gain from ``OUTLIER_GAIN_RANGE``."""
    gains = 1.0 + GAIN_JITTER * rng.standard_normal(hidden)
    gains[outlier_channels] *= rng.uniform(*OUTLIER_GAIN_RANGE, size=outlier_channels.size)
    return gains.astype(np.float32)


def outlier_channel_indices(hidden: int, seed: int) -> np.ndarray:
    """The hidden channels that get large LayerNorm gains (at least one), sorted."""
    count = max(1, round(OUTLIER_FRACTION * hidden))
    return np.sort(np.random.default_rng(seed).choice(hidden, size=count, replace=False))


def _causal_mask(builder: _GraphBuilder, seq: int) -> str:
    """``Where(causal, 0, -inf)`` of shape [seq, seq], as exporters emit it."""
    causal = builder.constant("causal_mask", np.tril(np.ones((seq, seq), dtype=bool)))
    zero = builder.constant("mask_zero", np.array(0.0, dtype=np.float32))
    minus_inf = builder.constant("mask_minus_inf", np.array(-np.inf, dtype=np.float32))
    return builder.node("Where", [causal, zero, minus_inf], "additive_causal_mask")


def _split_heads(builder: _GraphBuilder, name: str, x: str, config: DecoderConfig, key: bool) -> str:
    """[B, S, hidden] -> [B, H, S, D] (or [B, H, D, S] for keys, ready for Q @ K^T)."""
    shape = builder.constant(f"{name}.shape", np.array([0, 0, config.heads, config.head_dim], np.int64))
    heads = builder.node("Reshape", [x, shape], f"{name}.reshape")
    perm = [0, 2, 3, 1] if key else [0, 2, 1, 3]
    return builder.node("Transpose", [heads], f"{name}.transpose", perm=perm)


def _attention(builder: _GraphBuilder, prefix: str, x: str, mask: str, config: DecoderConfig) -> str:
    """Causal multi-head self-attention with separate Q/K/V projections; returns the projection output."""
    hidden = config.hidden
    query = _split_heads(
        builder, f"{prefix}.q_heads", builder.linear(f"{prefix}.q_proj", x, hidden, hidden), config, False
    )
    key = _split_heads(
        builder, f"{prefix}.k_heads", builder.linear(f"{prefix}.k_proj", x, hidden, hidden), config, True
    )
    value = _split_heads(
        builder, f"{prefix}.v_heads", builder.linear(f"{prefix}.v_proj", x, hidden, hidden), config, False
    )
    scores = builder.node("MatMul", [query, key], f"{prefix}.scores")
    scale = builder.constant(f"{prefix}.scale", np.array(1.0 / math.sqrt(config.head_dim), np.float32))
    scaled = builder.node("Mul", [scores, scale], f"{prefix}.scaled_scores")
    masked = builder.node("Add", [scaled, mask], f"{prefix}.masked_scores")
    probs = builder.node("Softmax", [masked], f"{prefix}.softmax", axis=-1)
    context = builder.node("MatMul", [probs, value], f"{prefix}.context")
    merged = builder.node("Transpose", [context], f"{prefix}.context_transpose", perm=[0, 2, 1, 3])
    merged_shape = builder.constant(f"{prefix}.merge_shape", np.array([0, 0, hidden], np.int64))
    flat = builder.node("Reshape", [merged, merged_shape], f"{prefix}.context_reshape")
    residual_gain = 1.0 / math.sqrt(2.0 * config.layers)
    return builder.linear(f"{prefix}.o_proj", flat, hidden, hidden, gain=residual_gain)


def _gelu_tanh(builder: _GraphBuilder, prefix: str, x: str) -> str:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) with standard ops."""
    cube = builder.node("Mul", [builder.node("Mul", [x, x], f"{prefix}.square"), x], f"{prefix}.cube")
    coeff = builder.constant(f"{prefix}.coeff", np.array(GELU_TANH_COEFF, np.float32))
    inner = builder.node(
        "Add", [x, builder.node("Mul", [cube, coeff], f"{prefix}.cube_scaled")], f"{prefix}.inner"
    )
    sqrt_2_pi = builder.constant(f"{prefix}.sqrt_2_over_pi", np.array(GELU_SQRT_2_OVER_PI, np.float32))
    tanh = builder.node(
        "Tanh", [builder.node("Mul", [inner, sqrt_2_pi], f"{prefix}.tanh_input")], f"{prefix}.tanh"
    )
    one = builder.constant(f"{prefix}.one", np.array(1.0, np.float32))
    half = builder.constant(f"{prefix}.half", np.array(0.5, np.float32))
    gate = builder.node(
        "Mul", [builder.node("Add", [tanh, one], f"{prefix}.one_plus_tanh"), half], f"{prefix}.gate"
    )
    return builder.node("Mul", [x, gate], f"{prefix}.output")


def _decoder_layer(
    builder: _GraphBuilder, index: int, x: str, mask: str, config: DecoderConfig, outliers: np.ndarray
) -> str:
    """One pre-LN block: x + attn(LN(x)), then + FFN(LN(.))."""
    prefix = f"layers.{index}"
    normed = builder.layer_norm(f"{prefix}.ln_1", x, layernorm_gains(config.hidden, outliers, builder.rng))
    attention = _attention(builder, f"{prefix}.attn", normed, mask, config)
    x = builder.node("Add", [x, attention], f"{prefix}.attn_residual")
    normed = builder.layer_norm(f"{prefix}.ln_2", x, layernorm_gains(config.hidden, outliers, builder.rng))
    up = builder.linear(f"{prefix}.mlp.fc_in", normed, config.hidden, config.ffn)
    activated = _gelu_tanh(builder, f"{prefix}.mlp.gelu", up)
    residual_gain = 1.0 / math.sqrt(2.0 * config.layers)
    down = builder.linear(f"{prefix}.mlp.fc_out", activated, config.ffn, config.hidden, gain=residual_gain)
    return builder.node("Add", [x, down], f"{prefix}.mlp_residual")


def build_decoder(config: DecoderConfig, seed: int = 0) -> tuple[onnx.ModelProto, int]:
    """The decoder as a ModelProto with inline weights, and the weights' size in bytes."""
    rng = np.random.default_rng(seed)
    builder = _GraphBuilder(rng)
    outliers = outlier_channel_indices(config.hidden, seed)
    embedding = builder.constant(
        "embed_tokens.weight",
        (EMBEDDING_STD * rng.standard_normal((config.vocab, config.hidden))).astype(np.float32),
    )
    positions = builder.constant(
        "embed_positions.weight",
        (POSITION_STD * rng.standard_normal((config.seq, config.hidden))).astype(np.float32),
    )
    tokens = builder.node("Gather", [embedding, INPUT_NAME], "embed_tokens", axis=0)
    x = builder.node("Add", [tokens, positions], "embed_add_positions")
    mask = _causal_mask(builder, config.seq)
    for index in range(config.layers):
        x = _decoder_layer(builder, index, x, mask, config, outliers)
    x = builder.layer_norm("final_ln", x, layernorm_gains(config.hidden, outliers, rng))
    lm_head = builder.weight("lm_head.weight", config.hidden, config.vocab)
    builder.nodes.append(helper.make_node("MatMul", [x, lm_head], [OUTPUT_NAME], name=LM_HEAD_NODE))
    graph = helper.make_graph(
        builder.nodes,
        "decoder",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.INT64, ["batch", config.seq])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", config.seq, config.vocab])],
        initializer=builder.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    model.producer_name = "onnxq tools/block_models.py"
    return model, builder.weight_bytes


def make_decoder(
    path: str | Path,
    hidden: int = 1024,
    layers: int = 8,
    heads: int = 16,
    ffn: int = 4096,
    vocab: int = 8192,
    seq: int = 64,
    seed: int = 0,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD_BYTES,
) -> Path:
    """Build the decoder, save it to ``path`` (external data past the threshold), check it; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = DecoderConfig(hidden=hidden, layers=layers, heads=heads, ffn=ffn, vocab=vocab, seq=seq)
    model, weight_bytes = build_decoder(config, seed)
    external = weight_bytes > external_data_threshold
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=EXTERNAL_DATA_MIN_TENSOR_BYTES,
    )
    onnx.checker.check_model(str(path), full_check=True)
    return path


def make_calibration(count: int, seq: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """``{"input_ids": [count, seq] int64}`` from a Zipf-like token distribution (a random token order)."""
    rng = np.random.default_rng(seed)
    probabilities = 1.0 / (np.arange(vocab) + ZIPF_OFFSET)
    probabilities /= probabilities.sum()
    token_of_rank = rng.permutation(vocab)
    ranks = rng.choice(vocab, size=(count, seq), p=probabilities)
    return {INPUT_NAME: token_of_rank[ranks].astype(np.int64)}


def make_splits(calib_count: int, eval_count: int, seq: int, vocab: int, seed: int) -> DecoderSplits:
    """A calibration set and a held-out evaluation set (different seeds, same distribution)."""
    return DecoderSplits(
        calibration=make_calibration(calib_count, seq, vocab, seed),
        evaluation=make_calibration(eval_count, seq, vocab, seed + SPLIT_SEED_OFFSET),
    )


def logit_summary(logits: np.ndarray) -> dict[str, float]:
    """Numbers that show whether logits are degenerate: spread, distinct argmaxes, softmax entropy."""
    flat = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    shifted = flat - flat.max(axis=-1, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    entropy = -(probabilities * np.log(np.maximum(probabilities, 1e-30))).sum(axis=-1)
    return {
        "std": float(flat.std()),
        "finite_fraction": float(np.isfinite(flat).mean()),
        "distinct_argmax_fraction": len(np.unique(flat.argmax(axis=-1))) / flat.shape[0],
        "mean_entropy_nats": float(entropy.mean()),
        "max_entropy_nats": math.log(flat.shape[-1]),
    }


def main() -> int:
    """Build the default decoder, run it in ONNX Runtime and print its logit statistics."""
    import time

    import onnxruntime as ort

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("out/bench/block"), help="output directory")
    parser.add_argument("--layers", type=int, default=DecoderConfig.layers)
    parser.add_argument("--hidden", type=int, default=DecoderConfig.hidden)
    args = parser.parse_args()
    start = time.perf_counter()
    path = make_decoder(
        args.out / "decoder.onnx", hidden=args.hidden, layers=args.layers, ffn=4 * args.hidden
    )
    print(f"built {path} in {time.perf_counter() - start:.1f} s, {path.stat().st_size / 1e6:.0f} MB")
    feeds = make_calibration(4, DecoderConfig.seq, DecoderConfig.vocab, seed=1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run([OUTPUT_NAME], feeds)
    print({key: round(value, 3) for key, value in logit_summary(logits).items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
