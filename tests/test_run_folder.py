"""Nothing the user has is lost: a run folder has one owner (a lock, stale after a kill), a fresh run does not
replace an earlier run's checkpoints, latest.pth and best.pth agree after a kill between their writes, a full
disk is one error line with the earlier files intact, interrupted writes leave no temporary files behind, and
eval.py reads labels and data as the model was trained."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (REPO_ROOT, assert_clean_error, instantiate, make_image_folder, run_captured, run_script)

from clsengine import fileio
from clsengine.checkpoint import load_checkpoint, save_checkpoint
from clsengine.checkpoint_saver import RESUME_ONLY_KEYS
from clsengine.errors import UserError
from clsengine.fileio import FAULT_ENV, WriteError, remove_stale_temporaries
from clsengine.predictions import evaluate_predictions
from clsengine.rundir import RunFolderError, claim_run_folder, lock_run_folder


def train_args(data: Path, epochs: int = 1) -> list[str]:
    return ["--train-data-roots", str(data / "train"), "--val-data-roots", str(data / "val"), "--epochs", str(epochs),
            "--batch-size", "4", "--workers", "0", "input.size=[32,32]"]


@pytest.fixture(scope="module")
def killed_run(module_dir) -> dict:
    """A run SIGKILLed between the latest.pth and best.pth writes of its first epoch (the test hook kills the
    process after best.pth's temporary file is written, before it replaces best.pth)."""
    root = module_dir
    data = root / "data"
    make_image_folder(data / "train", per_class=4, seed=1)
    make_image_folder(data / "val", per_class=2, seed=2)
    wd = root / "wd"
    assert instantiate("mobilenet_v3_small", wd, "--do-not-load-snapshot").returncode == 0
    result = run_script(wd, "train.py", *train_args(data, epochs=2), env={FAULT_ENV: "kill:best.pth:1"})
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr)
    return {"wd": wd, "data": data}


def copy_run(killed: dict, tmp_path: Path) -> Path:
    wd = tmp_path / "wd"
    shutil.copytree(killed["wd"], wd, symlinks=True)
    return wd


def test_kill_between_latest_and_best_is_repaired_on_resume(killed_run, tmp_path: Path, monkeypatch, capsys):
    wd = copy_run(killed_run, tmp_path)
    out = wd / "outputs"
    latest = load_checkpoint(out / "latest.pth")
    assert latest["epoch"] == latest["best_epoch"] == 1 and not (out / "best.pth").exists()
    result = run_script(wd, "train.py", *train_args(killed_run["data"], epochs=2), "--resume-from",
                        "outputs/latest.pth")
    assert result.returncode == 0, result.stderr
    assert "rebuilt from latest.pth" in result.stdout
    final = load_checkpoint(out / "latest.pth")
    best = load_checkpoint(out / "best.pth")
    assert final["epoch"] == 2 and best["epoch"] == final["best_epoch"]
    done = next(line for line in result.stdout.splitlines() if line.startswith("Done:"))
    listed = done.split(": ", 2)[2].split(", TensorBoard")[0].split(", ")
    assert "best.pth" in listed and all((out / name).is_file() for name in listed), done
    # best.pth holds what deployment needs, latest.pth what resuming needs: resuming from best.pth is refused.
    assert not set(RESUME_ONLY_KEYS) & set(best) and {"optimizer", "scheduler", "rng"} <= set(final)
    assert (out / "best.pth").stat().st_size < 0.7 * (out / "latest.pth").stat().st_size
    result = run_captured(wd, "train.py", *train_args(killed_run["data"], epochs=3), "--resume-from",
                          "outputs/best.pth", monkeypatch=monkeypatch, capsys=capsys)
    assert_clean_error(result, "outputs/best.pth", "latest.pth")


def test_repair_rebuilds_best_from_the_ema_when_the_ema_was_best(tmp_path: Path):
    from clsengine.checkpoint_saver import repair_best
    from clsengine.runlog import get_logger

    model = torch.nn.Linear(2, 2)
    ema = {"module.weight": torch.full((2, 2), 7.0), "module.bias": torch.zeros(2), "n_averaged": torch.tensor(3)}
    latest = {"model": model.state_dict(), "ema": ema, "epoch": 3, "best_epoch": 3, "best_from": "ema"}
    save_checkpoint({**latest, "epoch": 1}, tmp_path / "best.pth")  # one best epoch behind
    repair_best(latest, tmp_path / "best.pth", get_logger(name="clsengine.test_repair"))
    best = load_checkpoint(tmp_path / "best.pth")
    assert best["epoch"] == 3 and best["weights_from"] == "ema"
    assert torch.equal(best["model"]["weight"], ema["module.weight"]) and "n_averaged" not in best["model"]


