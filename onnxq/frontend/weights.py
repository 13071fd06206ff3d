"""Loading weights from local files into a built module, checked against its architecture first.

Cases handled:
- ``.pth``/``.pt``/``.bin``: ``torch.load(weights_only=True)`` only (never a full unpickling); a plain
  state dict, or one under ``state_dict``/``model`` (training checkpoints); anything else refused;
- ``.safetensors``: ``safetensors.torch.load_file``;
- a diffusers folder (``config.json`` + safetensors, or a pipeline folder with ``transformer/``) for
  Flux: its config builds the module (checked against the variant: dev has guidance embeddings,
  schnell not), ``from_pretrained(local_files_only=True)`` loads it;
- missing files, unknown suffixes, and state dicts that do not match: missing and unexpected keys and
  shape mismatches, the first few named, in one line.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxq.errors import OnnxqError

if TYPE_CHECKING:
    import torch

STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
#: keys named in a mismatch error; the rest are counted
SHOWN_KEYS = 3
#: training checkpoints keep the weights under one of these keys
NESTED_STATE_KEYS = ("state_dict", "model")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth``/``.pt``/``.bin`` (weights only) or ``.safetensors`` file."""
    import torch

    if not path.exists():
        raise OnnxqError(
            f"weights file {path} does not exist", "pass the path of a local .pth or .safetensors file"
        )
    if path.is_dir():
        raise OnnxqError(
            f"--weights {path} is a folder", "pass a .pth or .safetensors file (folders are for Flux)"
        )
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    if suffix not in STATE_DICT_SUFFIXES:
        raise OnnxqError(
            f"weights file {path} has an unknown suffix {suffix or '(none)'}",
            "pass a torchvision state dict (.pth) or a .safetensors file",
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise OnnxqError(
            f"{path} holds Python objects besides tensors; onnxq loads weights only (never a full unpickling)",
            "save model.state_dict() with torch.save, or convert the file to .safetensors",
        ) from error
    except (RuntimeError, OSError, EOFError) as error:
        raise OnnxqError(
            f"cannot read {path}: {_first_line(error)}", "check that the file is a torch.save state dict"
        ) from error
    return _state_dict(loaded, path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as error:
        raise OnnxqError(f"reading {path} needs safetensors", "pip install safetensors") from error
    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as error:  # SafetensorError and OSError: any unreadable file is the same problem
        raise OnnxqError(
            f"cannot read {path}: {_first_line(error)}", "check that it is a .safetensors file"
        ) from error


def _state_dict(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    import torch

    if isinstance(loaded, Mapping):
        for key in NESTED_STATE_KEYS:
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise OnnxqError(
            f"{path} is not a state dict (a mapping of names to tensors)",
            "save model.state_dict() with torch.save",
        )
    return {str(k): v for k, v in loaded.items()}


def check_state_dict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], label: str) -> None:
    """Refuse, naming the first keys, a state dict whose keys or shapes differ from ``module``'s."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for what, keys in (
        ("shape mismatches", mismatched),
        ("missing keys", missing),
        ("unexpected keys", unexpected),
    ):
        if keys:
            more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
            problems.append(f"{what}: {', '.join(keys[:SHOWN_KEYS])}{more}")
    if problems:
        raise OnnxqError(
            f"the weights do not match {label}: {'; '.join(problems)}",
            "pass weights saved from this architecture (check the model name and --image-size)",
        )


def load_into(module: torch.nn.Module, path: Path, label: str) -> None:
    state = read_state_dict(path)
    check_state_dict(module, state, label)
    module.load_state_dict(state, strict=True)


# --- diffusers folders ----------------------------------------------------------------------------


def flux_folder(path: Path) -> Path:
    """The folder holding the transformer's ``config.json``: ``path`` or its ``transformer/``."""
    if not path.exists():
        raise OnnxqError(f"weights folder {path} does not exist", "pass a local diffusers model folder")
    if not path.is_dir():
        raise OnnxqError(
            f"--weights {path} is a file; Flux weights are a diffusers folder",
            "pass the folder holding config.json and the .safetensors files",
        )
    for candidate in (path, path / "transformer"):
        if (candidate / "config.json").is_file():
            return candidate
    raise OnnxqError(
        f"{path} holds no config.json (nor transformer/config.json)", "pass a diffusers model folder"
    )


def flux_folder_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise OnnxqError(
            f"cannot read {folder / 'config.json'}: {error}", "pass a diffusers model folder"
        ) from error
    if (
        not isinstance(config, dict)
        or config.get("_class_name", "FluxTransformer2DModel") != "FluxTransformer2DModel"
    ):
        raise OnnxqError(
            f"{folder / 'config.json'} is not a FluxTransformer2DModel config",
            "pass the Flux transformer's folder",
        )
    return {k: v for k, v in config.items() if not k.startswith("_")}


def check_flux_variant(config: Mapping[str, Any], variant: Mapping[str, Any], name: str) -> None:
    """Flux.1 dev has guidance embeddings and schnell none: a folder of the other one is refused."""
    wanted = bool(variant.get("guidance_embeds"))
    if bool(config.get("guidance_embeds")) != wanted:
        other = "flux-dev" if not wanted else "flux-schnell"
        raise OnnxqError(
            f"the folder's model {'has' if not wanted else 'has no'} guidance embeddings, unlike {name}",
            f"use {other} for these weights",
        )


def load_flux_folder(folder: Path, dtype: torch.dtype) -> Any:
    """``FluxTransformer2DModel.from_pretrained`` on local files only; mismatches in one line."""
    from diffusers import FluxTransformer2DModel

    try:
        return FluxTransformer2DModel.from_pretrained(
            str(folder), local_files_only=True, torch_dtype=dtype
        ).eval()
    except (OSError, ValueError, RuntimeError) as error:
        raise OnnxqError(
            f"cannot load the Flux weights in {folder}: {_first_line(error)}",
            "pass a diffusers folder whose safetensors match its config.json",
        ) from error


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
