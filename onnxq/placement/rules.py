"""Placement rule sets: one readable TOML file per deployment target, shipped with the package.

A rule set names the target, whether activations are symmetric, and a list of rules; each rule applies a
matcher ``kind`` (see ``matchers.py``) to some op types with parameters. Users can pass their own file.

A rule may hold a ``[rules.modes.<mode>]`` table (``<mode>`` one of ``MODE_OVERRIDE_NAMES``: the base
format of the Q/DQ, so ``fp8`` also governs the FP8 layers of ``nvfp4``/``w4a8``/``mxfp8``): its keys
replace the rule's ``kind`` and parameters for that mode only (:meth:`RuleSet.for_mode`). Cases: no
table (the rule as written), a table changing parameters, a table changing the kind (e.g. ``never``
with a ``reason``), an unknown mode or kind or an ``op_types`` key in the table (refused when read).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from onnxq.choices import TARGETS
from onnxq.errors import OnnxqError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: the key of a rule's per-mode tables, and the modes (base Q/DQ formats) a table may name
MODES_KEY = "modes"
MODE_OVERRIDE_NAMES = ("int8", "fp8")


@dataclass(frozen=True)
class Rule:
    name: str
    kind: str
    op_types: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)

    def for_mode(self, mode: str | None) -> Rule:
        """This rule with its ``[rules.modes.<mode>]`` table applied (itself when it has none)."""
        override = self.params.get(MODES_KEY, {}).get(mode) if mode is not None else None
        if not override:
            return self
        params = {k: v for k, v in self.params.items() if k != MODES_KEY}
        params.update({k: v for k, v in override.items() if k != "kind"})
        return Rule(self.name, override.get("kind", self.kind), self.op_types, params)


@dataclass(frozen=True)
class RuleSet:
    target: str
    description: str
    activation_symmetric: bool
    quantize_graph_outputs: bool
    rules: tuple[Rule, ...]
    source: str

    def rule_for(self, op_type: str) -> Rule | None:
        """The first rule listing ``op_type``: order in the file is priority."""
        return next((rule for rule in self.rules if op_type in rule.op_types), None)

    def for_mode(self, mode: str | None) -> RuleSet:
        """The rules as the base format ``mode`` (``int8``, ``fp8``; None: as written) applies them."""
        return replace(self, rules=tuple(rule.for_mode(mode) for rule in self.rules))


def patterns_dir() -> Path:
    """The shipped rule sets: inside the wheel as ``onnxq/_patterns``, in a checkout as ``patterns/``."""
    packaged = resources.files("onnxq") / "_patterns"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "patterns"


def load_rule_set(target: str = "tensorrt", path: str | os.PathLike[str] | None = None) -> RuleSet:
    """The rule set of ``target``, or the user's file at ``path``."""
    if path is None:
        if target not in TARGETS:
            raise OnnxqError(f"unknown target {target!r}", f"use one of {', '.join(TARGETS)}")
        path = patterns_dir() / f"{target}.toml"
    return parse_rule_set(_read_toml(Path(path)), str(path))


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise OnnxqError(
            f"patterns file {path} does not exist", "pass a TOML rule set such as patterns/tensorrt.toml"
        )
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise OnnxqError(
            f"patterns file {path} is not valid TOML: {error}", "fix the file's syntax"
        ) from error


def parse_rule_set(data: dict[str, Any], source: str) -> RuleSet:
    from onnxq.placement.matchers import MATCHERS

    rules = []
    for index, entry in enumerate(data.get("rules", [])):
        kind = entry.get("kind")
        if kind not in MATCHERS:
            raise OnnxqError(
                f"rule {index} in {source} has unknown kind {kind!r}",
                f"use one of {', '.join(sorted(MATCHERS))}",
            )
        if not entry.get("op_types"):
            raise OnnxqError(f"rule {index} in {source} lists no op_types", 'add op_types = ["Conv", ...]')
        _check_mode_tables(entry.get(MODES_KEY, {}), index, source, MATCHERS)
        params = {k: v for k, v in entry.items() if k not in ("name", "kind", "op_types")}
        rules.append(Rule(entry.get("name", kind), kind, tuple(entry["op_types"]), params))
    return RuleSet(
        target=data.get("target", "custom"),
        description=data.get("description", ""),
        activation_symmetric=bool(data.get("activation_symmetric", True)),
        quantize_graph_outputs=bool(data.get("quantize_graph_outputs", False)),
        rules=tuple(rules),
        source=source,
    )


def _check_mode_tables(tables: Any, index: int, source: str, matchers: Any) -> None:
    """Refuse per-mode tables that name an unknown mode or kind, or change the op types."""
    if not isinstance(tables, dict):
        raise OnnxqError(f"rule {index} in {source}: {MODES_KEY} is not a table", "write [rules.modes.fp8]")
    for mode, table in tables.items():
        if mode not in MODE_OVERRIDE_NAMES or not isinstance(table, dict):
            raise OnnxqError(
                f"rule {index} in {source} has a table for unknown mode {mode!r}",
                f"use [rules.{MODES_KEY}.<mode>] with one of {', '.join(MODE_OVERRIDE_NAMES)}",
            )
        if "op_types" in table:
            raise OnnxqError(
                f"rule {index} in {source}: [rules.{MODES_KEY}.{mode}] sets op_types",
                "write a separate rule for other op types; a mode table changes kind and parameters only",
            )
        kind = table.get("kind")
        if kind is not None and kind not in matchers:
            raise OnnxqError(
                f"rule {index} in {source}: [rules.{MODES_KEY}.{mode}] has unknown kind {kind!r}",
                f"use one of {', '.join(sorted(matchers))}",
            )
