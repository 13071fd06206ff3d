"""AutoQuantize: the knapsack against brute force, the budget, monotone predictions, the verification
measurement, the mixed model's formats, stored bits, and the one-line refusals."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxq.comparison import compare
from onnxq.errors import OnnxqError
from onnxq.report.autoquant import (
    FLOAT_FORMAT,
    AutoResult,
    auto_quantize,
    auto_sweep,
    brute_force_knapsack,
    solve_knapsack,
)
from onnxq.report.points import find_points

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model_builders as mb

BUDGETS = (4.6, 6.0, 8.0, 12.0)
HIDDEN, SEQ, SAMPLES = 32, 16, 20
#: element type of the stored weight codes per format
CODE_TYPES = {"int8": "int8", "fp8": "float8e4m3fn", "nvfp4": "float4e2m1", "int4": "int4"}


@pytest.mark.parametrize("seed", range(20))
def test_knapsack_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    groups = int(rng.integers(1, 6))
    costs = [[int(c) for c in rng.integers(0, 9, int(rng.integers(1, 5)))] for _ in range(groups)]
    errors = [[float(e) for e in rng.exponential(1.0, len(group))] for group in costs]
    capacity = int(rng.integers(0, 9 * groups))
    found = solve_knapsack(costs, errors, capacity)
    reference = brute_force_knapsack(costs, errors, capacity)
    if reference is None:
        assert found is None
        return
    assert found is not None
    assert sum(costs[g][i] for g, i in enumerate(found)) <= capacity
    assert sum(errors[g][i] for g, i in enumerate(found)) == pytest.approx(reference[0], rel=1e-12)


def test_knapsack_larger_capacity_never_worse() -> None:
    rng = np.random.default_rng(7)
    costs = [[int(c) for c in rng.integers(1, 20, 4)] for _ in range(8)]
    errors = [[float(e) for e in rng.exponential(1.0, 4)] for _ in range(8)]
    totals = []
    for capacity in range(sum(min(c) for c in costs), sum(max(c) for c in costs) + 1):
        found = solve_knapsack(costs, errors, capacity)
        assert found is not None
        totals.append(sum(errors[g][i] for g, i in enumerate(found)))
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(totals))


@pytest.fixture(scope="module")
def attention() -> tuple[object, dict[str, np.ndarray], dict[str, np.ndarray]]:
    model = mb.masked_attention(seed=1, hidden=HIDDEN, seq=SEQ)
    return (
        model,
        mb.attention_inputs(2, SAMPLES, hidden=HIDDEN, seq=SEQ),
        mb.attention_inputs(3, 6, HIDDEN, SEQ),
    )


@pytest.fixture(scope="module")
def sweep(attention: tuple[object, dict[str, np.ndarray], dict[str, np.ndarray]]) -> list[AutoResult]:
    model, calib, held = attention
    return auto_sweep(
        model, calib, BUDGETS, formats=("fp8", "int8", "nvfp4", "int4", "fp16"),
        options={"target": "tensorrt"}, eval_data=held,
    )  # fmt: skip


def test_budget_respected(sweep: list[AutoResult]) -> None:
    for result in sweep:
        params = sum(layer.params for layer in result.layers)
        bits = sum(layer.params * layer.option(layer.chosen).bits for layer in result.layers) / params
        assert bits == pytest.approx(result.effective_bits)
        assert result.effective_bits <= result.budget_bits


def test_larger_budget_never_predicts_worse(sweep: list[AutoResult]) -> None:
    predicted = [r.predicted_snr_db for r in sweep]
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(predicted))
    assert predicted[-1] > predicted[0]


def test_verification_equals_compare(
    sweep: list[AutoResult], attention: tuple[object, dict[str, np.ndarray], dict[str, np.ndarray]]
) -> None:
    model, _, held = attention
    for result in sweep:
        assert result.measured_snr_db == pytest.approx(compare(model, result.result.model, held).min_snr_db)
        # the additive prediction is an estimate: within a few dB of the measurement here
        assert abs(result.predicted_snr_db - result.measured_snr_db) < 3.0


def test_mixed_model_holds_the_chosen_formats(sweep: list[AutoResult]) -> None:
    for result in sweep:
        weights = {
            reader: point.fmt
            for point in find_points(result.result.model)
            if point.kind == "weight"
            for reader, _ in point.readers
        }
        for layer in result.layers:
            expected = None if layer.chosen == FLOAT_FORMAT else CODE_TYPES[layer.chosen]
            assert weights.get(layer.name) == expected, (layer.name, layer.chosen)


def test_stored_bits_count_scales(sweep: list[AutoResult]) -> None:
    layer = next(x for x in sweep[0].layers if x.name and x.params == HIDDEN * HIDDEN)
    # NVFP4: 4-bit codes, one FP8 scale per 16, one global scale per tensor (float16 in a float16 rest)
    nvfp4 = layer.option("nvfp4").bits - 4 - 8 / 16
    assert nvfp4 in (pytest.approx(16 / layer.params), pytest.approx(32 / layer.params))
    # INT8 per channel: 8-bit codes, one scale (float16 or float32) and one stored zero point per channel
    int8 = layer.option("int8").bits - 8
    overheads = [(scale + zero) * HIDDEN / layer.params for scale in (16, 32) for zero in (0, 8)]
    assert int8 in [pytest.approx(x) for x in overheads]


def test_mixed_formats_splice(attention: tuple[object, dict[str, np.ndarray], dict[str, np.ndarray]]) -> None:
    """Three quantized formats at once, a float32 rest: the model runs and every layer holds its format."""
    model, calib, held = attention
    result = auto_quantize(
        model, calib, effective_bits=6.5, formats=("nvfp4", "int8", "fp8"),
        options={"target": "tensorrt", "high_precision": "fp32"}, eval_data=held,
    )  # fmt: skip
    assert math.isfinite(result.measured_snr_db)
    assert FLOAT_FORMAT not in result.counts()
    assert result.effective_bits <= 6.5


def test_budget_below_smallest_format(
    attention: tuple[object, dict[str, np.ndarray], dict[str, np.ndarray]], tmp_path: Path
) -> None:
    model, calib, held = attention
    output = tmp_path / "auto.onnx"
    with pytest.raises(OnnxqError) as error:
        auto_quantize(
            model, calib, effective_bits=4.0, formats=("int8", "nvfp4"), options={"target": "tensorrt"},
            eval_data=held, output_path=output,
        )  # fmt: skip
    assert "below the smallest" in str(error.value) and "\n" not in str(error.value)
    assert not output.exists()


@pytest.mark.parametrize("budget", [0, -3, math.nan, "6", True])
def test_budget_not_a_number(
    budget: object, attention: tuple[object, dict[str, np.ndarray], dict[str, np.ndarray]]
) -> None:
    model, calib, _ = attention
    with pytest.raises(OnnxqError, match="not a positive number"):
        auto_quantize(model, calib, effective_bits=budget, options={"target": "tensorrt"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("formats", "target", "message"),
    [(("int8", "int9"), "tensorrt", "not a format"), (("int8", "int8"), "tensorrt", "distinct"),
     (("nvfp4", "int8"), "ort", "TensorRT format"), (("int4", "int8"), "ort", "MatMulNBits")],
)  # fmt: skip
def test_bad_formats(
    formats: tuple[str, ...], target: str, message: str,
    attention: tuple[object, dict[str, np.ndarray], dict[str, np.ndarray]],
) -> None:  # fmt: skip
    model, calib, _ = attention
    with pytest.raises(OnnxqError, match=message):
        auto_quantize(model, calib, effective_bits=6, formats=formats, options={"target": target})


def test_cli_glue_writes_the_verified_model(
    attention: tuple[object, dict[str, np.ndarray], dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """``--auto``/``--auto-formats`` parsed by the glue's arguments; the written model measures what was
    reported, and the CLI's summary and plan printers take the result."""
    import argparse

    import onnx

    from onnxq import cli
    from onnxq.report.autoquant import run_cli
    from onnxq.report.cli_auto import add_cli_arguments

    model, calib, held = attention
    source, calib_path, held_path = tmp_path / "m.onnx", tmp_path / "calib.npz", tmp_path / "held.npz"
    onnx.save(model, source)  # type: ignore[arg-type]
    np.savez(calib_path, **calib)
    np.savez(held_path, **held)
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args(["--auto", "7", "--auto-formats", "int8,int4,fp16"])
    args.model, args.calib, args.eval_data, args.min_snr = str(source), str(calib_path), str(held_path), None
    output = tmp_path / "auto.onnx"
    auto = run_cli(args, {"target": "tensorrt"}, output)
    assert auto.effective_bits <= 7
    assert compare(str(source), str(output), str(held_path)).min_snr_db == pytest.approx(auto.measured_snr_db)
    cli.print_plan(auto.result)
    cli.print_summary(auto.result, source, output, 1.0)
    assert auto.result.insertion.weights == sum(1 for x in auto.layers if x.chosen != FLOAT_FORMAT)
