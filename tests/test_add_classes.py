"""train.py --add-classes: the extended model keeps the old head rows (linear and cosine heads) so that its old
classes' logits are the old model's before training; the new classes list and the report are written; the replay
sample is what was asked (a warning where fewer images exist); a wrong old checkpoint or data is one error line."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from clsengine.checkpoint import load_checkpoint
from clsengine.errors import CheckpointError
from clsengine.incremental import extend_head_state, replay_sample
from clsengine.models import am_softmax_scale, create_model
from conftest import TEMPLATES_DIR, assert_clean_error, instantiate, make_image_folder, run_captured, run_script
from workbench import factories
from workbench.incremental import AddClasses
from workbench.template import load_template


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_extended_head_keeps_old_rows_and_the_old_classes_logits(head):
    """Old classes at new positions 0, 2, 3 of 5 (any order works): those rows are the old ones, the others the
    fresh model's, every other tensor the old model's; the old classes' logits are the old model's."""
    torch.manual_seed(0)
    scale = am_softmax_scale(3)   # a cosine head keeps the old model's scale (template_keys pins it)
    old = create_model("convnet_small", 3, small_input=True, head=head, cosine_scale=scale).eval()
    torch.manual_seed(1)
    new = create_model("convnet_small", 5, small_input=True, head=head, cosine_scale=scale).eval()
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    positions = [0, 2, 3]
    new.load_state_dict(extend_head_state(old.state_dict(), new.state_dict(), positions))
    old_state, new_state = old.state_dict(), new.state_dict()
    rows = [k for k in new_state if new_state[k].shape != old_state[k].shape]   # the class rows
    assert len(rows) == (2 if head == "linear" else 1) and all(k.startswith(new.head_name) for k in rows)
    for key in rows:
        assert torch.equal(new_state[key][positions], old_state[key])
        assert torch.equal(new_state[key][[1, 4]], fresh[key][[1, 4]])
    assert all(torch.equal(new_state[k], old_state[k]) for k in new_state if k not in rows)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(new(images)[:, positions], old(images), atol=1e-5)
        assert not torch.allclose(new(images)[:, [1, 4]], old(images)[:, :2], atol=1e-3)


def test_a_cosine_old_model_keeps_its_scale_in_the_larger_model():
    """The AM-softmax scale grows with the class count; the extended model keeps the old one, or the old classes'
    logits would all be rescaled."""
    path = TEMPLATES_DIR / "convnet_small" / "template.yaml"
    old_t = load_template(path, {"model.head": "cosine", "training.loss.name": "am_softmax"})
    keys = AddClasses(Path("old.pth"), old_t, [f"c{i}" for i in range(12)], None, None, None).template_keys()
    new_t = load_template(path, keys)
    assert new_t.model.head == "cosine" and new_t.training.distillation.teacher_classes == "subset"
    assert factories.cosine_scale(new_t.training.loss, 20) == pytest.approx(am_softmax_scale(12))
    assert am_softmax_scale(12) != pytest.approx(am_softmax_scale(20))


def test_another_architecture_is_refused():
    old = create_model("convnet_small", 3).state_dict()
    new = create_model("resnet18", 5).state_dict()
    with pytest.raises(CheckpointError, match="does not fit"):
        extend_head_state(old, new, [0, 1, 2])


def test_replay_sample_takes_n_per_class_and_says_where_fewer_exist():
    samples = [(f"{c}_{i}.png", c) for c in range(3) for i in range(5 if c < 2 else 2)] + [("new.png", 3)]
    chosen, short = replay_sample(samples, [0, 1, 2], 3, seed=0)
    counts = [sum(1 for _, label in chosen if label == c) for c in range(4)]
    assert counts == [3, 3, 2, 0] and short == {2: 2}
    assert replay_sample(samples, [0, 1, 2], 3, seed=0)[0] == chosen          # the same sample every time
    assert len(replay_sample(samples, [0, 1, 2], None)[0]) == 12               # None: all of them


COMMON = ["--epochs", "1", "--batch-size", "6", "--workers", "0", "training.ema.enabled=false",
          "calibration.enabled=false"]


@pytest.fixture(scope="module")
def old_run(module_dir) -> dict:
    """An old model on class_0..class_2 (32x32), its training data, and data with 2 more classes: `new` holds only
    the new classes' images, `all_val` every class."""
    root = module_dir
    make_image_folder(root / "all" / "train", classes=5, per_class=6, seed=1)
    make_image_folder(root / "all" / "val", classes=5, per_class=2, seed=2)
    for split in ("train", "val"):
        for c in range(3):
            shutil.copytree(root / "all" / split / f"class_{c}", root / "old" / split / f"class_{c}")
    for c in (3, 4):
        shutil.copytree(root / "all" / "train" / f"class_{c}", root / "new" / "train" / f"class_{c}")
    wd = root / "wd"
    assert instantiate("convnet_small", wd, "--do-not-load-snapshot").returncode == 0
    result = run_script(wd, "train.py", "--train-data-roots", str(root / "old" / "train"), "--val-data-roots",
                        str(root / "old" / "val"), *COMMON, "--epochs", "2", "input.size=[32,32]",
                        "--save-checkpoints-to", "old")
    assert result.returncode == 0, result.stderr
    return {"root": root, "wd": wd, "old": wd / "old" / "best.pth"}


