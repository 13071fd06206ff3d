"""The INT8 weight grid for ``--target ort``, chosen per deployment CPU.

ONNX Runtime's fused u8s8 CPU kernels (QLinearConv, QLinearMatMul, MatMulIntegerToFloat) multiply
uint8 activations by int8 weights. On x86 with AVX2 but no VNNI they add pairs of products with
``vpmaddubsw``, whose int16 sums saturate when both codes are large; with VNNI (``vpdpbusd``) or on
ARM the sums are 32-bit and nothing saturates. The 7-bit grid (``int8_reduced``, weights in -64..63)
never saturates but carries one bit less of the weight. Which grid is better depends on the CPU
that runs the model, so the ORT rule set's grid is only a portable default and this module picks.

Cases handled:

* ``--ort-cpu avx2``: the 7-bit grid, not measured; ``vnni`` or ``arm``: the full grid, not measured;
* ``--ort-cpu auto`` (the default): both grids are inserted on copies of the prepared model with the
  same activation parameters, run on a few calibration samples as written (graph optimizations at
  BASIC) and as deployed (ONNX Runtime's default session, fused integer kernels). Where the full
  grid loses more than :data:`SATURATION_DB` deployed against as written, beyond what the 7-bit
  grid loses, this CPU's kernels saturate and the 7-bit grid is chosen; otherwise the full grid
  (4x less weight noise power). The SNR of one grid against the other is not the criterion: on a
  few samples it is noise-dominated (measured: which grid won flipped by 4-9 dB between 4 and 16
  samples on a real model, tools/results/ort_grid.md), while deployed vs as written of one grid
  differs only by the kernels;
* a deployed output that turns non-finite where as written is finite: saturation, 7-bit grid;
* no sample, or no floating-point output: nothing can be measured, the rule set's grid is kept;
* no weight whose rule names a grid (a custom rule set without ``int8_weight_format``): nothing to
  choose, the plan is left as it is;
* the choice is written into the output's ``metadata_props`` under :data:`METADATA_KEY` as JSON
  (grid, cpu asked, reason, this machine's CPU kind and flags, measured SNRs rounded to 0.01 dB so
  that the same inputs on the same machine give the same bytes);
* bad input (:func:`check_ort_cpu_option`): an unknown ``--ort-cpu`` value, or ``--ort-cpu`` with a
  target other than ``ort``: one-line :class:`~onnxq.errors.OnnxqError`.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx_ir as ir

from onnxq.calibration.method_guard import first_samples, output_snr_db
from onnxq.errors import OnnxqError
from onnxq.graph.qdq import insert_qdq
from onnxq.model_io import clone_model
from onnxq.runtime import make_session

if TYPE_CHECKING:
    from onnxq.calibration.data import CalibrationData
    from onnxq.formats.base import NumberFormat, QuantParams
    from onnxq.placement.plan import Plan, QuantizedTensor

Grid = Literal["int8", "int8_reduced"]
FULL_GRID: Grid = "int8"
REDUCED_GRID: Grid = "int8_reduced"
GRIDS: tuple[Grid, ...] = (FULL_GRID, REDUCED_GRID)

#: ``--ort-cpu`` values; ``auto`` measures on the machine that quantizes
ORT_CPU_CHOICES = ("auto", "avx2", "vnni", "arm")
AUTO_CPU = "auto"
#: the grid each named deployment CPU gets without measuring
CPU_GRIDS: dict[str, Grid] = {"avx2": REDUCED_GRID, "vnni": FULL_GRID, "arm": FULL_GRID}
CPU_REASONS = {
    "avx2": "x86 without VNNI: u8s8 pair sums saturate int16 on the full grid",
    "vnni": "x86 with VNNI: 32-bit dot products, the full grid cannot saturate",
    "arm": "ARM: 32-bit (s)dot/widening accumulation, the full grid cannot saturate",
}

#: key of the output model's ``metadata_props`` entry holding the choice (JSON)
METADATA_KEY = "onnxq.ort_weight_grid"
#: calibration samples measured, one at a time: the figures only need to tell a saturating kernel
#: (several dB lost) from a clean one, and 4 runs keep the 5 short sessions cheap
DEFAULT_GRID_SAMPLES = 4
#: the full grid's deployed loss (against as written) beyond the 7-bit grid's that counts as
#: saturation. Clean kernels differ from as written by requantization rounding only (measured with
#: VNNI on 8 models: excess up to 0.8 dB at 4 samples, 0.6 dB at 16); saturating ones lose more
#: (the issue: up to 3 dB; a digits CNN without VNNI: 26 dB). Half-way between the two; below it the
#: full grid's finer weights (up to 6 dB less weight noise) make up for the loss.
SATURATION_DB = 1.5
#: figures in the metadata are rounded so the output's bytes do not depend on float noise
METADATA_DIGITS = 2

CPUINFO_PATH = Path("/proc/cpuinfo")
#: CPU flags worth recording (``/proc/cpuinfo`` spelling), in order of relevance
RELEVANT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512bw", "avx2", "asimddp", "i8mm")

Feed = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class CpuInfo:
    """What this machine's CPU is, for the metadata note (the choice itself is measured)."""

    #: "vnni", "avx2", "arm" or "unknown"
    kind: str
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class GridChoice:
    """The INT8 weight grid for the ORT target, and why."""

    grid: Grid
    reason: str
    #: ``--ort-cpu`` as given ("auto" when measured)
    cpu: str = AUTO_CPU
    #: SNR in dB per "<grid>/as_written" and "<grid>/deployed"; empty when not measured
    measured: dict[str, float] = field(default_factory=dict)
    #: the CPU the measurement ran on (None when not measured)
    machine: CpuInfo | None = None


