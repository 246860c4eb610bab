"""The `auto` rules (clsengine.auto) and their application to templates (workbench.auto): what each chooses
for a small and a large dataset, for short and long runs, and that pinned values are never touched."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from clsengine import auto as A
from clsengine.auto import RunFacts
from conftest import TEMPLATES_DIR, make_image_folder, run_captured
from workbench import auto
from workbench.template import AUTO, load_template

SMALL = RunFacts(train_images=245, num_classes=2, input_size=(224, 224), epochs=20)          # a first run
DIGITS = RunFacts(train_images=8000, num_classes=10, input_size=(32, 32), epochs=5)
LARGE = RunFacts(train_images=100_000, num_classes=100, input_size=(224, 224), epochs=200)  # published scale


def test_batch_size_gives_small_datasets_enough_steps():
    assert A.batch_size(SMALL).value == 16                 # 15 steps per epoch (batch 128 gave 1)
    assert A.steps_per_epoch(SMALL, 16) == 15
    assert A.batch_size(DIGITS).value == 32                # 40k images seen / 1000 steps
    assert A.batch_size(LARGE).value == A.MAX_BATCH
    tiny = RunFacts(train_images=72, num_classes=3, input_size=(32, 32), epochs=5)
    assert A.batch_size(tiny).value == A.MIN_BATCH["cpu"]  # never below the floor
    gpu = RunFacts(**{**SMALL.__dict__, "device_type": "cuda"})
    assert A.batch_size(gpu).value == A.MIN_BATCH["cuda"]
    # Several processes share the images: each process's batch follows its shard.
    four = RunFacts(**{**LARGE.__dict__, "train_images": 20_000, "epochs": 10, "processes": 4})
    assert A.batch_size(four).value == 32                  # 5000 images x 10 epochs per process / 1000
    assert "steps per epoch" in A.batch_size(SMALL).reason


def test_short_runs_get_adamw_and_cosine_long_runs_the_published_sgd_and_plateau():
    b_small, b_large = A.batch_size(SMALL).value, A.batch_size(LARGE).value
    assert not A.is_long(SMALL, b_small) and A.is_long(LARGE, b_large)
    assert A.optimizer(SMALL, b_small).value == "adamw"
    assert A.optimizer(LARGE, b_large).value == "sgd"
    assert A.scheduler(SMALL, b_small).value == "cosine"
    assert A.scheduler(LARGE, b_large).value == "plateau"
    assert A.weight_decay("adamw").value == 0.05 and A.weight_decay("sgd").value == 5e-4
    assert "short run (300 steps < 10000)" in A.optimizer(SMALL, b_small).reason


def test_learning_rate_follows_the_batch_and_initial_weights():
    assert A.learning_rate(SMALL, "adamw", 32).value == pytest.approx(2e-3)
    assert A.learning_rate(SMALL, "adamw", 128).value == pytest.approx(4e-3)        # sqrt scaling
    assert A.learning_rate(LARGE, "sgd", 128).value == pytest.approx(0.05)          # linear scaling
    pretrained = RunFacts(**{**SMALL.__dict__, "pretrained": True})
    assert A.learning_rate(pretrained, "adamw", 32).value == pytest.approx(5e-4)
    assert "initial weights" in A.learning_rate(pretrained, "adamw", 32).reason


def test_warmup_is_short_and_shorter_for_fine_tuning():
    assert A.warmup_epochs(SMALL).value == 1.0          # 5% of 20
    assert A.warmup_epochs(DIGITS).value == 0.25
    assert A.warmup_epochs(LARGE).value == 1.0          # capped
    pretrained = RunFacts(**{**SMALL.__dict__, "pretrained": True})
    assert A.warmup_epochs(pretrained).value == 0.4     # 2% of 20


def test_sam_and_mutual_learning_only_in_long_runs():
    key = "training.optimizer.sam.enabled"
    assert A.costly_technique(key, "SAM", SMALL, 16).value is False
    assert A.costly_technique(key, "SAM", LARGE, 128).value is True


@pytest.mark.parametrize("size,expected", [((32, 32), True), ((28, 28), True), ((63, 80), True),
                                           ((64, 64), False), ((224, 224), False)])
def test_small_input_stem_from_the_input_size(size, expected):
    assert A.small_input(size).value is expected


def test_lr_finder_costs_at_most_its_budget():
    off = A.lr_finder(SMALL, 16, passes_per_step=1, warmup_epochs=1, lr_pinned=False)
    assert [c.value for c in off] == [False] and "no range test" in off[0].reason    # a short run
    asked = A.lr_finder(SMALL, 16, passes_per_step=1, warmup_epochs=1, lr_pinned=False, pinned_on=True)
    assert "cannot pay" in asked[0].reason                                           # 15 iterations
    on = {c.key: c.value for c in A.lr_finder(LARGE, 128, passes_per_step=4, warmup_epochs=1, lr_pinned=False)}
    assert on["training.lr_finder.enabled"] is True and on["training.lr_finder.num_iter"] == A.LR_FINDER_MAX_ITERS
    # A mid-size run: fewer iterations, within 5% of the passes, and the warm-up epoch dropped.
    mid = RunFacts(train_images=2000, num_classes=10, input_size=(64, 64), epochs=30)
    found = {c.key: c.value for c in A.lr_finder(mid, 32, passes_per_step=1, warmup_epochs=1, lr_pinned=False,
                                                 pinned_on=True)}
    assert found["training.lr_finder.enabled"] is True
    assert A.LR_FINDER_MIN_ITERS <= found["training.lr_finder.num_iter"] < A.LR_FINDER_MAX_ITERS
    assert found["training.lr_finder.num_iter"] <= 0.05 * A.planned_steps(mid, 32)
    assert found["training.lr_finder.warmup_epochs"] == 0
    assert A.lr_finder(LARGE, 128, 4, 1, lr_pinned=True)[0].value is False       # nothing to find
    tpe = A.lr_finder(LARGE, 128, 4, 1, lr_pinned=False, mode="tpe", trial_cost_epochs=15 * 6)
    assert tpe[0].value is False                                                 # 90 epochs of trials


# compression.mode "auto" is compress.py's mode (QAT only when PTQ misses the budget), decided at compression.
DEVICE_AUTO = ["data.format", "training.channels_last", "training.workers", "compression.mode"]


def _auto_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            keys += _auto_keys(value, f"{path}.")
        elif value == AUTO:
            keys.append(path)
    return keys


def _template(name: str = "mobilenet_v3_small", **overrides):
    return load_template(TEMPLATES_DIR / name / "template.yaml", overrides)


def test_resolve_decides_every_auto_and_logs_why():
    t = _template(**{"input.size": [32, 32]})
    resolved, choices = auto.resolve(t, auto.run_facts(t, 72, 3, "cpu"))
    keys = [c.key for c in choices]
    for key in ("model.small_input", "hyper_parameters.basic.batch_size", "training.optimizer.name",
                "hyper_parameters.basic.base_learning_rate", "training.scheduler.name",
                "training.optimizer.sam.enabled", "training.mutual_learning.enabled", "training.lr_finder.enabled"):
        assert key in keys
    # Left: what is decided by the files given (data.format) or by the device (workers, amp, layout).
    assert _auto_keys(resolved.to_dict()) == DEVICE_AUTO
    assert resolved.model.small_input is True
    assert resolved.training.mutual_learning.aux_models[0].model.small_input is True  # the partner follows
    assert resolved.training.optimizer.name == "adamw" and resolved.training.optimizer.sam.enabled is False
    assert all(str(c).startswith(f"auto {c.key} = ") and c.reason for c in choices)


def test_resolve_keeps_pinned_values_and_the_published_recipe():
    published = {"hyper_parameters.basic.batch_size": 128, "hyper_parameters.basic.base_learning_rate": 0.016,
                 "training.optimizer.name": "sgd", "training.optimizer.weight_decay": 5e-4,
                 "training.scheduler.name": "plateau", "training.scheduler.warmup_epochs": 1,
                 "training.optimizer.sam.enabled": True, "training.mutual_learning.enabled": True,
                 "training.lr_finder.enabled": True, "training.lr_finder.num_iter": 100, "model.small_input": False,
                 "training.augmentation_level": "full", "training.amp": "none", "training.augmentation.hflip": 0.5,
                 "training.transfer.linear_probe": False, "training.transfer.trainable_stages": "all",
                 "training.transfer.freeze_bn": False, "training.transfer.fine_tune": True}
    t = _template(**published)
    resolved, choices = auto.resolve(t, auto.run_facts(t, 245, 2, "cpu"))
    assert choices == []
    for key, value in published.items():
        node = resolved
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, key


def test_resolve_pinned_lr_finder_gets_its_iterations_only():
    t = _template(**{"training.lr_finder.enabled": True, "hyper_parameters.basic.epochs": 20})
    resolved, choices = auto.resolve(t, auto.run_facts(t, 245, 2, "cpu"))
    assert resolved.training.lr_finder.enabled is True
    assert resolved.training.lr_finder.num_iter == A.LR_FINDER_MIN_ITERS  # its 5% share would be 15
    assert "training.lr_finder.enabled" not in [c.key for c in choices]


def test_bad_auto_value_is_one_error_naming_the_key(tmp_path: Path):
    from workbench.template import TemplateError
    with pytest.raises(TemplateError, match="hyper_parameters.basic.batch_size.*auto or an integer of at least 1, got 'big'"):
        _template(**{"hyper_parameters.basic.batch_size": "big"})
    with pytest.raises(TemplateError, match="training.optimizer.sam.enabled.*true, false or auto"):
        _template(**{"training.optimizer.sam.enabled": "sometimes"})


def test_train_py_logs_each_choice_and_honours_overrides(tmp_path: Path, work_dir, monkeypatch, capsys):
    train = make_image_folder(tmp_path / "train", per_class=8, seed=1)
    val = make_image_folder(tmp_path / "val", per_class=3, seed=2)
    wd = work_dir("mobilenet_v3_small")
    out = tmp_path / "out"
    result = run_captured(wd, "train.py", "--train-data-roots", str(train), "--val-data-roots", str(val),
                          "--epochs", "1", "--batch-size", "8", "--save-checkpoints-to", str(out),
                          "input.size=[32,32]", "training.optimizer.name=sgd", monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr
    log = (out / "train.log").read_text()
    assert "auto model.small_input = True" in log
    assert "auto training.scheduler.name = cosine" in log
    assert "auto hyper_parameters.basic.base_learning_rate = 0.003125: sgd: 0.1 x batch 8 / 256" in log
    assert "auto hyper_parameters.basic.batch_size" not in log      # given by --batch-size
    assert "auto training.optimizer.name" not in log                # given by KEY=VALUE
    config = yaml.safe_load((out / "config.yaml").read_text())["template"]
    assert config["hyper_parameters"]["basic"]["batch_size"] == 8
    assert config["training"]["optimizer"]["name"] == "sgd"
    assert math.isclose(config["hyper_parameters"]["basic"]["base_learning_rate"], 0.1 * 8 / 256)
    assert _auto_keys(config) == DEVICE_AUTO


def test_mixup_refused_for_multilabel():
    from workbench.template import TemplateError
    with pytest.raises(TemplateError, match="mixup_alpha.*multilabel"):
        _template("mobilenet_v3_large_1_multilabel", **{"training.augmentation.cutmix_alpha": 1.0})


def test_load_weights_reports_what_it_loaded_and_refuses_another_width(tmp_path: Path, work_dir, monkeypatch,
                                                                         capsys):
    import torch
    import torchvision

    from conftest import assert_clean_error

    train = make_image_folder(tmp_path / "train", per_class=8, seed=1)
    val = make_image_folder(tmp_path / "val", per_class=3, seed=2)
    weights = tmp_path / "imagenet_like.pth"
    torch.save(torchvision.models.mobilenet_v3_large(weights=None).state_dict(), weights)  # 1000 classes, width 1
    common = ["--train-data-roots", str(train), "--val-data-roots", str(val), "--epochs", "1",
              "--load-weights", str(weights), "input.size=[32,32]"]

    wd = work_dir("mobilenet_v3_large_1")
    result = run_captured(wd, "train.py", *common, "--save-checkpoints-to", str(tmp_path / "ok"),
                          monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "ok" / "train.log").read_text()
    total = len(torchvision.models.mobilenet_v3_large(weights=None).state_dict())
    assert (f"loaded {total - 2} of the model's {total} tensors; left at their initial values: "
            f"classifier.3.bias, classifier.3.weight") in log
    assert "x 0.25 (initial weights given)" in log                  # the fine-tuning learning rate
    assert "auto training.scheduler.warmup_epochs = 0.02: initial weights given: short" in log

    narrow = work_dir("mobilenet_v3_large_075")
    result = run_captured(narrow, "train.py", *common, "--save-checkpoints-to", str(tmp_path / "narrow"),
                          monkeypatch=monkeypatch, capsys=capsys)
    assert_clean_error(result, str(weights), "backbone tensors", "width multiplier")


def test_short_runs_train_with_light_augmentation_long_runs_with_the_templates():
    assert A.augmentation_level(SMALL, 16).value == "light" and A.augmentation_level(LARGE, 128).value == "full"
    t = _template(**{"training.augmentation.hflip": 0.5})
    short, _ = auto.resolve(t, SMALL)
    aug = short.training.augmentation
    assert short.training.augmentation_level == "light" and aug.augmix is False and aug.cutout_p == 0.0
    assert aug.hflip == t.training.augmentation.hflip and aug.color_jitter_p == t.training.augmentation.color_jitter_p
    long, _ = auto.resolve(t, LARGE)
    assert long.training.augmentation == t.training.augmentation and long.training.augmentation_level == "full"
    pinned, choices = auto.resolve(_template(**{"training.augmentation_level": "full"}), SMALL)
    assert pinned.training.augmentation.augmix is True
    assert "training.augmentation_level" not in [c.key for c in choices]


def test_lr_finder_pinned_off_decides_nothing_about_it():
    t = _template(**{"training.lr_finder.enabled": False})
    resolved, choices = auto.resolve(t, LARGE)  # a long run, where `auto` would run the finder
    assert not [c for c in choices if c.key.startswith("training.lr_finder")]
    assert resolved.training.lr_finder.enabled is False
    assert resolved.training.lr_finder.num_iter == A.LR_FINDER_MIN_ITERS


def test_stochastic_depth_off_in_short_runs_architectures_rate_in_long_ones():
    assert A.drop_path_rate(SMALL, 16, 0.2).value == 0.0
    assert A.drop_path_rate(LARGE, 128, 0.2).value == 0.2
    t = _template("efficientnet_b0")
    short, choices = auto.resolve(t, auto.run_facts(t, 245, 2, "cpu"))
    assert short.model.drop_path_rate == 0.0 and "model.drop_path_rate" in [c.key for c in choices]
    long, _ = auto.resolve(t, auto.run_facts(t, 100_000, 100, "cpu"))
    assert long.model.drop_path_rate == 0.2
    pinned, choices = auto.resolve(_template("efficientnet_b0", **{"model.drop_path_rate": 0.1}),
                                   auto.run_facts(t, 245, 2, "cpu"))
    assert pinned.model.drop_path_rate == 0.1 and "model.drop_path_rate" not in [c.key for c in choices]
    # Architectures without stochastic depth: nothing to decide, nothing logged, 0 in the effective config.
    resolved, choices = auto.resolve(_template(), auto.run_facts(_template(), 245, 2, "cpu"))
    assert resolved.model.drop_path_rate == 0.0 and "model.drop_path_rate" not in [c.key for c in choices]


def test_drop_path_rate_reaches_the_model_and_is_refused_where_there_is_none():
    from clsengine.errors import UserError
    from clsengine.models import create_model
    from torchvision.ops import StochasticDepth
    rates = {m.p for m in create_model("efficientnet_b0", 3, drop_path_rate=0.0).modules()
             if isinstance(m, StochasticDepth)}
    assert rates == {0.0}
    assert max(m.p for m in create_model("efficientnet_b0", 3).modules() if isinstance(m, StochasticDepth)) > 0.1
    with pytest.raises(UserError, match="no stochastic depth"):
        create_model("resnet18", 3, drop_path_rate=0.1)


def test_mixed_precision_bf16_only_where_it_was_measured_faster(monkeypatch):
    assert A.mixed_precision("cpu", True, depthwise=False).value == "bf16"    # dense convolutions: 1.3-2.1x
    assert A.mixed_precision("cpu", True, depthwise=True).value == "none"     # depthwise: 0.7-0.9x in bf16
    assert A.mixed_precision("cpu", False, depthwise=False).value == "none"   # emulated bf16
    assert A.mixed_precision("cuda", True, depthwise=True).value == "bf16"
    assert A.mixed_precision("cuda", False, depthwise=False).value == "none"
    monkeypatch.setattr(A, "native_bf16", lambda device_type: True)
    for name, expected in (("resnet18", "bf16"), ("mobilenet_v3_small", "none")):
        t = _template(name)
        resolved, choices = auto.resolve(t, auto.run_facts(t, 245, 2, "cpu"))
        assert resolved.training.amp == expected and "training.amp" in [c.key for c in choices]
    # A depthwise auxiliary model keeps a dense main model in full precision; a pinned value is kept.
    t = _template("resnet18", **{"training.mutual_learning.aux_models": [
        {"model": {"architecture": "mobilenet_v3_small"}}]})
    assert auto.resolve(t, auto.run_facts(t, 245, 2, "cpu"))[0].training.amp == "none"
    t = _template("mobilenet_v3_small", **{"training.amp": "bf16"})
    resolved, choices = auto.resolve(t, auto.run_facts(t, 245, 2, "cpu"))
    assert resolved.training.amp == "bf16" and "training.amp" not in [c.key for c in choices]


def test_depthwise_flag_of_every_architecture_matches_its_layers():
    import torch.nn as nn
    from clsengine.models import create_model, list_models, uses_depthwise
    for name in list_models():
        model = create_model(name, 2)
        has = any(isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels for m in model.modules())
        assert uses_depthwise(name) == has, name


def _glyph_folder(root: Path, oriented: bool, per_class: int = 24) -> list[tuple[str, int]]:
    """Two classes of noisy bright bars on a dark ground: oriented, the bar stands at the left (class 0) or the
    top-left (class 1), like strokes of a glyph; mirror-symmetric, it stands at either side at random."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    samples = []
    for label in (0, 1):
        folder = root / str(label)
        folder.mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
            rows = slice(4, 28) if label == 0 else slice(2, 12)
            left = oriented or rng.random() < 0.5
            if left:
                a[rows, 4:10] = 230
            else:
                a[rows, 22:28] = 230
            Image.fromarray(a).save(folder / f"{i}.png")
            samples.append((str(folder / f"{i}.png"), label))
    return samples