def test_temporary_files_of_a_killed_write_are_removed_on_the_next_start(killed_run, tmp_path: Path):
    wd = copy_run(killed_run, tmp_path)
    out = wd / "outputs"
    stale = [p.name for p in out.iterdir() if p.name.startswith(".best.pth.") and p.name.endswith(".tmp")]
    assert len(stale) == 1, sorted(p.name for p in out.iterdir())
    result = run_script(wd, "train.py", *train_args(killed_run["data"], epochs=1), "--resume-from",
                        "outputs/latest.pth")  # nothing left to train: claims the folder, repairs and ends
    assert result.returncode == 0, result.stderr
    assert "removed 1 temporary file(s)" in result.stdout and stale[0] in result.stdout
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # A live writer's names are the only ones matched: other dot-files stay.
    (out / ".keep").write_text("x")
    assert remove_stale_temporaries(out) == [] and (out / ".keep").exists()


def test_fresh_run_into_a_folder_with_a_run_is_refused_then_overwritten_on_request(killed_run, tmp_path: Path,
                                                                                      monkeypatch, capsys):
    wd = copy_run(killed_run, tmp_path)
    out = wd / "outputs"
    before = (out / "latest.pth").read_bytes()
    result = run_captured(wd, "train.py", *train_args(killed_run["data"]), monkeypatch=monkeypatch, capsys=capsys)
    assert_clean_error(result, str(out), "already holds a run", "latest.pth", "--resume-from", "--overwrite")
    assert (out / "latest.pth").read_bytes() == before
    result = run_captured(wd, "train.py", *train_args(killed_run["data"]), "--overwrite", monkeypatch=monkeypatch,
                          capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "--overwrite: removed the earlier run's latest.pth" in result.stdout
    assert load_checkpoint(out / "latest.pth")["epoch"] == 1 and (out / "best.pth").is_file()
    # Resuming from another folder's checkpoint into this one is a fresh start for this folder: refused too.
    other = tmp_path / "other"
    shutil.copytree(out, other)
    result = run_captured(wd, "train.py", *train_args(killed_run["data"], epochs=2), "--resume-from",
                          str(other / "latest.pth"), monkeypatch=monkeypatch, capsys=capsys)
    assert_clean_error(result, "already holds a run")


HOLD_LOCK = """
import sys, time
from clsengine.rundir import lock_run_folder
lock_run_folder(sys.argv[1], "train.py")
print("locked", flush=True)
time.sleep(120)
"""


def test_second_run_on_a_locked_folder_is_refused_and_a_killed_owner_is_taken_over(killed_run, tmp_path: Path,
                                                                                     monkeypatch, capsys):
    wd = copy_run(killed_run, tmp_path)
    out = wd / "new_run"
    owner = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "external")})
    try:
        assert owner.stdout.readline().strip() == "locked"
        args = [*train_args(killed_run["data"]), "--save-checkpoints-to", str(out)]
        result = run_captured(wd, "train.py", *args, monkeypatch=monkeypatch, capsys=capsys)
        assert_clean_error(result, str(out), "in use by another train.py", f"pid {owner.pid}", "started")
        assert not (out / "train.log").exists() and not (out / "latest.pth").exists()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    result = run_captured(wd, "train.py", *args, monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert f"took over the lock of a train.py that is no longer running (pid {owner.pid}" in result.stdout
    assert (out / "latest.pth").is_file()
    # The run ended: its lock is released and names nobody, so the next start warns of nothing.
    assert (out / ".lock").read_text() == ""
    lock_run_folder(out, "test").release()


def test_full_disk_during_a_checkpoint_write_is_one_error_and_the_earlier_checkpoint_stays(killed_run,
                                                                                           tmp_path: Path):
    wd = copy_run(killed_run, tmp_path)
    args = [*train_args(killed_run["data"], epochs=2), "--save-checkpoints-to", "full"]
    result = run_script(wd, "train.py", *args, env={FAULT_ENV: "enospc:latest.pth:2"})
    assert_clean_error(result, str(wd / "full" / "latest.pth"), "no space left on the device", "free")
    assert load_checkpoint(wd / "full" / "latest.pth")["epoch"] == 1
    assert not [p for p in (wd / "full").iterdir() if p.name.endswith(".tmp")]
    result = run_script(wd, "train.py", *args, env={FAULT_ENV: "eacces:config.yaml"})
    assert_clean_error(result, "already holds a run")  # the refusal comes first
    result = run_script(wd, "train.py", *args, "--overwrite", env={FAULT_ENV: "eacces:config.yaml"})
    assert_clean_error(result, "config.yaml", "permission denied")


class _FullDisk:
    """A file object whose writes fail as a full disk does, after taking part of the data."""

    def __init__(self, path, mode):
        self.f = open(path, mode)

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_save_checkpoint_on_a_full_disk_names_the_size_and_keeps_the_old_file(tmp_path: Path, monkeypatch):
    path = tmp_path / "latest.pth"
    save_checkpoint({"epoch": 1, "w": torch.zeros(10)}, path)
    monkeypatch.setattr(fileio, "open", _FullDisk, raising=False)  # the builtin open of write_bytes
    with pytest.raises(WriteError) as info:
        save_checkpoint({"epoch": 2, "w": torch.zeros(100_000)}, path)
    message = str(info.value)
    assert str(path) in message and "no space left" in message and "needs about 39" in message and "KiB" in message, message
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]


