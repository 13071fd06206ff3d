"""A sandbox for fuzzing: onnxq runs in a spawned worker process, so a hang or a crash of native code
(ONNX Runtime, protobuf) is a finding that names the case, never a stuck or dead test run.

The parent sends (function name, arguments) over a pipe; the worker answers (verdict, detail). A worker
that does not answer within the time limit is killed and replaced (verdict ``hang``); one that dies is
replaced (verdict ``died``). Verdicts from the case functions:
  ``ok``       onnxq wrote a model that passes the full checker and runs in ONNX Runtime,
  ``refused``  onnxq raised OnnxqError / the CLI exited 2 with one ``onnxq: error:`` line, nothing written
               (``quantize_case`` takes valid models: there an error that asks to be reported is ``bad``),
  ``bad``      anything else: another exception, a traceback, an invalid output, litter, NaN outputs.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import tempfile
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

Verdict = tuple[str, str]


class Sandbox:
    """One spawned worker, reused across cases (onnxq is imported once), restarted after a hang/crash."""

    def __init__(self) -> None:
        self._process: Any = None
        self._conn: Connection | None = None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # no fork: the parent may hold ORT threads
        parent, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child,), daemon=True)
        self._process.start()
        child.close()
        self._conn = parent

    def call(self, function: str, *args: Any, timeout: float = 60.0) -> Verdict:
        if self._process is None or not self._process.is_alive():
            self._start()
        assert self._conn is not None
        self._conn.send((function, args))
        if not self._conn.poll(timeout):
            self.close()
            return "hang", f"no answer in {timeout:.0f} s"
        try:
            verdict: Verdict = self._conn.recv()
        except (EOFError, OSError):  # the worker died mid-case (a native crash)
            self._process.join(5)
            code = self._process.exitcode
            self.close()
            return "died", f"worker died (exit code {code})"
        return verdict

    def close(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._process = None
        if self._conn is not None:
            self._conn.close()
        self._conn = None


def _serve(conn: Connection) -> None:
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cases = {"quantize_case": quantize_case, "cli_case": cli_case}
    while True:
        try:
            function, args = conn.recv()
        except EOFError:
            return
        try:
            verdict = cases[function](*args)
        except BaseException:  # a bug in the case code itself: report, keep serving
            verdict = ("bad", "fuzz worker: " + traceback.format_exc())
        conn.send(verdict)


# ------------------------------------------------------------------------------------ worker side


def _session(path: Path, fp8: bool) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    if fp8:  # ORT's extended fusions miscompute FP8 Q/DQ -> Conv (README: known platform behaviour)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_written(model: Path, output: Path, feed: dict[str, np.ndarray] | None, fp8: bool) -> Verdict:
    """An output onnxq wrote: full checker, ORT load, and (with a feed) finite where FP32 is finite."""
    import onnx

    try:
        onnx.checker.check_model(str(output), full_check=True)
    except Exception as error:
        return "bad", f"written model fails the checker: {error}"
    try:
        quantized = _session(output, fp8)
    except Exception as error:
        return "bad", f"written model does not load in ONNX Runtime: {error}"
    if feed is None:
        return "ok", ""
    try:
        got = quantized.run(None, feed)
    except Exception as error:
        return "bad", f"written model fails to run in ONNX Runtime: {error}"
    want = _session(model, False).run(None, feed)
    for index, (w, g) in enumerate(zip(want, got)):
        if np.any(np.isfinite(w) & ~np.isfinite(np.asarray(g, dtype=np.float64))):
            return "bad", f"output {index} is NaN/inf where the FP32 model's is finite"
    return "ok", ""


def quantize_case(model_bytes: bytes, feeds: list[dict[str, np.ndarray]], mode: str, target: str) -> Verdict:
    """``onnxq.quantize`` on a model (bytes) with a list of feeds as calibration data."""
    import onnxq
    from onnxq.errors import OnnxqError

    with tempfile.TemporaryDirectory(prefix="onnxq-fuzz-") as work:
        model, output = Path(work) / "model.onnx", Path(work) / "out" / "q.onnx"
        model.write_bytes(model_bytes)
        output.parent.mkdir()
        try:
            onnxq.quantize(str(model), mode=mode, calibration_data=feeds, output_path=output, target=target)
        except OnnxqError as error:
            litter = sorted(p.name for p in output.parent.iterdir())
            if litter:
                return "bad", f"refused ({error}) but left {litter}"
            if "report it" in str(error):  # onnxq's check of its own output failed: a valid input, a bug
                return "bad", f"onnxq refused its own output: {error}"
            return "refused", str(error)
        except Exception:
            return "bad", traceback.format_exc()
        if model.read_bytes() != model_bytes:
            return "bad", "the input model was modified"
        return check_written(model, output, feeds[0], mode == "fp8")


def cli_case(model: str, calib: str, output: str, mode: str, target: str) -> Verdict:
    """``onnxq quantize`` through ``onnxq.cli.main`` in-process, stdout/stderr captured."""
    from onnxq.cli import main

    err, out = io.StringIO(), io.StringIO()
    argv = ["quantize", model, "--mode", mode, "--target", target, "--calib", calib, "-o", output]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 2
    except Exception:
        return "bad", f"exception out of the CLI:\n{traceback.format_exc()}"
    stderr = err.getvalue()
    # only "\n" ends a line on a terminal or in a log (str.splitlines also splits on \x1c-\x1e, \x85)
    lines = [line for line in stderr.split("\n") if line.strip()]
    if "Traceback" in stderr:
        return "bad", f"traceback on stderr:\n{stderr}"
    written = Path(output)
    litter = sorted(p.name for p in written.parent.iterdir() if p != written)
    if litter:
        return "bad", f"exit {code} left {litter} beside the output"
    if code == 0:
        if not written.is_file():
            return "bad", "exit 0 without an output file"
        return check_written(Path(model), written, None, mode == "fp8")
    # warnings may come first; the error itself is the last line, and one line
    if code != 2 or not lines or not lines[-1].startswith("onnxq: error:"):
        return "bad", f"exit {code} without a closing 'onnxq: error:' line: {stderr!r}"
    if written.exists():
        return "bad", f"exit {code} but a file is at the output path ({lines[-1]})"
    return "refused", lines[-1]
