"""Build a TensorRT engine from an ONNX model through TensorRT's Python API and polygraphy's loaders.

TensorRT and polygraphy are imported inside functions only: onnxq works without them, and
``onnxq build`` without TensorRT fails with one line before anything is written. Cases handled:

* TensorRT missing (``import tensorrt`` fails, e.g. the bindings without ``libnvonnxparser``) or older
  than the model needs: ``OnnxqError`` naming the version and how to install it. Any TensorRT 10
  builds INT8/FP8/INT4 Q/DQ models strongly typed; FP4 (``FLOAT4E2M1`` tensors,
  ``TRT_FP4DynamicQuantize``) needs 10.8;
* strongly typed networks (``NetworkFromOnnxPath(strongly_typed=True)``) for explicitly quantized
  models: precisions come from the model, so ``--fp16``/``--bf16`` are refused with it. Weakly typed
  builds with FP16/BF16 exist on TensorRT 10 only (TensorRT 11 removed the precision flags; there the
  model is converted to FP16 first, e.g. with ``onnxq convert --to fp16``);
* an optimization profile for the dynamic inputs (``onnxq.deploy.profiles``); static models need none;
* timing cache file (read when it exists, written back after the build), builder optimization level,
  workspace limit, hardware compatibility (Ampere+), version compatibility;
* plugin libraries loaded before parsing: with ``ctypes`` (what trtexec's ``--staticPlugins`` does),
  or for version-compatible engines through ``trt.get_plugin_registry().load_library`` and serialized
  into the engine (``IBuilderConfig.plugins_to_serialize``, trtexec's ``--dynamicPlugins`` plus
  ``--setPluginsToSerialize``), since an engine that moves to another TensorRT must carry them;
* the engine is written atomically: the bytes go to a temporary file beside the output, then are
  renamed over it; a failed build or write leaves no partial file and keeps an existing engine;
* TensorRT/polygraphy build failures (parser errors, no tactic) become one ``OnnxqError`` line.

Written against TensorRT 10/11's documented Python API and polygraphy 0.49+ (``CreateConfig``'s
``profiles``, ``load_timing_cache``, ``builder_optimization_level``, ``memory_pool_limits``,
``hardware_compatibility_level``, ``version_compatible``; ``EngineBytesFromNetwork``'s
``save_timing_cache``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from onnxq.deploy.profiles import Profile
from onnxq.errors import OnnxqError

#: strongly typed networks with INT8/FP8/INT4 Q/DQ need TensorRT 10
MIN_TENSORRT_VERSION = (10, 0)
#: FP4 (FLOAT4E2M1 weights, TRT_FP4DynamicQuantize) arrived in TensorRT 10.8
MIN_TENSORRT_VERSION_FP4 = (10, 8)
#: TensorRT 11 removed the weak-typing precision flags (BuilderFlag.FP16/BF16, trtexec --fp16/--bf16)
TENSORRT_WITHOUT_PRECISION_FLAGS = 11
#: precisions a weakly typed build may enable (TensorRT 10 only)
WEAK_PRECISIONS = ("fp16", "bf16")
#: TensorRT's builder optimization levels
OPTIMIZATION_LEVELS = range(0, 6)
MIB = 1 << 20

#: TensorRT's dynamic FP4 activation quantizer (domain ``trt``), as onnxq writes NVFP4 activations
FP4_OP = "TRT_FP4DynamicQuantize"
#: ONNX ops that make a model explicitly quantized
QUANTIZE_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", FP4_OP})

_INSTALL_FIX = (
    "install TensorRT {version} or newer: `pip install tensorrt` on x86-64 Linux or Windows (wheels come from "
    "NVIDIA's index, https://pypi.nvidia.com), the TensorRT that JetPack ships on Jetson; or print the command "
    "with --print-trtexec and build on the target"
)


@dataclass(frozen=True)
class BuildOptions:
    """How to build an engine; each field maps to one ``onnxq build`` flag and one trtexec flag.

    ``profile``: shape ranges (``--shapes``); None or a profile without dynamic inputs means none.
    ``strongly_typed``: precisions from the model (explicitly quantized models); ``weak_precisions``
    (``fp16``, ``bf16``) only without it. ``workspace_mib``: workspace pool limit in MiB.
    ``hardware_compatible``: runs on Ampere and newer GPUs; ``version_compatible``: runs on later
    TensorRT versions. ``plugins``: plugin libraries (``.so``/``.dll``).
    """

    profile: Profile | None = None
    strongly_typed: bool = True
    weak_precisions: tuple[str, ...] = ()
    timing_cache: Path | None = None
    builder_optimization_level: int | None = None
    workspace_mib: int | None = None
    hardware_compatible: bool = False
    version_compatible: bool = False
    plugins: tuple[Path, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        unknown = [p for p in self.weak_precisions if p not in WEAK_PRECISIONS]
        if unknown:
            raise OnnxqError(f"unknown precision {unknown[0]!r}", f"use one of {', '.join(WEAK_PRECISIONS)}")
        if self.strongly_typed and self.weak_precisions:
            flags = " ".join(f"--{p}" for p in self.weak_precisions)
            raise OnnxqError(
                f"{flags} needs a weakly typed build, but a strongly typed network takes its precisions "
                "from the model",
                f"drop {flags}, or convert the model first with `onnxq convert --to {self.weak_precisions[0]}`",
            )
        level = self.builder_optimization_level
        if level is not None and level not in OPTIMIZATION_LEVELS:
            raise OnnxqError(
                f"builder optimization level {level} is out of range",
                f"use {OPTIMIZATION_LEVELS.start} to {OPTIMIZATION_LEVELS.stop - 1} (TensorRT's default is 3)",
            )
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise OnnxqError(f"workspace limit {self.workspace_mib} MiB is too small", "give 1 MiB or more")

    @property
    def serializes_plugins(self) -> bool:
        """Version-compatible engines carry their plugin libraries (the target's TensorRT may differ)."""
        return self.version_compatible and bool(self.plugins)


@dataclass(frozen=True)
class ModelTraits:
    """What the ONNX file says about the TensorRT it needs."""

    explicitly_quantized: bool
    uses_fp4: bool

    @property
    def min_tensorrt(self) -> tuple[int, int]:
        return MIN_TENSORRT_VERSION_FP4 if self.uses_fp4 else MIN_TENSORRT_VERSION


@dataclass(frozen=True)
class BuildResult:
    engine_path: Path
    engine_bytes: int
    build_seconds: float
    tensorrt_version: str
    strongly_typed: bool
    profile: Profile | None


#: builds the serialized engine: (onnx path, options, tensorrt module) -> engine bytes
EngineBytesBuilder = Callable[[Path, BuildOptions, ModuleType], bytes]


# --- TensorRT availability ------------------------------------------------------------------------


def parse_version(text: str) -> tuple[int, int]:
    """``10.8.0.43`` -> ``(10, 8)``; ValueError when the string does not start with two numbers."""
    match = re.match(r"^\s*(\d+)\.(\d+)", text)
    if not match:
        raise ValueError(f"not a version: {text!r}")
    return int(match.group(1)), int(match.group(2))


def _dotted(version: tuple[int, int]) -> str:
    return ".".join(str(part) for part in version)


def import_tensorrt(minimum: tuple[int, int] = MIN_TENSORRT_VERSION) -> ModuleType:
    """The ``tensorrt`` module, or one-line ``OnnxqError`` when it is missing or older than ``minimum``."""
    fix = _INSTALL_FIX.format(version=_dotted(minimum))
    try:
        import tensorrt
    except Exception as error:  # ImportError, or OSError from a missing libnvinfer/libnvonnxparser
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise OnnxqError(f"TensorRT is not available (import tensorrt failed: {reason})", fix) from error
    version_text = str(getattr(tensorrt, "__version__", "0.0"))
    try:
        version = parse_version(version_text)
    except ValueError:
        version = (0, 0)
    if version < minimum:
        raise OnnxqError(f"TensorRT {version_text} is too old: this model needs {_dotted(minimum)}", fix)
    return tensorrt


def _import_polygraphy_trt() -> Any:
    try:
        from polygraphy.backend import trt as polygraphy_trt
    except ImportError as error:
        raise OnnxqError(f"polygraphy is not installed ({error})", "pip install polygraphy") from error
    return polygraphy_trt


# --- the model ------------------------------------------------------------------------------------


def inspect_model(onnx_path: Path) -> ModelTraits:
    """Whether the model holds Q/DQ (explicit quantization) and FP4 tensors; weights are not read."""
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as error:  # OSError, or protobuf's DecodeError for a file that is not ONNX
        raise OnnxqError(f"cannot read {onnx_path}: {error}", "pass an ONNX model file") from error
    graphs = [model.graph, *model.functions]
    ops = {node.op_type for graph in graphs for node in graph.node}
    fp4 = onnx.TensorProto.FLOAT4E2M1
    fp4_tensor = any(t.data_type == fp4 for t in model.graph.initializer) or any(
        attr.t.data_type == fp4
        for graph in graphs
        for node in graph.node
        for attr in node.attribute
        if attr.type == onnx.AttributeProto.TENSOR
    )
    return ModelTraits(explicitly_quantized=bool(ops & QUANTIZE_OPS), uses_fp4=fp4_tensor or FP4_OP in ops)


# --- building -------------------------------------------------------------------------------------


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    options: BuildOptions,
    *,
    engine_bytes_builder: EngineBytesBuilder | None = None,
) -> BuildResult:
    """Build ``onnx_path`` into a TensorRT engine at ``engine_path`` (written atomically).

    Everything that can fail without TensorRT (paths, options, TensorRT's presence and version) is
    checked before the build; ``engine_bytes_builder`` replaces the polygraphy build (tests).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    _check_paths(onnx_path, engine_path, options)
    traits = inspect_model(onnx_path)
    trt = import_tensorrt(traits.min_tensorrt)
    _check_against_tensorrt(options, trt)
    builder = engine_bytes_builder or polygraphy_engine_bytes
    started = time.perf_counter()
    engine = builder(onnx_path, options, trt)
    seconds = time.perf_counter() - started
    write_atomically(engine_path, engine)
    return BuildResult(
        engine_path=engine_path,
        engine_bytes=len(engine),
        build_seconds=seconds,
        tensorrt_version=str(getattr(trt, "__version__", "unknown")),
        strongly_typed=options.strongly_typed,
        profile=options.profile,
    )


def _check_paths(onnx_path: Path, engine_path: Path, options: BuildOptions) -> None:
    if not onnx_path.is_file():
        raise OnnxqError(f"model {onnx_path} does not exist", "pass the path of an ONNX file")
    if engine_path.is_dir():
        raise OnnxqError(
            f"output path {engine_path} is a directory",
            f"pass a file path, e.g. {engine_path / 'model.engine'}",
        )
    if engine_path.exists() and engine_path.resolve() == onnx_path.resolve():
        raise OnnxqError(f"output path {engine_path} is the input model", "choose another -o path")
    folder = engine_path.parent
    if not folder.is_dir():
        raise OnnxqError(f"output directory {folder} does not exist", "create it or choose another -o path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OnnxqError(f"output directory {folder} is not writable", "choose another -o path")
    for plugin in options.plugins:
        if not plugin.is_file():
            raise OnnxqError(f"plugin library {plugin} does not exist", "pass the path of a .so or .dll file")
    if options.timing_cache is not None and options.timing_cache.is_dir():
        raise OnnxqError(f"timing cache {options.timing_cache} is a directory", "pass a file path")


def _check_against_tensorrt(options: BuildOptions, trt: ModuleType) -> None:
    major = parse_version(str(getattr(trt, "__version__", "0.0")))[0]
    if options.weak_precisions and major >= TENSORRT_WITHOUT_PRECISION_FLAGS:
        raise OnnxqError(
            f"TensorRT {trt.__version__} has no weakly typed {'/'.join(options.weak_precisions)} builds "
            "(TensorRT 11 removed the precision flags)",
            f"convert the model with `onnxq convert --to {options.weak_precisions[0]}` and build it strongly typed",
        )


def polygraphy_engine_bytes(onnx_path: Path, options: BuildOptions, trt: ModuleType) -> bytes:
    """The serialized engine, built by polygraphy's loaders (network, config, build)."""
    polygraphy_trt = _import_polygraphy_trt()
    from polygraphy.exception import PolygraphyException

    load_plugins(options.plugins, trt, through_registry=options.serializes_plugins)
    network = polygraphy_trt.NetworkFromOnnxPath(str(onnx_path), strongly_typed=options.strongly_typed)
    create_config = polygraphy_trt.CreateConfig(**config_arguments(options, trt, polygraphy_trt.Profile))

    def make_config(builder: Any, network: Any) -> Any:
        config = create_config(builder, network)
        if options.serializes_plugins:
            config.plugins_to_serialize = [str(plugin) for plugin in options.plugins]
        return config

    timing_cache = str(options.timing_cache) if options.timing_cache is not None else None
    build = polygraphy_trt.EngineBytesFromNetwork(network, config=make_config, save_timing_cache=timing_cache)
    try:
        serialized = build()
    except PolygraphyException as error:
        raise OnnxqError(
            f"TensorRT could not build {onnx_path.name}: {_first_line(error)}",
            "read TensorRT's messages above; for unsupported ops check the plugin libraries (--plugins)",
        ) from error
    return bytes(memoryview(serialized))


