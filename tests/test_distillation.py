"""Distillation from a fixed teacher (training.distillation): the loss is zero exactly when the student matches the
teacher, the teacher sees the student's batch as its own preprocessing would have made it (another size,
normalisation and channel order), it stays frozen and out of the student's checkpoints, and a wrong teacher is one
error line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from clsengine import data as datasets
from clsengine.checkpoint import load_checkpoint
from clsengine.errors import UserError
from clsengine.losses.distillation import Teacher, distillation_loss
from clsengine.loop import train_one_epoch
from clsengine.models import create_model
from clsengine.optim import create_optimizer, create_scheduler
from clsengine.recipe import Recipe
from conftest import assert_clean_error, instantiate, make_image_folder, run_captured
from workbench.distill import class_index, teacher_checkpoint
from workbench.template import TemplateError, load_template
from conftest import TEMPLATES_DIR


@pytest.mark.parametrize("multilabel", [False, True])
def test_a_student_matching_the_teacher_has_zero_loss_and_a_mismatched_one_a_positive_loss(multilabel):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 5, generator=g) * 3
    assert distillation_loss(teacher.clone(), teacher, 2.0, multilabel).item() == pytest.approx(0.0, abs=1e-5)
    other = teacher + torch.randn(16, 5, generator=g)
    assert distillation_loss(other, teacher, 2.0, multilabel).item() > 1e-2
    # single-label: shifting every logit of an image by the same amount changes no softmax
    if not multilabel:
        assert distillation_loss(teacher + 7.0, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-5)


def test_the_loss_is_t_squared_kl_of_the_softened_distributions():
    s, t = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.5, 1.5, 0.0]])
    p, q = (t / 4).softmax(1), (s / 4).softmax(1)
    expected = 16 * (p * (p.log() - q.log())).sum()
    assert distillation_loss(s, t, 4.0).item() == pytest.approx(expected.item(), rel=1e-5)


def _model(classes: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("convnet_small", classes, small_input=True).eval()


def test_a_student_that_is_the_teacher_has_zero_teacher_loss_through_the_input_adapter():
    model = _model()
    images = torch.randn(4, 3, 32, 32)
    teacher = Teacher(model, [0, 1, 2], temperature=2.0, weight=1.0, input_size=(32, 32),
                      student_norm=([1, 2, 3], [4, 5, 6], "RGB"), teacher_norm=([1, 2, 3], [4, 5, 6], "RGB"))
    assert teacher.affine is None
    with torch.no_grad():
        assert teacher.loss(model(images), teacher.logits(images)).item() == pytest.approx(0.0, abs=1e-6)
        assert teacher.loss(_model(seed=1)(images), teacher.logits(images)).item() > 1e-4
        # the teacher's classes in another order: the student's logits are read at the teacher's positions
        permuted = Teacher(model, [2, 0, 1], temperature=2.0)
        student = model(images)[:, [1, 2, 0]]
        assert permuted.loss(student, permuted.logits(images)).item() == pytest.approx(0.0, abs=1e-6)


def test_the_teacher_sees_the_batch_as_its_own_preprocessing_makes_it(tmp_path):
    """A student batch (RGB, its mean/std) turned into the teacher's input equals the teacher's own transform of the
    same image (BGR, other mean/std); at another size it comes at the teacher's size."""
    image = (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8).numpy()
    s_mean, s_std, t_mean, t_std = [120.0, 110.0, 100.0], [60.0, 55.0, 50.0], [90.0, 100.0, 110.0], [40.0, 45.0, 70.0]
    student = datasets.build_eval_transform((32, 32), s_mean, s_std)(image).unsqueeze(0)
    own = datasets.build_eval_transform((32, 32), t_mean, t_std, bgr=True)(image).unsqueeze(0)
    teacher = Teacher(_model(), [0, 1, 2], input_size=(32, 32), student_norm=(s_mean, s_std, "RGB"),
                      teacher_norm=(t_mean, t_std, "BGR"))
    assert torch.allclose(teacher.inputs(student), own, atol=1e-4)
    assert not torch.allclose(student, own, atol=1e-2)   # the adapter did something
    bigger = Teacher(_model(), [0, 1, 2], input_size=(48, 40), student_norm=(s_mean, s_std, "RGB"),
                     teacher_norm=(t_mean, t_std, "BGR"))
    assert tuple(bigger.inputs(student).shape) == (1, 3, 48, 40)


def test_the_teacher_stays_frozen_while_the_student_trains():
    student, teacher_model = _model(seed=0), _model(seed=1)
    before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher = Teacher(teacher_model, [0, 1, 2], temperature=2.0, weight=1.0)
    images, labels = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    optimizer = create_optimizer([student], name="adamw", lr=1e-2, weight_decay=0.0)
    scheduler = create_scheduler(optimizer, name="constant", epochs=1, iters_per_epoch=2)
    stats = train_one_epoch(student, [(images, labels)] * 2, torch.nn.CrossEntropyLoss(), optimizer, scheduler,
                            torch.device("cpu"), progress=False, recipe=Recipe(teacher=teacher))
    assert stats["loss"] > 0
    assert all(torch.equal(before[k], v) for k, v in teacher_model.state_dict().items())
    assert not teacher_model.training and not any(p.requires_grad for p in teacher_model.parameters())
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())


def test_class_index_maps_the_teachers_classes_and_refuses_other_ones():
    assert class_index(["b", "a", "c"], ["a", "b", "c"], "same", "t") == [1, 0, 2]
    assert class_index(["a", "c"], ["a", "b", "c"], "subset", "t") == [0, 2]
    with pytest.raises(UserError, match="unknown to the teacher: b"):
        class_index(["a", "c"], ["a", "b", "c"], "same", "t")
    with pytest.raises(UserError, match="not in the training data: d"):
        class_index(["a", "d"], ["a", "b", "c"], "subset", "t")


