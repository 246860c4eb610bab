"""The deployment half of the main job in a work dir: export.py (parity-checked IR and ONNX), eval.py on the
IR and ONNX, predict.py on a folder, and eval.py's end-to-end evaluation of the predictions; bad inputs give
one clear error. One trained work dir serves the whole module."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from clsengine.export import read_metadata
from clsengine.inference import ExportedClassifier
from conftest import assert_clean_error, leaves_no_trace, make_image_folder, run_captured, run_script


@pytest.fixture(scope="module")
def trained(trained_resnet18) -> dict:
    """The session's trained resnet18 work dir, exported (IR + ONNX) to its export/ folder."""
    trained = trained_resnet18
    wd, val = trained["wd"], trained["val"]
    with leaves_no_trace(wd):  # export/ and what the tests write go with the module
        result = run_script(wd, "export.py", "--load-weights", "outputs/best.pth", env={"VAL_DATA_ROOT": str(val)})
        assert result.returncode == 0, result.stderr
        yield {**trained, "export_stdout": result.stdout}


def test_export_writes_parity_checked_ir_and_onnx(trained, tmp_path):
    wd = trained["wd"]
    export = wd / "export"
    assert (export / "model.onnx").is_file() and (export / "model.xml").is_file() and (export / "model.bin").is_file()
    parity = yaml.safe_load((export / "parity.yaml").read_text())
    assert parity["images"].startswith("9 images from")  # the validation images, found through $VAL_DATA_ROOT
    for name in ("model.onnx", "model.xml"):
        assert parity["files"][name]["ok"] and parity["files"][name]["top1_agreement"] == 1.0
        assert parity["files"][name]["exporter"] == "dynamo"
    # The ONNX file is checked by onnxruntime too, not only through OpenVINO (which the IR comes from).
    assert set(parity["files"]["model.onnx"]["runtimes"]) == {"onnxruntime", "openvino"}
    assert set(parity["runtimes"]) == {"onnxruntime", "openvino"} and parity["devices"][0] == "CPU"
    assert all(r["ok"] for r in parity["files"]["model.onnx"]["runtimes"].values())
    out = trained["export_stdout"]
    assert "model.onnx: written by the dynamo exporter" in out and "  onnxruntime: max |logit diff|" in out, out
    meta = read_metadata(export / "model.xml")
    assert meta["labels"] == ["class_0", "class_1", "class_2"] and tuple(meta["input_size"]) == (32, 32)
    assert meta["input_order"] == "BGR"

    static = run_script(wd, "export.py", "--load-weights", "outputs/best.pth", "--openvino", "--static",
                        "--precision", "FP16", "--input-shape", "48", "48", "--save-model-to", str(tmp_path / "npu"),
                        "inference_target=[CPU,NPU]")
    assert static.returncode == 0, static.stderr
    assert "warning: inference_target lists NPU" not in static.stdout  # static: what NPU compilers need
    assert not (tmp_path / "npu" / "model.onnx").exists()
    assert tuple(read_metadata(tmp_path / "npu" / "model.xml")["input_size"]) == (48, 48)
    assert ExportedClassifier(tmp_path / "npu" / "model.xml").static_batch == 1

    dynamic = run_script(wd, "export.py", "--load-weights", "outputs/best.pth", "--onnx", "--exporter", "torchscript",
                         "--save-model-to", str(tmp_path / "dyn"), "inference_target=[CPU,NPU]")
    assert dynamic.returncode == 0, dynamic.stderr
    assert "warning: inference_target lists NPU, whose compilers need a static input shape" in dynamic.stdout
    assert "TorchScript exporter chosen explicitly" in dynamic.stdout
    if not any(d.startswith("NPU") for d in _ov_devices()):
        assert "note: inference_target NPU not present here" in dynamic.stdout
    assert read_metadata(tmp_path / "dyn" / "model.onnx")["exporter"] == "torchscript"

    bare = tmp_path / "bare.pth"
    torch.save(torch.load(wd / "outputs" / "best.pth", weights_only=True)["model"], bare)
    assert_clean_error(run_script(wd, "export.py", "--load-weights", str(bare)), "bare weights")


