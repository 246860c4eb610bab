"""Saliency maps (Recipro-CAM): the features/head split of every architecture, the method itself, maps that
peak where the class is decided, explain.py on a checkpoint and on an export.py --explain IR, the IR's
saliency output against PyTorch's, and one-line errors for bad input."""
from __future__ import annotations

import csv
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clsengine.errors import UserError
from clsengine.export import SALIENCY_NAME, DeployModel, export_onnx, export_openvino, read_metadata
from clsengine.inference import ExportedClassifier
from clsengine.models import create_model, forward_features, forward_head, list_models
from clsengine.models.factory import IMAGENET_MEAN, IMAGENET_STD
from clsengine.saliency import overlay, recipro_cam
from conftest import assert_clean_error, instantiate, one_torch_thread, run_captured, run_in_process, train_on_shapes
from test_export import warmed_model
from workbench.classifier import load_classifier

SIZE, SQUARE = 32, 10
COLOURS = {"blue": (40, 60, 230), "green": (40, 200, 40), "red": (230, 40, 40)}   # sorted: class order


def make_located_images(root: Path, per_class: int, seed: int) -> dict[str, int]:
    """<root>/<colour>/<j>.png: grey noise with a square of the class colour inside one quadrant (the region
    that decides the class) and a white square, the same in every class, inside another. Returns the
    decisive quadrant (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) of each image."""
    rng = np.random.default_rng(seed)
    half, quadrants = SIZE // 2, {}
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            image = rng.integers(80, 160, (SIZE, SIZE, 3)).astype(np.float64)
            decisive, distractor = rng.choice(4, 2, replace=False)
            for quadrant, value in ((distractor, 245), (decisive, colour)):
                y = (quadrant // 2) * half + rng.integers(0, half - SQUARE + 1)
                x = (quadrant % 2) * half + rng.integers(0, half - SQUARE + 1)
                image[y:y + SQUARE, x:x + SQUARE] = value
            image += rng.normal(0, 12, image.shape)
            path = root / name / f"{j}.png"
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
            quadrants[str(path)] = int(decisive)
    return quadrants


@pytest.fixture(scope="module")
def located(module_dir) -> dict:
    """regnetx_800mf trained from scratch by train.py on the located squares (32x32: a 2x2 last feature map,
    one cell per quadrant), and exported by export.py --explain."""
    root = module_dir
    make_located_images(root / "train", per_class=30, seed=1)
    quadrants = make_located_images(root / "val", per_class=15, seed=2)
    wd = root / "wd"
    assert instantiate("regnetx_800mf", wd, "--do-not-load-snapshot").returncode == 0
    start = time.monotonic()
    # One thread, as conftest's per-test fixture sets (this module fixture is set up before it).
    with one_torch_thread(), pytest.MonkeyPatch.context() as mp:
        assert train_on_shapes(wd, root, 3, SIZE, mp) == 0
        train_s = time.monotonic() - start
        assert run_in_process(wd, "export.py", "--load-weights", "outputs/best.pth", "--save-model-to", "export",
                              "--explain", "--val-data-roots", str(root / "val"), monkeypatch=mp) == 0
    return {"wd": wd, "root": root, "val": root / "val", "quadrants": quadrants, "train_s": train_s}


def _load(path: Path, wd: Path):
    return load_classifier(path, template_path=str(wd / "template.yaml"), overrides={}, classes=None,
                           classes_source="")


def _explain_val(model, files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from clsengine import data as D

    transform = model.transform()
    with torch.no_grad():
        return model.explain(torch.stack([transform(D.read_image(f)) for f in files]))


@pytest.mark.parametrize("arch", list_models())
def test_features_then_head_is_the_model(arch):
    """The hook Recipro-CAM needs, for every architecture: head(features(x)) is exactly model(x)."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=3, small_input=True, dropout=0.1, head="cosine").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = forward_features(model, x)
        side = 8 if arch == "convnet_small" else 2  # two max-pools; the ImageNet backbones downsample 16x here
        assert features.dim() == 4 and features.shape[2:] == (side, side)
        torch.testing.assert_close(forward_head(model, features), model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("multilabel", [False, True])
def test_recipro_cam_is_the_head_on_each_masked_feature_map(multilabel):
    """The pooled shortcut equals the method as published: the head run on the feature map kept at one
    position (zero elsewhere), its score of each class at that position. MobileNetV3's head is two layers."""
    model = warmed_model("mobilenet_v3_small", small_input=True)
    with torch.no_grad():
        features = forward_features(model, torch.randn(2, 3, 64, 64))
        n, _, h, w = features.shape
        fast = recipro_cam(features, partial(forward_head, model), multilabel=multilabel, normalize=False)
        expected = torch.empty_like(fast)
        for k in range(h * w):
            mask = torch.zeros(1, 1, h * w)
            mask[..., k] = 1
            logits = forward_head(model, features * mask.view(1, 1, h, w))
            expected[:, :, k // w, k % w] = logits.sigmoid() if multilabel else logits.softmax(dim=1)
        torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-6)
        maps = recipro_cam(features, partial(forward_head, model), multilabel=multilabel)
    assert maps.shape == (n, 3, 4, 4)
    assert maps.amin(dim=(2, 3)).eq(0).all() and torch.isclose(maps.amax(dim=(2, 3)), torch.ones(())).all()


def test_maps_peak_in_the_region_that_decides_the_class(located):
    model = _load(located["wd"] / "outputs" / "best.pth", located["wd"])
    files = sorted(located["quadrants"])
    logits, maps = _explain_val(model, files)
    predicted = logits.argmax(dim=1)
    labels = torch.tensor([model.classes.index(Path(f).parent.name) for f in files])
    top1 = float((predicted == labels).float().mean())
    peaks = maps[torch.arange(len(files)), predicted].flatten(1).argmax(dim=1)
    quadrants = torch.tensor([located["quadrants"][f] for f in files])
    hits = float((peaks == quadrants).float().mean())
    print(f"trained in {located['train_s']:.1f} s; val top-1 {100 * top1:.1f}%; the predicted class's map "
          f"peaks in the decisive quadrant for {100 * hits:.1f}% of {len(files)} images (chance 25%)")
    assert maps.shape == (len(files), 3, 2, 2)
    assert top1 >= 0.9
    assert hits >= 0.8


def test_explain_script_on_checkpoint_and_on_explain_ir(located, monkeypatch, capsys):
    wd, val = located["wd"], located["val"]
    parity = (wd / "export" / "parity.yaml").read_text()
    assert "saliency_max_abs_diff" in parity and "saliency_ok: true" in parity
    assert read_metadata(wd / "export" / "model.xml")["saliency"] == {"output": SALIENCY_NAME,
                                                                     "method": "recipro_cam"}
    for weights, out in (("outputs/best.pth", "from_checkpoint"), ("export/model.xml", "from_ir"),
                         ("export/model.onnx", "from_onnx")):
        result = run_captured(wd, "explain.py", "--load-weights", weights, "--input", str(val), "--save-to", out,
                              monkeypatch=monkeypatch, capsys=capsys)
        assert result.returncode == 0, result.stderr
        overlays = sorted((wd / out).rglob("*.png"))
        assert len(overlays) == 45 and (wd / out / "red" / "0.png.png") in overlays   # the input tree, mirrored
        with open(wd / out / "summary.csv", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 45 and sum(Path(r["img_path"]).parent.name == r["class"] for r in rows) >= 40
        original = np.asarray(Image.open(val / "red" / "0.png"))
        blended = np.asarray(Image.open(wd / out / "red" / "0.png.png"))
        assert blended.shape == original.shape and np.abs(blended.astype(int) - original).mean() > 10
    result = run_captured(wd, "explain.py", "--load-weights", "export/model.xml", "--input", str(val / "red" / "0.png"),
                          "--save-to", "target", "--target-class", "green", monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "class 'green'" in result.stdout and (wd / "target" / "0.png.png").is_file()
    assert (wd / "target" / "summary.csv").read_text().splitlines()[1].split(",")[1] == "green"


def test_ir_saliency_output_matches_pytorch(located):
    wd = located["wd"]
    files = sorted(located["quadrants"])
    logits, maps = _explain_val(_load(wd / "outputs" / "best.pth", wd), files)
    for exported in ("model.xml", "model.onnx"):
        ir_logits, ir_maps = _explain_val(_load(wd / "export" / exported, wd), files)
        torch.testing.assert_close(ir_logits, logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ir_maps, maps, rtol=0, atol=1e-3)


def test_explain_export_keeps_logits_and_default_export_unchanged(tmp_path):
    """Static batch 1 (NPU templates) and a multi-label task (sigmoid scores) through export_openvino; the
    default export has one output and no saliency metadata."""
    model = warmed_model("mobilenet_v3_small", small_input=True)
    kw = dict(input_size=(64, 64), mean=IMAGENET_MEAN, std=IMAGENET_STD, labels=["a", "b", "c"])
    task = {"type": "multilabel", "threshold": 0.5, "background_label": None}
    xml = export_openvino(model, tmp_path / "explain.xml", static_batch=True, task=task, explain=True, **kw)
    images = torch.randint(0, 256, (3, 3, 64, 64), generator=torch.Generator().manual_seed(3)).float()
    runner = ExportedClassifier(xml)
    assert runner.output_names == ["logits", SALIENCY_NAME]
    logits, maps = runner.explain(images)
    with torch.no_grad():
        expected_logits, expected_maps = DeployModel(model, IMAGENET_MEAN, IMAGENET_STD, explain=True,
                                                     multilabel=True)(images)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(maps, expected_maps, rtol=0, atol=1e-3)
    torch.testing.assert_close(runner(images), logits)
    plain = export_onnx(model, tmp_path / "plain.onnx", **kw)
    plain_runner = ExportedClassifier(plain)
    assert plain_runner.saliency is None and plain_runner.output_names == ["logits"]
    with pytest.raises(UserError, match="no saliency output"):
        plain_runner.explain(images)


def test_overlay_is_a_heat_map_over_the_image():
    image = np.full((40, 60, 3), 128, np.uint8)
    saliency = np.array([[0.0, 1.0], [0.0, 0.0]], np.float32)   # top-right salient
    blended = overlay(image, saliency, alpha=0.5)
    assert blended.shape == image.shape and blended.dtype == np.uint8
    assert blended[2, 57, 0] > blended[2, 57, 2] and blended[37, 2, 2] > blended[37, 2, 0]   # red hot, blue cold


def test_bad_inputs_give_one_clear_error(located, monkeypatch, capsys):
    wd, val = located["wd"], located["val"]

    def explain(*args: str):
        return run_captured(wd, "explain.py", *args, monkeypatch=monkeypatch, capsys=capsys)

    assert_clean_error(explain("--load-weights", "outputs/best.pth", "--input", str(val / "missing.png")),
                       "missing.png", "does not exist")
    assert_clean_error(explain("--load-weights", "outputs/best.pth", "--input", str(val), "--target-class", "pink"),
                       "'pink'", "blue, green, red")
    assert_clean_error(explain("--load-weights", "outputs/nothing.pth", "--input", str(val)), "nothing.pth")
    assert run_captured(wd, "export.py", "--load-weights", "outputs/best.pth", "--save-model-to", "plain",
                        "--openvino", monkeypatch=monkeypatch, capsys=capsys).returncode == 0
    assert_clean_error(explain("--load-weights", "plain/model.xml", "--input", str(val)),
                       "no saliency output", "export.py --explain")
    with pytest.raises(UserError, match="create_model"):
        DeployModel(torch.nn.Conv2d(3, 3, 1), IMAGENET_MEAN, IMAGENET_STD, explain=True)