def test_hflip_off_for_oriented_images_on_for_mirror_symmetric_ones(tmp_path: Path):
    from clsengine.data import mirror_asymmetry
    oriented = mirror_asymmetry(_glyph_folder(tmp_path / "glyphs", oriented=True))
    symmetric = mirror_asymmetry(_glyph_folder(tmp_path / "photos", oriented=False))
    assert oriented.effect >= A.MIRROR_EFFECT and oriented.vs_noise >= A.MIRROR_VS_NOISE
    assert symmetric.effect < A.MIRROR_EFFECT and symmetric.vs_noise < A.MIRROR_VS_NOISE
    assert mirror_asymmetry([("x.png", (0, 1))]) is None                      # multi-label: not judged
    assert mirror_asymmetry(_glyph_folder(tmp_path / "few", True, per_class=1)) is None  # too few to tell

    t = _template()
    glyphs = _glyph_folder(tmp_path / "g2", oriented=True)
    resolved, choices = auto.resolve(t, auto.run_facts(t, len(glyphs), 2, "cpu", samples=glyphs))
    assert resolved.training.augmentation.hflip == 0.0
    assert "left and a right" in next(c.reason for c in choices if c.key == "training.augmentation.hflip")
    photos = _glyph_folder(tmp_path / "p2", oriented=False)
    assert auto.resolve(t, auto.run_facts(t, len(photos), 2, "cpu", samples=photos))[0].training.augmentation.hflip == 0.5
    assert auto.resolve(t, auto.run_facts(t, 48, 2, "cpu"))[0].training.augmentation.hflip == 0.5  # not measured
    # A pinned value is kept, and the images are then not even read.
    pinned = _template(**{"training.augmentation.hflip": 0.5})
    assert auto.run_facts(pinned, len(glyphs), 2, "cpu", samples=glyphs).mirror is None
    resolved, choices = auto.resolve(pinned, auto.run_facts(pinned, len(glyphs), 2, "cpu", samples=glyphs))
    assert resolved.training.augmentation.hflip == 0.5 and "training.augmentation.hflip" not in [c.key for c in choices]