def test_teacher_path_of_a_work_dir_is_its_best_checkpoint(tmp_path):
    (tmp_path / "wd" / "outputs").mkdir(parents=True)
    (tmp_path / "wd" / "outputs" / "best.pth").write_bytes(b"x")
    assert teacher_checkpoint(str(tmp_path / "wd")) == tmp_path / "wd" / "outputs" / "best.pth"
    with pytest.raises(UserError, match="a folder without"):
        teacher_checkpoint(str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        teacher_checkpoint(str(tmp_path / "nothing.pth"))


def test_template_checks_the_distillation_keys():
    path = TEMPLATES_DIR / "convnet_small" / "template.yaml"
    assert load_template(path).training.distillation.enabled is False
    for overrides, fragment in [({"training.distillation.enabled": True}, "training.distillation.teacher"),
                                ({"training.distillation.temperature": 0}, "training.distillation.temperature"),
                                ({"training.distillation.weight": -1}, "training.distillation.weight"),
                                ({"training.distillation.teacher_classes": "some"}, "same or subset")]:
        with pytest.raises(TemplateError, match=fragment):
            load_template(path, overrides)


COMMON = ["--epochs", "1", "--batch-size", "6", "--workers", "0", "input.size=[32,32]", "training.ema.enabled=false",
          "calibration.enabled=false"]


@pytest.fixture
def teacher_run(tmp_path, monkeypatch, capsys) -> dict:
    """A teacher trained on 3 colour classes at 40x40 in BGR with its own mean/std, and a student work dir."""
    train = make_image_folder(tmp_path / "data" / "train", classes=3, per_class=6, seed=1)
    val = make_image_folder(tmp_path / "data" / "val", classes=3, per_class=2, seed=2)
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    for wd in (teacher, student):
        assert instantiate("convnet_small", wd, "--do-not-load-snapshot").returncode == 0
    result = run_captured(teacher, "train.py", "--train-data-roots", str(train), "--val-data-roots", str(val),
                          *COMMON, "input.size=[40,40]", "input.channel_order=BGR", "input.mean=[100,110,120]",
                          monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr
    return {"teacher": teacher, "student": student, "train": train, "val": val, "root": tmp_path}


def test_train_py_distils_from_a_work_dir_and_never_saves_the_teacher(teacher_run, monkeypatch, capsys):
    r = teacher_run
    teacher_file = r["teacher"] / "outputs" / "best.pth"
    teacher_before = load_checkpoint(teacher_file)["model"]
    result = run_captured(r["student"], "train.py", "--train-data-roots", str(r["train"]), "--val-data-roots",
                          str(r["val"]), *COMMON, "training.distillation.enabled=true",
                          f"training.distillation.teacher={r['teacher']}", monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr
    log = (r["student"] / "outputs" / "train.log").read_text()
    assert f"Distillation: teacher {teacher_file} (convnet_small, 40x40, 3 of the 3 classes)" in log
    assert "distillation (T=2, weight=1)" in log
    fresh = create_model("convnet_small", 3, small_input=True).state_dict()
    for name in ("best.pth", "latest.pth"):
        checkpoint = load_checkpoint(r["student"] / "outputs" / name)
        assert set(checkpoint["model"]) == set(fresh)                     # the student's tensors only
        assert not any("teacher" in key for key in checkpoint) and "aux_models" not in checkpoint
    config = yaml.safe_load((r["student"] / "outputs" / "config.yaml").read_text())
    assert config["template"]["training"]["distillation"]["teacher"] == str(teacher_file)   # absolute, for resume
    after = load_checkpoint(teacher_file)["model"]
    assert all(torch.equal(teacher_before[k], after[k]) for k in teacher_before)


def test_a_teacher_of_other_classes_is_one_error_line(teacher_run, monkeypatch, capsys):
    r = teacher_run
    four = make_image_folder(r["root"] / "four" / "train", classes=4, per_class=3, seed=3)
    val4 = make_image_folder(r["root"] / "four" / "val", classes=4, per_class=1, seed=4)
    result = run_captured(r["student"], "train.py", "--train-data-roots", str(four), "--val-data-roots", str(val4),
                          *COMMON, "training.distillation.enabled=true", f"training.distillation.teacher={r['teacher']}",
                          monkeypatch=monkeypatch, capsys=capsys)
    assert_clean_error(result, "its classes differ from the training data's", "unknown to the teacher: class_3")


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_an_unloadable_teacher_is_one_error_line(tmp_path, monkeypatch, capsys, content):
    train = make_image_folder(tmp_path / "data" / "train", classes=3, per_class=3, seed=1)
    val = make_image_folder(tmp_path / "data" / "val", classes=3, per_class=1, seed=2)
    wd = tmp_path / "wd"
    assert instantiate("convnet_small", wd, "--do-not-load-snapshot").returncode == 0
    bad = tmp_path / "teacher.pth"
    if content is None:  # bare weights: no classes, no template
        torch.save(create_model("convnet_small", 3).state_dict(), bad)
    else:
        bad.write_bytes(content)
    result = run_captured(wd, "train.py", "--train-data-roots", str(train), "--val-data-roots", str(val), *COMMON,
                          "training.distillation.enabled=true", f"training.distillation.teacher={bad}",
                          monkeypatch=monkeypatch, capsys=capsys)
    assert_clean_error(result, str(bad), "not a loadable checkpoint" if content else "bare weights file")
    assert not (wd / "outputs" / "best.pth").exists()
