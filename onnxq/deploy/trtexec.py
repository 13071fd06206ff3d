"""The trtexec command line equivalent to an ``onnxq build`` (what Jetson and Windows users run on the target).

``trtexec_command`` returns argv; ``format_command`` quotes it for a POSIX shell or for Windows
``cmd.exe``. Cases handled:

* ``--onnx``, ``--saveEngine``; ``--stronglyTyped`` for strongly typed builds, else ``--fp16``/``--bf16``
  (never both kinds); TensorRT 11 removed ``--fp16``/``--bf16`` (strong typing is always on), so for a
  target on 11 a weakly typed build is refused with the fix;
* ``--minShapes``/``--optShapes``/``--maxShapes`` for the dynamic inputs only (trtexec refuses shapes
  for static inputs); names holding ``:`` are wrapped in single quotes, trtexec's escape (trtexec
  cannot express names holding ``,``);
* ``--timingCacheFile``, ``--builderOptimizationLevel``, ``--memPoolSize=workspace:N`` (N in MiB, the
  unit trtexec assumes without a suffix), ``--hardwareCompatibilityLevel=ampere+``,
  ``--versionCompatible``;
* plugins: ``--staticPlugins=LIB`` (loaded with dlopen, like the Python build's ``ctypes``); for
  version-compatible engines ``--dynamicPlugins=LIB`` and ``--setPluginsToSerialize=LIB`` (the engine
  carries the library, like ``IBuilderConfig.plugins_to_serialize``);
* quoting: POSIX with ``shlex.quote``; Windows: an argument with whitespace, a double quote or one of
  cmd's operators ``& | < > ^`` is wrapped in double quotes with the C runtime's backslash rules
  (``subprocess.list2cmdline`` gives the same for arguments without operators). ``%`` cannot be
  escaped on cmd's interactive line and is left as it is.

Flag spellings are TensorRT's (checked with the docs):
* trtexec help text, TensorRT ``samples/common/sampleOptions.cpp`` (``BuildOptions::help``,
  ``SystemOptions::help``): ``--onnx=<file>``, ``--saveEngine=<file>``, ``--minShapes=spec``,
  ``--optShapes=spec``, ``--maxShapes=spec`` (spec ``name:1x3x256x256,...``, names may be wrapped in
  single quotes), ``--timingCacheFile=<file>``, ``--builderOptimizationLevel``,
  ``--hardwareCompatibilityLevel=mode`` (``none`` | ``ampere+``), ``--versionCompatible``,
  ``--memPoolSize=poolspec`` (``workspace:sizeInMiB``), ``--fp16``, ``--staticPlugins``,
  ``--dynamicPlugins``, ``--setPluginsToSerialize``;
* https://docs.nvidia.com/deeplearning/tensorrt/10.16.1/api/tensorrt-8x-to-10x-trtexec.html:
  ``--workspace`` became ``--memPoolSize=workspace:<size>``;
* https://docs.nvidia.com/deeplearning/tensorrt/11.4.1/api/migration/tensorrt-10x-to-11x-trtexec.html:
  TensorRT 11 removed ``--fp16``, ``--bf16``, ``--fp8``, ``--int8``, ``--best``; ``--stronglyTyped`` is
  always on (still accepted).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable, Sequence
from typing import Literal

from onnxq.deploy.profiles import Profile, Shape, ShapeRange, format_shape
from onnxq.deploy.tensorrt_build import TENSORRT_WITHOUT_PRECISION_FLAGS, BuildOptions
from onnxq.errors import OnnxqError

QuoteStyle = Literal["posix", "windows"]

DEFAULT_EXECUTABLE = "trtexec"
#: the TensorRT major version a printed command targets unless told (JetPack 6 ships TensorRT 10)
DEFAULT_TENSORRT_MAJOR = 10
HARDWARE_COMPATIBILITY_AMPERE_PLUS = "ampere+"
#: trtexec splits a shape entry on its last ':', so a name holding ':' goes in single quotes ('name')
_NAME_NEEDS_QUOTES = re.compile(r":")
#: arguments cmd.exe or the C runtime would split or interpret unless double-quoted
_WINDOWS_NEEDS_QUOTES = re.compile(r'[\s"&|<>^]')


def trtexec_command(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    options: BuildOptions,
    *,
    executable: str = DEFAULT_EXECUTABLE,
    tensorrt_major: int = DEFAULT_TENSORRT_MAJOR,
) -> list[str]:
    """argv of the trtexec run that builds the same engine as ``build_engine(onnx, engine, options)``."""
    argv = [executable, f"--onnx={_path(onnx_path)}", f"--saveEngine={_path(engine_path)}"]
    argv += _precision_flags(options, tensorrt_major)
    argv += _shape_flags(options.profile)
    if options.timing_cache is not None:
        argv.append(f"--timingCacheFile={_path(options.timing_cache)}")
    if options.builder_optimization_level is not None:
        argv.append(f"--builderOptimizationLevel={options.builder_optimization_level}")
    if options.workspace_mib is not None:
        argv.append(f"--memPoolSize=workspace:{options.workspace_mib}")
    if options.hardware_compatible:
        argv.append(f"--hardwareCompatibilityLevel={HARDWARE_COMPATIBILITY_AMPERE_PLUS}")
    if options.version_compatible:
        argv.append("--versionCompatible")
    argv += _plugin_flags(options)
    return argv


def _path(path: str | os.PathLike[str]) -> str:
    return os.fspath(path)


def _precision_flags(options: BuildOptions, tensorrt_major: int) -> list[str]:
    if options.strongly_typed:
        return ["--stronglyTyped"]
    if options.weak_precisions and tensorrt_major >= TENSORRT_WITHOUT_PRECISION_FLAGS:
        raise OnnxqError(
            f"trtexec of TensorRT {tensorrt_major} has no --{'/--'.join(options.weak_precisions)} "
            "(TensorRT 11 builds every network strongly typed)",
            f"convert the model with `onnxq convert --to {options.weak_precisions[0]}` and build it strongly typed",
        )
    return [f"--{precision}" for precision in options.weak_precisions]


def _shape_flags(profile: Profile | None) -> list[str]:
    if profile is None or not profile.needs_profile:
        return []
    ranges = profile.dynamic_ranges()
    return [
        f"--minShapes={_shape_spec(ranges, lambda r: r.min)}",
        f"--optShapes={_shape_spec(ranges, lambda r: r.opt)}",
        f"--maxShapes={_shape_spec(ranges, lambda r: r.max)}",
    ]


def _shape_spec(ranges: Sequence[ShapeRange], pick: Callable[[ShapeRange], Shape]) -> str:
    return ",".join(f"{_shape_name(r.name)}:{format_shape(pick(r))}" for r in ranges)


def _shape_name(name: str) -> str:
    """``input:0`` -> ``'input:0'`` (trtexec's escape); other names as they are."""
    return f"'{name}'" if _NAME_NEEDS_QUOTES.search(name) else name


def _plugin_flags(options: BuildOptions) -> list[str]:
    flags = []
    for plugin in options.plugins:
        if options.serializes_plugins:
            flags += [f"--dynamicPlugins={_path(plugin)}", f"--setPluginsToSerialize={_path(plugin)}"]
        else:
            flags.append(f"--staticPlugins={_path(plugin)}")
    return flags


# --- quoting --------------------------------------------------------------------------------------


def format_command(argv: Sequence[str], style: QuoteStyle | None = None) -> str:
    """One line a shell runs as ``argv``: POSIX shells or Windows ``cmd.exe`` (default: this OS's)."""
    if style is None:
        style = "windows" if os.name == "nt" else "posix"
    if style == "posix":
        return shlex.join(argv)
    if style == "windows":
        return " ".join(_windows_quote(argument) for argument in argv)
    raise ValueError(f"unknown quoting style {style!r}")


def _windows_quote(argument: str) -> str:
    """Quote one argument for cmd.exe and the Microsoft C runtime's argv parsing.

    Inside double quotes cmd's operators are literal; the C runtime reads ``\\"`` as a quote and
    2n backslashes before a quote as n backslashes, so backslashes are doubled only there.
    """
    if argument and not _WINDOWS_NEEDS_QUOTES.search(argument):
        return argument
    quoted = ['"']
    backslashes = 0
    for character in argument:
        if character == "\\":
            backslashes += 1
            continue
        if character == '"':
            quoted.append("\\" * (2 * backslashes + 1) + '"')
        else:
            quoted.append("\\" * backslashes + character)
        backslashes = 0
    quoted.append("\\" * (2 * backslashes) + '"')
    return "".join(quoted)


def trtexec_line(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    options: BuildOptions,
    *,
    style: QuoteStyle | None = None,
    executable: str = DEFAULT_EXECUTABLE,
    tensorrt_major: int = DEFAULT_TENSORRT_MAJOR,
) -> str:
    """``format_command(trtexec_command(...))``: what ``onnxq build --print-trtexec`` prints."""
    argv = trtexec_command(
        onnx_path, engine_path, options, executable=executable, tensorrt_major=tensorrt_major
    )
    return format_command(argv, style)
