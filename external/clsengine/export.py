"""Export a trained classifier to ONNX and OpenVINO IR for deployment, with parity checks.

The exported model takes the image as the deployment side has it (float values 0..255, channel order
`input_order`, usually BGR from OpenCV), so no caller has to re-implement the training preprocessing:
channel reordering and normalisation are folded into the graph as constants.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from .errors import UserError
from .fileio import atomic_output, atomic_outputs
from .saliency import METHOD as SALIENCY_METHOD
from .saliency import check_explainable, logits_and_saliency

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
SALIENCY_NAME = "saliency"  # second output of an explain=True export: (N, classes, h, w) Recipro-CAM maps in [0, 1]
_ORDERS = ("RGB", "BGR")
_RT_SECTION = "model_info"
# parity_check tolerances, relative to max(1, max |logit|): FP32 graphs only reorder float arithmetic;
# FP16-compressed weights lose ~3 decimal digits, so they get a looser bound.
FP16_RTOL = 2e-2
# Saliency maps (0..1) of an explain=True export, compared on each image's top-1 class: min-max scaling
# magnifies the float noise of maps whose scores barely vary, so the bound is absolute and loose.
SALIENCY_ATOL = 1e-2
FP16_SALIENCY_ATOL = 5e-2
# int8 IR against the fake-quantized PyTorch model: rounding and saturation of real int8 kernels (notably on
# CPUs without VNNI) move logits by up to ~10% of their range and can flip near-tied images.
INT8_RTOL = 0.2
INT8_MIN_AGREEMENT = 0.9


class DeployModel(nn.Module):
    """Image 0..255 in `input_order` -> logits: channel reorder and (x - mean) / std run inside the graph,
    as constant buffers, so the exported file carries the training preprocessing with it.

    With `explain`, it returns (logits, saliency): the Recipro-CAM maps (N, classes, h, w) in [0, 1] beside
    the same logits (clsengine.saliency; sigmoid scores when `multilabel`), so a deployed model explains
    itself."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float],
                 input_order: str = "BGR", train_order: str = "RGB", explain: bool = False,
                 multilabel: bool = False) -> None:
        super().__init__()
        input_order, train_order = _check_order(input_order), _check_order(train_order)
        if len(mean) != 3 or len(std) != 3:
            raise UserError(f"mean and std need 3 values each, got mean={list(mean)} std={list(std)}")
        if any(float(s) <= 0 for s in std):
            raise UserError(f"std values must be positive, got {list(std)}")
        self.model = model
        self.input_order = input_order
        self.train_order = train_order
        self.explain = bool(explain)
        if self.explain:
            check_explainable(model)
        self.multilabel = bool(multilabel)
        # Index i of the network's channel order taken from the input's channel order.
        perm = [input_order.index(c) for c in train_order]
        self.flip = perm != [0, 1, 2]
        self.register_buffer("perm", torch.tensor(perm, dtype=torch.long), persistent=False)
        self.register_buffer("mean", torch.tensor([float(v) for v in mean]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", (1.0 / torch.tensor([float(v) for v in std], dtype=torch.float64))
                             .float().view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = image.float()
        if self.flip:
            x = x.index_select(1, self.perm)
        x = (x - self.mean) * self.inv_std
        if self.explain:
            return logits_and_saliency(self.model, x, multilabel=self.multilabel)
        return self.model(x)


def _check_order(order: str) -> str:
    order = str(order).upper()
    if order not in _ORDERS:
        raise UserError(f"channel order must be one of {', '.join(_ORDERS)}, got '{order}'")
    return order


@contextmanager
def _eval_cpu_copy(model: nn.Module) -> Iterator[nn.Module]:
    """An eval-mode CPU copy, so exporting never changes the caller's model (mode, device, weights)."""
    clone = copy.deepcopy(model).to("cpu").eval()
    try:
        yield clone
    finally:
        del clone


MULTICLASS = {"type": "multiclass"}


def _check_task(task: Mapping[str, Any] | None) -> dict[str, Any]:
    """How outputs are read: {"type": "multiclass"} (softmax, argmax) or {"type": "multilabel", "threshold": t,
    "background_label": name or None} (sigmoid per label)."""
    task = dict(task or MULTICLASS)
    if task.get("type") not in ("multiclass", "multilabel"):
        raise UserError(f"task type must be multiclass or multilabel, got {task.get('type')!r}")
    return task


def _metadata(input_size: tuple[int, int], mean, std, input_order: str, labels: list[str],
              task: Mapping[str, Any] | None = None, explain: bool = False) -> dict[str, str]:
    h, w = (int(v) for v in input_size)
    saliency = {"saliency": json.dumps({"output": SALIENCY_NAME, "method": SALIENCY_METHOD})} if explain else {}
    return {
        "task": json.dumps(_check_task(task)),
        "labels": json.dumps([str(label) for label in labels]),
        "input_size": f"{h},{w}",
        "mean": json.dumps([float(v) for v in mean]),
        "std": json.dumps([float(v) for v in std]),
        "input_order": _check_order(input_order),
        "model_type": "classification",
        **saliency,
    }


def _check_input_size(input_size: tuple[int, int]) -> tuple[int, int]:
    if len(input_size) != 2 or min(int(v) for v in input_size) < 1:
        raise UserError(f"input_size must be (H, W) with positive values, got {input_size}")
    return int(input_size[0]), int(input_size[1])


def _check_outputs(logits: torch.Tensor, labels: list[str]) -> None:
    """Catch a label list that does not match the classifier before writing a misleading file."""
    if logits.dim() != 2:
        raise UserError(f"the model must return (N, classes) logits, got shape {tuple(logits.shape)}")
    if len(labels) != logits.shape[1]:
        raise UserError(f"{len(labels)} labels given but the classifier has {logits.shape[1]} outputs")


def export_onnx(model: nn.Module, path: str | os.PathLike, *, input_size: tuple[int, int], mean, std,
                input_order: str = "BGR", train_order: str = "RGB", labels: list[str], opset: int = 17,
                static_batch: bool = False, task: Mapping[str, Any] | None = None, explain: bool = False) -> Path:
    """Write `model` wrapped in DeployModel to ONNX, with labels, task and preprocessing in metadata_props.

    `explain` adds the saliency maps as a second output, SALIENCY_NAME (DeployModel), and says so in the
    metadata ("saliency"); the logits output is the same either way.

    Uses the TorchScript-based exporter (`dynamo=False`): the torch.export-based one needs the
    `onnxscript` package, which this environment lacks; the legacy one still works in torch 2.15
    (with a deprecation warning, silenced here). Batch is dynamic unless `static_batch`.
    """
    import onnx

    h, w = _check_input_size(input_size)
    meta = _metadata(input_size, mean, std, input_order, labels, task, explain)
    outputs = [OUTPUT_NAME, SALIENCY_NAME] if explain else [OUTPUT_NAME]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _eval_cpu_copy(model) as clone:
        deploy = DeployModel(clone, mean, std, input_order, train_order, explain,
                             _check_task(task)["type"] == "multilabel").eval()
        example = torch.full((1, 3, h, w), 127.0)
        with torch.no_grad():
            out = deploy(example)
        _check_outputs(out[0] if explain else out, labels)
        dynamic_axes = None if static_batch else {name: {0: "batch"} for name in [INPUT_NAME, *outputs]}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            with atomic_output(path) as tmp:
                torch.onnx.export(deploy, (example,), str(tmp), dynamo=False, input_names=[INPUT_NAME],
                                  output_names=outputs, opset_version=int(opset),
                                  dynamic_axes=dynamic_axes, do_constant_folding=True)
                onnx_model = onnx.load(str(tmp))
                del onnx_model.metadata_props[:]
                onnx.helper.set_model_props(onnx_model, meta)
                onnx.checker.check_model(onnx_model)
                onnx.save(onnx_model, str(tmp))
    return path


def export_openvino(model: nn.Module, xml_path: str | os.PathLike, *, input_size: tuple[int, int], mean, std,
                    input_order: str = "BGR", train_order: str = "RGB", labels: list[str], opset: int = 17,
                    static_batch: bool = False, precision: str = "FP32", task: Mapping[str, Any] | None = None,
                    explain: bool = False) -> Path:
    """Write OpenVINO IR (.xml + .bin) with the same metadata in rt_info["model_info"] (and, with `explain`,
    the same saliency output as export_onnx).

    Converted from an ONNX file written by export_onnx (in a temporary folder): that way both
    deployment files come from one traced graph, and OpenVINO's ONNX frontend is a stable path, whereas
    its PyTorch frontend depends on torch tracing/torch.export details that change between versions.
    """
    import openvino as ov

    precision = str(precision).upper()
    if precision not in ("FP32", "FP16"):
        raise UserError(f"precision must be FP32 or FP16, got '{precision}'")
    xml_path = Path(xml_path)
    if xml_path.suffix != ".xml":
        raise UserError(f"OpenVINO IR path must end in .xml, got {xml_path}")
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx", input_size=input_size, mean=mean, std=std,
                                input_order=input_order, train_order=train_order, labels=labels,
                                opset=opset, static_batch=static_batch, task=task, explain=explain)
        # Saved before the folder goes: the converted model may still map the ONNX file's weights.
        ov_model = ov.convert_model(str(onnx_path))
        if static_batch:
            h, w = _check_input_size(input_size)
            ov_model.reshape({ov_model.input(0).get_any_name(): ov.PartialShape([1, 3, h, w])})
        for key, value in _metadata(input_size, mean, std, input_order, labels, task, explain).items():
            ov_model.set_rt_info(value, [_RT_SECTION, key])
        with atomic_outputs(xml_path.with_suffix(".bin"), xml_path) as (_, tmp_xml):  # .bin, then .xml
            ov.save_model(ov_model, str(tmp_xml), compress_to_fp16=(precision == "FP16"))
        del ov_model
    return xml_path


def read_metadata(path: str | os.PathLike) -> dict:
    """Labels, input size and preprocessing stored by export_onnx / export_openvino (.onnx or .xml)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    if path.suffix not in (".onnx", ".xml"):
        raise UserError(f"{path}: expected a .onnx or .xml file")
    try:
        raw = _read_raw_metadata(path)
    except Exception as exc:  # protobuf, XML and OpenVINO errors: the file is not a model of that format
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot read {path} as {'ONNX' if path.suffix == '.onnx' else 'OpenVINO IR'}: "
                        f"{message}") from None
    if "labels" not in raw:
        raise UserError(f"{path} has no export metadata (was it written by clsengine.export?)")
    return _parse_metadata(raw)


def _read_raw_metadata(path: Path) -> dict[str, str]:
    if path.suffix == ".onnx":
        import onnx

        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    import openvino as ov

    ov_model = ov.Core().read_model(str(path))
    raw = {}
    if ov_model.has_rt_info([_RT_SECTION]):
        for key in ("labels", "input_size", "mean", "std", "input_order", "model_type", "task", "saliency"):
            if ov_model.has_rt_info([_RT_SECTION, key]):
                raw[key] = ov_model.get_rt_info([_RT_SECTION, key]).astype(str)
    return raw


def _parse_metadata(raw: dict[str, str]) -> dict:
    h, w = (int(v) for v in raw["input_size"].split(","))
    return {
        "labels": list(json.loads(raw["labels"])),
        "input_size": (h, w),
        "mean": [float(v) for v in json.loads(raw["mean"])],
        "std": [float(v) for v in json.loads(raw["std"])],
        "input_order": raw["input_order"],
        "model_type": raw.get("model_type", "classification"),
        "task": _check_task(json.loads(raw["task"]) if "task" in raw else None),
        # {"output": name, "method": "recipro_cam"} for a file exported with explain=True, else None
        "saliency": json.loads(raw["saliency"]) if "saliency" in raw else None,
    }


def _is_fp16_ir(path: Path) -> bool:
    """True when the IR stores compressed FP16 weights (save_model(compress_to_fp16=True))."""
    if path.suffix != ".xml":
        return False
    text = path.read_text(encoding="utf-8", errors="replace")
    return 'element_type="f16"' in text


def parity_check(model: nn.Module, exported: list[str | os.PathLike], images: torch.Tensor, *, mean, std,
                 input_order: str = "BGR", train_order: str = "RGB", atol: float = 1e-3,
                 min_top1_agreement: float = 1.0) -> dict:
    """Compare exported files against PyTorch on the same images; report, never raise.

    Per file: `max_abs_diff` of logits, `top1_agreement` (fraction of images with the same argmax),
    `tolerance` and `ok`. Rule: ok = max_abs_diff <= rtol * max(1, max |reference logit|) and
    top1_agreement >= min_top1_agreement, with rtol = `atol` for FP32 files and max(atol, 2e-2) for FP16 IR
    (the tolerance scales with the logits so large-logit models are not judged more strictly). An int8
    model is compared with its fake-quantized PyTorch twin, which real int8 kernels only approximate:
    callers pass INT8_RTOL and INT8_MIN_AGREEMENT then.
    Each file is compiled by OpenVINO on CPU with f32 inference precision (OpenVINO reads .onnx directly).
    A file that cannot be run is reported with ok=False and its `error`. A file with a saliency output
    (explain=True) is also judged on it: see _saliency_parity.
    """
    from .inference import ExportedClassifier  # here, not at the top: inference builds on this module

    images = images.detach().to("cpu", torch.float32)
    with _eval_cpu_copy(model) as clone, torch.no_grad():
        reference = DeployModel(clone, mean, std, input_order, train_order).eval()(images).numpy()
    scale = max(1.0, float(np.abs(reference).max()))
    ref_top1 = reference.argmax(axis=1)
    report: dict = {}
    for file in exported:
        file = Path(file)
        rtol = max(atol, FP16_RTOL) if _is_fp16_ir(file) else atol
        entry: dict = {"tolerance": rtol * scale}
        try:
            runner = ExportedClassifier(file)
            logits, maps = runner.explain(images.numpy()) if runner.saliency else (runner(images.numpy()), None)
        except Exception as exc:  # report, never raise: the caller decides what a failure means
            entry.update(max_abs_diff=float("inf"), top1_agreement=0.0, ok=False, error=f"{type(exc).__name__}: {exc}")
            report[str(file)] = entry
            continue
        if logits.shape != reference.shape:
            entry.update(max_abs_diff=float("inf"), top1_agreement=0.0, ok=False,
                         error=f"output shape {logits.shape} != reference {reference.shape}")
        else:
            diff = float(np.abs(logits - reference).max())
            agreement = float((logits.argmax(axis=1) == ref_top1).mean())
            entry.update(max_abs_diff=diff, top1_agreement=agreement,
                         ok=bool(diff <= entry["tolerance"] and agreement >= min_top1_agreement))
            if maps is not None:
                entry.update(_saliency_parity(model, images, maps, ref_top1, runner.task["type"] == "multilabel",
                                              FP16_SALIENCY_ATOL if _is_fp16_ir(file) else SALIENCY_ATOL,
                                              mean=mean, std=std, input_order=input_order, train_order=train_order))
                entry["ok"] = entry["ok"] and entry["saliency_ok"]
        report[str(file)] = entry
    return report


def _saliency_parity(model: nn.Module, images: torch.Tensor, maps: np.ndarray, top1: np.ndarray, multilabel: bool,
                     atol: float, **preprocessing) -> dict:
    """`saliency_max_abs_diff` of an exported file's saliency maps from PyTorch's, on each image's top-1 class
    (the map one looks at; the maps of classes scored ~0 everywhere are min-max scaled float noise), with
    `saliency_tolerance` and `saliency_ok`."""
    with _eval_cpu_copy(model) as clone, torch.no_grad():
        _, expected = DeployModel(clone, **preprocessing, explain=True, multilabel=multilabel).eval()(images)
    expected = expected.numpy()
    if maps.shape != expected.shape:
        return {"saliency_ok": False, "saliency_error": f"saliency shape {maps.shape} != reference {expected.shape}"}
    rows = np.arange(len(images))
    diff = float(np.abs(maps[rows, top1] - expected[rows, top1]).max())
    return {"saliency_max_abs_diff": diff, "saliency_tolerance": atol, "saliency_ok": diff <= atol}


__all__ = ["MULTICLASS", "SALIENCY_NAME", "DeployModel", "export_onnx", "export_openvino", "parity_check",
           "read_metadata"]
