"""The full recipe through the work-dir scripts: every technique on, one short epoch on tiny data."""
from __future__ import annotations

import csv
from pathlib import Path

import torch
import yaml

from conftest import assert_clean_error, run_script

# The published recipe, pinned (in a one-epoch run the `auto` values would switch its costly parts off).
PUBLISHED = ["training.optimizer.name=sgd", "training.optimizer.sam.enabled=true", "training.lr_finder.enabled=true",
             "training.augmentation_level=full"]
TINY = ["--epochs", "1", "--batch-size", "4", "--workers", "0", "input.size=[32,32]",
        "training.lr_finder.num_iter=12", "training.lr_finder.warmup_epochs=1", *PUBLISHED]


def test_full_recipe_one_epoch_then_aux_weights_and_resume(tmp_path: Path, tiny_dataset: Path, work_dir) -> None:
    wd = work_dir("mobilenet_v3_large_1")  # template recipe: mutual learning (AM-softmax aux), SAM, EMA, LR finder, AugMix
    data = ["--train-data-roots", str(tiny_dataset / "train"), "--val-data-roots", str(tiny_dataset / "val")]
    result = run_script(wd, "train.py", *data, *TINY, "training.mutual_learning.enabled=true")
    assert result.returncode == 0, result.stderr
    recipe_line = next(line for line in result.stdout.splitlines() if line.startswith("Recipe:"))
    for part in ("SAM(rho=0.05)", "mutual learning with 1 auxiliary model", "EMA(decay=0.999)", "AugMix"):
        assert part in recipe_line, recipe_line

    outputs = wd / "outputs"
    finder = yaml.safe_load((outputs / "lr_finder.yaml").read_text())
    assert finder["mode"] == "fast_ai" and 0.005 <= finder["lr"] <= 0.03
    assert (outputs / "lr_finder.png").read_bytes()[:4] == b"\x89PNG"
    config = yaml.safe_load((outputs / "config.yaml").read_text())
    assert config["template"]["hyper_parameters"]["basic"]["base_learning_rate"] == finder["lr"]

    latest = torch.load(outputs / "latest.pth", weights_only=True)
    assert len(latest["aux_models"]) == 1 and "ema" in latest
    aux_keys = [k for k in latest["aux_models"][0] if k.endswith("scale")]
    assert aux_keys, "the auxiliary model should have a cosine (AM-softmax) classifier"
    assert latest["optimizer"]["param_groups"][0]["rho"] == 0.05
    with open(outputs / "history.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert float(row["ema_val_top1"]) >= 0.0

    # Only the main model is evaluated: eval.py loads best.pth as usual.
    evaluation = run_script(wd, "eval.py", "--load-weights", str(outputs / "best.pth"), "--test-data-roots",
                            str(tiny_dataset / "val"))
    assert evaluation.returncode == 0, evaluation.stderr

    # A second run starts its auxiliary model from the first run's; LR finder skipped by override.
    second = run_script(wd, "train.py", *data, *TINY, "training.mutual_learning.enabled=true",
                        "--save-checkpoints-to", str(tmp_path / "second"),
                        "--load-aux-weights", str(outputs / "latest.pth"), "--lr-finder", "off")
    assert second.returncode == 0, second.stderr
    assert "LR finder" not in second.stdout

    # Resume continues with EMA and auxiliary model restored, and skips the LR finder.
    resumed = run_script(wd, "train.py", *data, "--resume-from", str(outputs / "latest.pth"), "--epochs", "2",
                         "--workers", "0")
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming after epoch 1" in resumed.stdout and "LR finder" not in resumed.stdout
    final = torch.load(outputs / "latest.pth", weights_only=True)
    assert final["epoch"] == 2 and final["ema"]["n_averaged"] > latest["ema"]["n_averaged"]


def test_lr_finder_stop_after_and_bad_aux_weights(tmp_path: Path, tiny_dataset: Path, work_dir) -> None:
    wd = work_dir("efficientnet_b0")  # AM-softmax main model, no mutual learning
    data = ["--train-data-roots", str(tiny_dataset / "train"), "--val-data-roots", str(tiny_dataset / "val")]
    result = run_script(wd, "train.py", *data, *TINY, "--lr-finder", "grid", "training.lr_finder.stop_after=true",
                        "training.lr_finder.n_trials=2", "training.lr_finder.trial_epochs=1")
    assert result.returncode == 0, result.stderr
    assert "stop_after: the learning rate is" in result.stdout
    settings = next(line for line in result.stdout.splitlines() if "Settings given: " in line)
    assert "training.lr_finder.mode='grid' (--lr-finder)" in settings  # each value named with its own source
    assert "training.lr_finder.n_trials=2 (KEY=VALUE)" in settings
    finder = yaml.safe_load((wd / "outputs" / "lr_finder.yaml").read_text())
    assert finder["mode"] == "grid" and len(finder["trials"]) == 2
    assert finder["lr"] in [trial["lr"] for trial in finder["trials"]] and 0.001 <= finder["lr"] <= 0.01
    assert (wd / "outputs" / "lr_finder.png").is_file() and not (wd / "outputs" / "latest.pth").exists()

    result = run_script(wd, "train.py", *data, *TINY, "--load-aux-weights", str(tmp_path / "x.pth"))
    assert_clean_error(result, "--load-aux-weights", "mutual_learning")


def test_plain_run_switches_everything_off(tiny_dataset: Path, work_dir) -> None:
    wd = work_dir("mobilenet_v3_small")
    off = ["training.optimizer.sam.enabled=false", "training.ema.enabled=false",
           "training.mutual_learning.enabled=false", "training.lr_finder.enabled=false",
           "training.augmentation.augmix=false", "training.channels_last=false"]  # its layout depends on the CPU
    result = run_script(wd, "train.py", "--train-data-roots", str(tiny_dataset / "train"), "--val-data-roots",
                        str(tiny_dataset / "val"), *TINY, *off)
    assert result.returncode == 0, result.stderr
    recipe_line = next(line for line in result.stdout.splitlines() if line.startswith("Recipe:"))
    assert recipe_line == "Recipe: loss softmax, optimizer sgd, scheduler cosine"  # auto schedule of a short run
    latest = torch.load(wd / "outputs" / "latest.pth", weights_only=True)
    assert "ema" not in latest and "aux_models" not in latest and not (wd / "outputs" / "lr_finder.png").exists()