def check_ort_cpu_option(value: str | None, target: str) -> None:
    """``--ort-cpu`` (None: not given): one of :data:`ORT_CPU_CHOICES`, and only for ``--target ort``."""
    if value is None:
        return
    if value not in ORT_CPU_CHOICES:
        raise OnnxqError(
            f"--ort-cpu {value!r} is not a known deployment CPU",
            f"use one of {', '.join(ORT_CPU_CHOICES)} ('auto' measures on this machine)",
        )
    if target != "ort":
        raise OnnxqError(
            f"--ort-cpu {value} applies only to --target ort (the target is {target})",
            "drop --ort-cpu, or use --target ort",
        )


def grid_for_cpu(name: str) -> GridChoice:
    """The grid for a named deployment CPU (``avx2``, ``vnni``, ``arm``), without measuring."""
    if name not in CPU_GRIDS:
        raise ValueError(f"no fixed grid for CPU {name!r}; known: {sorted(CPU_GRIDS)}")
    return GridChoice(CPU_GRIDS[name], f"--ort-cpu {name}: {CPU_REASONS[name]}", cpu=name)


def detect_cpu(cpuinfo: str | None = None, machine: str | None = None) -> CpuInfo:
    """This machine's CPU kind from ``/proc/cpuinfo`` flags (``cpuinfo`` text for tests)."""
    machine = (machine or platform.machine()).lower()
    if cpuinfo is None:
        cpuinfo = CPUINFO_PATH.read_text(errors="replace") if CPUINFO_PATH.exists() else ""
    words: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            words.update(value.split())
    flags = tuple(f for f in RELEVANT_FLAGS if f in words)
    if machine.startswith(("arm", "aarch64")) or "asimd" in words:
        return CpuInfo("arm", flags)
    if "avx512_vnni" in words or "avx_vnni" in words:
        return CpuInfo("vnni", flags)
    if "avx2" in words:
        return CpuInfo("avx2", flags)
    return CpuInfo("unknown", flags)


def decide(measured: Mapping[str, float], machine: CpuInfo | None = None) -> GridChoice:
    """The 7-bit grid where the deployed kernels saturate on the full grid, else the full grid.

    Saturation is what the full grid loses deployed against as written, beyond what the 7-bit grid
    loses the same way (the kernels' own requantization rounding). ``measured`` holds
    "<grid>/as_written" and "<grid>/deployed" for both grids."""
    full_loss = _deployment_loss(measured, FULL_GRID)
    excess = full_loss - _deployment_loss(measured, REDUCED_GRID)
    figures = (
        f"deployed vs as written: full grid {-full_loss:+.1f} dB, 7-bit grid "
        f"{-_deployment_loss(measured, REDUCED_GRID):+.1f} dB"
    )
    kept = {key: round(value, METADATA_DIGITS) for key, value in sorted(measured.items())}
    if not math.isfinite(excess) or excess > SATURATION_DB:
        reason = f"measured: the full grid saturates this CPU's u8s8 kernels ({figures})"
        return GridChoice(REDUCED_GRID, reason, AUTO_CPU, kept, machine)
    reason = f"measured: no saturation ({figures}), the full grid is finer"
    return GridChoice(FULL_GRID, reason, AUTO_CPU, kept, machine)


def _deployment_loss(measured: Mapping[str, float], grid: Grid) -> float:
    return measured[f"{grid}/as_written"] - measured[f"{grid}/deployed"]


