"""Two edges a demanding user finds: a run that diverges stops with one error line that says so (and what was
kept), and an output path that cannot be a folder (it lies under, or is, a regular file) is one error line for
every script that writes."""
from __future__ import annotations

import math

import pytest

from clsengine.loop import DIVERGENCE_FACTOR, Diverged, DivergenceGuard
from conftest import assert_clean_error, instantiate, run_captured, run_script


def test_guard_passes_a_falling_loss_and_stops_an_exploding_or_non_finite_one():
    guard = DivergenceGuard()
    for loss in (2.3, 1.9, 1.2, 0.4, 0.05, 3.0):  # noisy but healthy
        guard.check(loss, 0.01, "epoch 1/3")
    with pytest.raises(Diverged, match=r"epoch 2/3: the loss reached 1\.7e\+21 \(it began at 2\.3\) at learning rate 1e\+06"):
        guard.check(1.7e21, 1e6, "epoch 2/3")
    with pytest.raises(Diverged, match="the loss reached nan"):
        DivergenceGuard().check(math.nan, 0.1, "epoch 1/1")
    small = DivergenceGuard()
    small.check(0.01, 0.1, "e")              # a fine-tuned start: the reference is at least 1
    small.check(0.9 * DIVERGENCE_FACTOR, 0.1, "e")
    with pytest.raises(Diverged):
        small.check(1.1 * DIVERGENCE_FACTOR, 0.1, "e")


def test_a_diverging_run_stops_with_one_error_line(tiny_dataset, tmp_path):
    wd = tmp_path / "wd"
    assert instantiate("resnet18", wd, "--do-not-load-snapshot").returncode == 0
    result = run_script(wd, "train.py", "--train-data-roots", str(tiny_dataset / "train"), "--val-data-roots",
                        str(tiny_dataset / "val"), "--epochs", "3", "--batch-size", "2", "--workers", "0",
                        "--base-learning-rate", "1e6", "--lr-finder", "off", "input.size=[32,32]",
                        "training.optimizer.sam.enabled=false", "training.mutual_learning.enabled=false")
    assert_clean_error(result, "training diverged in epoch 1/3", "lower the learning rate", "--base-learning-rate",
                       "this run's: 1e+06", "no checkpoint of this run was written")
    assert not (wd / "outputs" / "best.pth").exists()


@pytest.mark.parametrize("script, flag, target", [
    ("train.py", "--save-checkpoints-to", "out"),
    ("eval.py", "--save-metrics-to", "out/metrics.yaml"),
    ("export.py", "--save-model-to", "export"),
    ("compress.py", "--save-checkpoints-to", "int8"),
    ("predict.py", "--save-to", "preds"),
    ("explain.py", "--save-to", "maps"),
])
def test_an_output_path_under_a_file_is_one_error_line(trained_resnet18, tmp_path, monkeypatch, capsys, script,
                                                       flag, target):
    wd, val = trained_resnet18["wd"], str(trained_resnet18["val"])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    data = {"train.py": ["--train-data-roots", str(trained_resnet18["train"]), "--val-data-roots", val,
                         "--epochs", "1", "input.size=[32,32]"],
            "eval.py": ["--load-weights", "outputs/best.pth", "--test-data-roots", val],
            "export.py": ["--load-weights", "outputs/best.pth"],
            "compress.py": ["--load-weights", "outputs/best.pth", "--train-data-roots", str(trained_resnet18["train"]),
                            "--val-data-roots", val],
            "predict.py": ["--load-weights", "outputs/best.pth", "--input", val],
            "explain.py": ["--load-weights", "outputs/best.pth", "--input", val]}[script]
    workers = [] if script == "export.py" else ["--workers", "0"]
    result = run_captured(wd, script, *data, flag, str(blocker / target), *workers, monkeypatch=monkeypatch,
                          capsys=capsys)
    assert_clean_error(result, f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "not a folder"


def test_instantiating_under_a_file_is_one_error_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = instantiate("resnet18", blocker / "wd", "--do-not-load-snapshot")
    assert_clean_error(result, f"{blocker} is a file, not a folder")