def test_small_image_hint_names_the_small_image_template_for_small_inputs_only():
    mobilenet = load_template(TEMPLATES_DIR / "mobilenet_v3_small" / "template.yaml")
    hint = auto.small_image_hint(load_template(TEMPLATES_DIR / "mobilenet_v3_small" / "template.yaml",
                                               {"input.size": [32, 32]}))
    assert hint is not None and auto.SMALL_IMAGE_TEMPLATE in hint and "32x32" in hint
    assert (TEMPLATES_DIR / auto.SMALL_IMAGE_TEMPLATE / "template.yaml").is_file()
    assert auto.small_image_hint(mobilenet) is None                                        # 224 px
    assert auto.small_image_hint(load_template(TEMPLATES_DIR / "convnet_small" / "template.yaml")) is None
    # A template that pins a small-input model is built for its size.
    assert auto.small_image_hint(load_template(TEMPLATES_DIR / "person_vs_background_56x32" / "template.yaml")) is None


def test_transfer_rules_for_tiny_and_large_datasets_with_and_without_initial_weights():
    small, large = RunFacts(**{**SMALL.__dict__, "pretrained": True}), RunFacts(**{**LARGE.__dict__, "pretrained": True})
    b_small, b_large = A.batch_size(small).value, A.batch_size(large).value
    # A few hundred photos from ImageNet weights: probe, then the last stages with BatchNorm kept.
    assert A.linear_probe(small, linear_head=True).value is True
    assert A.trainable_stages(small, b_small).value == A.FINETUNE_STAGES
    assert A.freeze_bn(small).value is True
    # A long run on a large set from the same weights: probe first, then every layer, BatchNorm adapting.
    assert A.linear_probe(large, linear_head=True).value is True
    assert A.trainable_stages(large, b_large).value == "all"
    assert A.freeze_bn(large).value is False
    # From scratch nothing is kept, whatever the size.
    for facts in (SMALL, LARGE):
        assert A.linear_probe(facts, linear_head=True).value is False
        assert A.trainable_stages(facts, A.batch_size(facts).value).value == "all"
        assert A.freeze_bn(facts).value is False
    # A cosine classifier is no logistic regression: no probe.
    assert A.linear_probe(small, linear_head=False).value is False
    assert "cosine" in A.linear_probe(small, linear_head=False).reason
    assert "245 training images" in A.freeze_bn(small).reason