def choose_ort_weight_grid(
    model: ir.Model,
    plan: Plan,
    data: CalibrationData | Sequence[Feed],
    activation_params: Mapping[str, QuantParams],
    formats: tuple[NumberFormat, NumberFormat],
    *,
    providers: Sequence[str] | None = None,
    custom_ops: Sequence[str] = (),
    samples: int = DEFAULT_GRID_SAMPLES,
) -> GridChoice:
    """Measure both grids on ``model`` (prepared, float, not modified) and choose one.

    ``formats`` are the (activation, weight) formats and ``activation_params`` the parameters that
    :func:`onnxq.graph.qdq.insert_qdq` will get; ``data`` the calibration data or a few feeds."""
    machine = detect_cpu()
    tensors = plan.tensors()
    if not any(_names_grid(t) for t in tensors):
        return GridChoice(
            _rule_grid(tensors), "no weight rule names an INT8 grid: plan kept", machine=machine
        )
    feeds = list(data) if isinstance(data, Sequence) else first_samples(data, samples)
    feeds = feeds[:samples]
    reference = _float_outputs(make_session(model, providers, custom_ops, fused_kernels=False), feeds)
    if not feeds or not any(reference):
        reason = "not measured (no calibration sample or no float output): the rule set's grid is kept"
        return GridChoice(_rule_grid(tensors), reason, machine=machine)
    measured: dict[str, float] = {}
    for grid in GRIDS:
        copy = clone_model(model)  # external weights stay on disk, found from their folder
        insert_qdq(copy, with_grid(tensors, grid), dict(activation_params), *formats)
        for label, fused in (("as_written", False), ("deployed", True)):
            session = make_session(copy, providers, custom_ops, fused_kernels=fused)
            measured[f"{grid}/{label}"] = _snr(reference, _float_outputs(session, feeds))
    return decide(measured, machine)


def resolve_ort_weight_grid(
    cpu: str,
    model: ir.Model,
    plan: Plan,
    data: CalibrationData | Sequence[Feed] | None,
    activation_params: Mapping[str, QuantParams],
    formats: tuple[NumberFormat, NumberFormat],
    *,
    providers: Sequence[str] | None = None,
    custom_ops: Sequence[str] = (),
) -> GridChoice:
    """``--ort-cpu``'s grid: named CPUs are not measured; ``auto`` measures (the rule set's grid
    without data), and the plan's grid-naming weights are set to the choice."""
    if cpu != AUTO_CPU:
        choice = grid_for_cpu(cpu)
    elif data is None:
        reason = "not measured (no calibration data): the rule set's grid is kept"
        choice = GridChoice(_rule_grid(plan.tensors()), reason)
    else:
        choice = choose_ort_weight_grid(
            model, plan, data, activation_params, formats, providers=providers, custom_ops=custom_ops
        )
    apply_grid(plan, choice.grid)
    return choice


def with_grid(tensors: Sequence[QuantizedTensor], grid: Grid) -> list[QuantizedTensor]:
    """``tensors`` with every weight whose rule names a grid on ``grid``."""
    return [replace(t, int8_weight_format=grid) if _names_grid(t) else t for t in tensors]


def apply_grid(plan: Plan, grid: Grid) -> int:
    """Put every weight use whose rule names a grid on ``grid``; returns how many uses changed."""
    changed = 0
    for decision in plan.decisions:
        uses = []
        for use in decision.uses:
            if use.role == "weight" and use.int8_weight_format in GRIDS and use.int8_weight_format != grid:
                use = replace(use, int8_weight_format=grid)
                changed += 1
            uses.append(use)
        decision.uses = uses
    return changed


def metadata_value(choice: GridChoice) -> str:
    """The JSON recorded under :data:`METADATA_KEY` (keys sorted: same choice, same bytes)."""
    record: dict[str, object] = {"grid": choice.grid, "cpu": choice.cpu, "reason": choice.reason}
    record["measured"] = dict(sorted(choice.measured.items()))
    if choice.machine is not None:
        record["measured_on"] = {"kind": choice.machine.kind, "flags": list(choice.machine.flags)}
    return json.dumps(record, sort_keys=True)


def record_choice(model: ir.Model, choice: GridChoice) -> None:
    """Write the choice into the model's metadata (call after Q/DQ insertion, before saving)."""
    model.metadata_props[METADATA_KEY] = metadata_value(choice)


def _names_grid(tensor: QuantizedTensor) -> bool:
    return tensor.role == "weight" and tensor.int8_weight_format in GRIDS


def _rule_grid(tensors: Sequence[QuantizedTensor]) -> Grid:
    """The grid the rule set names (the 7-bit one when any weight asks for it, else full INT8)."""
    named = {t.int8_weight_format for t in tensors if _names_grid(t)}
    return REDUCED_GRID if REDUCED_GRID in named else FULL_GRID


def _float_outputs(session: object, feeds: Sequence[Feed]) -> list[list[np.ndarray]]:
    results = []
    for feed in feeds:
        outputs = session.run(None, dict(feed))  # type: ignore[attr-defined]
        results.append([np.asarray(o) for o in outputs if np.asarray(o).dtype.kind == "f"])
    return results


def _snr(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]]) -> float:
    return output_snr_db([o for batch in reference for o in batch], [o for batch in outputs for o in batch])
