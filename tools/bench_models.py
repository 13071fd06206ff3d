"""Seeded benchmark models exported to ONNX, each with a calibration set and a held-out eval set.

Models (all exported with the TorchScript exporter at opset ``OPSET``, dynamic batch):

* ``resnet``: ResNet-style CNN, 3 stages of 2 basic residual blocks (32-64-128 channels) with
  BatchNorm, 3x64x64 input, global average pool, fc to 100 classes.
* ``vit``: ViT-style transformer, 8x8 patch-embedding Conv, 6 pre-LN layers, hidden 192, 3 heads,
  GELU MLP, Softmax attention, class token.
* ``bert``: BERT-style post-LN encoder, token-id input through an Embedding plus an
  ``attention_mask`` input, 4 layers, hidden 256, 4 heads, sequence 128. The additive mask is built
  with ``torch.where(mask, 0.0, -inf)`` and added to the attention scores right before Softmax, so
  the exported graph holds ``Where(mask, 0, -inf) -> Add -> Softmax`` and the data has padding.
* ``big``: synthetic MatMul+Add+Relu chain with 8192x8192 float32 weights, 9 layers (~2.4 GB of
  external data), written tensor by tensor so that the generator never holds more than one weight.

Weights and activations: the networks keep PyTorch's default initialisation, seeded. Two cheap steps
make the activations look more like those of trained networks (no training):

* BatchNorm statistics are re-estimated on the synthetic images (forward passes in train mode with a
  cumulative average), as after real training; otherwise the eval-mode BatchNorm would be an identity.
* Every LayerNorm gets a few outlier channels (gain ``OUTLIER_GAIN`` on the same ``OUTLIER_CHANNELS``
  channels in all layers), the pattern seen in trained BERT/ViT models that makes per-tensor INT8
  hard on transformer activations.

Images are smooth random fields (bilinear-upsampled 8x8 noise plus a little pixel noise), not pure
white noise, so that convolutions see spatially correlated inputs.

Run ``python tools/bench_models.py --help`` to build the models, check them in ONNX Runtime and print
their operator lists.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn import functional

LOG = logging.getLogger("bench_models")

SEED = 0
OPSET = 17  # ONNX Runtime's quantize_static supports opsets up to 21.
IR_VERSION = 8  # the IR version that goes with opset 17

CALIB_SAMPLES = 64
EVAL_SAMPLES = 32
CALIB_SEED_OFFSET = 1
EVAL_SEED_OFFSET = 2

IMAGE_SIZE = 64
IMAGE_CHANNELS = 3
IMAGE_NOISE_RES = 8
IMAGE_PIXEL_NOISE = 0.1
NUM_CLASSES = 100
BN_RECALIBRATION_BATCHES = 8
BN_RECALIBRATION_BATCH_SIZE = 32

OUTLIER_CHANNELS = 2
OUTLIER_GAIN = 6.0

RESNET_WIDTHS = (32, 64, 128)
RESNET_BLOCKS_PER_STAGE = 2

VIT_PATCH = 8
VIT_HIDDEN = 192
VIT_HEADS = 3
VIT_LAYERS = 6
VIT_MLP_RATIO = 4

BERT_VOCAB = 30522
BERT_HIDDEN = 256
BERT_HEADS = 4
BERT_LAYERS = 4
BERT_FFN = 1024
BERT_SEQ = 128
BERT_MIN_LENGTH = 16
BERT_PAD_ID = 0
BERT_FIRST_TOKEN_ID = 1000
BERT_FULL_LENGTH_FRACTION = 0.25

BIG_HIDDEN = 8192
BIG_LAYERS = 9
BIG_CALIB_SAMPLES = 16
BIG_EVAL_SAMPLES = 8
BIG_ALIGNMENT = 4096  # external-data offsets aligned to pages, as onnx's own writer does

DEFAULT_LATENCY_BATCH = 8
BIG_LATENCY_BATCH = 1


@dataclass(frozen=True)
class BenchModel:
    """One exported benchmark model and its data files."""

    name: str
    model_path: Path
    calib_path: Path
    eval_path: Path
    latency_batch: int


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def make_images(count: int, seed: int) -> np.ndarray:
    """Smooth random images of shape (count, 3, 64, 64), float32, roughly zero mean and unit std."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, IMAGE_CHANNELS, IMAGE_NOISE_RES, IMAGE_NOISE_RES, generator=generator)
    images = functional.interpolate(
        coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    )
    images = images + IMAGE_PIXEL_NOISE * torch.randn(images.shape, generator=generator)
    images = (images - images.mean()) / images.std()
    return images.numpy().astype(np.float32)


