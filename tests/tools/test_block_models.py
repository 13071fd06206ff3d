"""The decoder of tools/block_models.py (small config) and the pure helpers of tools/bench_block.py.

Checked against an independent numpy forward pass written here from the initializers: the graph
computes a causal pre-LN decoder, its LayerNorm outlier gains give the MatMul inputs outlier channels,
the logits are not degenerate, external data round-trips, and the token data is seeded and Zipf-like.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))

import bench_block  # noqa: E402
import block_models  # noqa: E402

SMALL = block_models.DecoderConfig(hidden=64, layers=2, heads=4, ffn=128, vocab=256, seq=16)
BATCH = 3
EPSILON = block_models.LAYERNORM_EPSILON


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small decoder saved with inline weights."""
    path = tmp_path_factory.mktemp("decoder") / "decoder.onnx"
    return block_models.make_decoder(path, **vars(SMALL) | {"seed": 3})


def ort_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    """Logits from ONNX Runtime CPU."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids})[0]


def weights(path: Path) -> dict[str, np.ndarray]:
    """All initializers by name."""
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def layer_norm(x: np.ndarray, gain: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """LayerNorm over the last axis in float64."""
    mean = x.mean(axis=-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + EPSILON) * gain + bias


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def numpy_decoder(w: dict[str, np.ndarray], ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Reference forward pass in float64; returns logits and every layer's attention input (LN output)."""
    w = {name: value.astype(np.float64) for name, value in w.items() if value.dtype != bool}
    batch, seq = ids.shape
    heads, head_dim = SMALL.heads, SMALL.head_dim
    x = w["embed_tokens.weight"][ids] + w["embed_positions.weight"][:seq]
    future = np.triu(np.ones((seq, seq), dtype=bool), k=1)
    attention_inputs = []
    for index in range(SMALL.layers):
        p = f"layers.{index}"
        h = layer_norm(x, w[f"{p}.ln_1.weight"], w[f"{p}.ln_1.bias"])
        attention_inputs.append(h)

        def project(name: str, inp: np.ndarray, p: str = p) -> np.ndarray:
            return inp @ w[f"{p}.{name}.weight"] + w[f"{p}.{name}.bias"]

        def heads_of(t: np.ndarray) -> np.ndarray:
            return t.reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3)

        q, k, v = (heads_of(project(f"attn.{n}_proj", h)) for n in "qkv")
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)
        scores[..., future] = -np.inf
        context = (softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(batch, seq, SMALL.hidden)
        x = x + project("attn.o_proj", context)
        h = layer_norm(x, w[f"{p}.ln_2.weight"], w[f"{p}.ln_2.bias"])
        up = project("mlp.fc_in", h)
        gelu = 0.5 * up * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (up + 0.044715 * up**3)))
        x = x + project("mlp.fc_out", gelu)
    x = layer_norm(x, w["final_ln.weight"], w["final_ln.bias"])
    return x @ w["lm_head.weight"], attention_inputs


def test_graph_is_the_documented_decoder(small_model: Path) -> None:
    model = onnx.load(str(small_model))
    assert (model.ir_version, model.opset_import[0].version) == (block_models.IR_VERSION, block_models.OPSET)
    ops = [node.op_type for node in model.graph.node]
    initializers = {t.name for t in model.graph.initializer}
    weight_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in initializers]
    assert len(weight_matmuls) == 6 * SMALL.layers + 1  # q, k, v, o, fc_in, fc_out per layer; lm_head
    assert ops.count("LayerNormalization") == 2 * SMALL.layers + 1
    assert ops.count("Softmax") == SMALL.layers
    assert ops[0] == "Gather" and model.graph.node[-1].name == block_models.LM_HEAD_NODE
    minus_inf = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "mask_minus_inf"))
    assert np.isneginf(minus_inf)
    where = next(n for n in model.graph.node if n.op_type == "Where")
    assert "mask_minus_inf" in where.input


def test_ort_matches_numpy_reference(small_model: Path) -> None:
    ids = block_models.make_calibration(BATCH, SMALL.seq, SMALL.vocab, seed=5)["input_ids"]
    expected, _ = numpy_decoder(weights(small_model), ids)
    actual = ort_logits(small_model, ids)
    assert actual.shape == (BATCH, SMALL.seq, SMALL.vocab)
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_attention_is_causal(small_model: Path) -> None:
    ids = block_models.make_calibration(1, SMALL.seq, SMALL.vocab, seed=6)["input_ids"]
    position = SMALL.seq // 2
    changed = ids.copy()
    changed[0, position] = (ids[0, position] + 1) % SMALL.vocab
    before, after = ort_logits(small_model, ids), ort_logits(small_model, changed)
    np.testing.assert_array_equal(before[:, :position], after[:, :position])
    assert np.abs(before[:, position:] - after[:, position:]).max() > 1e-3