def _ov_devices() -> list[str]:
    from clsengine.ov_core import openvino_core

    return list(openvino_core().available_devices)


def _eval(wd: Path, weights: str, val: Path, out: str, *extra: str) -> dict:
    result = run_script(wd, "eval.py", "--load-weights", weights, "--test-data-roots", str(val),
                        "--save-metrics-to", out, "--workers", "0", *extra)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load((wd / out).read_text())


def _metric(metrics: dict, key: str) -> float:
    return next(m["value"] for m in metrics["metrics"] if m["key"] == key)


def test_eval_of_exported_models_matches_checkpoint(trained):
    wd, val = trained["wd"], trained["val"]
    reference = _eval(wd, "outputs/best.pth", val, "m_pth.yaml")
    assert reference["model"]["runtime"] == "PyTorch"
    for weights, fmt, names, runtime in (("export/model.xml", "OpenVINO IR", ["model.xml", "model.bin"], "OpenVINO"),
                                         ("export/model.onnx", "ONNX", ["model.onnx"], "onnxruntime"),
                                         ("export/model.onnx", "ONNX", ["model.onnx"], "OpenVINO")):
        flags = ("--runtime", "openvino") if fmt == "ONNX" and runtime == "OpenVINO" else ()
        metrics = _eval(wd, weights, val, f"m_{fmt}_{runtime}.yaml", *flags)
        assert metrics["model"]["format"] == fmt and metrics["model"]["runtime"] == runtime
        assert [f["name"] for f in metrics["files"]] == names and all(len(f["sha256"]) == 64 for f in metrics["files"])
        assert metrics["confusion_matrix"] == reference["confusion_matrix"]
        for key in ("accuracy", "macro_f1"):
            assert _metric(metrics, key) == _metric(reference, key), (weights, key)
        assert _metric(metrics, "complexity") == pytest.approx(_metric(reference, "complexity"), rel=0.02)
        assert 0 < _metric(metrics, "size") <= _metric(reference, "size") + 0.001


def test_predict_folder_then_end_to_end_eval(trained):
    wd, val = trained["wd"], trained["val"]
    result = run_script(wd, "predict.py", "--load-weights", "export/model.xml", "--input", str(val),
                        "--save-to", "preds", "--topk", "2", "--workers", "0")
    assert result.returncode == 0, result.stderr
    files = sorted((wd / "preds").rglob("*.png.json"))
    assert len(files) == 9
    one = json.loads((wd / "preds" / "class_1" / "0.png.json").read_text())
    assert one["img_path"] == str(val / "class_1" / "0.png")
    assert len(one["0_0"]) == 2 and one["0_0"][0][0] >= one["0_0"][1][0]
    assert {label for _, label in one["0_0"]} <= {"class_0", "class_1", "class_2"}

    gts = {str(p): p.parent.name for p in sorted(val.rglob("*.png"))}
    (wd / "gt.json").write_text(json.dumps(gts))
    result = run_script(wd, "eval.py", "--preds", "preds", "--gts", "gt.json")
    assert result.returncode == 0, result.stderr
    text = (wd / "preds" / "eval_results.txt").read_text()
    assert "images evaluated: 9" in text
    # The end-to-end top-1 is that of eval.py on the same model and images.
    metrics = _eval(wd, "export/model.xml", val, "m_e2e.yaml")
    assert f"top-1 accuracy: {_metric(metrics, 'accuracy'):.2f} %" in text
    assert "top-2 accuracy" in text and "macro F1" in text

    # Integer labels are named through the folder's classes.json.
    ids = {path: ["class_0", "class_1", "class_2"].index(label) for path, label in gts.items()}
    (wd / "gt_ids.json").write_text(json.dumps(ids))
    result = run_script(wd, "eval.py", "--preds", "preds", "--gts", "gt_ids.json", "--save-output-to", "ids")
    assert result.returncode == 0, result.stderr
    assert (wd / "ids" / "eval_results.txt").read_text().splitlines()[4:] == text.splitlines()[4:]


