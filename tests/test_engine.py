"""Engine unit tests: checkpoints, schedules, optimizers, metrics, models, snapshots, loaders and the fit loop."""
from __future__ import annotations

import csv
import hashlib
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from clsengine.checkpoint import (load_checkpoint, load_model_weights, load_state_dict_file, rng_state,
                                  save_checkpoint, set_rng_state)
from clsengine.data.loader import EpochLoader
from clsengine.errors import CheckpointError, UserError
from clsengine.hub import OfflineError, fetch_snapshot
from clsengine.loop import FitConfig, fit
from clsengine.metrics import classification_report, confusion_matrix, topk_correct
from clsengine.models import classifier, create_model, freeze_backbone, list_models, load_pretrained
from clsengine.optim import LRSchedule, create_optimizer, param_groups
from clsengine import plots, runlog
from clsengine.runlog import HISTORY_FIELDS, get_logger
from clsengine.utils import seed_everything


def tiny_net(num_classes: int = 3, in_features: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, 16), nn.ReLU(), nn.Linear(16, num_classes))


def one_param_optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr)


# ============================================================================ checkpoint


def test_checkpoint_round_trip(tmp_path: Path):
    state = {
        "weights": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "ints": torch.tensor([1, 2, 3], dtype=torch.int64),
        "epoch": 7,
        "best_top1": 81.25,
        "name": "mobilenet_v3_small",
        "classes": ["cat", "dog", "bird"],
        "nested": [[1, 2], ["a", [3.5, None]], {"k": torch.ones(2)}],
        "flag": True,
    }
    path = save_checkpoint(state, tmp_path / "sub" / "ckpt.pth")
    assert path == tmp_path / "sub" / "ckpt.pth" and path.is_file()
    loaded = load_checkpoint(path)
    assert set(loaded) == set(state)
    assert torch.equal(loaded["weights"], state["weights"]) and loaded["weights"].dtype == torch.float32
    assert torch.equal(loaded["ints"], state["ints"]) and loaded["ints"].dtype == torch.int64
    assert loaded["epoch"] == 7 and isinstance(loaded["epoch"], int)
    assert loaded["best_top1"] == 81.25
    assert loaded["name"] == "mobilenet_v3_small"
    assert loaded["classes"] == ["cat", "dog", "bird"]
    assert loaded["nested"][:2] == [[1, 2], ["a", [3.5, None]]]
    assert torch.equal(loaded["nested"][2]["k"], torch.ones(2))
    assert loaded["flag"] is True
    # Only the checkpoint itself is in the folder: no temporary files left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pth"]


def test_interrupted_save_keeps_previous_file(tmp_path: Path, monkeypatch):
    path = tmp_path / "latest.pth"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("serialisation failed")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="serialisation failed"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pth"], "temporary file left behind"


def _write_marker(path: str) -> None:
    """What a malicious pickle would run on load."""
    Path(path).write_text("executed")