def test_log_file_that_cannot_be_written_is_one_warning(tmp_path: Path, capsys):
    from clsengine.runlog import get_logger

    logger = get_logger(tmp_path / "train.log", name="clsengine.test_logfull")
    handler = next(h for h in logger.handlers if hasattr(h, "baseFilename"))

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    handler.stream.write = full
    for i in range(3):
        logger.info(f"epoch {i}")
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "Traceback" not in err and "no space left" in err, err
    assert handler not in logger.handlers


def test_claim_keeps_a_folder_without_checkpoints_and_the_lock_is_exclusive(tmp_path: Path):
    lock = claim_run_folder(tmp_path / "run", "train.py", run_names=("latest.pth",), resuming=False, overwrite=False,
                            resume_hint="--resume-from X")
    with pytest.raises(RunFolderError, match="in use by another train.py"):
        lock_run_folder(tmp_path / "run", "train.py")
    lock.release()
    lock_run_folder(tmp_path / "run", "train.py").release()


# ------------------------------------------------------------------ eval.py: label spaces and data settings


def test_predictions_against_ground_truth_of_another_label_space_is_an_error():
    preds = {"a.png": [(0.9, "cat"), (0.1, "dog")], "b.png": [(0.8, "dog"), (0.2, "cat")]}
    with pytest.raises(UserError) as info:
        evaluate_predictions(preds, {"a.png": "0", "b.png": "1"}, model_classes=["cat", "dog"])
    assert "share no name" in str(info.value) and "0, 1" in str(info.value) and "cat, dog" in str(info.value)
    report = evaluate_predictions(preds, {"a.png": "cat", "b.png": "bird"}, model_classes=["cat", "dog"])
    assert report.warnings and "bird" in report.warnings[0]


def test_top_k_is_reported_only_below_the_number_of_classes():
    two = {"a.png": [(0.9, "cat"), (0.1, "dog")], "b.png": [(0.8, "cat"), (0.2, "dog")]}
    report = evaluate_predictions(two, {"a.png": "cat", "b.png": "dog"}, model_classes=["cat", "dog"])
    assert list(report.topk) == [1] and report.topk[1] == 50.0
    many = {"a.png": [(0.5, "c1"), (0.3, "c2"), (0.2, "c3")]}
    report = evaluate_predictions(many, {"a.png": "c2"}, model_classes=[f"c{i}" for i in range(8)])
    assert report.topk == {1: 0.0, 3: 100.0}  # top-5 of 3-long lists is top-3, below 8 classes


