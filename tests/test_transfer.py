"""Fine-tuning from initial weights (clsengine.transfer): the linear probe's logistic regression, the stages
that train, frozen BatchNorm, and train.py's log of the pretrained path with its override."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import clsengine.auto as A
from clsengine.checkpoint import load_checkpoint
from clsengine.errors import UserError
from clsengine.models import backbone_stages, classifier, create_model, freeze_stages
from clsengine.models.batchnorm import batchnorms, train_mode
from clsengine.transfer import fit_logistic_regression, linear_probe
from conftest import TEMPLATES_DIR, instantiate, make_image_folder, run_captured


def LITE0_WEIGHTS() -> Path:
    from clsengine.hub import package_file
    from workbench.template import load_template

    return package_file(load_template(TEMPLATES_DIR / "efficientnet_lite0" / "template.yaml").snapshot.location)


def test_logistic_regression_matches_scikit_learn():
    """Same objective as scikit-learn's LogisticRegression(C): l2 = 1 / (C x rows)."""
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 2
    y = torch.arange(200) % 4
    x = centres[y] + torch.randn(200, 16, generator=g) * 1.5
    w, b = fit_logistic_regression(x, y, 4, l2=1.0 / (1.0 * len(y)))
    ours = torch.softmax(x @ w.T + b, 1)
    sk = LogisticRegression(C=1.0, max_iter=5000, tol=1e-8).fit(x.numpy(), y.numpy())
    theirs = torch.from_numpy(sk.predict_proba(x.numpy())).float()
    assert torch.allclose(ours, theirs, atol=2e-3), (ours - theirs).abs().max()


def _loader(folder: Path, model_size: int = 64):
    from clsengine.data import ImageDataset, build_eval_transform, scan_dataset
    from clsengine.data import EpochLoader

    scan = scan_dataset(str(folder), fmt="folders")
    data = ImageDataset(scan.samples, scan.classes, build_eval_transform((model_size, model_size), (127,) * 3, (128,) * 3))
    return EpochLoader(data, batch_size=8, shuffle=False, workers=0, seed=0, drop_last=False)


def test_linear_probe_fits_the_head_in_place(tmp_path: Path):
    train = _loader(make_image_folder(tmp_path / "train", per_class=10, seed=1))
    val = _loader(make_image_folder(tmp_path / "val", per_class=4, seed=2))
    model = create_model("efficientnet_lite0", 3, pretrained=LITE0_WEIGHTS())   # real (ImageNet) features
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = linear_probe(model, train, val, 3, torch.device("cpu"), flip=True)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "classifier.1.weight" in changed and changed <= {"classifier.1.weight", "classifier.1.bias"}  # backbone kept
    assert result.train_rows == 60 and result.val_top1 == 100.0          # colour classes: linearly separable
    assert (result.val_rows, result.val_errors) == (12, 0)
    assert "Linear probe: head fitted on 60 pooled feature vectors" in result.describe()

    cosine = create_model("efficientnet_lite0", 3, head="cosine")
    with pytest.raises(UserError, match="linear classifier"):
        linear_probe(cosine, train, val, 3, torch.device("cpu"))


def test_freeze_stages_and_frozen_batchnorm():
    model = create_model("efficientnet_lite0", 5)
    parts = backbone_stages(model)
    assert len(parts) == 9                                                 # stem, 7 MBConv stages, head convolution
    freeze_stages(model, 2, freeze_bn=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"features.7.0.block.0.0.weight", "features.7.0.block.1.0.weight",
                         "features.7.0.block.3.0.weight", "features.8.0.weight",
                         "classifier.1.weight", "classifier.1.bias"}
    train_mode(model)
    assert all(not bn.training for bn in batchnorms(model)) and classifier(model).training
    stats = model.features[7][0].block[1][1].running_var.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(model.features[7][0].block[1][1].running_var, stats)   # statistics kept

    whole = create_model("resnet18", 5)
    assert len(backbone_stages(whole)) == 8
    freeze_stages(whole, None, freeze_bn=False)
    assert all(p.requires_grad for p in whole.parameters())
    train_mode(whole)
    assert all(bn.training for bn in batchnorms(whole))


