"""The user's flow end to end: instantiate each template, train, evaluate, interrupt and resume."""
from __future__ import annotations

import csv
import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import clsengine
from conftest import REPO_ROOT, TEMPLATE_NAMES, assert_clean_error, instantiate, make_image_folder, run_script

FAST = ["--epochs", "1", "--batch-size", "4", "--workers", "0", "input.size=[32,32]"]
# Templates whose flow at 32x32 is another template's code path (same recipe, another architecture of the
# same family or scale) are left out; their models are built and measured by tests/test_templates.py and
# tests/test_npu_models.py, and exported with parity by tests/test_export.py:
# EfficientNet-B1..B3 NPU run efficientnet_b0_npu's, mobilenet_v3_large_075 and mobilenet_v3_small
# mobilenet_v3_large_1's, person_vs_background_56x32 mobilenet_v2's, resnet50 and regnetx_800mf resnet18's
# (the plain recipe). mobilenet_v3_large_1_multilabel runs through every script on a multi-label COCO dataset
# in tests/test_dataset_workflow.py; efficientnet_b0_multilabel stays here: a multi-label model on
# single-label class folders.
SAME_PATH_AS_ANOTHER = ("efficientnet_b1_npu", "efficientnet_b2_npu", "efficientnet_b3_npu",
                        "mobilenet_v3_large_075", "mobilenet_v3_small", "person_vs_background_56x32",
                        "resnet50", "regnetx_800mf", "mobilenet_v3_large_1_multilabel")
FLOW_TEMPLATES = [t for t in TEMPLATE_NAMES if t not in SAME_PATH_AS_ANOTHER]


