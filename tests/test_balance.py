"""Class balance and dataset insight: class weights, weighted losses, the class-balanced sampler,
the dataset report and restricting a scan to some classes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from clsengine.data import (EpochLoader, DatasetScan, class_weights, dataset_report, format_dataset_report,
                            sample_weights, select_classes)
from clsengine.errors import DataError, UserError
from clsengine.losses import create_loss

# --------------------------------------------------------------------------- class weights


def test_class_weights_auto_is_inverse_frequency():
    weights = class_weights([10, 5, 0, 85], "auto")
    assert weights.dtype == torch.float32
    # total 100 over 3 classes with images; the empty class gets 1
    expected = [100 / (3 * 10), 100 / (3 * 5), 1.0, 100 / (3 * 85)]
    assert weights.tolist() == pytest.approx(expected)
    assert class_weights([7, 7, 7], "auto").tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_class_weights_none_and_list():
    assert class_weights([1, 2], "none") is None
    assert class_weights([1, 2], None) is None
    weights = class_weights([1, 2, 3], [0.5, 2, 0])
    assert weights.dtype == torch.float32 and weights.tolist() == [0.5, 2.0, 0.0]
    assert class_weights([1, 2], (1, 3)).tolist() == [1.0, 3.0]


@pytest.mark.parametrize("mode, message", [
    ([1.0, 2.0, 3.0], "class weights: 3 values given for 4 classes"),
    ([1.0, float("nan"), 1.0, 1.0], "finite"),
    ([1.0, float("inf"), 1.0, 1.0], "finite"),
    ([1.0, -1.0, 1.0, 1.0], ">= 0"),
    ([0, 0, 0, 0], "all values are 0"),
    (["a", "b", "c", "d"], "list of numbers"),
    ("balanced", "unknown mode 'balanced'; use \"none\", \"auto\" or a list of numbers"),
    (3.0, "list of numbers"),
])
def test_class_weights_errors(mode, message):
    with pytest.raises(UserError) as info:
        class_weights([1, 2, 3, 4], mode)
    assert message in str(info.value)


def test_weighted_softmax_loss_is_weighted_mean():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 2, 1, 2])
    weight = class_weights([10, 5, 20], "auto")
    loss = create_loss("softmax", weight=weight)
    nll = -F.log_softmax(logits, dim=1)[torch.arange(4), labels]
    w = weight[labels]
    assert float(loss(logits, labels)) == pytest.approx(float((w * nll).sum() / w.sum()), rel=1e-6)
    assert float(loss(logits, labels)) != pytest.approx(float(nll.mean()))


# --------------------------------------------------------------------------- sampler


def test_sample_weights():
    single = [("a.png", 0), ("b.png", 1), ("c.png", 1)]
    assert sample_weights(single, [1, 2]) == pytest.approx([1.0, 0.5, 0.5])
    multi = [("a.png", (0, 1)), ("b.png", (1,)), ("c.png", ())]
    # the rarest label decides; no label weighs like the most common class
    assert sample_weights(multi, [10, 2]) == pytest.approx([0.5, 0.5, 0.1])
    with pytest.raises(UserError, match="c.png has label 2"):
        sample_weights([("c.png", 2)], [1, 2])
    with pytest.raises(UserError, match="a.png has label 0, but the counts give 0 images"):
        sample_weights([("a.png", 0)], [0, 2])


class Imbalanced(Dataset):
    """90 samples of class 0, then 10 of class 1; items are (index, label)."""

    labels = [0] * 90 + [1] * 10

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return index, self.labels[index]


def drawn(loader: EpochLoader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [int(i) for indices, _ in loader for i in indices]


def balanced_loader(seed: int = 0) -> EpochLoader:
    dataset = Imbalanced()
    weights = sample_weights([(str(i), label) for i, label in enumerate(dataset.labels)], [90, 10])
    return EpochLoader(dataset, batch_size=16, shuffle=True, workers=0, seed=seed, sample_weights=weights)


def test_epoch_loader_balances_classes():
    loader = balanced_loader()
    draws = [i for epoch in range(10) for i in drawn(loader, epoch)]
    assert len(draws) == 1000 and len(drawn(loader, 0)) == len(loader.dataset)
    minority = sum(Imbalanced.labels[i] for i in draws) / len(draws)
    assert 0.35 < minority < 0.65
    # without weights the loader keeps the dataset's 10 % share, every sample once per epoch
    plain = EpochLoader(Imbalanced(), batch_size=16, shuffle=True, workers=0, seed=0)
    assert sorted(drawn(plain, 0)) == list(range(100))


def test_epoch_loader_sampling_is_deterministic_per_epoch():
    a, b = balanced_loader(), balanced_loader()
    assert drawn(a, 3) == drawn(b, 3)
    assert drawn(a, 3) == drawn(a, 3)
    assert drawn(a, 3) != drawn(a, 4)
    assert drawn(balanced_loader(seed=1), 3) != drawn(a, 3)


def test_epoch_loader_sample_weight_errors():
    with pytest.raises(UserError, match="99 weights given for a dataset of 100 samples"):
        EpochLoader(Imbalanced(), batch_size=8, shuffle=False, workers=0, sample_weights=[1.0] * 99)
    with pytest.raises(UserError, match="finite"):
        EpochLoader(Imbalanced(), batch_size=8, shuffle=False, workers=0, sample_weights=[-1.0] * 100)
    with pytest.raises(UserError, match="all 0"):
        EpochLoader(Imbalanced(), batch_size=8, shuffle=False, workers=0, sample_weights=[0.0] * 100)


# --------------------------------------------------------------------------- dataset report


def single_label_scans() -> tuple[DatasetScan, DatasetScan]:
    classes = ["cat", "dog", "bird"]
    train = DatasetScan(root=Path("/data/train"), classes=classes,
                       samples=[(f"t{i}.png", label) for i, label in enumerate([0] * 6 + [1] * 3 + [2])],
                       skipped=[("broken.png", "cannot decode")], unlabeled=["u1.png", "u2.png"],
                       source="list train.txt under /data")
    val = DatasetScan(root=Path("/data/val"), classes=classes,
                     samples=[("v0.png", 0), ("v1.png", 1), ("v2.png", 1)])
    return train, val


def test_dataset_report_single_label():
    train, val = single_label_scans()
    report = dataset_report(train, val)
    assert report["classes"] == ["cat", "dog", "bird"] and report["multilabel"] is False
    assert report["train"] == {"source": "list train.txt under /data", "images": 10,
                               "per_class": {"cat": 6, "dog": 3, "bird": 1}, "unlabeled": 2, "failed_to_load": 1,
                               "imbalance_ratio": 6.0, "empty_classes": []}
    assert report["val"]["per_class"] == {"cat": 1, "dog": 2, "bird": 0}
    assert report["val"]["imbalance_ratio"] is None and report["val"]["empty_classes"] == ["bird"]
    assert report["val"]["source"] == "class folders under /data/val"
    assert report["majority_class"] == "cat"
    assert report["majority_baseline"] == {"split": "val", "accuracy": pytest.approx(100 / 3)}
    # without val the baseline is measured on train
    alone = dataset_report(train)
    assert alone["val"] is None
    assert alone["majority_baseline"] == {"split": "train", "accuracy": pytest.approx(60.0)}


def test_dataset_report_multilabel_and_ties():
    scan = DatasetScan(root=Path("/coco"), classes=["a", "b", "c"], multilabel=True,
                      samples=[("0.png", (0,)), ("1.png", (0, 1)), ("2.png", (0,)), ("3.png", (1,))])
    report = dataset_report(scan)
    assert report["multilabel"] is True
    assert report["train"]["per_class"] == {"a": 3, "b": 2, "c": 0}
    assert report["train"]["imbalance_ratio"] is None and report["train"]["empty_classes"] == ["c"]
    assert report["majority_class"] == "a"
    assert report["majority_baseline"]["accuracy"] == pytest.approx(50.0)  # exactly {a}: images 0 and 2
    tie = DatasetScan(root=Path("/d"), classes=["x", "y"], samples=[("0.png", 1), ("1.png", 0)])
    assert dataset_report(tie)["majority_class"] == "x"


def test_format_dataset_report():
    train, val = single_label_scans()
    text = format_dataset_report(dataset_report(train, val))
    for expected in ("cat", "dog", "bird", "60.0%", "6.0",
                     "Images: train 10 (list train.txt under /data), val 3 (class folders under /data/val)",
                     "Classes without images in val: bird", "Unlabeled (not used): train 2, val 0",
                     "Failed to load (skipped): train 1, val 0", "always 'cat' gives 33.3% accuracy on val"):
        assert expected in text, (expected, text)
    long_name = "a_very_long_class_name_" * 4
    scan = DatasetScan(root=Path("/d"), classes=[long_name, "short"],
                      samples=[("0.png", 0), ("1.png", 1), ("2.png", 1)])
    text = format_dataset_report(dataset_report(scan))
    assert long_name not in text and long_name[:20] in text and "..." in text
    assert max(len(line) for line in text.splitlines()[:5]) < 80
    assert "Imbalance ratio (train, most / least common class): 2.0" in text
    many = DatasetScan(root=Path("/d"), classes=[f"c{i:02d}" for i in range(50)],
                      samples=[(f"{i}.png", i) for i in range(50)] + [("x.png", 7)])
    text = format_dataset_report(dataset_report(many))
    assert "... 10 more classes ..." in text and "c07" in text.splitlines()[3]


# --------------------------------------------------------------------------- select_classes


def test_select_classes_single_label():
    train, _ = single_label_scans()
    picked = select_classes(train, ["bird", "cat"])
    assert picked.classes == ["bird", "cat"] and picked.multilabel is False
    assert picked.samples == [(f"t{i}.png", 1) for i in range(6)] + [("t9.png", 0)]
    assert picked.counts() == [1, 6]
    assert picked.skipped == train.skipped and picked.unlabeled == train.unlabeled and picked.root == train.root
    assert picked.source == "list train.txt under /data; classes bird, cat"
    assert train.classes == ["cat", "dog", "bird"] and len(train.samples) == 10  # the input is untouched


def test_select_classes_multilabel():
    scan = DatasetScan(root=Path("/coco"), classes=["a", "b", "c"], multilabel=True,
                      samples=[("0.png", (0, 1)), ("1.png", (1,)), ("2.png", (2,)), ("3.png", (0, 2))])
    picked = select_classes(scan, ["c", "b"])
    assert picked.multilabel is True and picked.classes == ["c", "b"]
    assert picked.samples == [("0.png", (1,)), ("1.png", (1,)), ("2.png", (0,)), ("3.png", (0,))]
    only_a = select_classes(scan, ["a"])
    assert only_a.samples == [("0.png", (0,)), ("3.png", (0,))]
    both = select_classes(scan, ["b", "a"])
    assert both.samples[0] == ("0.png", (0, 1))


def test_select_classes_errors():
    train, _ = single_label_scans()
    with pytest.raises(DataError, match="^--classes: no class given"):
        select_classes(train, [])
    with pytest.raises(DataError, match="^--classes: class 'cat' is given twice"):
        select_classes(train, ["cat", "dog", "cat"])
    with pytest.raises(DataError, match=r"^--classes: unknown class 'cow' in list train.txt under /data "
                                        r"\(its classes: cat, dog, bird\)"):
        select_classes(train, ["cat", "cow"])
    with pytest.raises(DataError, match=r"^--val-classes: unknown classes 'x', 'y'"):
        select_classes(train, ["x", "y"], what="--val-classes")
    many = DatasetScan(root=Path("/d"), classes=[f"c{i}" for i in range(15)], samples=[("0.png", 0)])
    with pytest.raises(DataError, match=r"c9, \.\.\. \(15 in all\)"):
        select_classes(many, ["nope"])
    with pytest.raises(DataError, match="^--classes: no image of c3, c4 in class folders under /d"):
        select_classes(many, ["c3", "c4"])
