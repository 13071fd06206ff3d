"""``export``: a PyTorch module to an ONNX file that quantizes well, checked against eager PyTorch.

Steps: eager outputs on the example inputs -> torch's dynamo exporter (``torch.onnx.export(...,
dynamo=True)``, which folds constants and BatchNorm) or, where it fails, the TorchScript exporter ->
onnxq's clean-up passes on the ``onnx_ir`` model (Constant nodes lifted to initializers, BatchNorm
folded, unused nodes removed, shapes inferred) -> node names from the module path (``layer1.0.conv1/
Conv``: what ``--exclude-nodes`` and recipe patterns match) -> written into a temporary folder beside
the output (external data over the 2 GB protobuf limit) -> ONNX checker -> ONNX Runtime run compared
with the eager outputs -> renamed into place.

Cases handled:
- dynamic axes as ``{input: {axis: name}}``; one name shared by several inputs is one dimension;
- ``dtype`` fp32/fp16/bf16: the module is exported in that type (a converted copy: the caller's module
  is not changed); a dtype PyTorch cannot run on CPU for this module is refused in one line;
- both exporters failing: one line naming both errors;
- a model ONNX Runtime cannot run (bf16 ops its CPU build lacks): numerics unchecked, with a warning;
- an output above tolerance (max abs error relative to the output's peak): refused, naming the worst
  output; nothing is left at the output path (nor its data file) after any failure.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import inspect
import io
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.frontend.builders import TORCH_DTYPES, WRAPPED_ATTRIBUTE, torch_dtype
from onnxq.frontend.recipes import RecipeHints, write_hints
from onnxq.graph import passes
from onnxq.model_io import DEFAULT_IR_VERSION, data_path, output_folder, save_model
from onnxq.temporaries import make_temporary, remove_stale_temporaries

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
EXPORTERS = ("auto", "dynamo", "torchscript")
#: largest |onnx - eager| allowed, relative to the output's largest |eager| value, per export dtype
TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 5e-2}
#: outputs whose peak is below this are compared in absolute terms
TINY_PEAK = 1e-6
#: node metadata that holds local file paths and source text: dropped from the written model
DROPPED_NODE_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
#: a scope torch.export gives nodes outside any module (e.g. shape ops of the top-level forward)
HOOK_SCOPE = "_empty_nn_module_stack"


@dataclass
class OutputError:
    name: str
    max_abs: float
    max_rel: float


@dataclass
class ExportReport:
    path: Path
    exporter: str
    seconds: float
    #: per output; empty when the numerics could not be checked (see ``unchecked``)
    errors: list[OutputError] = field(default_factory=list)
    unchecked: str = ""
    tolerance: float = 0.0

    def lines(self) -> list[str]:
        if self.unchecked:
            return [f"numerics not checked: {self.unchecked}"]
        return [
            f"{e.name}: max abs error {e.max_abs:.3g}, relative {e.max_rel:.3g} (tolerance {self.tolerance:g})"
            for e in self.errors
        ]


def export(
    module: torch.nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_shapes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int | None = None,
    dtype: str | None = None,
    exporter: str = "auto",
    tolerance: float | None = None,
    hints: RecipeHints | None = None,
) -> Path:
    """Export ``module`` to ``path`` (see the module docstring); return the path.

    ``example_inputs``: a tensor or a sequence of tensors, in ``input_names`` order.
    ``dynamic_shapes``: ``{input name: {axis: dimension name}}``. ``exporter``: "auto" (dynamo, then
    TorchScript), "dynamo" or "torchscript". ``hints``: recipe choices stored in the model's metadata.
    """
    report = export_with_report(
        module, example_inputs, path, input_names=input_names, output_names=output_names,
        dynamic_shapes=dynamic_shapes, opset=opset, dtype=dtype, exporter=exporter, tolerance=tolerance,
        hints=hints,
    )  # fmt: skip
    for line in report.lines():
        logger.info("%s", line)
    return report.path


def export_with_report(
    module: torch.nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_shapes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int | None = None,
    dtype: str | None = None,
    exporter: str = "auto",
    tolerance: float | None = None,
    hints: RecipeHints | None = None,
) -> ExportReport:
    """``export``, returning what it measured (per-output errors, the exporter used, the time)."""
    torch = _import_torch()
    started = time.perf_counter()
    output = Path(path)
    inputs = _as_tuple(example_inputs)
    _check_arguments(inputs, input_names, dynamic_shapes, exporter, dtype)
    module, inputs = _in_dtype(module, inputs, dtype)
    expected = _eager(module, inputs, dtype)
    if len(expected) != len(output_names):
        raise ValueError(f"the module returns {len(expected)} tensors, output_names has {len(output_names)}")
    folder = output_folder(output)
    save_model_checks(output)
    opset = opset or DEFAULT_OPSET
    with torch.no_grad():
        model, used = _export_graph(
            module, inputs, input_names, output_names, dynamic_shapes, opset, exporter
        )
    _clean(model, hints)
    remove_stale_temporaries(folder)
    temporary = make_temporary(folder, output.name)
    try:
        staged = temporary / output.name
        save_model(model, staged, check=False)
        del model  # the weights live in the staged files now
        passes_checker(staged)
        report = _check_numerics(
            staged, input_names, inputs, expected, output_names, dtype or _module_dtype(module)
        )
        _move_into_place(staged, output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    report.path, report.exporter, report.seconds = output, used, time.perf_counter() - started
    return report


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as error:
        raise OnnxqError(f"onnxq export needs PyTorch ({error})", "pip install 'onnxq[torch]'") from error
    return torch


def save_model_checks(output: Path) -> None:
    """The output must be writable before the (long) export starts."""
    from onnxq.model_io import check_output_folder

    for candidate in (output, data_path(output)):
        if candidate.is_dir():
            raise OnnxqError(f"output path {candidate} is a directory", "pass a file path, e.g. model.onnx")
    check_output_folder(output_folder(output))


def _as_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    import torch

    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise ValueError("example_inputs must be a tensor or a sequence of tensors")


def _check_arguments(
    inputs: tuple[torch.Tensor, ...], input_names: Sequence[str],
    dynamic_shapes: Mapping[str, Mapping[int, str]] | None, exporter: str, dtype: str | None,
) -> None:  # fmt: skip
    if len(inputs) != len(input_names):
        raise ValueError(f"{len(inputs)} example inputs but {len(input_names)} input names")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter {exporter!r} is not one of {EXPORTERS}")
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise OnnxqError(f"dtype {dtype!r} cannot be exported", f"use one of {', '.join(TORCH_DTYPES)}")
    unknown = sorted(set(dynamic_shapes or {}) - set(input_names))
    if unknown:
        raise ValueError(f"dynamic_shapes names unknown inputs: {', '.join(unknown)}")
    for name, axes in (dynamic_shapes or {}).items():
        rank = inputs[list(input_names).index(name)].dim()
        if any(not 0 <= axis < rank for axis in axes):
            raise ValueError(f"dynamic_shapes[{name!r}] names an axis outside rank {rank}")


def _module_dtype(module: torch.nn.Module) -> str:
    floats = [p.dtype for p in module.parameters() if p.is_floating_point()]
    names = {torch_dtype(n): n for n in TORCH_DTYPES}
    return names.get(floats[0], "fp32") if floats else "fp32"


def _in_dtype(
    module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], dtype: str | None
) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Module and float inputs in ``dtype``; the caller's module is copied only when it must change."""
    if dtype is None:
        return module, inputs
    wanted = torch_dtype(dtype)
    if any(p.is_floating_point() and p.dtype != wanted for p in module.parameters()):
        module = copy.deepcopy(module).to(wanted)
    return module, tuple(t.to(wanted) if t.is_floating_point() else t for t in inputs)