class _Payload:
    """Unpickling calls _write_marker(marker): code execution if loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _write_marker, (self.marker,)


class _ShellPayload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class _PlainObject:
    def __init__(self):
        self.value = 3


@pytest.mark.parametrize("payload_cls", [_Payload, _ShellPayload])
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_load_checkpoint_refuses_code_execution(tmp_path: Path, payload_cls, writer):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    state = {"model": {"w": torch.ones(1)}, "extra": payload_cls(marker)}
    if writer == "torch":
        torch.save(state, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(state, f, protocol=2)
    if payload_cls is _Payload:
        # The payload is live: an unrestricted load does run it.
        if writer == "torch":
            torch.load(path, weights_only=False)
        else:
            with open(path, "rb") as f:
                pickle.load(f)
        assert marker.exists()
        marker.unlink()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists(), "loading a checkpoint executed pickled code"
    with pytest.raises(CheckpointError):
        load_state_dict_file(path)
    assert not marker.exists()


def test_load_checkpoint_refuses_arbitrary_objects(tmp_path: Path):
    path = tmp_path / "object.pth"
    torch.save({"epoch": 1, "thing": _PlainObject()}, path)
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(path)


def test_load_checkpoint_refuses_a_newer_format_and_reads_older_ones(tmp_path: Path):
    from clsengine.checkpoint import CHECKPOINT_FORMAT

    newer = tmp_path / "newer.pth"
    torch.save({"format": "clsengine-checkpoint-v99", "model": {}}, newer)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(newer)
    assert str(newer) in str(info.value) and "clsengine-checkpoint-v99" in str(info.value)
    assert "update the workbench" in str(info.value) and "\n" not in str(info.value)
    for readable in (CHECKPOINT_FORMAT, "clsengine-checkpoint-v0", None):  # ours, an older one, a bare file
        path = tmp_path / f"{readable}.pth"
        torch.save({"model": {"w": torch.zeros(1)}, **({"format": readable} if readable else {})}, path)
        assert load_checkpoint(path)["model"]["w"].shape == (1,)


def test_load_checkpoint_missing_and_garbage(tmp_path: Path):
    missing = tmp_path / "nope" / "missing.pth"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(missing)
    assert str(missing) in str(info.value)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(64) + b"\x00not a checkpoint\xff" * 10)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(garbage)
    assert str(garbage) in str(info.value)
    assert "\n" not in str(info.value)

    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.ones(1)], not_a_dict)
    with pytest.raises(CheckpointError, match="does not hold a dict"):
        load_checkpoint(not_a_dict)


def test_load_model_weights_shape_mismatch(tmp_path: Path):
    torch.manual_seed(0)
    source = tiny_net(num_classes=10)
    path = save_checkpoint({"model": source.state_dict()}, tmp_path / "ten.pth")
    target = tiny_net(num_classes=5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_model_weights(target, load_state_dict_file(path), source=str(path))
    message = str(info.value)
    assert str(path) in message
    assert "shape" in message
    assert "2.weight (10, 16) vs (5, 16)" in message or "2.bias (10,) vs (5,)" in message, message
    # Strict: nothing was copied, not even the matching first layer.
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k

    # The same class count loads, including a DataParallel 'module.' prefix.
    same = tiny_net(num_classes=10)
    load_model_weights(same, {f"module.{k}": v for k, v in source.state_dict().items()}, source="x")
    for k, v in same.state_dict().items():
        assert torch.equal(v, source.state_dict()[k]), k


def _draws() -> tuple[torch.Tensor, np.ndarray, list[float]]:
    numpy_draws = np.concatenate([np.random.randn(2), np.random.rand(5)])  # randn uses the cached gaussian
    return torch.rand(5), numpy_draws, [random.random() for _ in range(5)] + [random.gauss(0, 1)]


def _assert_same_draws(a, b) -> None:
    assert torch.equal(a[0], b[0])
    assert np.array_equal(a[1], b[1])
    assert a[2] == b[2]


def test_rng_state_round_trip(tmp_path: Path):
    seed_everything(123)
    torch.rand(3), np.random.rand(3), random.random()  # move away from the seeded state
    np.random.randn(1), random.gauss(0, 1)               # leave a cached gaussian in numpy's and python's state
    state = rng_state()
    assert state["numpy"][3] == 1
    first = _draws()
    # Different sequences without restoring...
    second = _draws()
    assert not torch.equal(first[0], second[0]) and first[2] != second[2]
    # ...the same after restoring the in-memory state.
    set_rng_state(state)
    _assert_same_draws(first, _draws())

    # And after a round trip through a weights_only checkpoint.
    save_checkpoint({"rng": state}, tmp_path / "rng.pth")
    loaded = load_checkpoint(tmp_path / "rng.pth")["rng"]
    seed_everything(999)
    set_rng_state(loaded)
    _assert_same_draws(first, _draws())


# ============================================================================ scheduler


def lrs(scheduler: LRSchedule, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        scheduler.step_iter()
        out.append(scheduler.lr)
    return out


def test_warmup_then_cosine():
    opt = one_param_optimizer(lr=0.1)
    sched = LRSchedule(opt, "cosine", epochs=10, iters_per_epoch=10, warmup_epochs=2, warmup_factor=0.1)
    assert sched.lr == pytest.approx(0.01)                     # starts at warmup_factor * lr
    warmup = [sched.lr] + lrs(sched, 20)
    assert warmup[-1] == pytest.approx(0.1)                    # reaches lr at the end of warm-up
    assert all(b > a for a, b in zip(warmup[:20], warmup[1:21]))
    assert warmup[10] == pytest.approx(0.01 + 0.09 * 0.5)      # linear
    cosine = [warmup[-1]] + lrs(sched, 80)
    assert all(b <= a + 1e-12 for a, b in zip(cosine, cosine[1:])), "cosine must not increase"
    assert cosine[40] == pytest.approx(0.05)                   # half-way down
    assert cosine[-1] == pytest.approx(0.0, abs=1e-9)          # ~0 at the end
    assert lrs(sched, 5)[-1] == pytest.approx(0.0, abs=1e-9)   # and stays there


def test_cosine_min_lr_and_param_groups():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.02}], lr=0.1)
    sched = LRSchedule(opt, "cosine", epochs=4, iters_per_epoch=5, min_lr=1e-3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.02])  # no warm-up: full lr at once
    seq = [sched.lr] + lrs(sched, 20)
    assert all(b <= a for a, b in zip(seq, seq[1:]))
    assert seq[-1] == pytest.approx(1e-3)
    assert min(seq) >= 1e-3
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-3)


def test_plateau_reduces_after_patience_plus_one_bad_epochs():
    opt = one_param_optimizer(lr=0.1)
    sched = LRSchedule(opt, "plateau", epochs=50, iters_per_epoch=1, factor=0.5, patience=2)
    sched.step_epoch(50.0)                     # first value: the best so far
    assert sched.lr == pytest.approx(0.1)
    sched.step_epoch(50.0)                     # bad epoch 1
    sched.step_epoch(49.0)                     # bad epoch 2 (= patience): not yet
    assert sched.lr == pytest.approx(0.1)
    sched.step_epoch(50.0 + 1e-6)              # bad epoch 3 (below threshold): reduce
    assert sched.lr == pytest.approx(0.05)
    assert sched.num_reductions == 1
    sched.step_epoch(49.0)
    sched.step_epoch(49.0)
    assert sched.lr == pytest.approx(0.05)     # the bad-epoch count restarted after the reduction
    sched.step_epoch(60.0)                     # improvement resets the count
    sched.step_epoch(59.0)
    sched.step_epoch(59.0)
    assert sched.lr == pytest.approx(0.05)
    sched.step_epoch(59.0)
    assert sched.lr == pytest.approx(0.025)
    # Iteration steps do not change a plateau schedule.
    assert lrs(sched, 3) == pytest.approx([0.025] * 3)


def test_unknown_scheduler():
    with pytest.raises(UserError, match="unknown scheduler"):
        LRSchedule(one_param_optimizer(), "step", epochs=2, iters_per_epoch=2)


def _drive(sched: LRSchedule, epochs: int, iters: int, metrics: list[float]) -> list[float]:
    seq = []
    for e in range(epochs):
        seq += lrs(sched, iters)
        sched.step_epoch(metrics[e % len(metrics)])
        seq.append(sched.lr)
    return seq


@pytest.mark.parametrize("name", ["cosine", "plateau", "constant"])
def test_scheduler_state_dict_continues_identically(tmp_path: Path, name):
    kwargs = dict(epochs=12, iters_per_epoch=4, warmup_epochs=1.5, warmup_factor=0.2, factor=0.5, patience=1)
    metrics = [10.0, 12.0, 11.0, 11.5, 11.0, 13.0]
    reference = LRSchedule(one_param_optimizer(0.3), name, **kwargs)
    full = _drive(reference, 12, 4, metrics)

    first = LRSchedule(one_param_optimizer(0.3), name, **kwargs)
    head = _drive(first, 5, 4, metrics)
    save_checkpoint({"scheduler": first.state_dict()}, tmp_path / "s.pth")
    state = load_checkpoint(tmp_path / "s.pth")["scheduler"]

    fresh_opt = one_param_optimizer(0.3)
    resumed = LRSchedule(fresh_opt, name, **kwargs)
    resumed.load_state_dict(state)
    assert resumed.lr == pytest.approx(head[-1])
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(head[-1])
    tail = _drive(resumed, 7, 4, metrics[5 % len(metrics):] + metrics[:5 % len(metrics)])
    assert head + tail == pytest.approx(full)
    if name == "plateau":
        assert resumed.num_reductions == reference.num_reductions > 0


# ============================================================================ optimizer


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(1))


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_param_groups_no_bias_decay():
    model = ConvNet()
    opt = create_optimizer(model, "sgd", lr=0.1, weight_decay=5e-4, no_bias_decay=True)
    assert len(opt.param_groups) == 2
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert _ids(decay["params"]) == _ids([model.conv.weight, model.fc.weight])
    assert _ids(no_decay["params"]) == _ids([model.conv.bias, model.fc.bias, model.bn.weight, model.bn.bias,
                                             model.norm.weight, model.norm.bias, model.scale])

    plain = create_optimizer(model, "sgd", lr=0.1, weight_decay=5e-4, no_bias_decay=False)
    assert len(plain.param_groups) == 1
    assert plain.param_groups[0]["weight_decay"] == 5e-4
    assert _ids(plain.param_groups[0]["params"]) == _ids(model.parameters())


def test_param_groups_exclude_frozen():
    model = ConvNet()
    for p in (model.conv.weight, model.conv.bias, model.bn.weight):
        p.requires_grad_(False)
    groups = param_groups(model, 1e-4, no_bias_decay=True)
    in_groups = set().union(*(_ids(g["params"]) for g in groups))
    assert in_groups == _ids(p for p in model.parameters() if p.requires_grad)
    assert id(model.conv.weight) not in in_groups and id(model.bn.weight) not in in_groups
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(UserError, match="no trainable parameters"):
        create_optimizer(model, "adam", lr=0.1)


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("asgd", torch.optim.ASGD),
                                      ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                      ("AdamW", torch.optim.AdamW)])
def test_create_optimizer_classes(name, cls):
    model = ConvNet()
    opt = create_optimizer(model, name, lr=0.03, weight_decay=0.01, no_bias_decay=True)
    assert type(opt) is cls
    assert all(g["lr"] == 0.03 for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.01
    if cls is torch.optim.SGD:
        assert opt.defaults["momentum"] == 0.9
    if cls in (torch.optim.Adam, torch.optim.AdamW):
        assert opt.defaults["betas"] == (0.9, 0.999)


def test_sgd_nesterov_needs_momentum():
    model = ConvNet()
    assert create_optimizer(model, "sgd", lr=0.1, nesterov=True).defaults["nesterov"] is True
    assert create_optimizer(model, "sgd", lr=0.1, momentum=0.0, nesterov=True).defaults["nesterov"] is False


def test_unknown_optimizer():
    with pytest.raises(UserError, match="unknown optimizer 'lamb'"):
        create_optimizer(ConvNet(), "lamb", lr=0.1)


# ============================================================================ metrics


def test_topk_correct_hand_made():
    logits = torch.tensor([[0.9, 0.05, 0.05],   # label 0: top-1
                           [0.5, 0.3, 0.2],     # label 1: second
                           [0.6, 0.3, 0.1],     # label 2: third
                           [0.1, 0.2, 0.7]])    # label 2: top-1
    labels = torch.tensor([0, 1, 2, 2])
    assert topk_correct(logits, labels, (1, 2, 3)) == {1: 2, 2: 3, 3: 4}
    # k beyond the class count counts every sample.
    assert topk_correct(logits, labels, (1, 5)) == {1: 2, 5: 4}
    assert topk_correct(logits, labels, (5,)) == {5: 4}


def test_confusion_matrix_rows_are_true_classes():
    cm = confusion_matrix(np.array([1, 1, 0]), np.array([0, 0, 0]), 2)
    assert cm.tolist() == [[1, 2], [0, 0]]


def test_classification_report_hand_computed():
    labels = torch.tensor([0, 0, 0, 1, 1])
    preds = [0, 0, 1, 1, 2]
    logits = torch.nn.functional.one_hot(torch.tensor(preds), 3).float() * 5.0
    report = classification_report(logits, labels, ["a", "b", "c"])
    assert report["num_samples"] == 5
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 0]]
    assert report["top1"] == pytest.approx(60.0)
    assert "top5" not in report  # 3 classes: every label is among the 5 best
    a, b, c = (report["per_class"][k] for k in "abc")
    assert a["precision"] == pytest.approx(100.0) and a["recall"] == pytest.approx(200 / 3)
    assert a["f1"] == pytest.approx(80.0) and a["support"] == 3
    assert b["precision"] == pytest.approx(50.0) and b["recall"] == pytest.approx(50.0)
    assert b["f1"] == pytest.approx(50.0) and b["support"] == 2
    assert c == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # Class c has no support: macro F1 is the mean over a and b only, not (80 + 50 + 0) / 3.
    assert report["macro_f1"] == pytest.approx(65.0)
    assert all(isinstance(v, float) for v in (report["top1"], report["macro_f1"], a["f1"]))


# ============================================================================ models


@pytest.mark.parametrize("name", list_models())
def test_create_model_every_architecture(name):
    small = name in ("resnet18", "mobilenet_v3_small", "efficientnet_b0")
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, small_input=small).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    assert model.arch_name == name
    assert set(model.default_cfg) == {"input_size", "mean", "std"}
    head_linears = [m for m in classifier(model).modules() if isinstance(m, nn.Linear)]
    assert head_linears[-1].out_features == 7


def test_unknown_architecture_and_bad_arguments():
    with pytest.raises(UserError, match="unknown architecture 'resnet9000'"):
        create_model("resnet9000", num_classes=3)
    with pytest.raises(UserError, match="width"):
        create_model("resnet18", num_classes=3, width_mult=0.5)
    with pytest.raises(UserError):
        create_model("resnet18", num_classes=0)


def test_width_mult_shrinks_mobilenet():
    def params(m): return sum(p.numel() for p in m.parameters())
    assert params(create_model("mobilenet_v3_small", 3, width_mult=0.5)) < \
        params(create_model("mobilenet_v3_small", 3))


def test_dropout_option():
    mobilenet = create_model("mobilenet_v3_small", 3, dropout=0.35)
    assert [m.p for m in mobilenet.modules() if isinstance(m, nn.Dropout)] == [0.35]
    resnet = create_model("resnet18", 3, dropout=0.25)
    assert [m.p for m in classifier(resnet).modules() if isinstance(m, nn.Dropout)] == [0.25]


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18"])
def test_bn_momentum(name):
    default = create_model(name, 3)
    bns = [m for m in default.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and any(m.target_momentum != 0.3 for m in bns)
    model = create_model(name, 3, bn_momentum=0.3)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    # The momentum each layer uses once past its cumulative start (clsengine.models.batchnorm).
    assert bns and all(m.target_momentum == 0.3 and m.momentum is None for m in bns)


def _feature_size(model: nn.Module, layer: nn.Module) -> tuple[int, int]:
    sizes = []
    handle = layer.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:])))
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 32, 32))
    handle.remove()
    return sizes[0]


def test_small_input_resnet():
    normal = create_model("resnet18", 4)
    small = create_model("resnet18", 4, small_input=True)
    assert normal.conv1.stride == (2, 2) and isinstance(normal.maxpool, nn.MaxPool2d)
    assert small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.MaxPool2d)  # kept: 16x downsampling, as for the other architectures
    assert _feature_size(normal, normal.layer4) == (1, 1)
    assert _feature_size(small, small.layer4) == (2, 2)


def test_small_input_mobilenet():
    normal = create_model("mobilenet_v3_small", 4)
    small = create_model("mobilenet_v3_small", 4, small_input=True)
    first = next(m for m in small.modules() if isinstance(m, nn.Conv2d))
    assert first.stride == (1, 1)
    assert _feature_size(small, small.features) == (2, 2)
    assert _feature_size(normal, normal.features) == (1, 1)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_freeze_backbone(name):
    model = create_model(name, 5)
    freeze_backbone(model)
    head = model.head_name
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(head + ".") for n in trainable)
    assert all(p.requires_grad for p in classifier(model).parameters())
    assert sum(1 for _ in model.parameters()) > len(trainable)
    opt = create_optimizer(model, "sgd", lr=0.1)
    assert set().union(*(_ids(g["params"]) for g in opt.param_groups)) == _ids(classifier(model).parameters())


def test_load_pretrained_skips_classifier(tmp_path: Path):
    torch.manual_seed(1)
    source = create_model("resnet18", 10)
    path = save_checkpoint({"model": source.state_dict(), "epoch": 3}, tmp_path / "ten.pth")
    torch.manual_seed(2)
    target = create_model("resnet18", 5)
    fc_before = {k: v.clone() for k, v in target.fc.state_dict().items()}
    assert not torch.equal(target.conv1.weight, source.conv1.weight)
    report = load_pretrained(target, path)
    assert report.missing == ["fc.bias", "fc.weight"]
    assert len(report.loaded) == report.total - 2 and report.unused == ["fc.bias", "fc.weight"]
    assert "left at their initial values: fc.bias, fc.weight" in report.describe()
    src = source.state_dict()
    for k, v in target.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, src[k]), k
    for k, v in target.fc.state_dict().items():
        assert torch.equal(v, fc_before[k]), k

    # The same through create_model(pretrained=...).
    via_factory = create_model("resnet18", 5, pretrained=path)
    assert torch.equal(via_factory.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert via_factory.fc.out_features == 5

    # A file of another architecture matches nothing: a clear CheckpointError.
    other = save_checkpoint(tiny_net().state_dict(), tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no tensor matches"):
        load_pretrained(create_model("resnet18", 5), other)


def test_load_pretrained_refuses_a_file_of_another_width(tmp_path: Path):
    path = save_checkpoint(create_model("mobilenet_v3_large", 10).state_dict(), tmp_path / "width1.pth")
    target = create_model("mobilenet_v3_large", 10, width_mult=0.75)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"only \d+ of the \d+ backbone tensors .* width multiplier"):
        load_pretrained(target, path)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing half-loaded


# ============================================================================ hub


def _snapshot(tmp_path: Path) -> tuple[Path, str, int]:
    source = tmp_path / "snap.pth"
    source.write_bytes(b"weights" * 1000)
    return source, hashlib.sha256(source.read_bytes()).hexdigest(), source.stat().st_size


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")] if folder.exists() else []


def test_fetch_snapshot_local(tmp_path: Path):
    source, digest, size = _snapshot(tmp_path)
    dest = tmp_path / "cache" / "model.pth"
    assert fetch_snapshot(str(source), dest, sha256=digest.upper(), size=size) == dest
    assert dest.read_bytes() == source.read_bytes()
    assert _leftovers(dest.parent) == []


@pytest.mark.parametrize("bad", ["sha256", "size"])
def test_fetch_snapshot_verification_fails(tmp_path: Path, bad):
    source, digest, size = _snapshot(tmp_path)
    dest = tmp_path / "cache" / "model.pth"
    kwargs = {"sha256": digest, "size": size}
    if bad == "sha256":
        kwargs["sha256"] = "0" * 64
    else:
        kwargs["size"] = size + 1
    with pytest.raises(UserError, match=bad) as info:
        fetch_snapshot(str(source), dest, **kwargs)
    assert not isinstance(info.value, OfflineError)
    assert not dest.exists()
    assert _leftovers(dest.parent) == []


def test_fetch_snapshot_missing_local_file(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        fetch_snapshot(str(tmp_path / "absent.pth"), tmp_path / "cache" / "m.pth")
    assert not (tmp_path / "cache" / "m.pth").exists()


def test_fetch_snapshot_unreachable_url(tmp_path: Path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    dest = tmp_path / "cache" / "m.pth"
    import time
    start = time.monotonic()
    with pytest.raises(OfflineError, match="127.0.0.1:9"):
        fetch_snapshot("http://127.0.0.1:9/x.pth", dest, timeout=2)
    assert time.monotonic() - start < 10
    assert not dest.exists()
    assert _leftovers(dest.parent) == []


# ============================================================================ loader


def _order(loader: EpochLoader) -> list[int]:
    return [int(i) for (batch,) in loader for i in batch]


def test_epoch_loader_order_depends_on_seed_and_epoch():
    dataset = TensorDataset(torch.arange(64))
    a = EpochLoader(dataset, batch_size=8, shuffle=True, workers=0, seed=5)
    b = EpochLoader(dataset, batch_size=8, shuffle=True, workers=0, seed=5)
    a.set_epoch(3)
    torch.manual_seed(111)          # the global RNG must not matter
    order_a = _order(a)
    _order(b)                       # b has already been iterated once: must not matter either
    b.set_epoch(3)
    torch.manual_seed(222)
    order_b = _order(b)
    assert sorted(order_a) == list(range(64))
    assert order_a == order_b
    assert order_a != list(range(64))

    a.set_epoch(4)
    order_a4 = _order(a)
    assert sorted(order_a4) == list(range(64)) and order_a4 != order_a
    a.set_epoch(3)
    assert _order(a) == order_a

    other_seed = EpochLoader(dataset, batch_size=8, shuffle=True, workers=0, seed=6)
    other_seed.set_epoch(3)
    assert _order(other_seed) != order_a


def test_epoch_loader_drop_last_on_tiny_dataset():
    loader = EpochLoader(TensorDataset(torch.arange(3)), batch_size=8, shuffle=False, workers=0, drop_last=True)
    assert len(loader) == 1 and _order(loader) == [0, 1, 2]


# ============================================================================ loop


def _data(seed: int, n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


def _run(output_dir: Path, epochs: int, resume=None, record=None):
    """One training run on fixed data; the schedule is planned for 5 epochs whatever cfg.epochs says."""
    seed_everything(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    train = EpochLoader(_data(1, 40), batch_size=8, shuffle=True, workers=0, seed=0)
    val = EpochLoader(_data(2, 16), batch_size=8, shuffle=False, workers=0, seed=0)
    optimizer = create_optimizer(model, "sgd", lr=0.2, weight_decay=1e-3, no_bias_decay=True)
    scheduler = LRSchedule(optimizer, "cosine", epochs=5, iters_per_epoch=len(train), warmup_epochs=1)
    cfg = FitConfig(epochs=epochs, output_dir=output_dir, progress=False,
                    checkpoint_extra={"classes": ["a", "b", "c"]})
    result = fit(model, train, val, nn.CrossEntropyLoss(), optimizer, scheduler, torch.device("cpu"), cfg,
                 get_logger(name="clsengine.test_engine"), resume=resume,
                 on_epoch_end=(lambda epoch, row: record.append(epoch)) if record is not None else None)
    return model, result


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _comparable(row: dict) -> dict:
    """Timing-free values; an empty field (no EMA in this run) stays the empty string."""
    return {k: (int(v) if k == "epoch" else float(v) if v != "" else v) for k, v in row.items()
            if k not in ("epoch_time_s", "images_per_s")}


def test_runlog_redraws_the_curves_at_most_every_plot_every_s_and_at_close(tmp_path: Path, monkeypatch):
    drawn: list[int] = []
    monkeypatch.setattr(plots, "plot_training_curves", lambda history, path: drawn.append(len(history)))
    log = runlog.RunLog(tmp_path, None)
    for epoch in (1, 2, 3):
        log.add_epoch({"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.0, "lr": 0.1})
        log.flush()
    assert drawn == [1]                      # the first epoch's curves at once, then not within 30 s
    assert len(_csv_rows(tmp_path / "history.csv")) == 3   # the CSV after every epoch
    log.close()
    assert drawn == [1, 3]                   # the end of the run draws what was not drawn
    monkeypatch.setattr(runlog, "PLOT_EVERY_S", 0.0)
    drawn.clear()
    log = runlog.RunLog(tmp_path, None, history=log.history)
    log.flush(), log.flush(), log.close()
    assert drawn == [3]                      # nothing new to draw: drawn once


def test_runlog_warns_once_and_goes_on_when_tensorboard_cannot_be_written(tmp_path: Path, capsys):
    class FullDisk:
        log_dir, calls = str(tmp_path / "tb"), 0

        def add_scalar(self, *args) -> None:
            FullDisk.calls += 1
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            pass

    log = runlog.RunLog(tmp_path, None)
    log.writer = FullDisk()
    for epoch in (1, 2):
        log.add_epoch({"epoch": epoch, "train_loss": 1.0, "val_loss": 1.0, "lr": 0.1, "images_per_s": 10.0})
    assert log.writer is None and FullDisk.calls == 1 and len(log.history) == 2
    assert capsys.readouterr().err.count("no more TensorBoard logging") == 1


def test_fit_writes_outputs_and_resumes_identically(tmp_path: Path):
    run_dir = tmp_path / "run"
    epochs_seen: list[int] = []
    _, result = _run(run_dir, epochs=3, record=epochs_seen)
    assert epochs_seen == [1, 2, 3]
    for name in ("latest.pth", "best.pth", "history.csv", "training_curves.png"):
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    assert (run_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _csv_rows(run_dir / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert tuple(rows[0]) == HISTORY_FIELDS
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]

    latest = load_checkpoint(run_dir / "latest.pth")
    best = load_checkpoint(run_dir / "best.pth")
    assert latest["epoch"] == 3 and latest["classes"] == ["a", "b", "c"]
    assert len(latest["history"]) == 3
    assert best["epoch"] == result["best_epoch"] == latest["best_epoch"]
    assert best["score"] == result["best_score"] == max(float(r["val_top1"]) for r in rows)

    resumed_epochs: list[int] = []
    resumed_model, resumed = _run(run_dir, epochs=5, resume=latest, record=resumed_epochs)
    assert resumed_epochs == [4, 5]
    rows = _csv_rows(run_dir / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3, 4, 5]
    assert load_checkpoint(run_dir / "latest.pth")["epoch"] == 5

    straight_dir = tmp_path / "straight"
    straight_model, straight = _run(straight_dir, epochs=5)
    for key, value in straight_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    assert [_comparable(r) for r in rows] == [_comparable(r) for r in _csv_rows(straight_dir / "history.csv")]
    assert resumed["best_score"] == straight["best_score"] and resumed["best_epoch"] == straight["best_epoch"]
    # The weights actually changed during the resumed epochs (the comparison is not vacuous).
    assert not torch.equal(latest["model"]["0.weight"], resumed_model.state_dict()["0.weight"])