def test_outlier_gains_make_outlier_input_channels(small_model: Path) -> None:
    ids = block_models.make_calibration(BATCH, SMALL.seq, SMALL.vocab, seed=7)["input_ids"]
    _, attention_inputs = numpy_decoder(weights(small_model), ids)
    outliers = block_models.outlier_channel_indices(SMALL.hidden, seed=3)
    for activations in attention_inputs:
        channel_rms = np.sqrt((activations**2).reshape(-1, SMALL.hidden).mean(axis=0))
        loudest = np.sort(np.argsort(channel_rms)[-outliers.size :])
        np.testing.assert_array_equal(loudest, outliers)
        assert channel_rms[outliers].min() > 4.0 * np.median(channel_rms)


def test_logits_are_not_degenerate(small_model: Path) -> None:
    ids = block_models.make_calibration(8, SMALL.seq, SMALL.vocab, seed=8)["input_ids"]
    summary = block_models.logit_summary(ort_logits(small_model, ids))
    assert summary["finite_fraction"] == 1.0
    assert summary["std"] > 0.1
    assert summary["distinct_argmax_fraction"] > 0.2  # not one token everywhere
    assert summary["mean_entropy_nats"] < 0.99 * summary["max_entropy_nats"]  # not uniform


def test_weights_have_the_documented_statistics(small_model: Path) -> None:
    weight = weights(small_model)["layers.0.mlp.fc_in.weight"].astype(np.float64)
    assert weight.std() == pytest.approx(1.0 / math.sqrt(SMALL.hidden), rel=0.05)
    standardized = (weight - weight.mean()) / weight.std()
    assert (standardized**4).mean() > 3.4  # heavier tails than a normal distribution (kurtosis 3)


def test_external_data_gives_the_same_model(tmp_path: Path, small_model: Path) -> None:
    external = block_models.make_decoder(
        tmp_path / "ext.onnx", **vars(SMALL) | {"seed": 3}, external_data_threshold=0
    )
    assert (tmp_path / "ext.onnx.data").exists()
    assert external.stat().st_size < small_model.stat().st_size / 10
    ids = block_models.make_calibration(2, SMALL.seq, SMALL.vocab, seed=9)["input_ids"]
    np.testing.assert_array_equal(ort_logits(external, ids), ort_logits(small_model, ids))


def test_calibration_data_is_seeded_and_zipf_like() -> None:
    first = block_models.make_calibration(64, SMALL.seq, SMALL.vocab, seed=1)["input_ids"]
    again = block_models.make_calibration(64, SMALL.seq, SMALL.vocab, seed=1)["input_ids"]
    np.testing.assert_array_equal(first, again)
    assert first.dtype == np.int64 and first.shape == (64, SMALL.seq)
    assert first.min() >= 0 and first.max() < SMALL.vocab
    counts = np.bincount(first.ravel(), minlength=SMALL.vocab)
    assert counts.max() > 5 * first.size / SMALL.vocab  # the most frequent token far above uniform
    splits = block_models.make_splits(4, 4, SMALL.seq, SMALL.vocab, seed=1)
    assert not np.array_equal(splits.calibration["input_ids"], splits.evaluation["input_ids"])


def test_bench_finds_the_logits_projection(small_model: Path) -> None:
    assert bench_block.logits_projections(str(small_model)) == [block_models.LM_HEAD_NODE]


def test_bench_snr_against_direct_formula() -> None:
    rng = np.random.default_rng(0)
    reference = rng.standard_normal(1000).astype(np.float32)
    noise = 0.1 * rng.standard_normal(1000).astype(np.float32)
    expected = 10 * np.log10(
        np.sum(reference.astype(np.float64) ** 2) / np.sum(noise.astype(np.float64) ** 2)
    )
    assert bench_block.snr_db(reference, reference + noise) == pytest.approx(expected, rel=1e-4)
    assert math.isnan(bench_block.snr_db(reference, np.full_like(reference, np.inf)))


def test_bench_awq_seconds_per_layer() -> None:
    rtn = bench_block.Outcome("m", "int4-rtn", ok=True, seconds=2.0)
    awq = bench_block.Outcome("m", "int4-awq-lite", ok=True, seconds=10.0)
    assert bench_block.awq_seconds_per_layer(awq, rtn, layers=4) == pytest.approx(2.0)
    awq.laps = {"awq": 6.0, "save": 1.0}
    assert bench_block.awq_seconds_per_layer(awq, rtn, layers=4) == pytest.approx(1.5)
    assert bench_block.awq_seconds_per_layer(rtn, rtn, layers=4) is None