def _eager(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], dtype: str | None) -> list[np.ndarray]:
    import torch

    module.eval()
    try:
        with torch.no_grad():
            result = module(*inputs)
    except (RuntimeError, NotImplementedError, TypeError) as error:
        if dtype in ("fp16", "bf16"):
            raise OnnxqError(
                f"PyTorch cannot run this model in {dtype} on this machine ({_first_line(error)})",
                f"export in fp32 and let onnxq quantize write the {dtype} rest (--high-precision {dtype})",
            ) from error
        raise OnnxqError(
            f"the module fails on the example inputs: {_first_line(error)}",
            "check the input shapes and dtypes",
        ) from error
    return [_to_numpy(t) for t in _flatten(result)]


def _flatten(result: Any) -> list[torch.Tensor]:
    import torch

    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, Mapping):
        return [t for value in result.values() for t in _flatten(value)]
    if isinstance(result, (list, tuple)):
        return [t for value in result for t in _flatten(value)]
    return []


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    import torch

    detached = tensor.detach().cpu()
    if detached.is_floating_point():
        detached = detached.to(torch.float32)  # numpy has no bfloat16; comparisons run in float32
    return detached.numpy()


# --- exporting ------------------------------------------------------------------------------------


def _export_graph(
    module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], input_names: Sequence[str],
    output_names: Sequence[str], dynamic_shapes: Mapping[str, Mapping[int, str]] | None, opset: int,
    exporter: str,
) -> tuple[ir.Model, str]:  # fmt: skip
    """(model, exporter used): dynamo first; TorchScript where dynamo fails and ``exporter`` allows."""
    failures = []
    if exporter in ("auto", "dynamo"):
        try:
            return _dynamo(module, inputs, input_names, output_names, dynamic_shapes, opset), "dynamo"
        except Exception as error:  # the exporter raises many types; each is reported the same way
            logger.debug("dynamo export failed", exc_info=True)
            failures.append(f"dynamo: {_root_cause(error)}")
            if exporter == "auto":
                logger.warning(
                    "the dynamo exporter failed (%s); trying the TorchScript exporter", failures[-1]
                )
    if exporter in ("auto", "torchscript"):
        try:
            return _torchscript(
                module, inputs, input_names, output_names, dynamic_shapes, opset
            ), "torchscript"
        except Exception as error:
            logger.debug("TorchScript export failed", exc_info=True)
            failures.append(f"torchscript: {_root_cause(error)}")
    raise OnnxqError(
        f"PyTorch cannot export this module ({'; '.join(failures)})",
        "rerun with --debug for the exporter's traceback; an unsupported dtype exports in fp32",
    )


