"""``onnxq report``: figures against numpy on full tensors, streaming invariance, formats, bad inputs.

The references recover the Q/DQ pairs from the ONNX protobuf on their own, run both models once with
every tensor as an output (ONNX Runtime at BASIC, Q/DQ as written) and compute SNR and clipping on
the whole tensors in numpy; the report streams small batches under a tiny memory limit.
"""

from __future__ import annotations

import math
from pathlib import Path

import model_builders
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import onnxq
from onnxq.report import build_report
from onnxq.report.build import Report

#: a memory limit so small that activations stream one group and few samples at a time
#: ONNX Runtime sums convolutions in a different order for other batch sizes: SNRs agree to ~1e-8
SNR_TOLERANCE = 1e-6
TINY_MEMORY_MB = 0.05
SAMPLES = 12


def _quantized(
    tmp_path: Path, model: onnx.ModelProto, data: dict[str, np.ndarray], mode: str, **options: object
) -> tuple[Path, Path, Path]:
    fp32, npz, quantized = tmp_path / "fp32.onnx", tmp_path / "data.npz", tmp_path / f"q.{mode}.onnx"
    onnx.save(model, fp32)
    np.savez(npz, **data)  # type: ignore[arg-type]
    onnxq.quantize(fp32, mode=mode, calibration_data=npz, output_path=quantized, **options)
    return fp32, npz, quantized