def test_fine_tuning_after_the_probe_only_where_validation_could_show_a_better_model():
    small, large = RunFacts(**{**SMALL.__dict__, "pretrained": True}), RunFacts(**{**LARGE.__dict__, "pretrained": True})
    # Before the probe (or without one) and from scratch, training runs.
    assert A.fine_tune(small).value is True and "no linear probe" in A.fine_tune(small).reason
    assert A.fine_tune(SMALL).value is True and "from scratch" in A.fine_tune(SMALL).reason
    # A tiny set whose probe misses 4 of 77 validation photos: fixing all 4 would be chance at 6.25% -> kept.
    kept = A.fine_tune(dataclasses.replace(small, probe_val_errors=4, val_images=77))
    assert kept.value is False and "4 of 77 validation images" in kept.reason and "0.5^4" in kept.reason
    assert A.fine_tune(dataclasses.replace(small, probe_val_errors=A.SHOWABLE_GAIN, val_images=77)).value is True
    # A large set: even a good probe leaves hundreds of errors on a large validation set.
    assert A.fine_tune(dataclasses.replace(large, probe_val_errors=300, val_images=20_000)).value is True
    # The template's auto is decided from the facts; a pin is kept whatever they say.
    t = _template("efficientnet_lite0", **{"hyper_parameters.basic.epochs": 20})
    facts = dataclasses.replace(auto.run_facts(t, 245, 2, "cpu", pretrained=True), probe_val_errors=2, val_images=77)
    resolved, choices = auto.resolve(t, facts)
    assert resolved.training.transfer.fine_tune is False
    assert "training.transfer.fine_tune" in {c.key for c in choices}
    pinned = _template("efficientnet_lite0", **{"hyper_parameters.basic.epochs": 20, "training.transfer.fine_tune": True})
    resolved, choices = auto.resolve(pinned, facts)
    assert resolved.training.transfer.fine_tune is True
    assert "training.transfer.fine_tune" not in {c.key for c in choices}


