"""Multi-label pieces of the engine: AP/mAP and the multi-label report, BCE and asymmetric losses, the
multi-label mutual-learning term, and multi-hot targets from ImageDataset."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from clsengine.data import ImageDataset
from clsengine.errors import DataError, UserError
from clsengine.losses import (LOSSES, MULTILABEL_LOSSES, AMSoftmaxLoss, AsymmetricLoss, BinaryCrossEntropyLoss,
                              create_loss)
from clsengine.losses.mutual import mutual_losses
from clsengine.metrics import average_precision, multilabel_probs, multilabel_report, primary_score


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def logit(p) -> torch.Tensor:
    p = torch.tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p)).float()


# --------------------------------------------------------------------------- average precision


def test_average_precision_hand_computed():
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(np.array([0.1, 0.9, 0.5]), np.array([0, 1, 1])) == pytest.approx(1.0)
    # the only positive ranked last of four: precision 1/4
    assert average_precision(np.array([0.1, 0.9, 0.5, 0.7]), np.array([1, 0, 0, 0])) == pytest.approx(0.25)


def test_average_precision_ties_are_deterministic():
    # equal scores keep the input order: positive first -> 1, positive second -> 1/2
    assert average_precision(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(1.0)
    assert average_precision(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)


def test_average_precision_without_positives_is_nan():
    assert math.isnan(average_precision(np.array([0.3, 0.2]), np.array([0, 0])))


# --------------------------------------------------------------------------- multilabel report

CLASSES = ["cat", "dog", "bird"]
PROBS = [[0.9, 0.2, 0.1],   # true {cat}      predicted {cat}        exact
         [0.6, 0.4, 0.7],   # true {cat, dog} predicted {cat, bird}
         [0.3, 0.8, 0.2],   # true {dog}      predicted {dog}        exact
         [0.7, 0.1, 0.3]]   # true {}         predicted {cat}
TARGETS = [[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]]


def test_multilabel_report_hand_computed():
    report = multilabel_report(logit(PROBS), torch.tensor(TARGETS, dtype=torch.float32), CLASSES)
    assert report["num_samples"] == 4 and report["threshold"] == 0.5
    # cat: tp 2, fp 1, fn 0; dog: tp 1, fp 0, fn 1; bird: tp 0, fp 1, no positives
    cat, dog, bird = (report["per_class"][c] for c in CLASSES)
    assert (cat["precision"], cat["recall"], cat["f1"], cat["support"]) == pytest.approx((200 / 3, 100, 80, 2))
    assert (dog["precision"], dog["recall"], dog["f1"], dog["support"]) == pytest.approx((100, 50, 200 / 3, 2))
    assert (bird["precision"], bird["recall"], bird["f1"], bird["support"]) == (0.0, 0.0, 0.0, 0)
    assert cat["ap"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert dog["ap"] == pytest.approx(100.0)
    assert bird["ap"] is None
    assert report["mAP"] == pytest.approx((100 * (1 + 2 / 3) / 2 + 100) / 2)  # bird left out
    # micro: tp 3, fp 2, fn 1
    assert report["micro"]["precision"] == pytest.approx(60.0)
    assert report["micro"]["recall"] == pytest.approx(75.0)
    assert report["micro"]["f1"] == pytest.approx(100 * 2 * 0.6 * 0.75 / 1.35)
    # macro over cat and dog only (bird has no support)
    assert report["macro"]["precision"] == pytest.approx((200 / 3 + 100) / 2)
    assert report["macro"]["recall"] == pytest.approx(75.0)
    assert report["macro"]["f1"] == pytest.approx((80 + 200 / 3) / 2)
    assert report["exact_match"] == pytest.approx(50.0)
    assert all(type(v) in (float, int, type(None)) for c in CLASSES for v in report["per_class"][c].values())


def test_multilabel_report_threshold_and_no_positives():
    report = multilabel_report(logit(PROBS), torch.tensor(TARGETS), CLASSES, threshold=0.65)
    # at 0.65: predictions {cat}, {bird}, {dog}, {cat} -> exact match for images 0 and 2
    assert report["exact_match"] == pytest.approx(50.0)
    assert report["per_class"]["dog"]["recall"] == pytest.approx(50.0)
    assert report["per_class"]["cat"]["recall"] == pytest.approx(50.0)
    empty = multilabel_report(logit(PROBS), torch.zeros(4, 3), CLASSES)
    assert empty["mAP"] == 0.0 and empty["macro"]["f1"] == 0.0
    with pytest.raises(UserError, match="shape"):
        multilabel_report(logit(PROBS), torch.zeros(4, 2), CLASSES)


def test_background_suppression():
    probs = [[0.9, 0.7, 0.1],   # dog over threshold: background zeroed
             [0.9, 0.4, 0.2],   # nothing else over threshold: background kept
             [0.2, 0.1, 0.5]]   # bird exactly at threshold: background zeroed
    logits = logit(probs)
    plain = multilabel_probs(logits)
    assert plain.dtype == torch.float32
    torch.testing.assert_close(plain, torch.tensor(probs, dtype=torch.float32))
    out = multilabel_probs(logits, background_index=0)
    assert out[0, 0] == 0 and out[2, 0] == 0
    assert out[1, 0] == pytest.approx(0.9)
    torch.testing.assert_close(out[:, 1:], plain[:, 1:])
    # the background column itself never suppresses anything
    out = multilabel_probs(logits, background_index=2)
    assert out[2, 2] == pytest.approx(0.5) and out[0, 2] == 0
    # the report uses the suppressed probabilities
    targets = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float32)
    plain_report = multilabel_report(logits, targets, ["background", "dog", "bird"])
    suppressed = multilabel_report(logits, targets, ["background", "dog", "bird"], background_index=0)
    assert plain_report["exact_match"] == pytest.approx(200 / 3)  # image 0 also predicts background
    assert suppressed["exact_match"] == pytest.approx(100.0)
    with pytest.raises(UserError, match="background index 3"):
        multilabel_probs(logits, background_index=3)


def test_primary_score():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert primary_score(logits, torch.tensor([0, 0, 0])) == pytest.approx(200 / 3)
    targets = torch.tensor(TARGETS, dtype=torch.float32)
    expected = multilabel_report(logit(PROBS), targets, CLASSES)["mAP"]
    assert primary_score(logit(PROBS), targets) == pytest.approx(expected)
    assert primary_score(logit(PROBS), targets.long()) == pytest.approx(expected)


# --------------------------------------------------------------------------- BCE and ASL


def reference_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none").sum(dim=1).mean()


def test_bce_reduction_and_integer_targets():
    logits = torch.randn(6, 4) * 3
    targets = torch.randint(0, 2, (6, 4))
    torch.testing.assert_close(BinaryCrossEntropyLoss()(logits, targets), reference_bce(logits, targets))
    smoothed = BinaryCrossEntropyLoss(label_smoothing=0.2)(logits, targets)
    torch.testing.assert_close(smoothed, reference_bce(logits, targets * 0.8 + 0.1))


def test_asl_without_focusing_equals_bce():
    logits = torch.randn(8, 5) * 3
    targets = torch.randint(0, 2, (8, 5))
    weight = torch.tensor([1.0, 2.0, 0.5, 0.0, 3.0])
    asl = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)
    torch.testing.assert_close(asl(logits, targets), BinaryCrossEntropyLoss()(logits, targets))
    asl = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0, weight=weight, label_smoothing=0.1)
    bce = BinaryCrossEntropyLoss(weight=weight, label_smoothing=0.1)
    torch.testing.assert_close(asl(logits, targets), bce(logits, targets))


def test_asl_single_element_by_hand():
    x = torch.tensor([[1.0]])
    p = 1 / (1 + math.exp(-1.0))
    pm = p - 0.1
    loss = AsymmetricLoss(gamma_neg=2, gamma_pos=1, clip=0.1)
    assert float(loss(x, torch.tensor([[0.0]]))) == pytest.approx(-(pm ** 2) * math.log(1 - pm), rel=1e-5)
    assert float(loss(x, torch.tensor([[1.0]]))) == pytest.approx(-(1 - p) * math.log(p), rel=1e-5)


def test_asl_down_weights_easy_negatives():
    logits = torch.full((4, 6), -2.0)   # p = 0.12: easy negatives
    negatives = torch.zeros(4, 6)
    bce = float(BinaryCrossEntropyLoss()(logits, negatives))
    focused = float(AsymmetricLoss(gamma_neg=4, clip=0)(logits, negatives))
    assert 0 < focused < 0.01 * bce
    # below the clip a negative is discarded altogether
    assert float(AsymmetricLoss(gamma_neg=0, clip=0.2)(logits, negatives)) == 0.0
    # positives are untouched with gamma_pos = 0
    positives = torch.ones(4, 6)
    torch.testing.assert_close(AsymmetricLoss()(logits, positives), BinaryCrossEntropyLoss()(logits, positives))


@pytest.mark.parametrize("loss", [BinaryCrossEntropyLoss(), AsymmetricLoss(), AsymmetricLoss(clip=0),
                                  AsymmetricLoss(gamma_neg=0.5, gamma_pos=0.5, clip=0.05)], ids=repr)
def test_extreme_logits_give_finite_loss_and_gradients(loss):
    logits = torch.tensor([[50.0, -50.0, 50.0, -50.0, 0.0]], requires_grad=True)
    targets = torch.tensor([[1, 1, 0, 0, 1]])
    value = loss(logits, targets)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    assert logits.grad[0, 1] < -0.1   # a confidently missed positive still learns
    if getattr(loss, "clip", 0) == 0:
        # a confidently wrong negative still learns (with a clip ASL lets it fade: it may be mislabeled)
        assert logits.grad[0, 2] > 0.1


@pytest.mark.parametrize("cls", [BinaryCrossEntropyLoss, AsymmetricLoss])
def test_weight_buffer_scales_and_moves(cls):
    weight = torch.tensor([2.0, 0.0, 1.0])
    loss = cls(weight=weight)
    assert "weight" in dict(loss.named_buffers()) and "weight" in loss.state_dict()
    assert cls().weight is None
    logits = torch.randn(5, 3)
    targets = torch.randint(0, 2, (5, 3)).float()
    per_class = [float(cls()(logits[:, c:c + 1], targets[:, c:c + 1])) for c in range(3)]
    assert float(loss(logits, targets)) == pytest.approx(2 * per_class[0] + per_class[2], rel=1e-5)
    assert loss.to(torch.device("meta")).weight.device.type == "meta"
    with pytest.raises(UserError, match="2 class weights for 3 classes"):
        cls(weight=torch.ones(2))(logits, targets)


def test_loss_argument_errors():
    with pytest.raises(UserError, match="gammas"):
        AsymmetricLoss(gamma_neg=-1)
    with pytest.raises(UserError, match="clip"):
        AsymmetricLoss(clip=1.0)
    with pytest.raises(UserError, match="label_smoothing"):
        BinaryCrossEntropyLoss(label_smoothing=1.0)
    with pytest.raises(UserError, match="same shape"):
        BinaryCrossEntropyLoss()(torch.zeros(2, 3), torch.zeros(2))


def test_create_loss_names():
    """Every listed loss is created by name and takes its task's targets: multi-hot vectors for the
    multi-label ones, class indices for the others."""
    logits = torch.tensor([[0.9, -0.2, 0.1], [-0.5, 0.7, 0.0], [0.2, 0.3, -0.8], [0.0, -0.1, 0.4]])
    for name in LOSSES:
        loss = create_loss(name, **({"scale": 10.0} if name == "am_softmax" else {}))
        target = (torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 1], [1, 1, 0]]) if name in MULTILABEL_LOSSES
                  else torch.tensor([0, 1, 2, 0]))
        assert torch.isfinite(loss(logits, target)) and loss(logits, target) > 0, name
    assert set(MULTILABEL_LOSSES) < set(LOSSES)
    weight = torch.tensor([1.0, 2.0, 3.0])
    assert isinstance(create_loss("bce", label_smoothing=0.1), BinaryCrossEntropyLoss)
    asl = create_loss("asl", weight=weight, asl_gamma_neg=2.0, asl_gamma_pos=1.0, asl_clip=0.0)
    assert isinstance(asl, AsymmetricLoss)
    assert (asl.gamma_neg, asl.gamma_pos, asl.clip) == (2.0, 1.0, 0.0)
    torch.testing.assert_close(asl.weight, weight)
    defaults = create_loss("asl")
    assert (defaults.gamma_neg, defaults.gamma_pos, defaults.clip, defaults.weight) == (4.0, 0.0, 0.05, None)
    torch.testing.assert_close(create_loss("softmax", weight=weight).weight, weight)
    am = create_loss("am_softmax", scale=10.0, weight=weight)
    assert isinstance(am, AMSoftmaxLoss)
    torch.testing.assert_close(am.weight, weight)
    with pytest.raises(UserError, match="unknown loss 'focal'.*bce, asl"):
        create_loss("focal")


def test_am_softmax_weight_matches_weighted_cross_entropy():
    logits = torch.randn(6, 3).clamp(-0.9, 0.9) * 10
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    weight = torch.tensor([1.0, 3.0, 0.5])
    # margin 0 leaves the logits as they are, so the loss is plain weighted cross-entropy
    loss = AMSoftmaxLoss(10.0, margin=0.0, weight=weight)
    torch.testing.assert_close(loss(logits, labels), F.cross_entropy(logits, labels, weight=weight))
    assert AMSoftmaxLoss(10.0).weight is None


# --------------------------------------------------------------------------- mutual learning


def reference_binary_kl(own: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    p, q = torch.sigmoid(own.double() / t), torch.sigmoid(other.double() / t)
    kl = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
    return kl.sum(dim=1).mean() * t ** 2


def test_mutual_multilabel_values():
    z0, z1, z2 = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    zero = mutual_losses([z0, z0.clone()], multilabel=True)
    assert all(float(x) == 0.0 for x in zero)
    l0, l1 = mutual_losses([z0, z1], temperature=2.0, multilabel=True)
    assert float(l0) > 0 and float(l1) > 0
    assert float(l0) == pytest.approx(float(reference_binary_kl(z0, z1, 2.0)), rel=1e-4)
    assert float(l1) == pytest.approx(float(reference_binary_kl(z1, z0, 2.0)), rel=1e-4)
    first, _, _ = mutual_losses([z0, z1, z2], multilabel=True)
    expected = (reference_binary_kl(z0, z1, 1.0) + reference_binary_kl(z0, z2, 1.0)) / 2
    assert float(first) == pytest.approx(float(expected), rel=1e-4)
    # the softmax path is not the multi-label one
    assert float(mutual_losses([z0, z1])[0]) != pytest.approx(float(l0))


def test_mutual_multilabel_gradient_stays_on_own_model():
    z0 = (torch.randn(3, 4) * 50).requires_grad_()
    z1 = (torch.randn(3, 4) * 50).requires_grad_()
    l0, _ = mutual_losses([z0, z1], multilabel=True)
    l0.backward()
    assert z1.grad is None
    assert torch.isfinite(z0.grad).all() and z0.grad.abs().sum() > 0


# --------------------------------------------------------------------------- multi-hot dataset


def tiny_images(root: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        path = root / f"{i}.png"
        Image.fromarray(np.full((4, 4, 3), 40 * i, dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float()


def test_image_dataset_multi_hot(tmp_path: Path):
    paths = tiny_images(tmp_path, 3)
    samples = [(paths[0], (0, 2)), (paths[1], 1), (paths[2], [1, 2])]
    dataset = ImageDataset(samples, ["a", "b", "c"], to_tensor, multilabel=True)
    _, label = dataset[0]
    assert label.dtype == torch.float32 and label.tolist() == [1.0, 0.0, 1.0]
    images, labels = next(iter(DataLoader(dataset, batch_size=3)))
    assert images.shape == (3, 3, 4, 4)
    assert labels.shape == (3, 3) and labels.dtype == torch.float32
    assert labels.tolist() == [[1, 0, 1], [0, 1, 0], [0, 1, 1]]
    # single-label datasets keep returning class indices
    single = ImageDataset([(paths[0], 2), (paths[1], 0)], ["a", "b", "c"], to_tensor)
    assert single[0][1] == 2
    assert next(iter(DataLoader(single, batch_size=2)))[1].tolist() == [2, 0]
    with pytest.raises(DataError, match="label 3 is out of range for 3 classes"):
        ImageDataset([(paths[0], (0, 3))], ["a", "b", "c"], multilabel=True)
