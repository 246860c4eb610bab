"""NPU-friendly models and templates: EfficientNet without squeeze-and-excitation and with ReLU, the
person-vs-background 56x32 template, and its static-shape OpenVINO export."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm
from torchvision.ops import SqueezeExcitation

from clsengine.export import export_openvino, parity_check, read_metadata
from clsengine.models import CosineLinear, create_model, default_cfg, list_models, load_pretrained
from clsengine.ov_core import openvino_core
from conftest import TEMPLATES_DIR
from workbench.factories import build_model
from workbench.template import TemplateError, load_template

NPU_ARCHS = ["efficientnet_b0_npu", "efficientnet_b1_npu", "efficientnet_b2_npu", "efficientnet_b3_npu"]
NPU_TEMPLATES = NPU_ARCHS + ["person_vs_background_56x32"]
PERSON = TEMPLATES_DIR / "person_vs_background_56x32" / "template.yaml"


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def se_keys(model: nn.Module) -> set[str]:
    """State-dict keys that belong to squeeze-and-excitation blocks."""
    prefixes = [f"{name}." for name, m in model.named_modules() if isinstance(m, SqueezeExcitation)]
    return {k for k in model.state_dict() if any(k.startswith(p) for p in prefixes)}


# --------------------------------------------------------------------------------- EfficientNet NPU variants
@pytest.mark.parametrize("arch", NPU_ARCHS)
def test_npu_variant_has_no_se_and_no_silu(arch):
    plain_arch = arch.removesuffix("_npu")
    torch.manual_seed(0)
    model = create_model(arch, 10).eval()
    plain = create_model(plain_arch, 10)
    assert count(model, SqueezeExcitation) == 0 and count(model, nn.SiLU) == 0
    assert count(plain, SqueezeExcitation) > 0, "the plain model has SE blocks to remove"
    # Every SiLU became a ReLU; the SE blocks' own SiLUs went with them.
    assert count(model, nn.ReLU) == count(plain, nn.SiLU) - count(plain, SqueezeExcitation) > 0
    # Same network otherwise: the state dict is the plain one without the SE tensors, shapes included.
    plain_state, own_state = plain.state_dict(), model.state_dict()
    assert set(own_state) == set(plain_state) - se_keys(plain)
    assert all(own_state[k].shape == plain_state[k].shape for k in own_state)
    assert default_cfg(arch) == default_cfg(plain_arch)
    assert model.arch_name == arch and arch in list_models()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_npu_variant_input_sizes():
    assert [default_cfg(a)["input_size"] for a in NPU_ARCHS] == [(224, 224), (240, 240), (260, 260), (300, 300)]


def test_npu_variant_options():
    model = create_model("efficientnet_b0_npu", 5, head="cosine", small_input=True, dropout=0.3, bn_momentum=0.05)
    assert isinstance(model.classifier[-1], CosineLinear)
    assert model.classifier[0].p == 0.3
    assert model.features[0][0].stride == (1, 1), "small_input: stem stride 1"
    assert all(m.target_momentum == 0.05 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert count(model, SqueezeExcitation) == 0 and count(model, nn.SiLU) == 0
    model.eval()
    with torch.no_grad():
        features = model.features(torch.randn(2, 3, 32, 32))
        out = model(torch.randn(2, 3, 32, 32))
    assert features.shape[-2:] == (2, 2), "stem stride 1: 16x downsampling"
    assert out.shape == (2, 5)
    assert out.abs().max() <= model.classifier[-1].scale + 1e-4, "cosine logits are bounded by the scale"


def test_torchvision_weights_load_into_npu_variant(tmp_path):
    torch.manual_seed(0)
    source = tvm.efficientnet_b0(weights=None, num_classes=10)
    path = tmp_path / "efficientnet_b0.pth"
    torch.save(source.state_dict(), path)
    state = source.state_dict()

    torch.manual_seed(1)
    model = create_model("efficientnet_b0_npu", 10)
    left = load_pretrained(model, path).missing
    assert left == [], "every tensor of the NPU model exists in the plain one"
    own = model.state_dict()
    unused = set(state) - set(own)
    assert unused == se_keys(source) and len(unused) == 4 * 16, "only the SE tensors (16 blocks) stay unused"
    assert all(torch.equal(own[k], state[k]) for k in own)

    # Another class count: only the classifier stays at its initialisation; create_model loads the same way.
    other = create_model("efficientnet_b0_npu", 3)
    assert load_pretrained(other, path).missing == ["classifier.1.bias", "classifier.1.weight"]
    loaded = create_model("efficientnet_b0_npu", 10, pretrained=path)
    assert torch.equal(loaded.features[1][0].block[0][0].weight, state["features.1.0.block.0.0.weight"])


# ------------------------------------------------------------------------------------------------ templates
@pytest.mark.parametrize("name", NPU_TEMPLATES)
def test_npu_templates(name):
    t = load_template(TEMPLATES_DIR / name / "template.yaml")
    assert t.output_format.static_shape is True
    assert "NPU" in t.inference_target
    if name in NPU_ARCHS:
        assert t.model.architecture == name
        assert tuple(t.input.size) == default_cfg(name)["input_size"]


def test_static_shape_defaults_to_false_and_is_validated():
    plain = load_template(TEMPLATES_DIR / "mobilenet_v2" / "template.yaml")
    assert plain.output_format.static_shape is False
    assert load_template(PERSON, {"output_format.static_shape": False}).output_format.static_shape is False
    with pytest.raises(TemplateError, match=r"output_format\.static_shape.*true or false"):
        load_template(PERSON, {"output_format.static_shape": "yes"})


def test_person_template_model():
    t = load_template(PERSON)
    assert (t.model.architecture, t.model.width_mult, t.model.small_input) == ("mobilenet_v2", 0.75, True)
    assert tuple(t.input.size) == (56, 32)
    model = build_model(t, 2).eval()
    assert model.features[0][0].out_channels == 24, "32 stem channels x 3/4"
    with torch.no_grad():
        x = torch.randn(2, 3, 56, 32)
        assert model.features(x).shape[-2:] == (4, 2), "stem stride 1 keeps a 4x2 final feature map"
        out = model(x)
    assert out.shape == (2, 2) and torch.isfinite(out).all()


def warmed(model: nn.Module, size: tuple[int, int]) -> nn.Module:
    """Give fresh BatchNorm layers running statistics from a few batches, so eval logits are not degenerate."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, *size))
    return model.eval()


def test_person_static_openvino_export(tmp_path):
    t = load_template(PERSON)
    size = (int(t.input.size[0]), int(t.input.size[1]))
    torch.manual_seed(0)
    model = warmed(build_model(t, 2), size)
    pre = dict(mean=t.input.mean, std=t.input.std, input_order=t.output_format.openvino_input_format,
               train_order=t.input.channel_order)
    xml = export_openvino(model, tmp_path / "person.xml", input_size=size, labels=["background", "person"],
                          static_batch=True, **pre)

    ov_model = openvino_core().read_model(str(xml))
    shape = ov_model.input(0).get_partial_shape()
    assert shape.is_static and [d.get_length() for d in shape] == [1, 3, 56, 32]
    assert read_metadata(xml)["input_size"] == (56, 32)

    images = torch.randint(0, 256, (4, 3, *size), generator=torch.Generator().manual_seed(3)).float()
    report = parity_check(model, [xml], images, **pre)[str(xml)]
    assert report["ok"], report
    assert report["top1_agreement"] == 1.0 and report["max_abs_diff"] <= report["tolerance"]
