"""Running exported models (ExportedClassifier), their complexity, and prediction files with their evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from clsengine import predictions as P
from clsengine.complexity import complexity
from clsengine.errors import UserError
from clsengine.export import DeployModel, export_onnx, export_openvino
from clsengine.inference import ExportedClassifier
from clsengine.models.factory import IMAGENET_MEAN, IMAGENET_STD, create_model

LABELS = ["a", "b", "c"]
KW = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, labels=LABELS)


@pytest.fixture(scope="module")
def files(module_dir) -> dict:
    root = module_dir
    torch.manual_seed(0)
    model = create_model("resnet18", 3).eval()
    # Scales as a trained model has them: the zero-initialised residual branches of a fresh model would be
    # constant-folded away by the converters, and the IR would count fewer parameters than torch.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
    out = {"model": model}
    out["onnx"] = export_onnx(model, root / "m.onnx", input_size=(32, 32), **KW)
    out["xml"] = export_openvino(model, root / "m.xml", input_size=(32, 32), **KW)
    out["static"] = export_openvino(model, root / "static" / "m.xml", input_size=(40, 24), static_batch=True, **KW)
    return out


@pytest.mark.parametrize("kind, runtime", [("onnx", None), ("onnx", "openvino"), ("xml", None)])
def test_exported_classifier_matches_pytorch(files, kind, runtime):
    clf = ExportedClassifier(files[kind], runtime=runtime)
    # ONNX runs in onnxruntime unless OpenVINO is asked for; an IR always in OpenVINO.
    assert clf.runtime == (runtime or ("onnxruntime" if kind == "onnx" else "openvino"))
    assert clf.labels == LABELS and clf.input_size == (32, 32) and clf.input_order == "BGR"
    batch = torch.randint(0, 256, (5, 3, 32, 32)).float()
    with torch.no_grad():
        expected = DeployModel(files["model"], IMAGENET_MEAN, IMAGENET_STD, "BGR").eval()(batch)
    got = clf(batch)
    assert isinstance(got, torch.Tensor) and got.shape == (5, 3)
    assert torch.allclose(got, expected, atol=1e-3 * max(1.0, float(expected.abs().max())))
    as_numpy = clf(batch.numpy())
    assert isinstance(as_numpy, np.ndarray) and np.allclose(as_numpy, got.numpy())


def test_static_batch_file_runs_image_by_image(files, tmp_path):
    clf = ExportedClassifier(files["static"])
    assert clf.static_batch == 1 and clf.input_size == (40, 24)
    batch = torch.randint(0, 256, (3, 3, 40, 24)).float()
    together = clf(batch)
    assert together.shape == (3, 3)
    assert torch.allclose(together[1:2], clf(batch[1:2]))
    static_onnx = export_onnx(files["model"], tmp_path / "s.onnx", input_size=(40, 24), static_batch=True, **KW)
    in_ort = ExportedClassifier(static_onnx)
    assert in_ort.runtime == "onnxruntime" and in_ort.static_batch == 1
    assert torch.allclose(in_ort(batch), together, atol=1e-3 * max(1.0, float(together.abs().max())))


def test_ir_complexity_matches_pytorch_count(files):
    """FLOPs counted on the IR graph equal torch's count; parameters differ only by folded batch norms."""
    model = files["model"]
    torch_cx = complexity(model, (32, 32))
    for kind in ("xml", "onnx"):
        ir_cx = ExportedClassifier(files[kind]).complexity()
        assert ir_cx["complexity_gflops"] == pytest.approx(torch_cx["complexity_gflops"], rel=0.02)
        bn = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        # BN scale is folded into the conv weights, its shift stays as a bias: only ~one BN vector per layer goes.
        assert torch_cx["size_mp"] - bn / 1e6 <= ir_cx["size_mp"] <= torch_cx["size_mp"] + 1e-3


def test_exported_classifier_errors(files, tmp_path):
    with pytest.raises(UserError, match="expected an OpenVINO IR"):
        ExportedClassifier(tmp_path / "m.pth")
    with pytest.raises(UserError, match="does not exist"):
        ExportedClassifier(tmp_path / "missing.onnx")
    lonely = tmp_path / "lonely.xml"
    lonely.write_text(Path(files["xml"]).read_text())
    with pytest.raises(UserError, match="lonely.bin is missing"):
        ExportedClassifier(lonely)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(UserError, match="garbage.onnx"):
        ExportedClassifier(garbage)
    with pytest.raises(UserError, match="not available"):
        ExportedClassifier(files["xml"], device="NO_SUCH_DEVICE")
    with pytest.raises(UserError, match="only the openvino runtime runs it"):
        ExportedClassifier(files["xml"], runtime="onnxruntime")
    with pytest.raises(UserError, match="unknown runtime 'tensorrt'"):
        ExportedClassifier(files["onnx"], runtime="tensorrt")
    with pytest.raises(UserError, match="onnxruntime cannot run on device 'NPU'"):
        ExportedClassifier(files["onnx"], device="NPU")
    with pytest.raises(UserError, match="onnxruntime cannot load .*garbage.onnx|garbage.onnx"):
        ExportedClassifier(garbage, runtime="onnxruntime")


# ------------------------------------------------------------------ prediction files


@pytest.mark.parametrize("content, expected", [
    (["x", "y"], ["x", "y"]),
    ({"1": "y", "0": "x"}, ["x", "y"]),
    ({"y": 1, "x": 0}, ["x", "y"]),
])
def test_read_class_names(tmp_path, content, expected):
    path = tmp_path / "ids.json"
    path.write_text(json.dumps(content))
    assert P.read_class_names(path) == expected