def read_history(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("template", FLOW_TEMPLATES)
def test_flow_for_every_template(template: str, tmp_path: Path, tiny_dataset: Path) -> None:
    """The README flow, verbatim apart from a tiny epoch budget, with data roots from the environment."""
    work_dir = tmp_path / "my_model"
    result = instantiate(template, work_dir, "--do-not-load-snapshot")
    assert result.returncode == 0, result.stderr
    for name in ("train.py", "eval.py", "template.yaml", "workbench/template.py"):
        assert (work_dir / name).is_file(), name

    env = {"TRAIN_DATA_ROOT": str(tiny_dataset / "train"), "VAL_DATA_ROOT": str(tiny_dataset / "val"),
           "TEST_DATA_ROOT": str(tiny_dataset / "val")}
    train = run_script(work_dir, "train.py", "--train-ann-files", "", "--train-data-roots", env["TRAIN_DATA_ROOT"],
                       "--val-ann-files", "", "--val-data-roots", env["VAL_DATA_ROOT"],
                       "--save-checkpoints-to", str(work_dir / "outputs"), *FAST, env=env)
    assert train.returncode == 0, train.stderr
    outputs = work_dir / "outputs"
    for name in ("latest.pth", "best.pth", "config.yaml", "train.log", "history.csv", "training_curves.png"):
        assert (outputs / name).is_file(), name
    assert list((outputs / "tensorboard").glob("events.out.tfevents.*"))
    assert "epoch   1/1" in train.stdout

    config = yaml.safe_load((outputs / "config.yaml").read_text())
    assert config["template"]["name"] == template
    assert config["template"]["input"]["size"] == [32, 32]           # the override is in the effective config
    assert config["template"]["hyper_parameters"]["basic"]["epochs"] == 1
    assert config["classes"] == ["class_0", "class_1", "class_2"]
    versions = config["run"]["versions"]  # what code trained it: the engine comes from the environment
    assert versions["clsengine"] == clsengine.__version__ and versions["workbench"]
    assert torch.load(outputs / "best.pth", weights_only=True)["config"]["run"]["versions"] == versions

    evaluation = run_script(work_dir, "eval.py", "--load-weights", str(outputs / "latest.pth"), "--test-ann-files", "",
                            "--save-metrics-to", str(work_dir / "metrics.yaml"), env=env)
    assert evaluation.returncode == 0, evaluation.stderr
    metrics = yaml.safe_load((work_dir / "metrics.yaml").read_text())
    by_key = {m["key"]: m["value"] for m in metrics["metrics"]}
    multilabel = config["template"]["task"]["type"] == "multilabel"
    score = by_key["mAP" if multilabel else "accuracy"]
    assert 0.0 <= score <= 100.0 and by_key["size"] > 0 and by_key["complexity"] > 0
    assert metrics["dataset"]["num_images"] == 6
    assert metrics["versions"]["clsengine"] == versions["clsengine"]
    assert (work_dir / "confusion_matrix.png").is_file() != multilabel


def test_learns_digits_well_above_chance(tmp_path: Path) -> None:
    """Train from scratch on 400 real handwritten digits (10 classes, chance = 10%) and evaluate."""
    data = tmp_path / "digits"
    made = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_digits_dataset.py"), str(data),
                           "--per-class", "50"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    work_dir = tmp_path / "wd"
    assert instantiate("resnet18", work_dir, "--do-not-load-snapshot").returncode == 0
    train = run_script(work_dir, "train.py", "--train-data-roots", str(data / "train"), "--val-data-roots",
                       str(data / "val"), "--epochs", "8", "--batch-size", "32", "--workers", "0",
                       "input.size=[32,32]", "training.scheduler.name=cosine", "model.small_input=false")
    assert train.returncode == 0, train.stderr
    evaluation = run_script(work_dir, "eval.py", "--load-weights", str(work_dir / "outputs" / "best.pth"),
                            "--test-data-roots", str(data / "val"))
    assert evaluation.returncode == 0, evaluation.stderr
    metrics = yaml.safe_load((work_dir / "metrics.yaml").read_text())
    top1 = next(m["value"] for m in metrics["metrics"] if m["key"] == "accuracy")
    assert top1 >= 40.0, f"top-1 {top1} is not clearly above the 10% chance level"
    assert sum(row["support"] for row in metrics["per_class"].values()) == 100


def test_killed_run_resumes_from_latest(tmp_path: Path) -> None:
    """SIGKILL a run in its third epoch, resume with --resume-from, and finish with every epoch exactly once."""
    data = make_image_folder(tmp_path / "train", per_class=24, seed=3)
    make_image_folder(tmp_path / "val", per_class=4, seed=4)
    work_dir = tmp_path / "wd"
    assert instantiate("mobilenet_v3_small", work_dir, "--do-not-load-snapshot").returncode == 0
    outputs = work_dir / "outputs"
    args = ["--train-data-roots", str(data), "--val-data-roots", str(tmp_path / "val"), "--epochs", "5",
            "--batch-size", "4", "--workers", "0", "input.size=[32,32]"]
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=work_dir, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and process.poll() is None:
            if (outputs / "history.csv").is_file() and len(read_history(outputs / "history.csv")) >= 2:
                break
            time.sleep(0.2)
        assert process.poll() is None, "training ended before it could be interrupted"
        time.sleep(0.5)  # well inside epoch 3
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    interrupted = torch.load(outputs / "latest.pth", weights_only=True)
    done = interrupted["epoch"]
    assert 2 <= done < 5

    resumed = run_script(work_dir, "train.py", *args, "--resume-from", str(outputs / "latest.pth"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming after epoch {done}" in resumed.stdout
    assert f"epoch {done:3d}/5" not in resumed.stdout and f"epoch {done + 1:3d}/5" in resumed.stdout
    assert [int(r["epoch"]) for r in read_history(outputs / "history.csv")] == [1, 2, 3, 4, 5]
    final = torch.load(outputs / "latest.pth", weights_only=True)
    assert final["epoch"] == 5 and final["scheduler"]["iteration"] == 5 * interrupted["scheduler"]["iteration"] // done
    assert not list(outputs.glob("*.tmp")) and not list(outputs.glob(".*.tmp"))


def test_resume_rejects_other_classes(tmp_path: Path, tiny_dataset: Path) -> None:
    work_dir = tmp_path / "wd"
    assert instantiate("mobilenet_v3_small", work_dir, "--do-not-load-snapshot").returncode == 0
    common = ["--val-data-roots", str(tiny_dataset / "val"), *FAST]
    assert run_script(work_dir, "train.py", "--train-data-roots", str(tiny_dataset / "train"),
                      *common).returncode == 0
    other = make_image_folder(tmp_path / "other", classes=2, per_class=2)  # lacks class_2
    result = run_script(work_dir, "eval.py", "--load-weights", str(work_dir / "outputs" / "latest.pth"),
                        "--test-data-roots", str(other))
    assert_clean_error(result, "class_2")


def test_instantiate_refuses_non_empty_dir_and_bad_template(tmp_path: Path) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    result = instantiate("resnet18", target)
    assert result.returncode == 2 and "not empty" in result.stderr and "Traceback" not in result.stderr
    assert (target / "keep.txt").read_text() == "user data"
    assert instantiate("resnet18", target, "--overwrite").returncode == 0
    assert (target / "train.py").is_file() and (target / "keep.txt").is_file()

    bad = tmp_path / "bad" / "template.yaml"
    bad.parent.mkdir()
    text = (REPO_ROOT / "models/image_classification/model_templates/custom-classification/resnet18/template.yaml")
    bad.write_text(text.read_text().replace("  architecture: resnet18", "  architecture: resnet18\n  widht: 1"))
    result = instantiate(bad, tmp_path / "wd")
    assert result.returncode == 2 and "model.widht" in result.stderr and str(bad) in result.stderr
    assert not (tmp_path / "wd").exists()


def _template_with_snapshot(tmp_path: Path, location: str, sha256: str, size: int, name: str = "tpl") -> Path:
    source = REPO_ROOT / "models/image_classification/model_templates/custom-classification/mobilenet_v3_small"
    folder = tmp_path / name
    folder.mkdir()
    text = (source / "template.yaml").read_text()
    text += f"\nsnapshot:\n  location: {location}\n  sha256: \"{sha256}\"\n  size: {size}\n"
    (folder / "template.yaml").write_text(text)
    return folder / "template.yaml"


def test_snapshot_is_verified_and_used_for_training(tmp_path: Path, tiny_dataset: Path) -> None:
    from clsengine.hub import sha256_of
    from clsengine.models import create_model

    weights = tmp_path / "weights.pth"
    torch.save(create_model("mobilenet_v3_small", 1000, bn_momentum=0.1).state_dict(), weights)
    template = _template_with_snapshot(tmp_path, str(weights), sha256_of(weights), weights.stat().st_size)
    work_dir = tmp_path / "wd"
    result = instantiate(template, work_dir)
    assert result.returncode == 0, result.stderr
    assert sha256_of(work_dir / "snapshot.pth") == sha256_of(weights)
    train = run_script(work_dir, "train.py", "--train-data-roots", str(tiny_dataset / "train"),
                       "--val-data-roots", str(tiny_dataset / "val"), *FAST)
    assert train.returncode == 0, train.stderr
    assert "Initial weights:" in train.stdout and "snapshot.pth" in train.stdout

    corrupted = _template_with_snapshot(tmp_path, str(weights), "0" * 64, weights.stat().st_size, name="bad_sha")
    result = instantiate(corrupted, tmp_path / "wd2")
    assert result.returncode == 2 and "sha256" in result.stderr
    assert not (tmp_path / "wd2" / "snapshot.pth").exists()


def test_offline_snapshot_is_one_line_and_work_dir_still_trains(tmp_path: Path) -> None:
    template = _template_with_snapshot(tmp_path, "http://127.0.0.1:9/weights.pth", "0" * 64, 10)
    result = instantiate(template, tmp_path / "wd")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "offline" in warnings[0] and "from scratch" in warnings[0]
    assert (tmp_path / "wd" / "train.py").is_file() and not (tmp_path / "wd" / "snapshot.pth").exists()


def test_script_help_and_bad_override(tmp_path: Path, tiny_dataset: Path, work_dir, monkeypatch, capsys) -> None:
    wd = work_dir("resnet18")
    # --help of every script, in-process (each script's parse_args; a subprocess each would cost seconds).
    scripts = sorted(p.name for p in wd.glob("*.py"))
    assert {"train.py", "eval.py", "export.py", "predict.py", "compress.py", "optimize.py",
            "explain.py"} <= set(scripts)
    for script in scripts:
        spec = importlib.util.spec_from_file_location(f"help_{script[:-3]}", wd / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        monkeypatch.setattr(sys, "argv", [str(wd / script), "--help"])
        with pytest.raises(SystemExit) as exit_info:
            module.parse_args()
        assert exit_info.value.code == 0
        assert "--template" in capsys.readouterr().out, script
    result = run_script(wd, "train.py", "--train-data-roots", str(tiny_dataset / "train"), "--val-data-roots",
                        str(tiny_dataset / "val"), "training.optimizer.nmae=adam")
    assert_clean_error(result, "training.optimizer.nmae", "command-line override")
    result = run_script(wd, "eval.py", "--load-weights", str(tmp_path / "missing.pth"),
                        "--test-data-roots", str(tiny_dataset / "val"))
    assert_clean_error(result, "missing.pth")