def test_predict_one_image_from_checkpoint_and_bare_weights(trained, tmp_path):
    wd, val = trained["wd"], trained["val"]
    image = val / "class_2" / "1.png"
    result = run_script(wd, "predict.py", "--load-weights", "outputs/best.pth", "--input", str(image),
                        "--save-to", str(tmp_path / "one"), "--workers", "0")
    assert result.returncode == 0, result.stderr
    out = json.loads((tmp_path / "one" / "1.png.json").read_text())
    assert len(out["0_0"]) == 3 and sum(score for score, _ in out["0_0"]) == pytest.approx(1.0, abs=1e-4)

    bare = tmp_path / "bare.pth"
    torch.save(torch.load(wd / "outputs" / "best.pth", weights_only=True)["model"], bare)
    assert_clean_error(run_script(wd, "predict.py", "--load-weights", str(bare), "--input", str(image),
                                  "--save-to", str(tmp_path / "x"), "input.size=[32,32]"), "--class-id-path")
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"0": "red", "1": "green", "2": "blue"}))
    result = run_script(wd, "predict.py", "--load-weights", str(bare), "--input", str(image), "--class-id-path",
                        str(names), "--save-to", str(tmp_path / "named"), "--workers", "0", "input.size=[32,32]")
    assert result.returncode == 0, result.stderr
    named = json.loads((tmp_path / "named" / "1.png.json").read_text())
    assert [label for _, label in named["0_0"]] == [
        {"class_0": "red", "class_1": "green", "class_2": "blue"}[label] for _, label in out["0_0"]]


def test_bad_inputs_give_one_clear_error(trained, tmp_path, monkeypatch, capsys):
    """In process: seven eval.py runs without seven imports of torch and OpenVINO."""
    def run(*args: str):
        return run_captured(wd, "eval.py", *args, monkeypatch=monkeypatch, capsys=capsys)

    wd, val, root = trained["wd"], trained["val"], trained["root"]
    text_file = tmp_path / "notes.pth"
    text_file.write_text("not a checkpoint")
    assert_clean_error(run("--load-weights", str(text_file), "--test-data-roots", str(val)), "notes.pth")
    assert_clean_error(run("--load-weights", str(tmp_path / "gone.xml"), "--test-data-roots", str(val)), "gone.xml")
    # A test folder that lacks one of the exported model's classes.
    two = make_image_folder(root / "data" / "two", classes=2, per_class=1)
    assert_clean_error(run("--load-weights", "export/model.onnx", "--test-data-roots", str(two)), "class_2")
    # One with more classes: the model is evaluated on the images of its own classes, with a note.
    four = make_image_folder(root / "data" / "four", classes=4, per_class=1)
    result = run("--load-weights", "export/model.onnx", "--test-data-roots", str(four),
                 "--save-metrics-to", str(tmp_path / "four.yaml"))
    assert result.returncode == 0 and "knows 3 of the 4 test classes" in result.stdout, result.stderr
    assert yaml.safe_load((tmp_path / "four.yaml").read_text())["dataset"]["num_images"] == 3
    # Bare weights of a 3-class model against a 2-class test folder: the class count is named.
    bare = tmp_path / "bare.pth"
    torch.save(torch.load(wd / "outputs" / "best.pth", weights_only=True)["model"], bare)
    assert_clean_error(run("--load-weights", str(bare), "--test-data-roots", str(two), "input.size=[32,32]"),
                       "classifier for 3 classes", "has 2")
    assert_clean_error(run("--preds", str(tmp_path)), "--gts")
