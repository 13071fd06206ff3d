"""``onnxq build``: one TensorRT engine from an ONNX model, checked against what onnxq placed.

Steps, each optional beyond the first:
1. build (``tensorrt_build.build_engine``: strongly typed for explicitly quantized models, the profile
   from ``--shapes``, timing cache, optimization level, workspace, compatibility, plugins);
2. engine check: each layer's precision from TensorRT's engine inspector against the Q/DQ of the
   model (``engine_check``): layers onnxq quantized that TensorRT ran in higher precision, Q/DQ left
   unfused, FP32 fallbacks;
3. ``--fp16-baseline``: the original (unquantized) model converted to FP16 (``onnxq convert``) and
   built too, so that ``--bench`` prints the quantized engine's latency as a ratio of FP16's;
4. ``--compare DATA``: the engine and the original model in ONNX Runtime on the same samples, SNR
   per output.

``--print-trtexec`` prints the equivalent trtexec command (what Windows and Jetson users run on the
target) and builds nothing, so it works without TensorRT. Everything that can be refused without
TensorRT (paths, options, shapes) is refused before TensorRT is imported.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxq.deploy.profiles import Profile, build_profile
from onnxq.deploy.tensorrt_build import (
    BuildOptions,
    BuildResult,
    build_engine,
    import_tensorrt,
    inspect_model,
)
from onnxq.errors import OnnxqError


@dataclass
class BuildRequest:
    model: Path
    engine: Path
    shapes: Sequence[str] = ()
    timing_cache: Path | None = None
    optimization_level: int | None = None
    workspace_mib: int | None = None
    hardware_compatible: bool = False
    version_compatible: bool = False
    plugins: Sequence[Path] = ()
    #: the unquantized model: built in FP16 for --fp16-baseline, run in ONNX Runtime for --compare
    original: Path | None = None
    fp16_baseline: bool = False
    bench: bool = False
    compare_data: Path | None = None
    check: bool = True


@dataclass
class BuildReport:
    build: BuildResult
    check_text: str = ""
    check_ok: bool = True
    baseline: BuildResult | None = None
    #: (quantized engine ms, FP16 baseline ms) medians
    timings: tuple[float, float | None] | None = None
    snr_db: dict[str, float] = field(default_factory=dict)


def build_options(request: BuildRequest) -> BuildOptions:
    """The build options for ``request`` (strong typing from the model: any Q/DQ makes it explicit)."""
    from onnxq.api import input_specs
    from onnxq.model_io import load_model

    profile: Profile = build_profile(input_specs(load_model(request.model)), request.shapes)
    traits = inspect_model(request.model)
    return BuildOptions(
        profile=profile,
        strongly_typed=traits.explicitly_quantized,
        weak_precisions=() if traits.explicitly_quantized else ("fp16",),
        timing_cache=request.timing_cache,
        builder_optimization_level=request.optimization_level,
        workspace_mib=request.workspace_mib,
        hardware_compatible=request.hardware_compatible,
        version_compatible=request.version_compatible,
        plugins=tuple(request.plugins),
    )


def check_request(request: BuildRequest) -> None:
    """One-line refusals for flag combinations, before anything is imported or built."""
    if not request.model.is_file():
        raise OnnxqError(f"model {request.model} does not exist", "pass the path of an .onnx file")
    needs_original = request.fp16_baseline or request.compare_data is not None
    if needs_original and request.original is None:
        raise OnnxqError(
            "--fp16-baseline and --compare need the unquantized model", "pass --original FP32.onnx"
        )
    if request.original is not None and not request.original.is_file():
        raise OnnxqError(f"--original {request.original} does not exist", "pass the FP32 .onnx file")
    if request.bench and not request.fp16_baseline:
        raise OnnxqError(
            "--bench times the engine against the FP16 baseline", "add --fp16-baseline --original FP32.onnx"
        )
    for plugin in request.plugins:
        if not plugin.is_file():
            raise OnnxqError(f"plugin library {plugin} does not exist", "pass the path of the built .so/.dll")


def run_build(request: BuildRequest) -> BuildReport:
    check_request(request)
    options = build_options(request)
    report = BuildReport(build_engine(request.model, request.engine, options))
    if request.check:
        report.check_text, report.check_ok = _engine_check(request, options)
    if request.fp16_baseline:
        assert request.original is not None
        report.baseline = _build_baseline(request, options)
    if request.bench:
        report.timings = _bench(request, report)
    if request.compare_data is not None:
        report.snr_db = _compare(request)
    return report


def _engine_check(request: BuildRequest, options: BuildOptions) -> tuple[str, bool]:
    from onnxq.deploy import engine_check
    from onnxq.model_io import load_model

    layers = engine_check.read_layers(inspect_engine(request.engine, options.plugins))
    model = load_model(request.model)
    quantized = engine_check.quantized_nodes_from_model(model)
    check = engine_check.check_engine(layers, quantized, engine_check.qdq_nodes_from_model(model))
    return engine_check.format_report(check), check.ok


def inspect_engine(engine: Path, plugins: Sequence[Path] = ()) -> str:
    """TensorRT's engine inspector, per layer, as JSON (the engine was built with detailed verbosity)."""
    from onnxq.deploy.tensorrt_build import load_plugins

    trt = import_tensorrt()
    load_plugins(tuple(plugins), trt, through_registry=False)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    deserialized = runtime.deserialize_cuda_engine(engine.read_bytes())
    if deserialized is None:
        raise OnnxqError(
            f"TensorRT could not load the engine {engine}", "rebuild it with this TensorRT version"
        )
    inspector = deserialized.create_engine_inspector()
    return str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def _build_baseline(request: BuildRequest, options: BuildOptions) -> BuildResult:
    """The original model converted to FP16 by onnxq, built strongly typed beside the engine."""
    from onnxq.convert import convert_file

    assert request.original is not None
    engine = request.engine.with_name(f"{request.engine.stem}.fp16-baseline{request.engine.suffix}")
    with tempfile.TemporaryDirectory(prefix=".onnxq-baseline-", dir=request.engine.parent) as folder:
        fp16 = Path(folder) / f"{request.original.stem}.fp16.onnx"
        convert_file(request.original, fp16, "fp16")
        baseline_options = BuildOptions(
            profile=options.profile, strongly_typed=True, timing_cache=options.timing_cache,
            builder_optimization_level=options.builder_optimization_level, workspace_mib=options.workspace_mib,
            hardware_compatible=options.hardware_compatible, version_compatible=options.version_compatible,
            plugins=options.plugins,
        )  # fmt: skip
        return build_engine(fp16, engine, baseline_options)


