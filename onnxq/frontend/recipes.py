"""Export recipes: one TOML file per model family in ``models/``, and the hints they leave in a model.

A recipe holds what exporting and quantizing a family needs: its inputs (names, shapes with named
dimensions, dynamic axes), the export dtype and opset, the image preprocessing of its weights, the
nodes to keep in high precision (onnxq ``--exclude-nodes`` patterns) and the recommended mode. Each
variant (resnet50, vit_b_16, flux-dev, ...) adds its constructor or configuration.

Cases handled:
- the recipe folder is ``onnxq/_models`` in a wheel and ``models/`` in a source checkout;
- an unknown model name is refused, listing the known ones;
- a malformed recipe file is refused, naming the file and the missing or wrong key;
- the recipe's choices are written into the exported model's ``metadata_props`` under
  :data:`METADATA_KEY` (JSON), and :func:`recipe_hints` reads them back (None for a model without
  them or with unreadable ones: a hand-edited value never stops quantization).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxq.errors import OnnxqError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

logger = logging.getLogger(__name__)

#: the metadata_props key of the recipe's choices in an exported model (a JSON object, see RecipeHints)
METADATA_KEY = "onnxq.recipe"
#: version of the JSON under METADATA_KEY; readers ignore versions they do not know
METADATA_VERSION = 1
EXPORT_DTYPES = ("fp32", "fp16", "bf16")
#: IR version of the empty model that carries metadata to ``recipe_hints``
DEFAULT_IR = 10


@dataclass(frozen=True)
class InputSpec:
    """One model input: ``shape`` holds ints (static) and names (sized by the variant or the CLI)."""

    name: str
    shape: tuple[int | str, ...]
    dynamic: tuple[str, ...] = ()
    #: a variant config flag this input depends on (Flux's guidance needs ``guidance_embeds``)
    needs: str | None = None


@dataclass(frozen=True)
class ImageSpec:
    size: tuple[int, int]
    resize: int | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    #: latent models: pixels per latent and latent patch size (image tokens = (H / vae / patch) x ...)
    vae_scale: int | None = None
    patch: int | None = None


@dataclass(frozen=True)
class Recipe:
    """One variant of one family, with the family's shared settings merged in."""

    name: str
    family: str
    builder: str
    description: str
    dtype: str
    opset: int
    inputs: tuple[InputSpec, ...]
    output_names: tuple[str, ...]
    image: ImageSpec
    mode: str
    exclude: tuple[str, ...]
    why: str
    #: the variant's own table: constructor, config, text_length, sampler settings
    variant: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.variant.get("config", {}))

    def active_inputs(self, config: dict[str, Any] | None = None) -> tuple[InputSpec, ...]:
        """The inputs that this configuration takes (an input with ``needs`` needs that flag true)."""
        flags = self.config if config is None else config
        return tuple(spec for spec in self.inputs if spec.needs is None or flags.get(spec.needs))


def models_dir() -> Path:
    """The shipped recipes: inside the wheel as ``onnxq/_models``, in a checkout as ``models/``."""
    packaged = resources.files("onnxq") / "_models"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "models"


@cache
def all_recipes() -> dict[str, Recipe]:
    """Every variant of every recipe file, by name."""
    recipes: dict[str, Recipe] = {}
    for path in sorted(models_dir().glob("*.toml")):
        for recipe in _parse_file(path):
            recipes[recipe.name] = recipe
    return recipes


def known_models() -> list[str]:
    return sorted(all_recipes())


def find_recipe(name: str) -> Recipe:
    recipes = all_recipes()
    if name not in recipes:
        raise OnnxqError(f"unknown model {name!r}", f"use one of {', '.join(known_models())}")
    return recipes[name]


def _parse_file(path: Path) -> list[Recipe]:
    try:
        with path.open("rb") as stream:
            table = tomllib.load(stream)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise OnnxqError(f"recipe {path} cannot be read: {error}", "fix or remove the file") from error
    try:
        return [_recipe(path, table, name, variant) for name, variant in table["variants"].items()]
    except (KeyError, TypeError, ValueError) as error:
        raise OnnxqError(
            f"recipe {path} is malformed ({type(error).__name__}: {error})",
            "compare it with the recipes shipped in models/",
        ) from error