def _all_tensors(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every named tensor of ``model`` on ``feed`` (graph inputs included)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    infos = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    names = [o for node in model.graph.node for o in node.output if o in infos]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.output[:]
    copy.graph.output.extend(infos[n] for n in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(copy.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return {**feed, **dict(zip(names, session.run(names, feed)))}


def _snr(reference: np.ndarray, test: np.ndarray) -> float:
    return model_builders.snr_db(reference, test)


def _activation_pairs(model: onnx.ModelProto) -> dict[str, tuple[str, float, int]]:
    """Q input -> (DQ output, scale, zero point) for every per-tensor int8 Q/DQ pair."""
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dequantizers = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    pairs = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            scale = float(initializers[node.input[1]])
            zero_point = int(initializers[node.input[2]])
            pairs[node.input[0]] = (dequantizers[node.output[0]].output[0], scale, zero_point)
    return pairs


def _by_name(report: Report) -> dict[str, object]:
    return {t.name: t for t in report.tensors}


def test_int8_tensor_figures_equal_numpy_on_full_tensors(tmp_path: Path) -> None:
    data = model_builders.cnn_inputs(3, SAMPLES)
    fp32, npz, quantized = _quantized(
        tmp_path, model_builders.residual_cnn(), data, "int8", high_precision="fp32"
    )
    report = build_report(fp32, quantized, npz, batch_size=5, memory_mb=TINY_MEMORY_MB)
    q_model = onnx.load(quantized)
    reference = _all_tensors(onnx.load(fp32), data)
    actual = _all_tensors(q_model, data)
    pairs = _activation_pairs(q_model)
    tensors = _by_name(report)
    assert set(pairs) <= set(tensors)
    for source, (seen, scale, zero_point) in pairs.items():
        found = tensors[source]
        fp32_name = found.point.fp32_name  # type: ignore[attr-defined]
        metrics = found.metrics  # type: ignore[attr-defined]
        assert metrics.snr_db == pytest.approx(_snr(reference[fp32_name], actual[seen]), rel=SNR_TOLERANCE)
        assert metrics.local_snr_db == pytest.approx(_snr(actual[source], actual[seen]), rel=SNR_TOLERANCE)
        codes = actual[source].astype(np.float64) / scale + zero_point
        clipped = np.mean((codes < -128 - 0.5) | (codes > 127 + 0.5))
        assert metrics.clipped_share == pytest.approx(clipped, abs=1e-12)
        assert metrics.elements == actual[source].size
    # the quantizer reading the graph input is matched through its reader, the rest by name
    assert {t.point.match for t in report.tensors if t.point.kind == "activation"} <= {
        "same name",
        "consumer input",
    }


def test_int8_weight_figures_against_batchnorm_folded_fp32_weights(tmp_path: Path) -> None:
    data = model_builders.cnn_inputs(3, SAMPLES)
    model = model_builders.residual_cnn()
    fp32, npz, quantized = _quantized(tmp_path, model, data, "int8", high_precision="fp32")
    report = build_report(fp32, quantized, npz, exact_layers=0)
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    stored = {i.name: numpy_helper.to_array(i) for i in onnx.load(quantized).graph.initializer}
    folded = weights["w1"] * (weights["gamma"] / np.sqrt(weights["var"] + 1e-5)).reshape(-1, 1, 1, 1)
    expected = {"w1": folded, "w2": weights["w2"], "w3": weights["w3"]}
    by_fp32 = {t.point.fp32_name: t for t in report.tensors if t.point.kind == "weight"}
    for name, weight in expected.items():
        tensor = by_fp32[name]
        prefix = tensor.name[: -len("_dequantized")]
        scale = stored[f"{prefix}_scale"].reshape(-1, 1, 1, 1)
        dequantized = stored[f"{prefix}_quantized"].astype(np.float32) * scale
        assert tensor.metrics.snr_db == pytest.approx(_snr(weight, dequantized), rel=SNR_TOLERANCE)
    assert "folded with its BatchNorm" in by_fp32["w1"].point.match


def test_streaming_gives_the_same_figures_whatever_the_batch_and_memory(tmp_path: Path) -> None:
    data = model_builders.cnn_inputs(4, SAMPLES)
    fp32, npz, quantized = _quantized(
        tmp_path, model_builders.residual_cnn(), data, "int8", high_precision="fp32"
    )
    whole = build_report(fp32, quantized, npz, exact_layers=1)
    streamed = build_report(fp32, quantized, npz, batch_size=2, memory_mb=TINY_MEMORY_MB, exact_layers=1)
    assert whole.samples == streamed.samples == SAMPLES
    for a, b in zip(whole.tensors, streamed.tensors):
        assert a.name == b.name
        assert a.metrics.snr_db == pytest.approx(b.metrics.snr_db, rel=SNR_TOLERANCE)
        assert a.metrics.clipped == b.metrics.clipped
        assert a.metrics.counts is not None and b.metrics.counts is not None
        assert np.array_equal(a.metrics.counts, b.metrics.counts)
    assert whole.output_snr_db == pytest.approx(streamed.output_snr_db, rel=SNR_TOLERANCE)


def test_output_snr_and_exact_sensitivity_against_edited_graphs(tmp_path: Path) -> None:
    data = model_builders.cnn_inputs(5, SAMPLES)
    fp32, npz, quantized = _quantized(
        tmp_path, model_builders.residual_cnn(), data, "int8", high_precision="fp32"
    )
    report = build_report(fp32, quantized, npz, exact_layers=2)
    assert report.output_snr_db == pytest.approx(
        onnxq.compare(fp32, quantized, npz).min_snr_db, rel=SNR_TOLERANCE
    )
    measured = [x for x in report.layers if x.only_float_db is not None]
    assert len(measured) == 2
    worst_estimates = sorted(x.estimate_db for x in report.layers)[:2]
    assert sorted(x.estimate_db for x in measured) == worst_estimates
    # reference: the protobuf edited by hand, every input of that layer reading its float source
    report = build_report(fp32, quantized, npz, exact_layers=len(report.layers))
    layer = next(x for x in report.layers if not any("bn_folded" in t for t in x.tensors))
    assert layer.only_float_db is not None
    q_model = onnx.load(quantized)
    float_weights = {i.name: i for i in onnx.load(fp32).graph.initializer}
    producers = {o: n for n in q_model.graph.node for o in n.output}
    node = next(n for n in q_model.graph.node if n.name == layer.name)
    for index, name in enumerate(node.input):
        dq = producers.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producers.get(dq.input[0])
        if q is not None:
            node.input[index] = q.input[0]
        elif dq.input[0][: -len("_quantized")] in float_weights:  # not BN-folded: the FP32 weight as is
            q_model.graph.initializer.append(float_weights[dq.input[0][: -len("_quantized")]])
            node.input[index] = dq.input[0][: -len("_quantized")]
    expected = model_builders.run(onnx.load(fp32), data)[0]
    edited = model_builders.run(q_model, data)[0]
    assert layer.only_float_db == pytest.approx(_snr(expected, edited), rel=SNR_TOLERANCE)


@pytest.mark.parametrize("mode", ["fp8", "nvfp4"])
def test_transformer_fp8_and_nvfp4_report(tmp_path: Path, mode: str) -> None:
    data = model_builders.attention_inputs(6, SAMPLES, hidden=64)
    model = model_builders.masked_attention(hidden=64)
    options = {"quantize_lm_head": True} if mode == "nvfp4" else {}
    fp32, npz, quantized = _quantized(tmp_path, model, data, mode, **options)
    report = build_report(fp32, quantized, npz, batch_size=4, memory_mb=TINY_MEMORY_MB, exact_layers=2)
    assert all(t.point.fp32_name for t in report.tensors)
    assert math.isfinite(report.output_snr_db)
    gemm_weights = {"wq", "wk", "wv", "wo", "w_up", "w_down"}
    assert {t.point.fp32_name for t in report.tensors if t.point.kind == "weight"} == gemm_weights
    if mode == "nvfp4":
        assert any("emulate" in note for note in report.notes)
        assert {t.point.fmt for t in report.tensors if t.point.kind == "weight"} == {"float4e2m1"}
        _check_nvfp4_weights(report, quantized, model)
    for layer in report.layers:
        if layer.only_quantized_db is not None:
            # one layer quantized loses less than all of them
            assert layer.only_quantized_db > report.output_snr_db


def _check_nvfp4_weights(report: Report, quantized: Path, model: onnx.ModelProto) -> None:
    """Weight SNR against onnx.reference evaluating the deployable DQ chains."""
    from onnxq.reference_ops import reference_evaluator

    q_model = onnx.load(quantized)
    names = [t.name for t in report.tensors if t.point.kind == "weight"]
    known = {i.name for i in q_model.graph.initializer}
    chain_nodes = []
    for node in q_model.graph.node:  # DQs of constants, and DQs of those (the FP8 block scales)
        if node.op_type == "DequantizeLinear" and all(i in known for i in node.input if i):
            chain_nodes.append(node)
            known.update(node.output)
    outputs = [onnx.helper.make_empty_tensor_value_info(n) for n in names]
    graph = onnx.helper.make_graph(chain_nodes, "weights", [], outputs, list(q_model.graph.initializer))
    chain = onnx.helper.make_model(graph, opset_imports=q_model.opset_import, ir_version=q_model.ir_version)
    dequantized = dict(zip(names, reference_evaluator(chain).run(None, {})))
    fp32 = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for tensor in report.tensors:
        if tensor.point.kind == "weight":
            expected = _snr(fp32[tensor.point.fp32_name], dequantized[tensor.name])
            assert tensor.metrics.snr_db == pytest.approx(expected, rel=SNR_TOLERANCE)