def _bench(request: BuildRequest, report: BuildReport) -> tuple[float, float | None]:
    from onnxq.deploy.trt_runtime import time_engine

    feed = _example_feed(request.model, report.build.profile)
    quantized = time_engine(request.engine, feed, plugins=request.plugins).median_ms
    baseline = None
    if report.baseline is not None:
        baseline = time_engine(report.baseline.engine_path, feed, plugins=request.plugins).median_ms
    return quantized, baseline


def _example_feed(model: Path, profile: Profile | None) -> dict[str, np.ndarray]:
    """Seeded random inputs at the profile's opt shapes (every input has a range, static ones too)."""
    from onnxq.api import input_specs
    from onnxq.model_io import load_model

    rng = np.random.default_rng(0)
    feed = {}
    for spec in input_specs(load_model(model)):
        assert profile is not None
        shape = tuple(profile[spec.name].opt)
        dtype = np.dtype(spec.dtype) if spec.dtype is not None else np.dtype(np.float32)
        if dtype.kind in "iu":
            feed[spec.name] = np.zeros(shape, dtype)
        else:
            feed[spec.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def _compare(request: BuildRequest) -> dict[str, float]:
    """SNR per output: the engine against the original model in ONNX Runtime, on the same samples."""
    from onnxq.api import input_specs
    from onnxq.comparison import OutputMetrics
    from onnxq.deploy.trt_runtime import EngineRunner, run_engine_on_data
    from onnxq.model_io import load_model
    from onnxq.runtime import make_session

    assert request.original is not None and request.compare_data is not None
    original = load_model(request.original)
    names = [v.name or "" for v in original.graph.outputs]
    session = make_session(original)
    metrics = {name: OutputMetrics() for name in names}
    with EngineRunner(request.engine, plugins=request.plugins) as runner:
        for feed, outputs in run_engine_on_data(runner, request.compare_data, input_specs(original)):
            expected = session.run(names, feed)
            for name, reference in zip(names, expected):
                metrics[name].add(np.asarray(reference), np.asarray(outputs[name], dtype=np.float32))
    return {name: (m.snr_db if m.elements else math.nan) for name, m in metrics.items()}
