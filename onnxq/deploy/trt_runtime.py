"""Run a TensorRT engine on samples and time it, through polygraphy's ``TrtRunner``.

TensorRT and polygraphy are imported inside functions only. Cases handled:

* samples from ``onnxq.calibration.data`` (``.npz``, folders, dicts, lists of feeds): opened against
  the model's input specs and cut into batches (``batch_size``: the profile's opt batch is a good
  choice); each batch is checked against the engine's profile first, so a batch outside it fails
  with one line naming the input and its allowed range instead of a TensorRT error;
* outputs come back as numpy arrays, one dict per batch, in the engine's output names;
* plugin libraries are loaded before the engine is deserialized (``ctypes``, or the plugin registry
  for libraries serialized into version-compatible engines);
* version-compatible engines embed host code (the lean runtime): running them needs
  ``allow_host_code=True`` (``IRuntime.engine_host_code_allowed``), which is off by default because
  such code runs in this process;
* timing: ``warmup`` runs first, then the median (and min/max) of ``runs`` host-side inference times
  as polygraphy measures them (``TrtRunner.last_inference_time``: input copy, execution, output copy).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from onnxq.calibration.data import CalibrationSource, InputSpec, open_calibration_data
from onnxq.deploy.profiles import Profile, format_shape
from onnxq.deploy.tensorrt_build import MIN_TENSORRT_VERSION, import_tensorrt, load_plugins
from onnxq.errors import OnnxqError

NDArray = npt.NDArray[Any]
Feed = Mapping[str, NDArray]
#: runs before timing starts (CUDA context, lazy kernel loading, clocks ramping up)
DEFAULT_WARMUP_RUNS = 10
#: timed runs whose median is reported
DEFAULT_TIMED_RUNS = 50
MS_PER_SECOND = 1000.0


@dataclass(frozen=True)
class Timing:
    """Host-side latency of one inference, in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    runs: int
    warmup: int


def summarize_times(seconds: Sequence[float], warmup: int) -> Timing:
    """The median/min/max in milliseconds of timed runs (warmup runs are not in ``seconds``)."""
    if not seconds:
        raise ValueError("no timed runs")
    milliseconds = [value * MS_PER_SECOND for value in seconds]
    return Timing(statistics.median(milliseconds), min(milliseconds), max(milliseconds), len(seconds), warmup)


def check_feed_in_profile(feed: Feed, profile: Profile) -> None:
    """Fail with one line when a batch does not fit the engine's shape ranges."""
    for name, array in feed.items():
        try:
            shape_range = profile[name]
        except KeyError:
            continue
        shape = tuple(int(dim) for dim in array.shape)
        fits = len(shape) == len(shape_range.min) and all(
            low <= dim <= high for dim, low, high in zip(shape, shape_range.min, shape_range.max)
        )
        if not fits:
            raise OnnxqError(
                f"input '{name}' has shape {format_shape(shape)}, outside the engine's profile "
                f"{format_shape(shape_range.min)} .. {format_shape(shape_range.max)}",
                "use a batch size within the profile or rebuild the engine with wider --shapes",
            )


class EngineRunner:
    """A deserialized engine ready to run: ``with EngineRunner(path) as runner: runner.infer(feed)``."""

    def __init__(
        self,
        engine_path: str | os.PathLike[str],
        *,
        plugins: Sequence[Path] = (),
        plugins_through_registry: bool = False,
        allow_host_code: bool = False,
        profile: Profile | None = None,
    ) -> None:
        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise OnnxqError(f"engine {self.engine_path} does not exist", "build it with `onnxq build`")
        self.plugins = tuple(Path(plugin) for plugin in plugins)
        self.plugins_through_registry = plugins_through_registry
        self.allow_host_code = allow_host_code
        self.profile = profile
        self._runner: Any = None
        self._plugin_handles: list[Any] = []

    def __enter__(self) -> EngineRunner:
        trt = import_tensorrt(MIN_TENSORRT_VERSION)
        try:
            from polygraphy.backend.trt import EngineFromPath, TrtRunner
        except ImportError as error:
            raise OnnxqError(f"polygraphy is not installed ({error})", "pip install polygraphy") from error
        self._plugin_handles = load_plugins(self.plugins, trt, through_registry=self.plugins_through_registry)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if self.allow_host_code:
            runtime.engine_host_code_allowed = True
        self._runner = TrtRunner(EngineFromPath(str(self.engine_path), runtime=runtime))
        self._runner.activate()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            self._runner.deactivate()
            self._runner = None

    def infer(self, feed: Feed) -> dict[str, NDArray]:
        """Outputs of one batch as numpy arrays (copied to the host)."""
        if self._runner is None:
            raise ValueError("use EngineRunner inside a `with` block")
        if self.profile is not None:
            check_feed_in_profile(feed, self.profile)
        outputs = self._runner.infer(feed_dict=dict(feed), copy_outputs_to_host=True)
        return {name: np.asarray(value) for name, value in outputs.items()}

    def last_inference_seconds(self) -> float:
        if self._runner is None:
            raise ValueError("use EngineRunner inside a `with` block")
        return float(self._runner.last_inference_time())

    def time(self, feed: Feed, runs: int = DEFAULT_TIMED_RUNS, warmup: int = DEFAULT_WARMUP_RUNS) -> Timing:
        """Median latency of ``runs`` inferences of ``feed`` after ``warmup`` untimed ones."""
        if runs < 1 or warmup < 0:
            raise ValueError(f"runs must be >= 1 and warmup >= 0, got {runs} and {warmup}")
        for _ in range(warmup):
            self.infer(feed)
        seconds = []
        for _ in range(runs):
            self.infer(feed)
            seconds.append(self.last_inference_seconds())
        return summarize_times(seconds, warmup)


def run_engine_on_data(
    runner: EngineRunner,
    source: CalibrationSource,
    specs: Sequence[InputSpec],
    *,
    batch_size: int | None = None,
    max_samples: int | None = None,
) -> Iterator[tuple[dict[str, NDArray], dict[str, NDArray]]]:
    """(feed, outputs) for every batch of ``source`` (opened as ``onnxq.calibration.data`` does)."""
    data = open_calibration_data(source, specs, batch_size=batch_size, max_samples=max_samples)
    for feed in data.batches():
        yield feed, runner.infer(feed)


def time_engine(
    engine_path: str | os.PathLike[str],
    feed: Feed,
    *,
    runs: int = DEFAULT_TIMED_RUNS,
    warmup: int = DEFAULT_WARMUP_RUNS,
    plugins: Sequence[Path] = (),
    allow_host_code: bool = False,
) -> Timing:
    """Open ``engine_path`` and time it on ``feed`` (see ``EngineRunner.time``)."""
    with EngineRunner(engine_path, plugins=plugins, allow_host_code=allow_host_code) as runner:
        return runner.time(feed, runs=runs, warmup=warmup)
