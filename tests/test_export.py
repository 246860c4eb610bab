"""ONNX / OpenVINO IR export: parity with PyTorch, in-graph preprocessing, metadata, shapes, precision."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import openvino as ov
import pytest
import torch
import torch.nn as nn

from clsengine.errors import UserError
from clsengine.export import (DeployModel, export_onnx, export_openvino, onnx_to_openvino, parity_check,
                              read_metadata)
from clsengine.models.factory import IMAGENET_MEAN, IMAGENET_STD, create_model
from clsengine.ov_core import openvino_core

# One per architecture family the templates use.
ARCHS = ["mobilenet_v3_small", "mobilenet_v2", "resnet18", "regnet_x_800mf", "efficientnet_b0", "efficientnet_b0_npu"]
SIZE = (32, 32)
LABELS = ["cat", "dog, large", "чай"]  # a comma and non-ASCII text must survive the metadata round trip
KW = dict(input_size=SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD, labels=LABELS)
PRE = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, input_order="BGR", train_order="RGB")


def warmed_model(arch: str, **options) -> nn.Module:
    """Random-init model whose BN running statistics come from a few train-mode batches, so eval-mode
    outputs are spread out (not the degenerate ones fresh running stats give), then put in eval mode."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=3, **options)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average: a few batches give usable statistics
    model.train()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        # The test images' own distribution and batches of 32: with 8 random normals, EfficientNet's
        # 1x1-spatial late stages get statistics that blow its eval logits up to ~1e3.
        for seed in range(100, 103):
            model((images(32, seed=seed) - mean) / std)
    return model.eval()


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, *SIZE), generator=generator).float()


@pytest.fixture(scope="module")
def exported(module_dir) -> dict:
    """arch -> (model, onnx path, FP32 IR path), exported once for the module. export_openvino is export_onnx
    then onnx_to_openvino: the first architecture goes through it whole, the others convert the ONNX file
    just written (the same two steps, one graph export instead of two)."""
    root = module_dir
    out = {}
    for arch in ARCHS:
        model = warmed_model(arch)
        onnx_path = export_onnx(model, root / f"{arch}.onnx", **KW)
        xml_path = (export_openvino(model, root / f"{arch}.xml", **KW) if arch == ARCHS[0]
                    else onnx_to_openvino(onnx_path, root / f"{arch}.xml"))
        out[arch] = (model, onnx_path, xml_path)
    return out


