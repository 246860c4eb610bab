"""Cosine classifier head and AM-Softmax loss: the mathematics, and the head on every architecture."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from clsengine.errors import UserError
from clsengine.losses import LOSSES, AMSoftmaxLoss, create_loss
from clsengine.models import create_model, list_models
from clsengine.models.heads import CosineLinear, am_softmax_scale, use_cosine_classifier


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def hand_cosine(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64)
    for i in range(x.shape[0]):
        for j in range(w.shape[0]):
            a, b = x[i].double(), w[j].double()
            out[i, j] = (a * b).sum() / (a.pow(2).sum().sqrt() * b.pow(2).sum().sqrt())
    return out


# CosineLinear

def test_cosine_linear_is_scaled_cosine_similarity():
    head = CosineLinear(6, 4, scale=7.5)
    x = torch.randn(3, 6)
    out = head(x)
    assert out.shape == (3, 4)
    torch.testing.assert_close(out.double(), 7.5 * hand_cosine(x, head.weight.detach()), atol=1e-5, rtol=1e-5)
    assert out.abs().max() <= 7.5 + 1e-5


def test_cosine_linear_bounds_and_input_scale_invariance():
    head = CosineLinear(8, 5, scale=4.0)
    x = torch.randn(16, 8) * 100
    out = head(x)
    assert out.min() >= -4.0 - 1e-5 and out.max() <= 4.0 + 1e-5
    torch.testing.assert_close(head(x * 0.01), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head(x * 37.0), out, atol=1e-5, rtol=1e-5)
    aligned = head(head.weight.detach()[:1] * 3.0)  # a feature along class 0's weight: cos = 1
    assert aligned[0, 0].item() == pytest.approx(4.0, abs=1e-5)


def test_cosine_linear_scale_is_a_buffer_and_no_bias():
    head = CosineLinear(3, 2, scale=5.0)
    state = head.state_dict()
    assert set(state) == {"weight", "scale"}
    assert state["scale"].item() == 5.0
    assert [name for name, _ in head.named_parameters()] == ["weight"]
    assert head.weight.shape == (2, 3)
    assert "scale=5" in repr(head) and "in_features=3" in repr(head)
    bound = 1 / math.sqrt(3)  # nn.Linear's kaiming-uniform(a=sqrt 5) bound is 1/sqrt(fan_in)
    assert head.weight.abs().max() <= bound
    with pytest.raises(UserError):
        CosineLinear(3, 2, scale=0.0)


def test_cosine_linear_scale_travels_with_state_dict():
    source, target = CosineLinear(3, 2, scale=9.0), CosineLinear(3, 2, scale=1.0)
    target.load_state_dict(source.state_dict())
    x = torch.randn(4, 3)
    torch.testing.assert_close(target(x), source(x))


def test_am_softmax_scale():
    assert am_softmax_scale(1) == 3.0
    assert am_softmax_scale(2) == 3.0
    assert am_softmax_scale(10) == pytest.approx(3.107, abs=1e-3)   # sqrt2 * ln 9 = 3.1073
    assert am_softmax_scale(10) == pytest.approx(math.sqrt(2) * math.log(9))
    assert am_softmax_scale(1000) == pytest.approx(math.sqrt(2) * math.log(999))
    assert am_softmax_scale(1000) == pytest.approx(9.767, abs=1e-3)
    assert am_softmax_scale(5) == 3.0  # sqrt2 * ln 4 = 1.96, floored


# AMSoftmaxLoss

def cosine_logits(batch: int, classes: int, scale: float) -> torch.Tensor:
    return scale * torch.empty(batch, classes).uniform_(-0.95, 0.95)


@pytest.mark.parametrize("margin_type", ["cos", "arc"])
def test_zero_margin_is_cross_entropy(margin_type):
    s = 6.0
    logits, target = cosine_logits(5, 4, s), torch.tensor([0, 3, 1, 1, 2])
    loss = AMSoftmaxLoss(s, margin=0.0, margin_type=margin_type)(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target), atol=1e-5, rtol=1e-5)


def test_cos_margin_reduces_only_the_target_logit():
    s, m = 10.0, 0.35
    logits = torch.tensor([[0.5, -0.2, 0.1], [0.9, 0.3, -0.7]]) * s
    target = torch.tensor([2, 0])
    expected = torch.tensor([[5.0, -2.0, 1.0 - 3.5], [9.0 - 3.5, 3.0, -7.0]])
    loss = AMSoftmaxLoss(s, margin=m)(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(expected, target))


def test_arc_margin_target_logit():
    s, m, c = 8.0, 0.5, 0.6
    logits = torch.tensor([[c * s, 0.1 * s, -0.4 * s]])
    target = torch.tensor([0])
    target_logit = s * math.cos(math.acos(c) + m)
    # cos(a + m) = cos a cos m - sin a sin m, with sin a = 0.8: 8 * (0.6 * 0.87758 - 0.8 * 0.47943) = 1.1441
    assert target_logit == pytest.approx(s * (c * math.cos(m) - 0.8 * math.sin(m)))
    assert target_logit == pytest.approx(1.1441, abs=1e-3)
    expected = torch.tensor([[target_logit, 0.1 * s, -0.4 * s]])
    loss = AMSoftmaxLoss(s, margin=m, margin_type="arc")(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(expected, target), atol=1e-5, rtol=1e-5)


def test_arc_margin_fallback_past_pi():
    s, m, c = 2.0, 0.5, -0.95  # acos(-0.95) = 2.82 > pi - 0.5
    logits, target = torch.tensor([[c * s, 0.0]]), torch.tensor([0])
    expected = torch.tensor([[s * (c - m * math.sin(m)), 0.0]])
    loss = AMSoftmaxLoss(s, margin=m, margin_type="arc")(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(expected, target), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("margin_type", ["cos", "arc"])
def test_arc_and_cos_target_logit_decreases_with_angle(margin_type):
    loss = AMSoftmaxLoss(1.0, margin=0.5, margin_type=margin_type)
    cos = torch.cos(torch.linspace(0, math.pi, 2001))
    penalised = loss._penalised(cos)
    assert (penalised[1:] <= penalised[:-1] + 1e-6).all()
    assert (penalised <= cos + 1e-6).all()


@pytest.mark.parametrize("margin_type", ["cos", "arc"])
def test_margin_increases_loss(margin_type):
    s = 5.0
    logits, target = cosine_logits(8, 6, s), torch.randint(0, 6, (8,))
    plain = AMSoftmaxLoss(s, margin=0.0, margin_type=margin_type)(logits, target)
    margin = AMSoftmaxLoss(s, margin=0.3, margin_type=margin_type)(logits, target)
    assert margin > plain + 1e-3


@pytest.mark.parametrize("margin_type", ["cos", "arc"])
def test_gradients_flow_through_cosine_head(margin_type):
    s = am_softmax_scale(10)
    head = CosineLinear(16, 10, scale=s)
    features = torch.randn(4, 16, requires_grad=True)
    loss = AMSoftmaxLoss(s, margin_type=margin_type)(head(features), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0


def test_arc_margin_no_nan_at_exact_plus_minus_one():
    s = 4.0
    logits = torch.tensor([[s, -s, 0.0], [-s, s, 0.0]], requires_grad=True)  # cos exactly +1 / -1
    target = torch.tensor([0, 0])
    loss = AMSoftmaxLoss(s, margin=0.5, margin_type="arc")(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


def test_label_smoothing_is_passed_through():
    s, m = 6.0, 0.35
    logits, target = cosine_logits(4, 5, s), torch.tensor([4, 0, 2, 2])
    modified = logits.clone()
    modified[torch.arange(4), target] -= s * m
    loss = AMSoftmaxLoss(s, margin=m, label_smoothing=0.2)(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(modified, target, label_smoothing=0.2))
    assert not torch.isclose(loss, AMSoftmaxLoss(s, margin=m)(logits, target))


def test_half_precision_logits():
    s = 6.0
    logits, target = cosine_logits(4, 3, s), torch.tensor([0, 1, 2, 0])
    loss = AMSoftmaxLoss(s, margin_type="arc")(logits.half(), target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, AMSoftmaxLoss(s, margin_type="arc")(logits.half().float(), target))


def test_invalid_arguments():
    with pytest.raises(UserError, match="margin type"):
        AMSoftmaxLoss(5.0, margin_type="sphere")
    with pytest.raises(UserError, match="margin"):
        AMSoftmaxLoss(5.0, margin=-0.1)
    with pytest.raises(UserError, match="scale"):
        AMSoftmaxLoss(0.0)


# create_loss

def test_create_loss():
    assert LOSSES == ("softmax", "am_softmax", "bce", "asl")
    assert type(create_loss("softmax")) is nn.CrossEntropyLoss
    assert create_loss("softmax", label_smoothing=0.1).label_smoothing == 0.1
    loss = create_loss("am_softmax", scale=7.0, margin=0.2, margin_type="arc", label_smoothing=0.1)
    assert isinstance(loss, AMSoftmaxLoss)
    assert (loss.scale, loss.margin, loss.margin_type, loss.label_smoothing) == (7.0, 0.2, "arc", 0.1)
    with pytest.raises(UserError, match="scale"):
        create_loss("am_softmax")
    with pytest.raises(UserError, match="unknown loss"):
        create_loss("focal")


# use_cosine_classifier

def linear_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in module.modules())


@pytest.mark.parametrize("dropout", [None, 0.2])
@pytest.mark.parametrize("arch", list_models())
def test_use_cosine_classifier_on_every_architecture(arch, dropout):
    model = create_model(arch, num_classes=5, dropout=dropout, small_input=True)
    head = getattr(model, model.head_name)
    old_linear = head if isinstance(head, nn.Linear) else [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    linears_before = linear_count(model)
    scale = am_softmax_scale(5)
    assert use_cosine_classifier(model, scale) is model
    cosines = [m for m in model.modules() if isinstance(m, CosineLinear)]
    assert len(cosines) == 1
    assert (cosines[0].in_features, cosines[0].out_features) == (old_linear.in_features, 5)
    assert all(m is not old_linear for m in model.modules())
    assert linear_count(model) == linears_before - 1
    assert any(m is cosines[0] for m in getattr(model, model.head_name).modules())
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5)
    assert out.abs().max() <= scale + 1e-4


def test_soft_targets_one_hot_equal_class_indices_and_mix_the_margin():
    """MixUp / CutMix give class probabilities: one-hot ones give the same loss as indices, and a 50/50 target
    penalises each of its two classes by half the margin."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    logits = torch.rand(5, 4) * 6 - 3
    target = torch.tensor([0, 1, 2, 3, 1])
    for margin_type in ("cos", "arc"):
        loss = AMSoftmaxLoss(scale=6.0, margin=0.3, margin_type=margin_type, label_smoothing=0.1)
        assert torch.allclose(loss(logits, target), loss(logits, F.one_hot(target, 4).float()), atol=1e-6)
    loss = AMSoftmaxLoss(scale=6.0, margin=0.3)
    soft = torch.zeros(1, 4)
    soft[0, 0] = soft[0, 2] = 0.5
    expected = F.cross_entropy(logits[:1] - 6.0 * 0.3 * soft, soft)
    assert torch.allclose(loss(logits[:1], soft), expected, atol=1e-6)
