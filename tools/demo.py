"""End-to-end onnxq demo: train a small CNN on scikit-learn's digits, export it, quantize it, compare.

Steps (seeded, CPU only, well under two minutes on two cores):

1. Load ``sklearn.datasets.load_digits`` (8x8 grayscale), upsample to 16x16, split train/test.
2. Train a two-conv CNN for a few epochs with PyTorch and export it to ONNX (opset 17, dynamic batch).
3. Write a calibration set (200 training images) and the test split as .npz files.
4. Quantize with the onnxq CLI (``python -m onnxq quantize``): INT8 and FP8 for TensorRT, INT8 for
   ONNX Runtime (``--target ort``).
5. For FP32 and every quantized model report the test accuracy (ONNX Runtime CPU), the output SNR
   against FP32 (``onnxq.compare``), file size, quantize wall time and ORT CPU latency per batch.

Exits non-zero when a quantization fails or when a quantized model loses more than
``MAX_ACCURACY_DROP_POINTS`` points of test accuracy.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional

LOG = logging.getLogger("demo")

SEED = 0
OPSET = 17
IMAGE_SIZE = 16
DIGITS_MAX_VALUE = 16.0
NUM_CLASSES = 10
TEST_FRACTION = 0.25
EPOCHS = 15
BATCH_SIZE = 32
LEARNING_RATE = 2e-3
TRAIN_THREADS = 1  # the model is tiny: more threads only add synchronisation overhead
CALIB_SAMPLES = 200
LATENCY_BATCH = 64
LATENCY_WARMUP = 5
LATENCY_RUNS = 50
MAX_ACCURACY_DROP_POINTS = 2.0
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
QUANTIZE_TIMEOUT_S = 300
REPO_ROOT = Path(__file__).resolve().parent.parent
TABLE_NOTES = (
    "quantize: wall time of the `python -m onnxq quantize` process (start-up and imports included).",
    "SNR: onnxq.compare of the logits on the test split. Latency: ONNX Runtime CPU EP, median of "
    f"{LATENCY_RUNS} runs of one batch of {LATENCY_BATCH} images.",
    "CPU latency of TensorRT-style Q/DQ graphs says nothing about TensorRT speed (ORT CPU emulates many of "
    "them); the `--target ort` graph is the one laid out for ORT's CPU kernels.",
)


@dataclass(frozen=True)
class Variant:
    """One onnxq quantization run of the demo model."""

    label: str
    mode: str
    target: str

    @property
    def file_name(self) -> str:
        """Output file name of this variant."""
        return f"digits_{self.mode}_{self.target}.onnx"


VARIANTS = (
    Variant("INT8 (TensorRT)", "int8", "tensorrt"),
    Variant("FP8 (TensorRT)", "fp8", "tensorrt"),
    Variant("INT8 (ORT CPU)", "int8", "ort"),
)


@dataclass
class Row:
    """One line of the result table."""

    label: str
    accuracy: float
    snr_db: float | None
    size_bytes: int
    quantize_s: float | None
    latency_ms: float


@dataclass(frozen=True)
class Splits:
    """Train and test images (N, 1, 16, 16) float32 in [0, 1] and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


class DigitsCNN(nn.Module):
    """conv(16) - pool - conv(32) - pool - fc(64) - fc(10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * (IMAGE_SIZE // 4) ** 2, 64)
        self.fc2 = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        x = functional.max_pool2d(functional.relu(self.conv1(x)), 2)
        x = functional.max_pool2d(functional.relu(self.conv2(x)), 2)
        return self.fc2(functional.relu(self.fc1(x.flatten(1))))


def load_splits() -> Splits:
    """Digits upsampled to 16x16 and scaled to [0, 1], split with a fixed seed (stratified)."""
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / DIGITS_MAX_VALUE)[:, None]
    images = functional.interpolate(
        images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    )
    x_train, x_test, y_train, y_test = train_test_split(
        images.numpy(),
        digits.target.astype(np.int64),
        test_size=TEST_FRACTION,
        random_state=SEED,
        stratify=digits.target,
    )
    return Splits(x_train, y_train, x_test, y_test)


def train(splits: Splits) -> DigitsCNN:
    """Train the CNN with Adam for ``EPOCHS`` epochs (seeded)."""
    torch.manual_seed(SEED)
    torch.set_num_threads(TRAIN_THREADS)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    x_train, y_train = torch.from_numpy(splits.x_train), torch.from_numpy(splits.y_train)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(x_train), generator=generator)
        total_loss = 0.0
        for start in range(0, len(order), BATCH_SIZE):
            index = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = functional.cross_entropy(model(x_train[index]), y_train[index])
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(index)
        LOG.info("epoch %d/%d: train loss %.4f", epoch + 1, EPOCHS, total_loss / len(order))
    return model.eval()


def export(model: nn.Module, path: Path) -> Path:
    """Export to ONNX with the TorchScript exporter, dynamic batch."""
    example = torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return path


def write_data(splits: Splits, out_dir: Path) -> tuple[Path, Path]:
    """Write the calibration set (first ``CALIB_SAMPLES`` of a seeded shuffle of train) and the test set."""
    rng = np.random.default_rng(SEED)
    chosen = rng.choice(len(splits.x_train), size=CALIB_SAMPLES, replace=False)
    calib_path = out_dir / "calib.npz"
    test_path = out_dir / "test.npz"
    np.savez(calib_path, **{INPUT_NAME: splits.x_train[chosen]})
    np.savez(test_path, **{INPUT_NAME: splits.x_test})
    return calib_path, test_path


def onnxq_env() -> dict[str, str]:
    """The environment for onnxq subprocesses, with the repository root importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    return env


