"""Placement rule sets: one readable TOML file per deployment target, shipped with the package.

A rule set names the target, whether activations are symmetric, and a list of rules; each rule applies a
matcher ``kind`` (see ``matchers.py``) to some op types with parameters. Users can pass their own file.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from onnxq.choices import TARGETS
from onnxq.errors import OnnxqError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib



@dataclass(frozen=True)
class Rule:
    name: str
    kind: str
    op_types: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)


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