def _dynamo(
    module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], input_names: Sequence[str],
    output_names: Sequence[str], dynamic_shapes: Mapping[str, Mapping[int, str]] | None, opset: int,
) -> ir.Model:  # fmt: skip
    import torch
    from torch.export import Dim

    shapes: tuple[Any, ...] | None = None
    if dynamic_shapes:
        dims: dict[str, Any] = {}
        shapes = tuple(
            {axis: dims.setdefault(dim, Dim(dim)) for axis, dim in dynamic_shapes.get(name, {}).items()}
            or None
            for name in input_names
        )
    if shapes is not None and _takes_varargs(module):
        shapes = (shapes,)  # forward(*inputs): torch.export sees one argument, a tuple
    progress = io.StringIO()
    with contextlib.redirect_stdout(progress), warnings.catch_warnings():
        # the exporter prints progress lines and warns that shared dimension names are merged (wanted)
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used", category=UserWarning)
        program = torch.onnx.export(
            module, inputs, dynamo=True, input_names=list(input_names), output_names=list(output_names),
            opset_version=opset, dynamic_shapes=shapes, optimize=True, verbose=False,
        )  # fmt: skip
    logger.debug("dynamo exporter: %s", progress.getvalue())
    if program is None:
        raise RuntimeError("the exporter returned no program")
    model: ir.Model = program.model
    return model