def make_token_batch(count: int, seed: int) -> dict[str, np.ndarray]:
    """Token ids and attention masks with padding: most sequences are shorter than ``BERT_SEQ``."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(BERT_MIN_LENGTH, BERT_SEQ + 1, size=count)
    full = rng.random(count) < BERT_FULL_LENGTH_FRACTION
    lengths[full] = BERT_SEQ
    positions = np.arange(BERT_SEQ)[None, :]
    mask = (positions < lengths[:, None]).astype(np.int64)
    ids = rng.integers(BERT_FIRST_TOKEN_ID, BERT_VOCAB, size=(count, BERT_SEQ), dtype=np.int64)
    ids = np.where(mask == 1, ids, BERT_PAD_ID).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write named arrays to an uncompressed .npz file and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


# --------------------------------------------------------------------------------------------------
# PyTorch modules
# --------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity or 1x1 projection shortcut, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual forward pass."""
        out = functional.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return functional.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """Three-stage ResNet for 3x64x64 inputs."""

    def __init__(self) -> None:
        super().__init__()
        first = RESNET_WIDTHS[0]
        self.stem = nn.Sequential(
            nn.Conv2d(IMAGE_CHANNELS, first, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(first),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        in_channels = first
        for stage, width in enumerate(RESNET_WIDTHS):
            for index in range(RESNET_BLOCKS_PER_STAGE):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(in_channels, width, stride))
                in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_channels, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, NUM_CLASSES)."""
        features = self.blocks(self.stem(x))
        return self.fc(features.mean(dim=(2, 3)))


class SelfAttention(nn.Module):
    """Multi-head self-attention written out as MatMul/Softmax so the export is explicit."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over the token axis; ``additive_mask`` (0 or -inf) is added to the scores."""
        batch, tokens, hidden = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv[0], qkv[1], qkv[2]
        scores = torch.matmul(query, key.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        if additive_mask is not None:
            scores = scores + additive_mask
        weights = torch.softmax(scores, dim=-1)
        context = torch.matmul(weights, value).transpose(1, 2).reshape(batch, tokens, hidden)
        return self.proj(context)


class ViTBlock(nn.Module):
    """Pre-LN transformer block with a GELU MLP."""

    def __init__(self, hidden: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = SelfAttention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual attention then residual MLP."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTSmall(nn.Module):
    """ViT for 3x64x64 images: 8x8 patches, class token, learned position embedding."""

    def __init__(self) -> None:
        super().__init__()
        patches = (IMAGE_SIZE // VIT_PATCH) ** 2
        self.patch_embed = nn.Conv2d(IMAGE_CHANNELS, VIT_HIDDEN, VIT_PATCH, stride=VIT_PATCH)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, VIT_HIDDEN))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, patches + 1, VIT_HIDDEN))
        mlp_hidden = VIT_HIDDEN * VIT_MLP_RATIO
        self.blocks = nn.Sequential(*[ViTBlock(VIT_HIDDEN, VIT_HEADS, mlp_hidden) for _ in range(VIT_LAYERS)])
        self.norm = nn.LayerNorm(VIT_HIDDEN)
        self.head = nn.Linear(VIT_HIDDEN, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the class token."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        tokens = self.norm(self.blocks(tokens))
        return self.head(tokens[:, 0])


class BertLayer(nn.Module):
    """Post-LN BERT encoder layer."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = SelfAttention(BERT_HIDDEN, BERT_HEADS)
        self.norm1 = nn.LayerNorm(BERT_HIDDEN)
        self.ffn = nn.Sequential(
            nn.Linear(BERT_HIDDEN, BERT_FFN), nn.GELU(), nn.Linear(BERT_FFN, BERT_HIDDEN)
        )
        self.norm2 = nn.LayerNorm(BERT_HIDDEN)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        """Masked attention and FFN, each followed by residual + LayerNorm."""
        x = self.norm1(x + self.attn(x, additive_mask))
        return self.norm2(x + self.ffn(x))


class BertSmall(nn.Module):
    """BERT-style encoder returning the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(BERT_VOCAB, BERT_HIDDEN, padding_idx=BERT_PAD_ID)
        self.position_embeddings = nn.Embedding(BERT_SEQ, BERT_HIDDEN)
        self.embed_norm = nn.LayerNorm(BERT_HIDDEN)
        self.layers = nn.ModuleList([BertLayer() for _ in range(BERT_LAYERS)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states of shape (batch, seq, hidden)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        hidden = self.embed_norm(hidden)
        keep = attention_mask.bool()[:, None, None, :]
        additive_mask = torch.where(keep, 0.0, float("-inf"))
        for layer in self.layers:
            hidden = layer(hidden, additive_mask)
        return hidden


# --------------------------------------------------------------------------------------------------
# Weight conditioning and export
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, seed: int) -> None:
    """Re-estimate BatchNorm running statistics on synthetic images (cumulative average)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    for batch in range(BN_RECALIBRATION_BATCHES):
        images = make_images(BN_RECALIBRATION_BATCH_SIZE, seed + 1000 + batch)
        model(torch.from_numpy(images))
    model.eval()


@torch.no_grad()
def add_layernorm_outliers(model: nn.Module, seed: int) -> None:
    """Scale the same few channels of every LayerNorm weight by ``OUTLIER_GAIN``."""
    norms = [module for module in model.modules() if isinstance(module, nn.LayerNorm)]
    if not norms:
        return
    rng = np.random.default_rng(seed)
    channels = rng.choice(norms[0].normalized_shape[0], size=OUTLIER_CHANNELS, replace=False)
    for norm in norms:
        norm.weight[torch.from_numpy(channels)] *= OUTLIER_GAIN


def export_onnx(
    model: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_name: str,
) -> Path:
    """Export with the TorchScript exporter at ``OPSET`` with a dynamic batch axis."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic_axes = {name: {0: "batch"} for name in [*input_names, output_name]}
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=input_names,
            output_names=[output_name],
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(path))
    return path


def _export_with_data(
    name: str,
    out_dir: Path,
    model: nn.Module,
    data_fn: Callable[[int, int], dict[str, np.ndarray]],
    output_name: str,
) -> BenchModel:
    """Export ``model`` and write its calibration and eval sets from ``data_fn(count, seed)``."""
    calib = data_fn(CALIB_SAMPLES, SEED + CALIB_SEED_OFFSET)
    evaluation = data_fn(EVAL_SAMPLES, SEED + EVAL_SEED_OFFSET)
    input_names = list(calib)
    example = tuple(torch.from_numpy(calib[key][:2]) for key in input_names)
    model_path = export_onnx(model, example, out_dir / f"{name}.onnx", input_names, output_name)
    return BenchModel(
        name=name,
        model_path=model_path,
        calib_path=save_npz(out_dir / f"{name}_calib.npz", calib),
        eval_path=save_npz(out_dir / f"{name}_eval.npz", evaluation),
        latency_batch=DEFAULT_LATENCY_BATCH,
    )


def _image_data(count: int, seed: int) -> dict[str, np.ndarray]:
    """Image feeds under the input name ``pixel_values``."""
    return {"pixel_values": make_images(count, seed)}


def make_resnet(out_dir: Path) -> BenchModel:
    """Export the ResNet-style CNN (BatchNorm statistics re-estimated on the synthetic images)."""
    torch.manual_seed(SEED)
    model = ResNetSmall()
    recalibrate_batchnorm(model, SEED)
    return _export_with_data("resnet", out_dir, model, _image_data, "logits")


def make_vit(out_dir: Path) -> BenchModel:
    """Export the ViT-style transformer (LayerNorm outlier channels added)."""
    torch.manual_seed(SEED)
    model = ViTSmall()
    add_layernorm_outliers(model, SEED)
    return _export_with_data("vit", out_dir, model, _image_data, "logits")


def make_bert(out_dir: Path) -> BenchModel:
    """Export the BERT-style encoder with the ``Where(mask, 0, -inf)`` additive attention mask."""
    torch.manual_seed(SEED)
    model = BertSmall()
    add_layernorm_outliers(model, SEED)
    bench_model = _export_with_data("bert", out_dir, model, make_token_batch, "last_hidden_state")
    if not find_masked_softmax(onnx.load(str(bench_model.model_path))):
        raise RuntimeError("BERT export lost the Where(mask, 0, -inf) -> Add -> Softmax path")
    return bench_model


# --------------------------------------------------------------------------------------------------
# The > 2 GB model
# --------------------------------------------------------------------------------------------------


def _external_tensor(name: str, dims: list[int], location: str, offset: int, length: int) -> onnx.TensorProto:
    """A float32 initializer whose bytes live in ``location`` at ``offset``."""
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = onnx.TensorProto.FLOAT
    tensor.dims.extend(dims)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _write_aligned(handle: BinaryIO, array: np.ndarray) -> tuple[int, int]:
    """Pad the file to ``BIG_ALIGNMENT``, write ``array`` and return (offset, length)."""
    offset = handle.tell()
    padding = (-offset) % BIG_ALIGNMENT
    if padding:
        handle.write(b"\0" * padding)
        offset += padding
    array.tofile(handle)
    return offset, array.nbytes


def make_big_model(path: Path, hidden: int = BIG_HIDDEN, layers: int = BIG_LAYERS) -> BenchModel:
    """Write a MatMul+Add+Relu chain with ``layers`` float32 ``hidden`` x ``hidden`` weights.

    Each weight is generated (seeded, He-scaled so activations keep their magnitude), appended to the
    external data file ``<path>.data`` and freed before the next one, so peak memory stays at about
    one weight. The calibration and eval sets (inputs of shape (n, hidden)) are written beside it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    location = path.name + ".data"
    weight_scale = np.float32(math.sqrt(2.0 / hidden))
    initializers: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    current = "input"
    with open(path.parent / location, "wb") as handle:
        for layer in range(layers):
            rng = np.random.default_rng(SEED + layer)
            weight = rng.standard_normal((hidden, hidden), dtype=np.float32)
            weight *= weight_scale
            offset, length = _write_aligned(handle, weight)
            del weight
            weight_name, bias_name = f"layer{layer}.weight", f"layer{layer}.bias"
            initializers.append(_external_tensor(weight_name, [hidden, hidden], location, offset, length))
            bias = (0.01 * rng.standard_normal(hidden)).astype(np.float32)
            initializers.append(onnx.numpy_helper.from_array(bias, bias_name))
            matmul, added = f"layer{layer}.matmul", f"layer{layer}.add"
            nodes.append(onnx.helper.make_node("MatMul", [current, weight_name], [matmul], name=matmul))
            last = layer == layers - 1
            add_output = "output" if last else added
            nodes.append(onnx.helper.make_node("Add", [matmul, bias_name], [add_output], name=added))
            if not last:
                current = f"layer{layer}.relu"
                nodes.append(onnx.helper.make_node("Relu", [added], [current], name=current))
            LOG.info("big model: wrote layer %d/%d", layer + 1, layers)
    graph = onnx.helper.make_graph(
        nodes,
        "big_mlp",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", hidden])],
        [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["batch", hidden])],
        initializer=initializers,
    )
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))
    stem = path.with_suffix("")
    rng = np.random.default_rng(SEED + layers)
    calib = {"input": rng.standard_normal((BIG_CALIB_SAMPLES, hidden), dtype=np.float32)}
    evaluation = {"input": rng.standard_normal((BIG_EVAL_SAMPLES, hidden), dtype=np.float32)}
    return BenchModel(
        name="big",
        model_path=path,
        calib_path=save_npz(stem.parent / f"{stem.name}_calib.npz", calib),
        eval_path=save_npz(stem.parent / f"{stem.name}_eval.npz", evaluation),
        latency_batch=BIG_LATENCY_BATCH,
    )


def model_size_bytes(path: Path) -> int:
    """Size of an ONNX file plus the external data files it references."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in onnx.external_data_helper._get_all_tensors(model)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / location).stat().st_size for location in locations)


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def _is_negative_infinity(model: onnx.ModelProto, name: str) -> bool:
    """True when ``name`` is a Constant node output or initializer holding only -inf."""
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            value = onnx.numpy_helper.to_array(onnx.helper.get_attribute_value(node.attribute[0]))
            return bool(np.all(np.isneginf(value)))
    for initializer in model.graph.initializer:
        if initializer.name == name:
            return bool(np.all(np.isneginf(onnx.numpy_helper.to_array(initializer))))
    return False


def find_masked_softmax(model: onnx.ModelProto) -> list[str]:
    """Names of Softmax nodes fed by an Add that takes the output of a ``Where(mask, 0, -inf)``."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    masked: list[str] = []
    for where in (node for node in model.graph.node if node.op_type == "Where"):
        if not any(_is_negative_infinity(model, name) for name in where.input[1:]):
            continue
        for add in consumers.get(where.output[0], []):
            if add.op_type != "Add":
                continue
            masked += [node.name for node in consumers.get(add.output[0], []) if node.op_type == "Softmax"]
    return masked


def op_histogram(path: Path) -> Counter[str]:
    """Operator counts of a model (without loading external data)."""
    model = onnx.load(str(path), load_external_data=False)
    return Counter(node.op_type for node in model.graph.node)


def run_in_ort(bench_model: BenchModel) -> dict[str, np.ndarray]:
    """Run the eval set through ONNX Runtime (CPU) and return the outputs by name."""
    session = ort.InferenceSession(str(bench_model.model_path), providers=["CPUExecutionProvider"])
    with np.load(bench_model.eval_path) as data:
        feeds = {name: data[name] for name in data.files}
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


BUILDERS: dict[str, Callable[[Path], BenchModel]] = {
    "resnet": make_resnet,
    "vit": make_vit,
    "bert": make_bert,
    "big": lambda out_dir: make_big_model(out_dir / "big.onnx"),
}


def main() -> int:
    """Build the requested models, run them in ONNX Runtime and print their operator lists."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("out/bench/models"), help="output directory")
    parser.add_argument(
        "--models",
        default="resnet,vit,bert",
        help=f"comma-separated subset of {','.join(BUILDERS)} (default: resnet,vit,bert)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in args.models.split(","):
        start = time.perf_counter()
        bench_model = BUILDERS[name](args.out)
        seconds = time.perf_counter() - start
        outputs = run_in_ort(bench_model)
        shapes = {key: value.shape for key, value in outputs.items()}
        finite = all(np.isfinite(value).all() for value in outputs.values())
        size_mb = model_size_bytes(bench_model.model_path) / 1e6
        LOG.info(
            "%s: built in %.1f s, %.1f MB, ORT outputs %s, finite=%s", name, seconds, size_mb, shapes, finite
        )
        print(f"{name} ops: {dict(sorted(op_histogram(bench_model.model_path).items()))}")
        if name == "bert":
            masked = find_masked_softmax(onnx.load(str(bench_model.model_path)))
            print(f"bert: Softmax nodes behind Where(mask, 0, -inf) -> Add: {masked}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