@pytest.mark.parametrize("content, fragment", [
    ('{"0": "x", "2": "y"}', "ids must be 0..1"),
    ("[]", "non-empty"),
    ('{"a": "x"}', "expected"),
    ("[1, 2", "line 1"),
])
def test_read_class_names_errors(tmp_path, content, fragment):
    path = tmp_path / "ids.json"
    path.write_text(content)
    with pytest.raises(UserError, match=fragment) as info:
        P.read_class_names(path)
    assert "ids.json" in str(info.value)


def test_write_then_read_predictions(tmp_path):
    images = [str(tmp_path / "in" / "cats" / "1.png"), str(tmp_path / "in" / "dogs" / "1.png")]
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    P.write_predictions(tmp_path / "out", images, probs, LABELS, k=2, root=tmp_path / "in")
    first = json.loads((tmp_path / "out" / "cats" / "1.png.json").read_text())
    assert first == {"img_path": images[0], "0_0": [[0.7, "a"], [0.2, "b"]]}
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == LABELS
    assert (tmp_path / "out" / "summary.csv").read_text().splitlines()[2].endswith("dogs/1.png,c,0.600000")
    preds = P.read_predictions(tmp_path / "out")  # classes.json is not mistaken for a prediction
    assert preds == {images[0]: [(0.7, "a"), (0.2, "b")], images[1]: [(0.6, "c"), (0.3, "b")]}


def test_evaluate_predictions_by_hand():
    preds = {
        "d/1.png": [(0.9, "cat"), (0.1, "dog")],
        "d/2.png": [(0.6, "dog"), (0.4, "cat")],   # wrong at top-1, right at top-2
        "d/3.png": [(0.8, "dog"), (0.2, "cat")],
        "d/4.png": [(0.5, "bird"), (0.3, "cat")],  # a class the ground truth never has
        "d/extra.png": [(1.0, "cat")],
    }
    truth = {"./d/1.png": "cat", "d/2.png": "cat", "/elsewhere/3.png": "dog", "d/4.png": "dog", "d/5.png": "cat"}
    report = P.evaluate_predictions(preds, truth)
    assert report.num_images == 4 and report.missing == ["d/5.png"] and report.unmatched == 1
    assert report.topk == {1: 50.0, 2: 75.0}  # top-5 becomes top-2: the lists are 2 long
    # top-1: cat->cat, cat->dog, dog->dog, dog->bird. cat: P 1/1, R 1/2; dog: P 1/2, R 1/2; bird: P 0 (no support)
    assert report.per_class["cat"]["precision"] == 100.0 and report.per_class["cat"]["recall"] == 50.0
    assert report.per_class["dog"]["precision"] == 50.0 and report.per_class["dog"]["recall"] == 50.0
    assert report.per_class["bird"]["support"] == 0
    assert report.macro["precision"] == pytest.approx(75.0) and report.macro["recall"] == pytest.approx(50.0)
    assert report.macro["f1"] == pytest.approx((2 * 0.5 / 1.5 + 0.5) / 2 * 100)
    text = report.to_text("preds", "gt.json")
    assert "top-2 accuracy: 75.00 %" in text and "d/5.png" in text


def test_ground_truth_ids_and_errors(tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"1.png": 1, "2.png": "a"}))
    assert P.read_ground_truth(gt, LABELS) == {"1.png": "b", "2.png": "a"}
    gt.write_text(json.dumps({"1.png": 7}))
    with pytest.raises(UserError, match="label 7 of 1.png"):
        P.read_ground_truth(gt, LABELS)
    gt.write_text(json.dumps({"1.png": [1]}))
    with pytest.raises(UserError, match="class name or id"):
        P.read_ground_truth(gt)
    with pytest.raises(UserError, match="no prediction matches"):
        P.evaluate_predictions({"x.png": [(1.0, "a")]}, {"y.png": "a"})
    (tmp_path / "preds").mkdir()
    (tmp_path / "preds" / "1.png.json").write_text(json.dumps({"img_path": "1.png", "0_0": "cat"}))
    with pytest.raises(UserError, match="1.png.json"):
        P.read_predictions(tmp_path / "preds")


def test_read_predictions_needs_prediction_files(tmp_path):
    (tmp_path / "classes.json").write_text(json.dumps(LABELS))
    with pytest.raises(UserError, match="no prediction JSON"):
        P.read_predictions(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        P.read_predictions(tmp_path / "missing")


def test_list_images_for_predict(tmp_path):
    from clsengine.data import list_images
    from clsengine.errors import DataError
    from conftest import make_image_folder

    make_image_folder(tmp_path / "in", classes=2, per_class=2)
    (tmp_path / "in" / "class_0" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "in" / ".hidden").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("ignored")
    files, skipped = list_images(tmp_path / "in")
    assert [Path(f).relative_to(tmp_path / "in").as_posix() for f in files] == [
        "class_0/0.png", "class_0/1.png", "class_1/0.png", "class_1/1.png"]
    assert [Path(p).name for p, _ in skipped] == ["broken.png"]
    assert list_images(tmp_path / "in" / "class_1" / "0.png")[0] == [str(tmp_path / "in" / "class_1" / "0.png")]
    for bad, fragment in ((tmp_path / "nothing", "does not exist"), (tmp_path / "in" / "notes.txt", "not an image"),
                          (tmp_path / "in" / ".hidden", "no readable image")):
        with pytest.raises(DataError, match=fragment):
            list_images(bad)