def _takes_varargs(module: torch.nn.Module) -> bool:
    parameters = list(inspect.signature(module.forward).parameters.values())
    return len(parameters) == 1 and parameters[0].kind is inspect.Parameter.VAR_POSITIONAL


def _torchscript(
    module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], input_names: Sequence[str],
    output_names: Sequence[str], dynamic_shapes: Mapping[str, Mapping[int, str]] | None, opset: int,
) -> ir.Model:  # fmt: skip
    """The TorchScript exporter writes a file; it is read back as an ``ir.Model`` (weights in memory)."""
    import torch

    with tempfile.TemporaryDirectory(prefix="onnxq-export-") as folder:
        target = Path(folder) / "model.onnx"
        torch.onnx.export(
            module, inputs, str(target), dynamo=False, input_names=list(input_names),
            output_names=list(output_names), opset_version=opset,
            dynamic_axes={name: dict(axes) for name, axes in (dynamic_shapes or {}).items()} or None,
            do_constant_folding=True,
        )  # fmt: skip
        model = ir.load(target)
        for tensor in _external(model):  # read before the folder goes away
            _inline(model, tensor)
    for value in model.graph.outputs:
        value.shape = None  # TorchScript declares traced (static) output shapes; inference redoes them
    return model


def _external(model: ir.Model) -> list[ir.ExternalTensor]:
    return [
        v.const_value
        for v in model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    ]


def _inline(model: ir.Model, tensor: ir.ExternalTensor) -> None:
    value = model.graph.initializers[tensor.name or ""]
    value.const_value = ir.Tensor(tensor.numpy().copy(), name=tensor.name, dtype=tensor.dtype)


# --- clean-up -------------------------------------------------------------------------------------


def _clean(model: ir.Model, hints: RecipeHints | None) -> None:
    """onnxq's passes, names from module paths, metadata; IR version as onnxq writes it."""
    passes.inline_functions(model)
    passes.lift_constant_nodes(model)
    passes.fold_batch_norm(model)
    ir.passes.common.RemoveInitializersFromInputsPass()(model)
    passes.clean_up(model)
    name_nodes_by_module(model)
    passes.infer_shapes(model)
    model.ir_version = DEFAULT_IR_VERSION
    model.producer_name = "onnxq export"
    if hints is not None:
        write_hints(model, hints)


def name_nodes_by_module(model: ir.Model) -> int:
    """Name each node ``<module path>/<op type>[_<n>]`` from the dynamo exporter's scopes; return how
    many were renamed. Nodes without scopes (TorchScript, top-level ops) keep their names; the
    wrapper's attribute (``builders.WRAPPED_ATTRIBUTE``) is dropped from paths."""
    taken = {node.name for node in model.graph if node.name}
    renamed = 0
    prefix = WRAPPED_ATTRIBUTE + "."
    for node in model.graph:
        for key in DROPPED_NODE_METADATA:
            node.metadata_props.pop(key, None)
        path = _module_path(node.metadata_props.get(SCOPES_KEY))
        if path.startswith(prefix) or path == WRAPPED_ATTRIBUTE:
            path = path[len(prefix) :]
        if not path:
            continue
        base = f"{path}/{node.op_type}"
        name, index = base, 0
        while name in taken:
            index += 1
            name = f"{base}_{index}"
        taken.discard(node.name)
        taken.add(name)
        node.name = name
        renamed += 1
    return renamed


def _module_path(scopes: str | None) -> str:
    """The innermost module of ``"['', 'layer1', 'layer1.0', 'relu_1']"``: the last entry is the op."""
    if not scopes:
        return ""
    try:
        parsed = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return ""
    names = (
        [s for s in parsed[:-1] if isinstance(s, str) and s and not s.startswith(HOOK_SCOPE)]
        if isinstance(parsed, list)
        else []
    )
    return names[-1] if names else ""


