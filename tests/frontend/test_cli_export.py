"""``onnxq export``: the round trip with saved weights and calibration images, and every bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the front-end tests need torch (pip install 'onnxq[torch]')")
torchvision = pytest.importorskip("torchvision", reason="the front-end tests need torchvision")
Image = pytest.importorskip("PIL.Image", reason="calibration images need Pillow")

import onnxruntime as ort  # noqa: E402

from onnxq.errors import OnnxqError  # noqa: E402
from onnxq.frontend import builders, export, recipes  # noqa: E402
from onnxq.frontend.cli_export import main  # noqa: E402

TINY = ["--tiny", "--image-size", "32", "32"]


def _tiny_resnet(seed: int) -> torch.nn.Module:
    return builders.build(recipes.find_recipe("resnet18"), tiny=True, seed=seed).module


def _images(folder: Path, count: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(7)
    for index in range(count):
        pixels = rng.integers(0, 256, size=(40 + 7 * index, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"image_{index}.{'png' if index % 2 else 'jpg'}")
    return folder


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".onnx", ".data", ".tmp", ".npz"))


def test_round_trip_with_saved_weights_and_images(tmp_path: Path) -> None:
    trained = _tiny_resnet(seed=11)
    weights = tmp_path / "resnet.pth"
    torch.save(trained.state_dict(), weights)
    images = _images(tmp_path / "images", 3)
    output, calib = tmp_path / "model.onnx", tmp_path / "calib.npz"
    code = main(["resnet18", *TINY, "--weights", str(weights), "-o", str(output), "--dynamic-batch",
                 "--calib-samples", "3", "--calib-out", str(calib), "--images", str(images)])  # fmt: skip
    assert code == 0
    samples = np.load(calib)["input"]
    # torchvision's own preprocessing is the reference (Resize(256 * 32 / 224) -> CenterCrop -> Normalize)
    transform = torchvision.transforms.Compose([
        torchvision.transforms.Resize(round(256 * 32 / 224)), torchvision.transforms.CenterCrop(32),
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])  # fmt: skip
    files = sorted((images).iterdir())
    expected = np.stack([transform(Image.open(f).convert("RGB")).numpy() for f in files])
    np.testing.assert_allclose(samples, expected, atol=1e-5)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    got = ort.InferenceSession(str(output), options, providers=["CPUExecutionProvider"]).run(
        None, {"input": samples}
    )[0]
    with torch.no_grad():
        want = trained.eval()(torch.from_numpy(samples)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_no_weights_warns_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxq.frontend import cli_export

    def stop(*_: object) -> None:
        raise OnnxqError("stopped before the export")

    monkeypatch.setattr(cli_export, "_export", stop)  # the warning comes with the build; no export needed
    assert main(["resnet18", *TINY, "-o", str(tmp_path / "r.onnx")]) == 2
    assert "RANDOM weights" in caplog.text


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("onnxq: error:")
    return err


def test_unknown_model_lists_known(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["resnet9", "-o", str(tmp_path / "m.onnx")])
    assert "resnet18" in err and "flux-schnell" in err
    assert _leftovers(tmp_path) == []


def test_missing_weights_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(
        capsys, ["resnet18", *TINY, "--weights", str(tmp_path / "none.pth"), "-o", str(tmp_path / "m.onnx")]
    )
    assert "does not exist" in err and _leftovers(tmp_path) == []


def test_mismatched_weights_name_the_first_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    state = _tiny_resnet(seed=0).state_dict()
    state["fc.weight"] = torch.zeros(7, 512)
    del state["layer1.0.conv1.weight"]
    weights = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    err = _error(capsys, ["resnet18", *TINY, "--weights", str(weights), "-o", str(tmp_path / "m.onnx")])
    assert "fc.weight [7, 512] vs [10, 512]" in err and "missing keys: layer1.0.conv1.weight" in err
    assert _leftovers(tmp_path) == []


def test_pickled_objects_are_never_loaded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), weights)  # a whole module: loading it would unpickle code
    err = _error(capsys, ["resnet18", *TINY, "--weights", str(weights), "-o", str(tmp_path / "m.onnx")])
    assert "weights only" in err


def test_calibration_options_go_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["resnet18", *TINY, "--calib-samples", "4", "-o", str(tmp_path / "m.onnx")])
    assert "--calib-out" in err


def test_unknown_dtype_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["resnet18", "--dtype", "fp64"])
    module = torch.nn.Linear(4, 4)
    with pytest.raises(OnnxqError, match="dtype 'fp64' cannot be exported"):
        export.export(
            module, torch.ones(1, 4), tmp_path / "m.onnx", input_names=["x"], output_names=["y"], dtype="fp64"
        )


class _TwoOutputs(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2.0, x + 1.0


def test_numerics_disagreeing_with_eager_name_the_worst_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = export._run_ort

    def perturbed(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        first, second = real(path, feeds)
        return [first, second + 0.5]  # "plus_one" off by 0.5 of a peak of 2: relative 0.25

    monkeypatch.setattr(export, "_run_ort", perturbed)
    with pytest.raises(OnnxqError, match=r"output 'plus_one' max abs error 0\.5, relative 0\.25"):
        export.export(_TwoOutputs(), torch.ones(1, 4), tmp_path / "m.onnx", input_names=["x"],
                      output_names=["doubled", "plus_one"])  # fmt: skip
    assert _leftovers(tmp_path) == []
    assert not list(tmp_path.iterdir())