def config_arguments(options: BuildOptions, trt: ModuleType, profile_type: Any) -> dict[str, Any]:
    """Keyword arguments of polygraphy's ``CreateConfig`` for ``options``."""
    arguments: dict[str, Any] = {
        # trtexec enables TF32 by default while polygraphy clears it: keep the two builds alike.
        "tf32": hasattr(trt.BuilderFlag, "TF32"),
        "fp16": "fp16" in options.weak_precisions,
        "bf16": "bf16" in options.weak_precisions,
    }
    # the engine check reads each layer's precision from the inspector, which needs detailed verbosity
    if hasattr(trt, "ProfilingVerbosity"):
        arguments["profiling_verbosity"] = trt.ProfilingVerbosity.DETAILED
    if options.profile is not None and options.profile.needs_profile:
        profile = profile_type()
        for shape_range in options.profile.dynamic_ranges():
            profile.add(shape_range.name, min=shape_range.min, opt=shape_range.opt, max=shape_range.max)
        arguments["profiles"] = [profile]
    if options.timing_cache is not None and options.timing_cache.is_file():
        arguments["load_timing_cache"] = str(options.timing_cache)
    if options.builder_optimization_level is not None:
        arguments["builder_optimization_level"] = options.builder_optimization_level
    if options.workspace_mib is not None:
        arguments["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: options.workspace_mib * MIB}
    if options.hardware_compatible:
        arguments["hardware_compatibility_level"] = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if options.version_compatible:
        arguments["version_compatible"] = True
    return arguments


def load_plugins(plugins: tuple[Path, ...], trt: ModuleType, *, through_registry: bool) -> list[Any]:
    """Load plugin libraries before the ONNX parser (or the runtime) needs their ops.

    ``through_registry``: ``trt.get_plugin_registry().load_library`` (libraries that export TensorRT's
    plugin-library entry points, needed to serialize them into the engine); otherwise ``ctypes``,
    which runs the library's static plugin registrations. Returns the handles (keep them alive).
    """
    handles = []
    for plugin in plugins:
        try:
            if through_registry:
                handles.append(trt.get_plugin_registry().load_library(str(plugin)))
            else:
                handles.append(ctypes.CDLL(str(plugin)))
        except (OSError, RuntimeError, TypeError) as error:
            raise OnnxqError(
                f"cannot load plugin library {plugin}: {_first_line(error)}",
                "build the plugin for this TensorRT and platform",
            ) from error
    return handles


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --- writing --------------------------------------------------------------------------------------


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it and a rename.

    A failure at any point removes the temporary file and leaves an existing ``path`` as it was.
    """
    folder = path.parent
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as error:
        raise OnnxqError(
            f"cannot write in {folder}: {error.strerror or error}", "choose another -o path"
        ) from error
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        _remove_quietly(temporary)
        raise OnnxqError(f"cannot write {path}: {error.strerror or error}", "check free space") from error
    except BaseException:
        _remove_quietly(temporary)
        raise


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
