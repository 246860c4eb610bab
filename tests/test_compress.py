"""compress.py: NNCF post-training quantization of a small trained model, quantization-aware fine-tuning
inside an accuracy budget (met and not met), resume, and the int8 outputs used by eval/export/predict."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from clsengine.checkpoint import load_checkpoint, save_checkpoint
from clsengine.compression import AccuracyBudget, qat_epochs
from clsengine.errors import UserError
from clsengine.export import read_metadata
from clsengine.inference import ExportedClassifier
from clsengine.rundir import release_all
from conftest import run_captured
from workbench.template import TemplateError


@pytest.fixture
def trained(trained_resnet18) -> dict:
    return trained_resnet18


def data_args(trained: dict) -> list[str]:
    return ["--train-data-roots", str(trained["train"]), "--val-data-roots", str(trained["val"]), "--workers", "0"]


def test_ptq_within_budget_then_int8_files_work_everywhere(trained, monkeypatch, capsys):
    """In process (one import of torch, NNCF and OpenVINO for the five script runs)."""
    wd = trained["wd"]
    result = run_captured(wd, "compress.py", "--load-weights", "outputs/best.pth", "--save-checkpoints-to", "int8",
                          "--nncf-quantization", "--max-accuracy-drop", "100", "--calibration-subset", "12",
                          "--benchmark-seconds", "0.2", *data_args(trained), monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr
    out = wd / "int8"
    metrics = yaml.safe_load((out / "metrics.yaml").read_text())
    assert metrics["budget"]["met"] is True
    assert 0 <= metrics["int8"]["top1"] <= 100 and 0 <= metrics["float"]["top1"] <= 100
    assert metrics["int8"]["size_bytes"] < 0.5 * metrics["float"]["size_bytes"]  # int8 weights, not float
    assert metrics["int8"]["throughput_img_s"] > 0 and metrics["float"]["throughput_img_s"] > 0
    assert not (out / "history.csv").exists()  # the budget was met by PTQ: no fine-tuning ran
    for name in ("best.pth", "latest.pth", "ptq.pth", "config.yaml", "compress.log"):
        assert (out / name).is_file(), name

    # The int8 IR holds quantization (FakeQuantize ops), loads and predicts.
    import openvino as ov

    ops = {op.get_type_name() for op in ov.Core().read_model(str(out / "export" / "model.xml")).get_ordered_ops()}
    assert "FakeQuantize" in ops
    assert read_metadata(out / "export" / "model.xml")["labels"] == ["class_0", "class_1", "class_2"]
    assert ExportedClassifier(out / "export" / "model.xml").complexity()["complexity_gflops"] > 0

    # eval.py, export.py and predict.py take the int8 checkpoint and IR with no extra flag.
    for weights in ("int8/best.pth", "int8/export/model.xml"):
        result = run_captured(wd, "eval.py", "--load-weights", weights, "--test-data-roots", str(trained["val"]),
                              "--save-metrics-to", f"m_{Path(weights).stem}.yaml", "--workers", "0",
                              monkeypatch=monkeypatch, capsys=capsys)
        assert result.returncode == 0, result.stderr
    evaluated = yaml.safe_load((wd / "m_model.yaml").read_text())
    assert next(m["value"] for m in evaluated["metrics"] if m["key"] == "accuracy") == metrics["int8"]["top1"]
    assert yaml.safe_load((wd / "m_best.yaml").read_text())["model"]["format"] == "int8 checkpoint"
    result = run_captured(wd, "export.py", "--load-weights", "int8/best.pth", "--save-model-to", "int8_export",
                          "--val-data-roots", str(trained["val"]), monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr
    parity = yaml.safe_load((wd / "int8_export" / "parity.yaml").read_text())
    assert all(entry["ok"] for entry in parity["files"].values())
    result = run_captured(wd, "predict.py", "--load-weights", "int8/export/model.xml", "--input",
                          str(trained["val"] / "class_2"), "--save-to", "int8_preds", "--workers", "0",
                          monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert len(json.loads((wd / "int8_preds" / "0.png.json").read_text())["0_0"]) == 3


def load_compress(wd: Path):
    """The work dir's compress.py as a module, so a test can replace how the IR is judged."""
    spec = importlib.util.spec_from_file_location("compress_under_test", wd / "compress.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_compress(monkeypatch, wd: Path, float_top1: float, int8_top1: float, *args: str) -> int:
    """compress.main() in-process with the IR judge scoring float and int8 files as given: the budget
    decisions are then deterministic while quantization and fine-tuning run for real."""
    module = load_compress(wd)
    monkeypatch.setattr(module.IRJudge, "top1",
                        lambda self, xml: float_top1 if Path(xml).parent.name == "export_fp32" else int8_top1)
    monkeypatch.setattr(sys, "argv", [str(wd / "compress.py"), "--template", str(wd / "template.yaml"), *args])
    monkeypatch.chdir(wd)
    try:
        return module.main()
    finally:
        release_all()  # what cli.run does after main: the next compress.py in this process takes the folder


def test_budget_not_met_runs_fine_tuning_then_reports_and_resumes(trained, monkeypatch, capsys):
    wd, common = trained["wd"], ["--load-weights", "outputs/best.pth", "--save-checkpoints-to", "qat",
                                 "--calibration-subset", "6", "--benchmark-seconds", "0", *data_args(trained)]
    code = run_compress(monkeypatch, wd, 90.0, 80.0, *common, "--max-accuracy-drop", "1", "--epochs", "1")
    assert code == 3  # the budget cannot be met
    out = wd / "qat"
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 2  # header + the one fine-tuning epoch that ran in full (target never reached)
    metrics = yaml.safe_load((out / "metrics.yaml").read_text())
    assert metrics["budget"] == {"metric": "top1", "max_accuracy_drop": 1.0, "met": False, "drop": 10.0}
    log = (out / "compress.log").read_text()
    assert "Quantization-aware training: up to 1 epoch(s)" in log and "accuracy budget NOT met" in log

    # Resumed with a larger epoch budget, fine-tuning continues after epoch 1.
    code = run_compress(monkeypatch, wd, 90.0, 80.0, "--resume-from", "qat/latest.pth", *common,
                        "--max-accuracy-drop", "1", "--epochs", "2")
    assert code == 3
    assert [row.split(",")[0] for row in (out / "history.csv").read_text().splitlines()[1:]] == ["1", "2"]
    assert "Resuming after epoch 1" in (out / "compress.log").read_text()


def test_budget_met_after_ptq_skips_fine_tuning(trained, monkeypatch):
    wd = trained["wd"]
    code = run_compress(monkeypatch, wd, 90.0, 89.5, "--load-weights", "outputs/best.pth", "--save-checkpoints-to",
                        "met", "--calibration-subset", "6", "--benchmark-seconds", "0", "--max-accuracy-drop", "1",
                        *data_args(trained))
    assert code == 0
    assert not (wd / "met" / "history.csv").exists()
    assert yaml.safe_load((wd / "met" / "metrics.yaml").read_text())["budget"]["met"] is True


def test_compress_into_a_folder_with_a_compression_run_is_refused_unless_overwrite(trained, monkeypatch):
    wd = trained["wd"]
    args = ["--load-weights", "outputs/best.pth", "--save-checkpoints-to", "twice", "--calibration-subset", "6",
            "--benchmark-seconds", "0", "--max-accuracy-drop", "1", *data_args(trained)]
    assert run_compress(monkeypatch, wd, 90.0, 89.5, *args) == 0
    before = (wd / "twice" / "ptq.pth").read_bytes()
    with pytest.raises(UserError) as info:
        run_compress(monkeypatch, wd, 90.0, 89.5, *args)
    message = str(info.value)
    assert "already holds a run" in message and "ptq.pth" in message and "--overwrite" in message
    assert (wd / "twice" / "ptq.pth").read_bytes() == before
    assert run_compress(monkeypatch, wd, 90.0, 89.5, *args, "--overwrite") == 0
    assert "--overwrite: removed the earlier run's" in (wd / "twice" / "compress.log").read_text()


def test_bad_compress_inputs(trained, monkeypatch, tmp_path):
    """One clear error each (in-process: the script's cli.run turns UserError into one 'error:' line, which
    tests/test_workflow.py checks for every script)."""
    wd = trained["wd"]
    marked = load_checkpoint(wd / "outputs" / "best.pth")
    marked["quantization"] = {}  # what compress.py adds to its checkpoints
    save_checkpoint(marked, tmp_path / "compressed.pth")
    with pytest.raises(UserError, match="already compressed"):
        run_compress(monkeypatch, wd, 0, 0, "--load-weights", str(tmp_path / "compressed.pth"), *data_args(trained))
    with pytest.raises(UserError, match="--load-weights"):
        run_compress(monkeypatch, wd, 0, 0, *data_args(trained))
    with pytest.raises(UserError, match="not a checkpoint written by compress.py"):
        run_compress(monkeypatch, wd, 0, 0, "--resume-from", "outputs/best.pth", *data_args(trained))
    with pytest.raises(TemplateError, match="compression.preset"):
        run_compress(monkeypatch, wd, 0, 0, "--load-weights", "outputs/best.pth", "compression.preset=fast",
                     *data_args(trained))


@pytest.mark.parametrize("float_top1, int8_top1, drop, met", [
    (90.0, 89.0, 1.0, True), (90.0, 88.99, 1.0, False), (90.0, 90.5, 0.0, True), (75.5, 70.0, 5.0, False)])
def test_accuracy_budget(float_top1, int8_top1, drop, met):
    budget = AccuracyBudget(float_top1, drop)
    assert budget.met(int8_top1) is met
    assert ("NOT met" in budget.describe(int8_top1)) is (not met)


def test_qat_epochs_rule():
    assert qat_epochs(1438, 64) == 10          # 22 steps per epoch: capped at 10 epochs
    assert qat_epochs(100_000, 64) == 1        # one epoch is already more than the target steps
    assert qat_epochs(3200, 32) == 3           # 100 steps per epoch -> 3 epochs for 300 steps
    assert qat_epochs(10, 64) == 10 and qat_epochs(5000, 10, max_epochs=2) == 1