# --- checks ---------------------------------------------------------------------------------------


def passes_checker(path: Path) -> None:
    import onnx.checker

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:  # ValidationError, InferenceError and C++ errors alike
        raise OnnxqError(
            f"the exported model fails the ONNX checker: {_first_line(error)}",
            "rerun with --debug and report it; another --opset may help",
        ) from error


def _check_numerics(
    path: Path, input_names: Sequence[str], inputs: tuple[torch.Tensor, ...], expected: list[np.ndarray],
    output_names: Sequence[str], dtype: str,
) -> ExportReport:  # fmt: skip
    """Run the written model in ONNX Runtime; refuse outputs further from eager than the tolerance."""
    tolerance = TOLERANCE.get(dtype, TOLERANCE["fp32"])
    report = ExportReport(path, "", 0.0, tolerance=tolerance)
    try:
        actual = _run_ort(path, dict(zip(input_names, (_feed(t) for t in inputs), strict=True)))
    except Exception as error:  # ORT raises its own types (NOT_IMPLEMENTED for bf16 kernels)
        if dtype == "fp32":
            raise OnnxqError(
                f"ONNX Runtime cannot run the exported model: {_first_line(error)}",
                "rerun with --debug and report it; another --opset may help",
            ) from error
        report.unchecked = f"ONNX Runtime's CPU build cannot run the {dtype} model ({_first_line(error)})"
        logger.warning("%s", report.unchecked)
        return report
    for name, want, got in zip(output_names, expected, actual, strict=True):
        report.errors.append(_error(name, want, np.asarray(got, dtype=np.float32)))
    worst = max(report.errors, key=lambda e: e.max_rel, default=None)
    if worst is not None and not worst.max_rel <= tolerance:
        raise OnnxqError(
            f"the exported model disagrees with eager PyTorch: output {worst.name!r} max abs error "
            f"{worst.max_abs:.3g}, relative {worst.max_rel:.3g} (tolerance {tolerance:g})",
            "rerun with --exporter torchscript or another --opset, and report the model",
        )
    return report


def _feed(tensor: torch.Tensor) -> np.ndarray:
    import ml_dtypes
    import torch

    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: the same bits as ml_dtypes'
        return tensor.detach().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.detach().cpu().numpy()


def _run_ort(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # BASIC: the graph as written, without CPU-specific fusions that change rounding
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [np.asarray(o).astype(np.float32) for o in session.run(None, feeds)]


def _error(name: str, want: np.ndarray, got: np.ndarray) -> OutputError:
    if want.shape != got.shape:
        return OutputError(name, math.inf, math.inf)
    want64, got64 = want.astype(np.float64), got.astype(np.float64)
    difference = np.abs(want64 - got64)
    max_abs = float(np.max(difference)) if difference.size else 0.0
    if difference.size and not np.all(np.isfinite(difference)):
        max_abs = math.inf if not np.array_equal(want64, got64, equal_nan=True) else 0.0
    peak = float(np.max(np.abs(want64))) if want64.size else 0.0
    return OutputError(name, max_abs, max_abs / peak if peak > TINY_PEAK else max_abs)


def _move_into_place(staged: Path, output: Path) -> None:
    """The data file first, then the model: a reader never sees a model without its weights."""
    staged_data, final_data = data_path(staged), data_path(output)
    try:
        if staged_data.exists():
            os.replace(staged_data, final_data)
        elif final_data.exists():
            final_data.unlink()  # an earlier export's weights: this model does not use them
        os.replace(staged, output)
    except OSError as error:
        raise OnnxqError(
            f"cannot write {output}: {error.strerror or error}", "choose another -o path"
        ) from error


def _root_cause(error: BaseException) -> str:
    """The innermost cause's first line: the exporters wrap the real reason in generic advice."""
    while error.__cause__ is not None:
        error = error.__cause__
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
