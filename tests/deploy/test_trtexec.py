"""The printed trtexec command: flags for several option sets, and quoting for POSIX and Windows cmd."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path, PureWindowsPath

import numpy as np
import pytest

from onnxq.calibration.data import InputSpec
from onnxq.deploy.profiles import build_profile
from onnxq.deploy.tensorrt_build import BuildOptions
from onnxq.deploy.trtexec import format_command, trtexec_command, trtexec_line
from onnxq.errors import OnnxqError

IMAGE = InputSpec("images", np.dtype(np.float32), ("batch", 3, 224, 224))
STATIC = InputSpec("scale", np.dtype(np.float32), (1, 3))


def _windows_argv(line: str) -> list[str]:
    """Reference parser: the Microsoft C runtime's documented argv rules (CommandLineToArgvW, 2008+).

    Backslashes are literal unless they precede a quote: 2n backslashes + quote -> n backslashes and
    a quote toggle; 2n+1 backslashes + quote -> n backslashes and a literal quote. Whitespace outside
    quotes separates arguments.
    """
    args: list[str] = []
    current: list[str] = []
    in_quotes = False
    has_arg = False
    i = 0
    while i < len(line):
        char = line[i]
        if char == "\\":
            run = len(line[i:]) - len(line[i:].lstrip("\\"))
            if i + run < len(line) and line[i + run] == '"':
                current.append("\\" * (run // 2))
                if run % 2:
                    current.append('"')
                    i += run + 1
                else:
                    i += run
                has_arg = True
                continue
            current.append("\\" * run)
            i += run
            has_arg = True
            continue
        if char == '"':
            in_quotes = not in_quotes
            has_arg = True
        elif char in " \t" and not in_quotes:
            if has_arg:
                args.append("".join(current))
                current, has_arg = [], False
        else:
            current.append(char)
            has_arg = True
        i += 1
    if has_arg:
        args.append("".join(current))
    return args


def test_strongly_typed_static_model() -> None:
    argv = trtexec_command("model.onnx", "model.engine", BuildOptions(profile=build_profile([STATIC])))
    assert argv == ["trtexec", "--onnx=model.onnx", "--saveEngine=model.engine", "--stronglyTyped"]


def test_every_option() -> None:
    profile = build_profile([IMAGE, STATIC], ["images:1x3x224x224,8x3x224x224,32x3x224x224"])
    options = BuildOptions(
        profile=profile,
        timing_cache=Path("cache/timing.cache"),
        builder_optimization_level=5,
        workspace_mib=2048,
        hardware_compatible=True,
        plugins=(Path("libs/libmyplugin.so"),),
    )
    argv = trtexec_command("m.onnx", "m.engine", options, executable="/usr/src/tensorrt/bin/trtexec")
    assert argv == [
        "/usr/src/tensorrt/bin/trtexec",
        "--onnx=m.onnx",
        "--saveEngine=m.engine",
        "--stronglyTyped",
        "--minShapes=images:1x3x224x224",
        "--optShapes=images:8x3x224x224",
        "--maxShapes=images:32x3x224x224",
        f"--timingCacheFile={Path('cache/timing.cache')}",
        "--builderOptimizationLevel=5",
        "--memPoolSize=workspace:2048",
        "--hardwareCompatibilityLevel=ampere+",
        f"--staticPlugins={Path('libs/libmyplugin.so')}",
    ]


def test_version_compatible_engine_serializes_its_plugins() -> None:
    plugin = Path("libmyplugin.so")
    argv = trtexec_command("m.onnx", "m.engine", BuildOptions(version_compatible=True, plugins=(plugin,)))
    assert "--versionCompatible" in argv
    assert argv[-2:] == [f"--dynamicPlugins={plugin}", f"--setPluginsToSerialize={plugin}"]
    assert not any(arg.startswith("--staticPlugins") for arg in argv)


def test_weakly_typed_fp16_baseline() -> None:
    argv = trtexec_command(
        "fp32.onnx", "fp16.engine", BuildOptions(strongly_typed=False, weak_precisions=("fp16",))
    )
    assert "--fp16" in argv and "--stronglyTyped" not in argv


def test_weak_precisions_refused_for_tensorrt_11() -> None:
    options = BuildOptions(strongly_typed=False, weak_precisions=("bf16",))
    with pytest.raises(OnnxqError, match="onnxq convert --to bf16"):
        trtexec_command("m.onnx", "m.engine", options, tensorrt_major=11)


def test_multi_input_shapes_and_quoted_names() -> None:
    ids = InputSpec("input_ids:0", np.dtype(np.int64), ("batch", "sequence"))
    mask = InputSpec("attention_mask", np.dtype(np.int64), ("batch", "sequence"))
    profile = build_profile([ids, mask], ["input_ids:0:1x8,4x128,8x512", "attention_mask:1x8,4x128,8x512"])
    argv = trtexec_command("m.onnx", "m.engine", BuildOptions(profile=profile))
    assert "--optShapes='input_ids:0':4x128,attention_mask:4x128" in argv


def test_posix_quoting_round_trips_paths_with_spaces() -> None:
    options = BuildOptions(timing_cache=Path("/tmp/my caches/t.cache"))
    argv = trtexec_command("/data/my models/m.onnx", "/data/out dir/m.engine", options)
    line = trtexec_line("/data/my models/m.onnx", "/data/out dir/m.engine", options, style="posix")
    assert shlex.split(line) == argv
    assert "'--onnx=/data/my models/m.onnx'" in line


def test_windows_paths_with_spaces() -> None:
    onnx = PureWindowsPath(r"C:\Users\Ann Lee\models\model int8.onnx")
    engine = PureWindowsPath(r"D:\engines\model.engine")
    plugin = PureWindowsPath(r"C:\Program Files\plugins\my plugin.dll")
    argv = trtexec_command(onnx, engine, BuildOptions(plugins=(Path(str(plugin)),)))
    line = format_command(argv, style="windows")
    assert line == (
        r'trtexec "--onnx=C:\Users\Ann Lee\models\model int8.onnx" --saveEngine=D:\engines\model.engine '
        r'--stronglyTyped "--staticPlugins=C:\Program Files\plugins\my plugin.dll"'
    )
    assert _windows_argv(line) == argv
    # the standard library's C-runtime quoting agrees where no cmd operator is involved
    assert line == subprocess.list2cmdline(argv)


@pytest.mark.parametrize(
    "argument",
    [
        r"C:\dir with space\\",
        r"C:\a&b\m.onnx",
        'say "hi"',
        r"trailing\\",
        "",
        r"C:\x^y|z<w>.onnx",
        "tab\there",
    ],
)
def test_windows_quoting_round_trips_hard_arguments(argument: str) -> None:
    line = format_command(["trtexec", argument], style="windows")
    assert _windows_argv(line) == ["trtexec", argument]


def test_windows_quoting_protects_cmd_operators() -> None:
    line = format_command(["trtexec", r"--onnx=C:\R&D\m.onnx"], style="windows")
    assert line == r'trtexec "--onnx=C:\R&D\m.onnx"'


def test_unknown_style_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="style"):
        format_command(["trtexec"], style="fish")  # type: ignore[arg-type]