def test_transfer_keys_resolved_from_the_template_and_kept_when_pinned():
    t = _template("efficientnet_lite0", **{"hyper_parameters.basic.epochs": 20})
    resolved, choices = auto.resolve(t, auto.run_facts(t, 245, 2, "cpu", pretrained=True))
    tf = resolved.training.transfer
    assert (tf.linear_probe, tf.trainable_stages, tf.freeze_bn) == (True, A.FINETUNE_STAGES, True)
    assert {"training.transfer.linear_probe", "training.transfer.trainable_stages",
            "training.transfer.freeze_bn"} <= {c.key for c in choices}
    pinned = _template("efficientnet_lite0", **{"training.transfer.trainable_stages": "all",
                                                "training.transfer.linear_probe": False,
                                                "training.transfer.freeze_bn": False,
                                                "training.transfer.fine_tune": True})
    resolved, choices = auto.resolve(pinned, auto.run_facts(pinned, 245, 2, "cpu", pretrained=True))
    tf = resolved.training.transfer
    assert (tf.linear_probe, tf.trainable_stages, tf.freeze_bn) == (False, "all", False)
    assert not [c for c in choices if c.key.startswith("training.transfer.")]
    from workbench.template import TemplateError
    with pytest.raises(TemplateError, match="training.transfer.trainable_stages.*auto, all or an integer"):
        _template("efficientnet_lite0", **{"training.transfer.trainable_stages": "most"})
    with pytest.raises(TemplateError, match="training.transfer.trainable_stages"):
        _template("efficientnet_lite0", **{"training.transfer.trainable_stages": True})