def _recipe(path: Path, table: dict[str, Any], name: str, variant: dict[str, Any]) -> Recipe:
    image = table.get("image", {})
    quantize = table["quantize"]
    dtype = str(table.get("dtype", "fp32"))
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {EXPORT_DTYPES}")
    inputs = tuple(
        InputSpec(
            str(entry["name"]),
            tuple(entry["shape"]),
            tuple(entry.get("dynamic", ())),
            entry.get("needs"),
        )
        for entry in table["inputs"]
    )
    return Recipe(
        name=name,
        family=str(table["family"]),
        builder=str(table["builder"]),
        description=str(table.get("description", "")),
        dtype=dtype,
        opset=int(table["opset"]),
        inputs=inputs,
        output_names=tuple(table["output_names"]),
        image=ImageSpec(
            size=(int(image["size"][0]), int(image["size"][1])),
            resize=image.get("resize"),
            mean=tuple(image.get("mean", ())),
            std=tuple(image.get("std", ())),
            vae_scale=image.get("vae_scale"),
            patch=image.get("patch"),
        ),
        mode=str(quantize["mode"]),
        exclude=tuple(str(p) for p in quantize.get("exclude", ())),
        why=str(quantize.get("why", "")),
        variant=dict(variant),
        source=path.name,
    )


# --- the recipe's choices inside an exported model ------------------------------------------------


@dataclass(frozen=True)
class RecipeHints:
    """What an exported model's recipe recommends to ``onnxq quantize``."""

    model: str
    mode: str
    #: ``--exclude-nodes`` regular expressions (joined with ``|`` by :meth:`exclude_regex`)
    exclude: tuple[str, ...] = ()
    why: str = ""

    def exclude_regex(self) -> str | None:
        return "|".join(f"(?:{p})" for p in self.exclude) if self.exclude else None

    def resolve(self, mode: str | None, exclude_nodes: str | None) -> tuple[str, str | None, list[str]]:
        """(mode, exclude regex, explain lines): what the user gave wins, the recipe fills the rest."""
        notes = []
        if mode is None:
            mode = self.mode
            notes.append(f"recipe {self.model}: --mode {self.mode} (recommended: {self.why})")
        elif mode != self.mode:
            notes.append(f"recipe {self.model} recommends --mode {self.mode}; --mode {mode} given, used")
        if exclude_nodes is None:
            exclude_nodes = self.exclude_regex()
            if exclude_nodes:
                notes.append(
                    f"recipe {self.model}: kept in high precision: nodes matching {', '.join(self.exclude)}"
                )
        elif self.exclude:
            notes.append(
                f"recipe {self.model}: --exclude-nodes given, replacing the recipe's {', '.join(self.exclude)}"
            )
        return mode, exclude_nodes, notes

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": METADATA_VERSION,
                "model": self.model,
                "mode": self.mode,
                "exclude": list(self.exclude),
                "why": self.why,
            },
            sort_keys=True,
        )


def hints_for(recipe: Recipe) -> RecipeHints:
    return RecipeHints(recipe.name, recipe.mode, recipe.exclude, recipe.why)


def write_hints(model: ir.Model, hints: RecipeHints) -> None:
    model.metadata_props[METADATA_KEY] = hints.to_json()


def hints_for_source(source: Any) -> RecipeHints | None:
    """``recipe_hints`` of whatever ``onnxq.quantize`` accepts, read before the model is loaded: a
    path (see ``hints_from_file``), an ``onnx.ModelProto`` or an ``ir.Model``; None for anything else."""
    if isinstance(source, (str, os.PathLike)):
        return hints_from_file(source)
    if isinstance(source, ir.Model):
        return recipe_hints(source)
    props = getattr(source, "metadata_props", None)  # onnx.ModelProto: repeated StringStringEntryProto
    if props is None or not hasattr(source, "graph"):
        return None
    return _hints_from_props({p.key: p.value for p in props})


def _hints_from_props(props: dict[str, str]) -> RecipeHints | None:
    return recipe_hints(ir.Model(ir.Graph([], [], nodes=[]), ir_version=DEFAULT_IR, metadata_props=props))


def hints_from_file(path: str | os.PathLike[str]) -> RecipeHints | None:
    """``recipe_hints`` of a saved model, its external weights left unread (the CLI's default output
    name needs the mode before the model is loaded); None for a file that cannot be read as ONNX."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # DecodeError, OSError: quantize reports the unreadable model itself
        return None
    return _hints_from_props({p.key: p.value for p in proto.metadata_props})


def recipe_hints(model: ir.Model) -> RecipeHints | None:
    """The recipe choices an ``onnxq export`` left in ``model``; None when there are none or they are
    unreadable (logged: a hand-edited value must not stop quantization)."""
    text = model.metadata_props.get(METADATA_KEY)
    if text is None:
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != METADATA_VERSION:
            raise ValueError(f"version {data.get('version') if isinstance(data, dict) else None!r}")
        exclude = data.get("exclude", [])
        if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
            raise ValueError("exclude is not a list of strings")
        return RecipeHints(str(data["model"]), str(data["mode"]), tuple(exclude), str(data.get("why", "")))
    except (ValueError, KeyError, TypeError) as error:
        logger.warning("ignoring the model's %s metadata: %s", METADATA_KEY, error)
        return None