def quantize_with_cli(model_path: Path, calib_path: Path, variant: Variant, out_path: Path) -> float:
    """Run ``python -m onnxq quantize`` for one variant; return its wall time in seconds."""
    command = [
        sys.executable, "-m", "onnxq", "quantize", str(model_path),
        "--mode", variant.mode,
        "--calib", str(calib_path),
        "--target", variant.target,
        "-o", str(out_path),
    ]  # fmt: skip
    LOG.info("running: %s", " ".join(command))
    start = time.perf_counter()
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=QUANTIZE_TIMEOUT_S, check=False, env=onnxq_env()
    )
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(
            f"onnxq quantize ({variant.label}) failed:\n{completed.stdout}\n{completed.stderr}"
        )
    print(completed.stdout.rstrip())
    return seconds


def make_session(model_path: Path) -> ort.InferenceSession:
    """A CPU ONNX Runtime session."""
    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])


def accuracy(session: ort.InferenceSession, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent on the whole set."""
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images})
    return 100.0 * float(np.mean(np.argmax(logits, axis=1) == labels))


def latency_ms(session: ort.InferenceSession, images: np.ndarray) -> float:
    """Median wall time in milliseconds of one batch of ``LATENCY_BATCH`` images."""
    batch = {INPUT_NAME: images[:LATENCY_BATCH]}
    for _ in range(LATENCY_WARMUP):
        session.run(None, batch)
    timings = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        session.run(None, batch)
        timings.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(timings)


def output_snr_db(reference: Path, quantized: Path, data: Path) -> float:
    """Output SNR of ``quantized`` against ``reference`` on ``data`` via ``onnxq.compare``."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    import onnxq

    result = onnxq.compare(str(reference), str(quantized), str(data))
    return min(float(metrics.snr_db) for metrics in result.outputs.values())


def format_table(rows: list[Row]) -> str:
    """Markdown table of the results."""
    header = [
        "model",
        "test acc (%)",
        "SNR vs FP32 (dB)",
        "size (KB)",
        "quantize (s)",
        "ORT latency (ms/batch)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row.label,
            f"{row.accuracy:.2f}",
            "-" if row.snr_db is None else f"{row.snr_db:.1f}",
            f"{row.size_bytes / 1024:.1f}",
            "-" if row.quantize_s is None else f"{row.quantize_s:.2f}",
            f"{row.latency_ms:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {note}" for note in TABLE_NOTES]
    return "\n".join(lines)


def evaluate(label: str, model_path: Path, splits: Splits) -> Row:
    """Accuracy, size and latency of one model (SNR and quantize time are filled in by the caller)."""
    session = make_session(model_path)
    return Row(
        label=label,
        accuracy=accuracy(session, splits.x_test, splits.y_test),
        snr_db=None,
        size_bytes=model_path.stat().st_size,
        quantize_s=None,
        latency_ms=latency_ms(session, splits.x_test),
    )


def run(out_dir: Path) -> int:
    """The whole demo; returns the process exit code."""
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = load_splits()
    LOG.info("digits: %d train / %d test images", len(splits.x_train), len(splits.x_test))
    model = train(splits)
    fp32_path = export(model, out_dir / "digits_fp32.onnx")
    calib_path, test_path = write_data(splits, out_dir)
    reference = evaluate("FP32", fp32_path, splits)
    rows = [reference]
    failures: list[str] = []
    for variant in VARIANTS:
        out_path = out_dir / variant.file_name
        try:
            seconds = quantize_with_cli(fp32_path, calib_path, variant, out_path)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            LOG.error("%s", error)
            failures.append(f"{variant.label}: quantization failed")
            continue
        row = evaluate(variant.label, out_path, splits)
        row.quantize_s = seconds
        row.snr_db = output_snr_db(fp32_path, out_path, test_path)
        rows.append(row)
        drop = reference.accuracy - row.accuracy
        if drop > MAX_ACCURACY_DROP_POINTS:
            failures.append(
                f"{variant.label}: accuracy dropped {drop:.2f} points (> {MAX_ACCURACY_DROP_POINTS})"
            )
    table = format_table(rows)
    print(table)
    (out_dir / "demo.md").write_text(table + "\n")
    for failure in failures:
        LOG.error("FAIL %s", failure)
    if not failures:
        LOG.info("all quantized models within %.1f accuracy points of FP32", MAX_ACCURACY_DROP_POINTS)
    return 1 if failures else 0


def main() -> int:
    """Parse arguments and run the demo."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out/demo"), help="output directory (default: out/demo)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    torch.manual_seed(SEED)
    return run(args.out)


if __name__ == "__main__":
    raise SystemExit(main())