def test_eval_preds_script_refuses_mismatched_labels(tmp_path: Path, monkeypatch, capsys, work_dir):
    wd = work_dir("mobilenet_v3_small")
    pred_dir = tmp_path / "preds"
    pred_dir.mkdir()
    (pred_dir / "a.json").write_text(json.dumps({"img_path": "a.png", "0_0": [[0.9, "cat"], [0.1, "dog"]]}))
    (pred_dir / "classes.json").write_text(json.dumps(["cat", "dog"]))
    gts = tmp_path / "gts.json"
    gts.write_text(json.dumps({"a.png": "zebra"}))
    result = run_captured(wd, "eval.py", "--preds", str(pred_dir), "--gts", str(gts), monkeypatch=monkeypatch,
                          capsys=capsys)
    assert_clean_error(result, "zebra", "cat, dog", "share no name")
    gts.write_text(json.dumps({"a.png": "cat"}))
    result = run_captured(wd, "eval.py", "--preds", str(pred_dir), "--gts", str(gts), monkeypatch=monkeypatch,
                          capsys=capsys)
    assert result.returncode == 0 and "top-1 100.00" in result.stdout and "top-5" not in result.stdout


def test_eval_reads_a_coco_file_with_the_category_map_the_model_was_trained_with(tmp_path: Path, monkeypatch,
                                                                                  capsys, work_dir):
    images = make_image_folder(tmp_path / "images", classes=3, per_class=4)
    files = sorted(p.relative_to(images) for p in images.rglob("*.png"))
    ids = {"class_0": 1, "class_1": 2, "class_2": 5}
    coco = {"images": [{"id": i + 1, "file_name": str(f)} for i, f in enumerate(files)],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": ids[f.parts[0]]}
                            for i, f in enumerate(files)],
            "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}, {"id": 5, "name": "blue"}]}
    ann = tmp_path / "coco.json"
    ann.write_text(json.dumps(coco))
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"1": 0, "2": 0, "5": 1}))  # red and green merged: 2 classes
    wd = work_dir("mobilenet_v3_small")
    data = ["--train-ann-files", str(ann), "--train-data-roots", str(images), "--val-ann-files", str(ann),
            "--val-data-roots", str(images)]
    result = run_captured(wd, "train.py", *data, "--category-map", str(mapping), "--epochs", "1", "--batch-size", "4",
                          "--workers", "0", "input.size=[32,32]", monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr
    result = run_captured(wd, "eval.py", "--load-weights", "outputs/best.pth", "--test-ann-files", str(ann),
                          "--test-data-roots", str(images), "--save-metrics-to", str(tmp_path / "m.yaml"),
                          monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert f"data.category_map={mapping}" in result.stdout and "on 12 images" in result.stdout
    import yaml
    metrics = yaml.safe_load((tmp_path / "m.yaml").read_text())
    assert metrics["classes"] == ["red+green", "blue"]
    assert "accuracy_top5" not in [m["key"] for m in metrics["metrics"]]  # 2 classes: top-1 only


def test_fault_hook_counts_writes_per_file_name(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "enospc:x.txt:2")
    monkeypatch.setattr(fileio, "_writes", {})
    fileio.write_text(tmp_path / "x.txt", "one")
    fileio.write_text(tmp_path / "y.txt", "other")
    with pytest.raises(WriteError, match="no space left"):
        fileio.write_text(tmp_path / "x.txt", "two")
    assert (tmp_path / "x.txt").read_text() == "one"


def test_ir_export_on_a_full_disk_keeps_the_earlier_ir(tmp_path: Path, monkeypatch):
    from clsengine.export import export_openvino
    from clsengine.ov_core import openvino_core

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    kwargs = dict(input_size=(16, 16), mean=[0, 0, 0], std=[1, 1, 1], labels=["a", "b"])
    xml = export_openvino(model, tmp_path / "model.xml", **kwargs)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setenv(FAULT_ENV, "enospc:model.xml")
    monkeypatch.setattr(fileio, "_writes", {})
    with pytest.raises(WriteError, match="no space left"):
        export_openvino(torch.nn.Sequential(*model[:3], torch.nn.Linear(4, 2)), xml, **kwargs)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # the pair unchanged, no temporaries
    openvino_core().compile_model(str(xml), "CPU")


def test_top5_is_kept_with_more_than_five_classes():
    from clsengine.metrics import meaningful_ks, topk_accuracy

    assert meaningful_ks(2) == (1,) and meaningful_ks(5) == (1,) and meaningful_ks(6) == (1, 5)
    logits = torch.tensor([[0.2, 0.9, 0.8, 0.7, 0.6, 0.5, 0.1, 0.0],    # label 0: ranked 6th of 8
                           [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]])   # label 3: 4th
    assert topk_accuracy(logits, torch.tensor([0, 3])) == {"top1": 0.0, "top5": 50.0}