def _run(path: Path, batch: torch.Tensor) -> np.ndarray:
    core = openvino_core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled(batch.numpy())[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_parity(exported, arch):
    model, onnx_path, xml_path = exported[arch]
    report = parity_check(model, [onnx_path, xml_path], images(), **PRE)
    for path in (onnx_path, xml_path):
        entry = report[str(path)]
        assert entry["ok"], entry
        assert entry["top1_agreement"] == 1.0
        with torch.no_grad():
            scale = max(1.0, float(DeployModel(model, IMAGENET_MEAN, IMAGENET_STD)(images()).abs().max()))
        assert entry["max_abs_diff"] < 1e-3 * scale
        assert entry["exporter"] == "dynamo"  # the current exporter works for every architecture family
        assert read_metadata(path)["exporter"] == "dynamo" and read_metadata(path)["opset"] == 18
    # The ONNX file is checked by onnxruntime, independently of OpenVINO (which converted the IR from it).
    assert set(report[str(onnx_path)]["runtimes"]) == {"onnxruntime", "openvino"}
    assert set(report[str(xml_path)]["runtimes"]) == {"openvino"}
    assert all(r["ok"] and r["top1_agreement"] == 1.0 for r in report[str(onnx_path)]["runtimes"].values())


def test_outputs_not_degenerate(exported):
    """The warmed models give distinct logits per image, so parity actually tests something."""
    for model, _, _ in exported.values():
        with torch.no_grad():
            logits = DeployModel(model, IMAGENET_MEAN, IMAGENET_STD)(images(8))
        assert logits.std(dim=0).min() > 1e-3


def test_deploy_model_flips_bgr_and_normalises(exported):
    model = exported["resnet18"][0]
    rgb = images(3)
    bgr = rgb.flip(1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model((rgb - mean) / std)
        from_bgr = DeployModel(model, IMAGENET_MEAN, IMAGENET_STD, "BGR", "RGB")(bgr)
        from_rgb = DeployModel(model, IMAGENET_MEAN, IMAGENET_STD, "RGB", "RGB")(rgb)
        wrong = DeployModel(model, IMAGENET_MEAN, IMAGENET_STD, "RGB", "RGB")(bgr)
    torch.testing.assert_close(from_bgr, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_rgb, expected, rtol=1e-5, atol=1e-5)
    assert (wrong - expected).abs().max() > 1e-3  # the flip matters for these images
    # A BGR-trained network fed RGB images: mean/std are given in train order.
    bgr_mean, bgr_std = IMAGENET_MEAN[::-1], IMAGENET_STD[::-1]
    with torch.no_grad():
        expected_bgr = model((bgr - torch.tensor(bgr_mean).view(1, 3, 1, 1)) / torch.tensor(bgr_std).view(1, 3, 1, 1))
        got = DeployModel(model, bgr_mean, bgr_std, "RGB", "BGR")(rgb)
    torch.testing.assert_close(got, expected_bgr, rtol=1e-5, atol=1e-5)


def test_exported_graph_does_the_preprocessing(exported):
    """The exported file, fed BGR 0..255, matches the model on manually normalised RGB."""
    model, onnx_path, xml_path = exported["mobilenet_v3_small"]
    rgb = images(2)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model((rgb - mean) / std).numpy()
    for path in (onnx_path, xml_path):
        np.testing.assert_allclose(_run(path, rgb.flip(1)), expected, rtol=1e-4, atol=1e-4)


def test_cosine_head_exports_with_parity(tmp_path):
    model = warmed_model("resnet18", head="cosine")
    assert any(type(m).__name__ == "CosineLinear" for m in model.modules())
    files = [export_onnx(model, tmp_path / "cos.onnx", **KW), export_openvino(model, tmp_path / "cos.xml", **KW)]
    report = parity_check(model, files, images(), **PRE)
    assert all(entry["ok"] for entry in report.values()), report


@pytest.mark.parametrize("which", [1, 2])
def test_metadata_round_trip(exported, which):
    path = exported["resnet18"][which]
    meta = read_metadata(path)
    assert meta["labels"] == LABELS
    assert meta["input_size"] == SIZE
    assert meta["mean"] == pytest.approx(list(IMAGENET_MEAN))
    assert meta["std"] == pytest.approx(list(IMAGENET_STD))
    assert meta["input_order"] == "BGR"
    assert meta["model_type"] == "classification"


def test_onnx_io_names_and_dynamic_batch(exported):
    _, onnx_path, xml_path = exported["mobilenet_v3_small"]
    graph = onnx.load(str(onnx_path)).graph
    assert [i.name for i in graph.input] == ["image"]
    assert [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    ir = openvino_core().read_model(str(xml_path))
    assert ir.input(0).get_partial_shape()[0].is_dynamic
    for path in (onnx_path, xml_path):
        assert _run(path, images(1)).shape == (1, 3)
        assert _run(path, images(4)).shape == (4, 3)


def test_static_batch_ir(exported, tmp_path):
    model = exported["mobilenet_v3_small"][0]
    xml_path = export_openvino(model, tmp_path / "static.xml", static_batch=True, **KW)
    shape = openvino_core().read_model(str(xml_path)).input(0).get_partial_shape()
    assert shape.is_static
    assert shape.to_shape() == ov.Shape([1, 3, *SIZE])
    onnx_path = export_onnx(model, tmp_path / "static.onnx", static_batch=True, **KW)
    dims = onnx.load(str(onnx_path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, *SIZE]
    report = parity_check(model, [xml_path, onnx_path], images(), **PRE)  # runs images one at a time
    assert all(entry["ok"] for entry in report.values()), report


def test_fp16_ir_parity(exported, tmp_path):
    model = exported["resnet18"][0]
    xml_path = export_openvino(model, tmp_path / "fp16.xml", precision="FP16", **KW)
    assert 'element_type="f16"' in xml_path.read_text()
    assert xml_path.with_suffix(".bin").stat().st_size < exported["resnet18"][2].with_suffix(".bin").stat().st_size * 0.6
    entry = parity_check(model, [xml_path], images(), **PRE)[str(xml_path)]
    assert entry["ok"], entry
    assert entry["tolerance"] >= 2e-2  # the looser FP16 rule applied (2e-2 * max(1, max |logit|))
    assert read_metadata(xml_path)["labels"] == LABELS


@pytest.mark.parametrize("opset", [13, 17])
def test_opset_honoured(exported, tmp_path, opset):
    model = exported["mobilenet_v3_small"][0]
    path = export_onnx(model, tmp_path / f"op{opset}.onnx", opset=opset, **KW)
    versions = {o.domain: o.version for o in onnx.load(str(path)).opset_import}
    assert versions.get("", versions.get("ai.onnx")) == opset
    assert read_metadata(path)["opset"] == opset
    assert parity_check(model, [path], images(2), **PRE)[str(path)]["ok"]


def test_caller_model_unchanged(tmp_path):
    model = warmed_model("mobilenet_v3_small").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx", **KW)
    export_openvino(model, tmp_path / "m.xml", **KW)
    parity_check(model, [tmp_path / "m.onnx"], images(2), **PRE)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).device.type == "cpu"
    model.eval()
    export_onnx(model, tmp_path / "m2.onnx", **KW)
    assert not model.training


def test_parity_reports_failures_without_raising(exported, tmp_path):
    model = exported["resnet18"][0]
    other_model, other_onnx, _ = exported["mobilenet_v3_small"]
    missing = tmp_path / "missing.onnx"
    report = parity_check(model, [other_onnx, missing], images(), **PRE)
    assert report[str(other_onnx)]["ok"] is False
    assert report[str(other_onnx)]["max_abs_diff"] > 1e-3
    assert report[str(missing)]["ok"] is False and "error" in report[str(missing)]


def test_bad_arguments_are_user_errors(exported, tmp_path):
    model = exported["resnet18"][0]
    with pytest.raises(UserError, match="labels"):
        export_onnx(model, tmp_path / "x.onnx", **{**KW, "labels": ["only", "two"]})
    with pytest.raises(UserError, match="channel order"):
        export_onnx(model, tmp_path / "x.onnx", input_order="BRG", **KW)
    with pytest.raises(UserError, match="precision"):
        export_openvino(model, tmp_path / "x.xml", precision="INT8", **KW)


class DataDependent(nn.Module):
    """A branch on a tensor value: torch.export cannot capture it, TorchScript tracing records one path."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        if pooled.sum() > -1e9:
            return self.fc(pooled)
        return -self.fc(pooled)


def test_torchscript_fallback_is_logged_and_recorded(tmp_path, caplog):
    model = DataDependent().eval()
    with caplog.at_level("WARNING", logger="clsengine.export"):
        path = export_onnx(model, tmp_path / "m.onnx", **KW)
    meta = read_metadata(path)
    assert meta["exporter"] == "torchscript" and meta["opset"] == 17
    assert "torch.export-based exporter failed" in meta["exporter_note"]
    assert "torch.export-based exporter failed" in caplog.text
    xml = export_openvino(model, tmp_path / "m.xml", **KW)
    assert read_metadata(xml)["exporter_note"] == meta["exporter_note"]  # the IR says how its ONNX was made
    report = parity_check(model, [path, xml], images(2), **PRE)
    assert all(entry["ok"] and entry["exporter"] == "torchscript" for entry in report.values())
    with pytest.raises(UserError, match="torch.export-based ONNX exporter failed"):
        export_onnx(model, tmp_path / "strict.onnx", exporter="dynamo", **KW)
    assert not (tmp_path / "strict.onnx").exists()


def test_torchscript_exporter_on_request(exported, tmp_path):
    model = exported["mobilenet_v3_small"][0]
    path = export_onnx(model, tmp_path / "ts.onnx", exporter="torchscript", **KW)
    meta = read_metadata(path)
    assert meta["exporter"] == "torchscript" and meta["exporter_note"] == "TorchScript exporter chosen explicitly"
    assert parity_check(model, [path], images(2), **PRE)[str(path)]["ok"]
    with pytest.raises(UserError, match="unknown ONNX exporter 'jit'"):
        export_onnx(model, tmp_path / "x.onnx", exporter="jit", **KW)


def test_parity_judges_each_runtime(exported):
    """Each runtime is judged on its own and the file's entry sums them up."""
    model, onnx_path, _ = exported["resnet18"]
    other_model = exported["mobilenet_v3_small"][0]
    report = parity_check(other_model, [onnx_path], images(), **PRE)[str(onnx_path)]
    assert not report["ok"] and not any(r["ok"] for r in report["runtimes"].values())
    assert report["max_abs_diff"] == max(r["max_abs_diff"] for r in report["runtimes"].values())
