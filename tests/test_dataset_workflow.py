"""Annotation-file datasets, multi-label models and class balance through the work-dir scripts: train,
eval, export, predict and compress on COCO and list-file datasets, run in-process to keep the suite fast."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from clsengine.checkpoint import load_checkpoint
from clsengine.export import read_metadata
from conftest import (MULTILABEL_CLASSES, instantiate, make_image_folder, make_multilabel_images, run_in_process,
                      write_multilabel_coco)

SMALL = ["--workers", "0", "--batch-size", "6", "input.size=[32,32]"]


def make_work_dir(tmp_path: Path, template: str) -> Path:
    wd = tmp_path / "wd"
    assert instantiate(template, wd, "--do-not-load-snapshot").returncode == 0
    return wd


def metric(metrics: dict, key: str) -> float:
    return next(m["value"] for m in metrics["metrics"] if m["key"] == key)


def test_multilabel_coco_train_eval_export_predict_compress(tmp_path: Path, monkeypatch, capsys) -> None:
    data = tmp_path / "data"
    train_json = write_multilabel_coco(data, make_multilabel_images(data, 18, seed=1), "train.json")
    val_items = make_multilabel_images(data / "val", 9, seed=2)
    val_json = write_multilabel_coco(data / "val", val_items, "val.json")
    wd = make_work_dir(tmp_path, "mobilenet_v3_large_1_multilabel")  # ASL, mutual learning, SAM, EMA
    data_args = ["--train-ann-files", str(train_json), "--train-data-roots", str(data),
                 "--val-ann-files", str(val_json), "--val-data-roots", str(data / "val")]

    assert run_in_process(wd, "train.py", *data_args, "--epochs", "2", "--lr-finder", "off", *SMALL,
                          monkeypatch=monkeypatch) == 0
    out = wd / "outputs"
    history = (out / "history.csv").read_text().splitlines()
    assert "val_map" in history[0] and len(history) == 3
    best = load_checkpoint(out / "best.pth")
    assert best["classes"] == MULTILABEL_CLASSES and 0 <= best["best_score"] <= 100
    report = yaml.safe_load((out / "dataset_report.yaml").read_text())
    assert report["multilabel"] is True and report["train"]["images"] == 18
    assert sum(report["train"]["per_class"].values()) == 27  # 9 images with one label, 9 with two
    assert "red" in (out / "dataset_report.txt").read_text()
    assert "multilabel" in capsys.readouterr().out

    # eval: mAP, per-class AP and thresholded scores in metrics.yaml, for the checkpoint and its IR alike.
    test_args = ["--test-ann-files", str(val_json), "--test-data-roots", str(data / "val"), "--workers", "0"]
    assert run_in_process(wd, "eval.py", "--load-weights", "outputs/best.pth", *test_args,
                          "--save-metrics-to", "m_ckpt.yaml", "--save-output-to", "per_image",
                          monkeypatch=monkeypatch) == 0
    m_ckpt = yaml.safe_load((wd / "m_ckpt.yaml").read_text())
    assert m_ckpt["model"]["task"] == "multilabel" and m_ckpt["dataset"]["num_images"] == 9
    assert 0 <= metric(m_ckpt, "mAP") <= 100 and set(m_ckpt["per_class"]) == set(MULTILABEL_CLASSES)
    assert all(0 <= c["ap"] <= 100 and c["support"] > 0 for c in m_ckpt["per_class"].values())
    assert {"precision", "recall", "f1"} <= set(m_ckpt["micro"]) and m_ckpt["threshold"] == 0.5
    assert (wd / "per_image" / "predictions.csv").read_text().splitlines()[0] == "path,labels,predictions,scores"

    assert run_in_process(wd, "export.py", "--load-weights", "outputs/best.pth", "--save-model-to", "export",
                          "--val-data-roots", str(data / "val"), monkeypatch=monkeypatch) == 0
    assert read_metadata(wd / "export" / "model.xml")["task"] == {"type": "multilabel", "threshold": 0.5,
                                                                 "background_label": None}
    assert run_in_process(wd, "eval.py", "--load-weights", "export/model.xml", *test_args,
                          "--save-metrics-to", "m_ir.yaml", monkeypatch=monkeypatch) == 0
    m_ir = yaml.safe_load((wd / "m_ir.yaml").read_text())
    assert metric(m_ir, "mAP") == pytest.approx(metric(m_ckpt, "mAP"), abs=0.5)

    # predict: every label over the threshold (here 0: all of them; 1: none), as JSON per image.
    for threshold, expected in (("0", 3), ("1", 0)):
        assert run_in_process(wd, "predict.py", "--load-weights", "export/model.xml", "--input",
                              str(data / "val" / "images"), "--save-to", f"preds_{threshold}", "--threshold",
                              threshold, "--workers", "0", monkeypatch=monkeypatch) == 0
        one = json.loads((wd / f"preds_{threshold}" / "0.png.json").read_text())
        assert one["multilabel"] is True and len(one["0_0"]) == expected
    assert run_in_process(wd, "predict.py", "--load-weights", "export/model.xml", "--input",
                          str(data / "val" / "images"), "--save-to", "preds", "--workers", "0",
                          monkeypatch=monkeypatch) == 0
    # without --threshold: each label at its own calibrated threshold (train.py fitted them on val; JSON scores
    # are rounded to 6 decimals)
    from clsengine.inference import ExportedClassifier

    ir = ExportedClassifier(wd / "export" / "model.xml")
    cut = dict(zip(ir.labels, ir.calibration.thresholds))
    found = [json.loads(f.read_text())["0_0"] for f in (wd / "preds").glob("*.png.json")]
    assert len(found) == 9 and all(s >= cut[label] - 1e-6 for row in found for s, label in row), (cut, found)

    # compress: post-training quantization judged by the int8 IR's mAP.
    assert run_in_process(wd, "compress.py", "--load-weights", "outputs/best.pth", *data_args, "--epochs", "0",
                          "--max-accuracy-drop", "100", "--calibration-subset", "6", "--benchmark-seconds", "0",
                          "--save-checkpoints-to", "int8", "--workers", "0", monkeypatch=monkeypatch) == 0
    compressed = yaml.safe_load((wd / "int8" / "metrics.yaml").read_text())
    assert compressed["budget"]["metric"] == "mAP" and 0 <= compressed["int8"]["mAP"] <= 100
    assert read_metadata(wd / "int8" / "export" / "model.xml")["task"]["type"] == "multilabel"


def write_list(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def list_dataset(tmp_path: Path) -> dict:
    """Class folders of 4 colours, described by list files with integer labels and an `id name` map."""
    images = make_image_folder(tmp_path / "images", classes=4, per_class=5, seed=3)
    names = ["red", "green", "blue", "yellow"]
    train = [f"class_{c}/{j}.png {c}" for c in range(4) for j in range(3)]
    val = [f"class_{c}/{j}.png {c}" for c in range(4) for j in (3, 4)]
    return {"images": images, "train": write_list(tmp_path / "train.txt", train + train[:3]),  # red twice
            "val": write_list(tmp_path / "val.txt", val),
            "classes": write_list(tmp_path / "classes.txt", [f"{i} {n}" for i, n in enumerate(names)])}


def test_list_files_with_class_subset_weights_and_balanced_sampler(tmp_path: Path, list_dataset: dict,
                                                                   monkeypatch) -> None:
    d = list_dataset
    wd = make_work_dir(tmp_path, "resnet18")
    args = ["--train-ann-files", str(d["train"]), "--train-data-roots", str(d["images"]),
            "--val-ann-files", str(d["val"]), "--val-data-roots", str(d["images"]),
            "--class-id-path", str(d["classes"]), "--classes", "blue,red,green",
            "--class-weights", "auto", "--balanced-sampler"]
    assert run_in_process(wd, "train.py", *args, "--epochs", "1", *SMALL, monkeypatch=monkeypatch) == 0
    out = wd / "outputs"
    best = load_checkpoint(out / "best.pth")
    assert best["classes"] == ["blue", "red", "green"]  # the subset, in the order given
    data = best["config"]["template"]["data"]
    assert data["classes"] == ["blue", "red", "green"] and data["class_weights"] == "auto"
    assert data["balanced_sampler"] is True
    report = yaml.safe_load((out / "dataset_report.yaml").read_text())
    # train.txt repeats red's first 3 lines: red 6, green 3, blue 3 (yellow left out by --classes).
    assert report["train"]["per_class"] == {"blue": 3, "red": 6, "green": 3}
    assert report["train"]["imbalance_ratio"] == pytest.approx(2.0)
    assert report["majority_class"] == "red" and report["majority_baseline"]["accuracy"] == pytest.approx(100 / 3)
    log = (out / "train.log").read_text()
    assert "class weights (auto)" in log and "class-balanced sampler" in log

    # eval on the full list: the model's 3 classes are evaluated, yellow's images left out.
    assert run_in_process(wd, "eval.py", "--load-weights", "outputs/best.pth", "--test-ann-files", str(d["val"]),
                          "--test-data-roots", str(d["images"]), "--class-id-path", str(d["classes"]),
                          "--workers", "0", "--save-metrics-to", "m.yaml", monkeypatch=monkeypatch) == 0
    metrics = yaml.safe_load((wd / "m.yaml").read_text())
    assert metrics["classes"] == ["blue", "red", "green"] and metrics["dataset"]["num_images"] == 6


@pytest.fixture(scope="module")
def resnet_wd(module_dir) -> Path:
    """One work dir for the error cases: each fails before training, so they can share it."""
    return make_work_dir(module_dir, "resnet18")


@pytest.mark.parametrize("case", ["missing_file", "unknown_label", "coco_missing_image", "invalid_json",
                                  "multilabel_data_multiclass_template", "bad_class_weights", "unknown_class"])
def test_bad_dataset_inputs_are_one_clear_error(case: str, tmp_path: Path, list_dataset: dict, resnet_wd: Path,
                                                monkeypatch, capsys) -> None:
    d, wd = list_dataset, resnet_wd
    train, val, extra = d["train"], d["val"], ["--class-id-path", str(d["classes"])]
    if case == "missing_file":
        train = write_list(tmp_path / "bad.txt", ["class_0/0.png 0", "class_0/nope.png 0"])
        expected = [f"{train}:2", "nope.png"]
    elif case == "unknown_label":
        train = write_list(tmp_path / "bad.txt", ["class_0/0.png 0", "class_0/1.png 0", "class_0/2.png purple"])
        expected = [f"{train}:3", "purple"]
    elif case == "coco_missing_image":
        train = tmp_path / "bad.json"
        train.write_text(json.dumps({"images": [{"id": 1, "file_name": "class_0/0.png"}],
                                     "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": []}],
                                     "categories": [{"id": 1, "name": "red"}]}))
        extra, expected = [], [str(train), "7"]
    elif case == "invalid_json":
        train = tmp_path / "bad.json"
        train.write_text('{"images": [\n  {"id": 1,,}\n]}')
        extra, expected = [], [str(train), "line 2"]
    elif case == "multilabel_data_multiclass_template":
        train = write_list(tmp_path / "ml.txt", ["class_0/0.png 0,1", "class_1/0.png 1"])
        expected = ["several labels", "task.type"]
    elif case == "bad_class_weights":
        extra += ["--class-weights", "1,2"]
        expected = ["data.class_weights", "2", "4"]
    else:
        extra += ["--classes", "red,purple"]
        expected = ["purple", "--classes"]
    code = run_in_process(wd, "train.py", "--train-ann-files", str(train), "--train-data-roots", str(d["images"]),
                          "--val-ann-files", str(val), "--val-data-roots", str(d["images"]), *extra,
                          "--epochs", "1", *SMALL, monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, err
    for fragment in expected:
        assert fragment in error_lines[0], (fragment, error_lines[0])