def test_train_py_probes_then_fine_tunes_the_last_stages_and_honours_pins(tmp_path: Path, monkeypatch, capsys):
    train = make_image_folder(tmp_path / "train", per_class=8, seed=1)
    val = make_image_folder(tmp_path / "val", per_class=3, seed=2)
    wd = tmp_path / "wd"
    assert instantiate("efficientnet_lite0", wd).returncode == 0           # with the ImageNet snapshot
    common = ["--train-data-roots", str(train), "--val-data-roots", str(val), "--epochs", "1", "--workers", "0",
              "input.size=[32,32]"]
    result = run_captured(wd, "train.py", *common, "--save-checkpoints-to", str(tmp_path / "a"),
                          "training.transfer.fine_tune=true", monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "a" / "train.log").read_text()
    assert f"Initial weights: {wd / 'snapshot.pth'}" in log
    assert "auto training.transfer.linear_probe = True" in log and "Linear probe: head fitted on 48 pooled" in log
    assert "Fine-tuning: the last 2 of 9 stages and the head train (6 tensors); BatchNorm keeps" in log
    assert "auto training.transfer.fine_tune" not in log and "epoch   1/1" in log

    # Left `auto`, fine-tuning is skipped: the probe misses fewer than 5 of the 9 validation images, so no
    # fine-tuned model could be shown better; best.pth is the probe's model and the run ends.
    result = run_captured(wd, "train.py", *common, "--save-checkpoints-to", str(tmp_path / "c"),
                          monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "c" / "train.log").read_text()
    errors = int(re.search(r"auto training.transfer.fine_tune = False: the linear probe leaves (\d) of 9 validation "
                           r"images wrong", log).group(1))
    assert errors < A.SHOWABLE_GAIN and "No fine-tuning" in log and "Fine-tuning:" not in log
    assert "epoch   1/" not in log and "Done: best val top-1" in log and "at epoch 0." in log
    best = load_checkpoint(tmp_path / "c" / "best.pth")
    assert best["epoch"] == 0 and best["config"]["template"]["training"]["transfer"]["fine_tune"] is False
    probe_val = float(re.search(r"Linear probe: .* val top-1 ([\d.]+),", log).group(1))
    assert abs(probe_val - (9 - errors) / 9 * 100) < 0.01

    result = run_captured(wd, "train.py", *common, "--save-checkpoints-to", str(tmp_path / "b"),
                          "training.transfer.trainable_stages=all", "training.transfer.linear_probe=false",
                          "training.transfer.freeze_bn=false", "training.transfer.fine_tune=false",
                          monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "b" / "train.log").read_text()
    assert "Linear probe" not in log and "auto training.transfer" not in log
    assert "Fine-tuning: every stage and the head train" in log and "BatchNorm trains" in log
    assert "fine_tune false keeps a linear probe's model, and no probe ran: training runs" in log  # nothing to keep
    assert "epoch   1/1" in log


def test_fit_keeps_the_starting_model_as_epoch_0_until_an_epoch_beats_it(tmp_path: Path):
    """score_start: a fine-tuning whose epochs all score below its start (here, by a score_fn that falls) ends
    with best.pth holding the starting weights, saved as epoch 0."""
    from torch.utils.data import TensorDataset

    from clsengine.checkpoint import load_checkpoint
    from clsengine.data import EpochLoader
    from clsengine.loop import FitConfig, fit
    from clsengine.optim import create_optimizer
    from clsengine.optim.scheduler import LRSchedule
    from clsengine.runlog import get_logger

    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.arange(32) % 3
    loader = EpochLoader(TensorDataset(x, y), batch_size=8, shuffle=False, workers=0, seed=0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = create_optimizer(model, "sgd", lr=0.5, weight_decay=0.0, no_bias_decay=True)
    scheduler = LRSchedule(optimizer, "cosine", epochs=2, iters_per_epoch=len(loader), warmup_epochs=0)
    scores = iter([90.0, 80.0, 85.0])                                       # epoch 0, 1, 2
    cfg = FitConfig(epochs=2, output_dir=tmp_path, progress=False, score_start=True,
                    score_fn=lambda model: next(scores), checkpoint_extra={"classes": ["a", "b", "c"]})
    result = fit(model, loader, loader, nn.CrossEntropyLoss(), optimizer, scheduler, torch.device("cpu"), cfg,
                 get_logger(name="clsengine.test_transfer"))
    assert (result["best_epoch"], result["best_score"]) == (0, 90.0)
    best = load_checkpoint(tmp_path / "best.pth")
    assert best["epoch"] == 0 and all(torch.equal(best["model"][k], v) for k, v in start.items())
    assert load_checkpoint(tmp_path / "latest.pth")["epoch"] == 2


def test_with_the_start_competing_an_epoch_wins_only_with_a_higher_score_and_no_higher_loss(tmp_path: Path):
    """CheckpointSaver(loss_guard=True), which fit uses with score_start: one validation image more with a
    worse validation loss is noise, not a better model; without the guard the score alone decides."""
    import logging

    from clsengine.checkpoint import load_checkpoint
    from clsengine.checkpoint_saver import CheckpointSaver, ResumableState
    from clsengine.optim import create_optimizer
    from clsengine.optim.scheduler import LRSchedule
    from clsengine.recipe import Recipe

    model = nn.Linear(4, 3)
    optimizer = create_optimizer(model, "sgd", lr=0.1, weight_decay=0.0)
    state = ResumableState(optimizer, LRSchedule(optimizer, "constant", 1, 1), Recipe())
    logger = logging.getLogger("clsengine.test_transfer")
    guarded = CheckpointSaver(tmp_path / "g", {}, write=True, logger=logger, loss_guard=True)
    plain = CheckpointSaver(tmp_path / "p", {}, write=False, logger=logger)
    (tmp_path / "g").mkdir()
    epochs = [(94.81, 0.3142), (96.10, 0.3589), (96.10, 0.3000), (97.40, 0.3100), (97.40, 0.2000)]
    won = [(guarded.save(model, e, score, "model", state, loss=loss), plain.save(model, e, score, "model", state,
                                                                                   loss=loss))
           for e, (score, loss) in enumerate(epochs)]
    assert [g for g, _ in won] == [True, False, True, False, True]  # epochs 1 and 3: higher score, higher loss
    assert [p for _, p in won] == [True, True, False, True, False]
    assert (guarded.best_epoch, guarded.best_score, guarded.best_loss) == (4, 97.40, 0.2000)
    assert load_checkpoint(tmp_path / "g" / "latest.pth")["best_loss"] == 0.2000  # what a resumed run compares with