def _add(r: dict, out: str, *extra: str, monkeypatch, capsys, train: str = "new/train"):
    return run_captured(r["wd"], "train.py", "--add-classes", str(r["old"]), "--train-data-roots",
                        str(r["root"] / train), "--val-data-roots", str(r["root"] / "all" / "val"), *COMMON,
                        "--save-checkpoints-to", out, *extra, monkeypatch=monkeypatch, capsys=capsys)


def test_add_classes_keeps_old_logits_writes_classes_and_report(old_run, monkeypatch, capsys):
    r = old_run
    result = _add(r, "added", "--replay-data-root", str(r["root"] / "old" / "train"), "--replay-per-class", "2",
                  monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr
    out = r["wd"] / "added"
    assert (out / "classes.txt").read_text().splitlines() == [f"{i} class_{i}" for i in range(5)]
    # the extended model before training: the old classes' logits are the old model's
    old_ckpt = load_checkpoint(r["old"])
    old = create_model("convnet_small", 3, small_input=True).eval()
    old.load_state_dict(old_ckpt["model"])
    init = create_model("convnet_small", 5, small_input=True).eval()
    init.load_state_dict(load_checkpoint(out / "add_classes_init.pth")["model"])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(init(images)[:, :3], old(images), atol=1e-5)
    trained = load_checkpoint(out / "best.pth")
    assert trained["classes"] == [f"class_{i}" for i in range(5)]
    rows = [k for k, v in trained["model"].items() if v.shape != old_ckpt["model"][k].shape]
    assert rows and all(not torch.equal(trained["model"][k][:3], old_ckpt["model"][k]) for k in rows)   # it trained
    report = yaml.safe_load((out / "add_classes_report.yaml").read_text())
    assert report["old_classes"] == ["class_0", "class_1", "class_2"] and report["new_classes"] == ["class_3", "class_4"]
    assert report["old_images"] == 6 and report["new_images"] == 4
    for key in ("old_classes_before", "old_classes_after", "new_classes_after", "all_after"):
        assert 0 <= report[key] <= 100, key
    assert report["old_classes_before"] == pytest.approx(old_ckpt["best_score"])  # the old model on its val images
    replay = (out / "replay_samples.txt").read_text().splitlines()
    assert len(replay) == 6 and {line.split("\t")[1] for line in replay} == {"class_0", "class_1", "class_2"}
    log = (out / "train.log").read_text()
    assert "Added classes: 3 old classes top-1" in log and "on the teacher's classes only" in log
    assert "fewer stored images" not in log


def test_replay_larger_than_what_exists_is_a_warning_and_uses_all(old_run, monkeypatch, capsys):
    r = old_run
    result = _add(r, "replay_all", "--replay-per-class", "50", "--epochs", "1", monkeypatch=monkeypatch,
                  capsys=capsys, train="all/train")   # the data holds the old classes: replay is drawn from it
    assert result.returncode == 0, result.stderr
    warnings = [line for line in (result.stdout + result.stderr).splitlines() if "fewer stored images" in line]
    assert len(warnings) == 1 and "3 old class(es)" in warnings[0] and "class_0 (6)" in warnings[0]
    assert len((r["wd"] / "replay_all" / "replay_samples.txt").read_text().splitlines()) == 18


def test_old_classes_not_a_subset_of_the_data_is_one_error_line(old_run, monkeypatch, capsys):
    r = old_run
    partial = r["root"] / "partial"
    shutil.copytree(r["root"] / "new" / "train", partial)
    shutil.copytree(r["root"] / "all" / "train" / "class_0", partial / "class_0")
    result = _add(r, "bad", monkeypatch=monkeypatch, capsys=capsys, train="partial")
    assert_clean_error(result, "not a subset of the training data's", "class_1, class_2")


def test_unloadable_old_checkpoint_and_stray_replay_flag_are_one_error_line(old_run, tmp_path, monkeypatch, capsys):
    r = old_run
    bad = tmp_path / "old.pth"
    bad.write_bytes(b"garbage")
    result = run_captured(r["wd"], "train.py", "--add-classes", str(bad), "--train-data-roots",
                          str(r["root"] / "new" / "train"), "--val-data-roots", str(r["root"] / "all" / "val"),
                          *COMMON, monkeypatch=monkeypatch, capsys=capsys)
    assert_clean_error(result, str(bad), "not a loadable checkpoint")
    result = run_captured(r["wd"], "train.py", "--replay-per-class", "3", "--train-data-roots",
                          str(r["root"] / "new" / "train"), "--val-data-roots", str(r["root"] / "all" / "val"),
                          *COMMON, monkeypatch=monkeypatch, capsys=capsys)
    assert_clean_error(result, "--replay-per-class", "need --add-classes")
