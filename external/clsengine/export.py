"""Export a trained classifier to ONNX and OpenVINO IR for deployment, with parity checks.

The exported model takes the image as the deployment side has it (float values 0..255, channel order
`input_order`, usually BGR from OpenCV), so no caller has to re-implement the training preprocessing:
channel reordering and normalisation are folded into the graph as constants.
"""
from __future__ import annotations

import copy
import io
import logging
import math
import os
import re
import tempfile
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from .compression import has_quantizers, strip_quantizers
from .errors import UserError
from .fileio import atomic_output, atomic_outputs
from .inference import ExportedClassifier, runtimes_for
from .calibration import Calibration, rejection_of_scaled, scale_logits
from .metadata import (INPUT_NAME, MULTICLASS, OUTPUT_NAME, PREDICTED_NAME, PROBS_NAME, RT_SECTION, SALIENCY_NAME,
                       UNKNOWN_NAME, build_metadata, check_input_size, check_order, check_task, read_metadata,
                       read_raw_metadata)
from .saliency import METHOD as SALIENCY_METHOD
from .saliency import check_explainable, logits_and_saliency

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

    With `calibration` (clsengine.calibration), the calibrated probabilities and the answer follow the logits
    (output_names): softmax(logits / T) and "unknown" (1.0 below the rejection threshold) for a single-label
    model, per-class sigmoid(logits / T_c) and "predicted" (1.0 at or above each class's threshold) for a
    multi-label one, so that any runtime gets the scores and the decision the checkpoint gives.
    With `explain`, the Recipro-CAM maps (N, classes, h, w) in [0, 1] come last (clsengine.saliency; sigmoid
    scores when `multilabel`), so a deployed model explains itself."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float],
                 input_order: str = "BGR", train_order: str = "RGB", explain: bool = False,
                 multilabel: bool = False, calibration: Calibration | None = None,
                 threshold: float = 0.5) -> None:
        super().__init__()
        input_order, train_order = check_order(input_order), check_order(train_order)
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
        self.calibration = calibration
        if calibration is not None:
            t = torch.as_tensor(calibration.temperature, dtype=torch.float32)
            self.register_buffer("inv_t", (1.0 / t).reshape(1, -1), persistent=False)   # (1, 1) or (1, classes)
            self.register_buffer("bias", torch.as_tensor(calibration.bias or 0.0, dtype=torch.float32).reshape(1, -1),
                                 persistent=False)
            cut = (calibration.thresholds if multilabel and calibration.thresholds else
                   threshold if multilabel else calibration.reject_below)
            self.register_buffer("cut", torch.as_tensor(-math.inf if cut is None else cut, dtype=torch.float32)
                                 .reshape(1, -1), persistent=False)

    @property
    def output_names(self) -> list[str]:
        calibrated = [PROBS_NAME, PREDICTED_NAME if self.multilabel else UNKNOWN_NAME] if self.calibration else []
        return [OUTPUT_NAME, *calibrated, *([SALIENCY_NAME] if self.explain else [])]

    def calibrated(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(calibrated probabilities, the answer: "unknown" per image or "predicted" per class)."""
        if self.multilabel:
            probs = torch.sigmoid(scale_logits(logits, self.inv_t, self.bias))
            return probs, (probs >= self.cut).float()
        scaled = scale_logits(logits, self.inv_t)
        score = rejection_of_scaled(scaled, self.inv_t, self.calibration.rejection_score or "max_prob")
        return scaled.softmax(dim=1), (score < self.cut[:, 0]).float()

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x = image.float()
        if self.flip:
            x = x.index_select(1, self.perm)
        x = (x - self.mean) * self.inv_std
        if self.explain:
            logits, maps = logits_and_saliency(self.model, x, multilabel=self.multilabel)
        else:
            logits, maps = self.model(x), None
        outputs = (logits, *(self.calibrated(logits) if self.calibration is not None else ()),
                   *((maps,) if maps is not None else ()))
        return outputs if len(outputs) > 1 else logits


@contextmanager
def _eval_cpu_copy(model: nn.Module) -> Iterator[nn.Module]:
    """An eval-mode CPU copy, so exporting never changes the caller's model (mode, device, weights)."""
    clone = copy.deepcopy(model).to("cpu").eval()
    try:
        yield clone
    finally:
        del clone


def _check_outputs(logits: torch.Tensor, labels: list[str]) -> None:
    """Catch a label list that does not match the classifier before writing a misleading file."""
    if logits.dim() != 2:
        raise UserError(f"the model must return (N, classes) logits, got shape {tuple(logits.shape)}")
    if len(labels) != logits.shape[1]:
        raise UserError(f"{len(labels)} labels given but the classifier has {logits.shape[1]} outputs")


EXPORTERS = ("auto", "dynamo", "torchscript")
# Opset used when none is asked for: the torch.export-based exporter writes opset 18 natively (asking it for a
# lower one runs onnx's version converter); the TorchScript exporter's tested default is 17.
DEFAULT_OPSET = {"dynamo": 18, "torchscript": 17}
_log = logging.getLogger(__name__)


def _first_line(exc: BaseException) -> str:
    """The exception's type and first line, without the terminal colour codes torch.onnx puts in."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


@contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """torch.export prints whole graphs when it fails; the fallback reports the failure in one line."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == "torch" or name.startswith("torch.")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _dynamo_export(deploy: nn.Module, example: torch.Tensor, file: Path, opset: int, static_batch: bool,
                   outputs: list[str]) -> None:
    """torch.onnx.export(dynamo=True): torch.export captures the graph, onnxscript translates it."""
    dynamic = None if static_batch else {INPUT_NAME: {0: torch.export.Dim("batch", min=1)}}
    program = torch.onnx.export(deploy, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=outputs,
                                opset_version=opset, dynamic_shapes=dynamic, verbose=False)
    # Where onnx's version converter cannot go down to `opset`, torch keeps its own opset with a warning only.
    written = {o.domain: o.version for o in program.model_proto.opset_import}.get("", None)
    if written != opset:
        raise RuntimeError(f"it wrote opset {written} where {opset} was asked for (its version converter failed)")
    program.save(str(file))


def _torchscript_export(deploy: nn.Module, example: torch.Tensor, file: Path, opset: int, static_batch: bool,
                        outputs: list[str]) -> None:
    """The legacy TorchScript-tracing exporter (deprecated in torch, still the one NNCF's int8 graphs need)."""
    dynamic_axes = None if static_batch else {name: {0: "batch"} for name in [INPUT_NAME, *outputs]}
    torch.onnx.export(deploy, (example,), str(file), dynamo=False, input_names=[INPUT_NAME],
                      output_names=outputs, opset_version=opset, dynamic_axes=dynamic_axes,
                      do_constant_folding=True)


def _write_graph(deploy: nn.Module, example: torch.Tensor, file: Path, opset: int | None, static_batch: bool,
                 exporter: str, int8: bool, outputs: list[str]) -> dict[str, str]:
    """Export with `exporter`; "auto" tries the torch.export-based exporter and falls back to TorchScript with
    the reason logged (int8 models go straight to TorchScript: torch.export cannot capture fake-quantize ops,
    whose scales it sees as data-dependent values). Returns the exporter keys of the file's metadata."""
    note = ""
    if exporter == "auto" and int8:
        note = "int8 model: torch.export cannot capture its fake-quantize ops; used the TorchScript exporter"
        _log.info("ONNX export: %s", note)
    elif exporter in ("auto", "dynamo"):
        used_opset = DEFAULT_OPSET["dynamo"] if opset is None else int(opset)
        try:
            with _quiet_torch_logs():
                _dynamo_export(deploy, example, file, used_opset, static_batch, outputs)
            return {"exporter": "dynamo", "exporter_note": "", "opset": str(used_opset)}
        except Exception as exc:  # torch.export and onnxscript raise many types; any of them means: fall back
            if exporter == "dynamo":
                raise UserError(f"the torch.export-based ONNX exporter failed: {_first_line(exc)} "
                                f"(exporter auto or torchscript uses the TorchScript exporter instead)") from None
            note = f"the torch.export-based exporter failed ({_first_line(exc)[:300]}); used the TorchScript exporter"
            _log.warning("ONNX export: %s", note)
    else:
        note = "TorchScript exporter chosen explicitly"
    used_opset = DEFAULT_OPSET["torchscript"] if opset is None else int(opset)
    _torchscript_export(deploy, example, file, used_opset, static_batch, outputs)
    return {"exporter": "torchscript", "exporter_note": note, "opset": str(used_opset)}


def export_onnx(model: nn.Module, path: str | os.PathLike, *, input_size: tuple[int, int], mean, std,
                input_order: str = "BGR", train_order: str = "RGB", labels: list[str], opset: int | None = None,
                static_batch: bool = False, task: Mapping[str, Any] | None = None, exporter: str = "auto",
                explain: bool = False, calibration: Calibration | None = None) -> Path:
    """Write `model` wrapped in DeployModel to ONNX, with labels, task, preprocessing and the exporter used in
    metadata_props.

    `calibration` adds the calibrated probabilities and the answer as outputs after the logits, and the
    calibration to the metadata; `explain` adds the saliency maps as the last output, SALIENCY_NAME
    (DeployModel), and says so in the metadata ("saliency"); the logits output is the same either way.

    exporter: "dynamo" (torch.onnx.export(dynamo=True), the current exporter), "torchscript" (the legacy one),
    or "auto": dynamo, and TorchScript where dynamo fails (NNCF's int8 models), with the reason in the log and
    in the metadata ("exporter_note"). Batch is dynamic unless `static_batch`; opset None = the exporter's own.
    """
    import onnx

    if exporter not in EXPORTERS:
        raise UserError(f"unknown ONNX exporter '{exporter}': expected one of {', '.join(EXPORTERS)}")
    h, w = check_input_size(input_size)
    task = check_task(task)
    meta = build_metadata(input_size, mean, std, input_order, labels, task,
                          {"output": SALIENCY_NAME, "method": SALIENCY_METHOD} if explain else None,
                          calibration.to_dict() if calibration is not None else None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _eval_cpu_copy(model) as clone:
        int8 = has_quantizers(clone)
        if int8:  # standard QuantizeLinear/DequantizeLinear nodes instead of NNCF's own op
            clone = strip_quantizers(clone, torch.zeros(1, 3, h, w)).eval()
        deploy = DeployModel(clone, mean, std, input_order, train_order, explain, task["type"] == "multilabel",
                             calibration, float(task.get("threshold", 0.5))).eval()
        outputs = deploy.output_names
        example = torch.full((1, 3, h, w), 127.0)
        with torch.no_grad():
            out = deploy(example)
        _check_outputs(out[0] if len(outputs) > 1 else out, labels)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            with atomic_output(path) as tmp:
                meta.update(_write_graph(deploy, example, Path(tmp), opset, static_batch, exporter, int8, outputs))
                onnx_model = onnx.load(str(tmp))
                del onnx_model.metadata_props[:]
                onnx.helper.set_model_props(onnx_model, meta)
                onnx.checker.check_model(onnx_model)
                onnx.save(onnx_model, str(tmp))
    return path


def export_openvino(model: nn.Module, xml_path: str | os.PathLike, *, input_size: tuple[int, int], mean, std,
                    input_order: str = "BGR", train_order: str = "RGB", labels: list[str], opset: int | None = None,
                    static_batch: bool = False, precision: str = "FP32", task: Mapping[str, Any] | None = None,
                    exporter: str = "auto", explain: bool = False, calibration: Calibration | None = None) -> Path:
    """Write OpenVINO IR (.xml + .bin) with the same metadata in rt_info["model_info"] (and, with `explain`,
    the same saliency output as export_onnx).

    Converted from an ONNX file written by export_onnx (in a temporary folder): that way both
    deployment files come from one exported graph, and OpenVINO's ONNX frontend is a stable path, whereas
    its PyTorch frontend depends on torch tracing/torch.export details that change between versions.
    A static batch is part of the ONNX graph already, so the IR inherits it.
    """
    _check_ir_args(xml_path, precision)  # before minutes of export
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx", input_size=input_size, mean=mean, std=std,
                                input_order=input_order, train_order=train_order, labels=labels,
                                opset=opset, static_batch=static_batch, task=task, exporter=exporter,
                                explain=explain, calibration=calibration)
        return onnx_to_openvino(onnx_path, xml_path, precision=precision)


def _check_ir_args(xml_path: str | os.PathLike, precision: str) -> tuple[Path, str]:
    precision = str(precision).upper()
    if precision not in ("FP32", "FP16"):
        raise UserError(f"precision must be FP32 or FP16, got '{precision}'")
    xml_path = Path(xml_path)
    if xml_path.suffix != ".xml":
        raise UserError(f"OpenVINO IR path must end in .xml, got {xml_path}")
    return xml_path, precision


def onnx_to_openvino(onnx_path: str | os.PathLike, xml_path: str | os.PathLike, *, precision: str = "FP32") -> Path:
    """Convert an ONNX file written by export_onnx to OpenVINO IR, carrying its metadata over (export.py uses
    this when it writes both formats, so the IR comes from the very file it ships beside)."""
    import openvino as ov

    xml_path, precision = _check_ir_args(xml_path, precision)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov_model = ov.convert_model(str(onnx_path))
    meta = read_raw_metadata(Path(onnx_path))
    for key, value in meta.items():
        ov_model.set_rt_info(value, [RT_SECTION, key])
    with atomic_outputs(xml_path.with_suffix(".bin"), xml_path) as (_, tmp_xml):  # .bin, then .xml
        ov.save_model(ov_model, str(tmp_xml), compress_to_fp16=(precision == "FP16"))
    del ov_model  # before the caller's temporary ONNX file goes: the converted model may map its weights
    return xml_path


def _is_fp16_ir(path: Path) -> bool:
    """True when the IR stores compressed FP16 weights (save_model(compress_to_fp16=True))."""
    if path.suffix != ".xml":
        return False
    text = path.read_text(encoding="utf-8", errors="replace")
    return 'element_type="f16"' in text


def _runs(file: Path, devices: Sequence[str]) -> list[tuple[str, str]]:
    """(runtime, device) pairs a file is checked in: onnxruntime on CPU, OpenVINO on each device."""
    return [(runtime, device) for runtime in runtimes_for(file)
            for device in (["CPU"] if runtime == "onnxruntime" else list(devices) or ["CPU"])]


def _compare(logits: np.ndarray, reference: np.ndarray, tolerance: float, min_top1_agreement: float) -> dict:
    if logits.shape != reference.shape:
        return dict(max_abs_diff=float("inf"), top1_agreement=0.0, ok=False,
                    error=f"output shape {logits.shape} != reference {reference.shape}")
    diff = float(np.abs(logits - reference).max())
    agreement = float((logits.argmax(axis=1) == reference.argmax(axis=1)).mean())
    return dict(max_abs_diff=diff, top1_agreement=agreement,
                ok=bool(diff <= tolerance and agreement >= min_top1_agreement))


def parity_check(model: nn.Module, exported: list[str | os.PathLike], images: torch.Tensor, *, mean, std,
                 input_order: str = "BGR", train_order: str = "RGB", atol: float = 1e-3,
                 min_top1_agreement: float = 1.0, devices: Sequence[str] = ("CPU",)) -> dict:
    """Compare exported files against PyTorch on the same images, in every runtime that runs them; report,
    never raise.

    An ONNX file is run by onnxruntime (CPU) and by OpenVINO (which reads .onnx directly), an IR by OpenVINO;
    OpenVINO on each of `devices` (CPU at f32; results named "openvino" on CPU, "openvino:GPU" elsewhere,
    judged with the FP16 tolerance, as accelerators compute in f16 by default). Per file and runtime (entry["runtimes"][name]): `max_abs_diff` of logits, `top1_agreement`
    (fraction of images with the same argmax) and `ok`; the file's own entry sums them up (ok only when every
    runtime is, the largest difference, the lowest agreement) and names the exporter that wrote it.
    Rule: ok = max_abs_diff <= rtol * max(1, max |reference logit|) and top1_agreement >= min_top1_agreement,
    with rtol = `atol` for FP32 files and max(atol, 2e-2) for FP16 IR (the tolerance scales with the logits
    so large-logit models are not judged more strictly). An int8 model is compared with its fake-quantized
    PyTorch twin, which real int8 kernels only approximate: callers pass INT8_RTOL and INT8_MIN_AGREEMENT
    then. A file or runtime that cannot run is reported with ok=False and its `error`. A file with a saliency
    output (explain=True) is also judged on it, in each runtime: see _saliency_parity.
    """
    images = images.detach().to("cpu", torch.float32)
    with _eval_cpu_copy(model) as clone, torch.no_grad():
        reference = DeployModel(clone, mean, std, input_order, train_order).eval()(images).numpy()
    scale = max(1.0, float(np.abs(reference).max()))
    report: dict = {}
    for file in exported:
        file = Path(file)
        rtol = max(atol, FP16_RTOL) if _is_fp16_ir(file) else atol
        entry: dict = {"tolerance": rtol * scale}
        try:
            meta = read_metadata(file)
            entry.update(exporter=meta["exporter"], exporter_note=meta["exporter_note"])
        except UserError as exc:
            entry.update(exporter="unknown", error=str(exc))
        runs: dict = {}
        for runtime, device in _runs(file, devices):
            name = runtime if device == "CPU" else f"{runtime}:{device}"
            tolerance = entry["tolerance"] if device == "CPU" else max(rtol, FP16_RTOL) * scale
            try:
                runner = ExportedClassifier(file, device=device, runtime=runtime)
                logits, maps = runner.explain(images.numpy()) if runner.saliency else (runner(images.numpy()), None)
            except Exception as exc:  # report, never raise: the caller decides what a failure means
                runs[name] = dict(max_abs_diff=float("inf"), top1_agreement=0.0, ok=False, error=_first_line(exc))
                continue
            runs[name] = _compare(logits, reference, tolerance, min_top1_agreement)
            if runner.calibration is not None:
                runs[name].update(_calibration_parity(runner, images, reference, tolerance / scale))
                runs[name]["ok"] = runs[name]["ok"] and runs[name]["probabilities_ok"]
            if maps is not None:
                runs[name].update(_saliency_parity(
                    model, images, maps, reference.argmax(axis=1), runner.task["type"] == "multilabel",
                    FP16_SALIENCY_ATOL if _is_fp16_ir(file) or device != "CPU" else SALIENCY_ATOL,
                    mean=mean, std=std, input_order=input_order, train_order=train_order))
                runs[name]["ok"] = runs[name]["ok"] and runs[name]["saliency_ok"]
        entry.update(max_abs_diff=max(r["max_abs_diff"] for r in runs.values()),
                     top1_agreement=min(r["top1_agreement"] for r in runs.values()),
                     ok=all(r["ok"] for r in runs.values()) and "error" not in entry, runtimes=runs)
        errors = [f"{name}: {r['error']}" for name, r in runs.items() if "error" in r]
        if errors and "error" not in entry:
            entry["error"] = "; ".join(errors)
        report[str(file)] = entry
    return report


def _calibration_parity(runner: ExportedClassifier, images: torch.Tensor, reference: np.ndarray,
                        rtol: float) -> dict:
    """`probabilities_max_abs_diff` of the file's calibrated probabilities from those of PyTorch's logits under
    the same calibration (its metadata's, written from the checkpoint's), with `probabilities_tolerance`
    (the logits' relative tolerance, in probability units) and `answer_agreement` (the share of images whose
    "unknown" or "predicted" answer is the same); `probabilities_ok`."""
    multilabel = runner.task["type"] == "multilabel"
    try:
        probs, answer = runner.calibrated(images.numpy())
    except Exception as exc:  # report, never raise
        return {"probabilities_ok": False, "probabilities_error": _first_line(exc)}
    expected_logits = torch.from_numpy(reference)
    expected = runner.calibration.probabilities(expected_logits, multilabel).numpy()
    if multilabel:
        cut = np.asarray(runner.calibration.thresholds or runner.task.get("threshold", 0.5), dtype=np.float32)
        expected_answer = (expected >= cut).astype(np.float32)
        agreement = float((answer == expected_answer).all(axis=1).mean())
    else:
        expected_answer = runner.calibration.unknown(expected_logits).numpy().astype(np.float32)
        agreement = float((answer.reshape(-1) == expected_answer).mean())
    diff = float(np.abs(probs - expected).max()) if probs.shape == expected.shape else float("inf")
    tolerance = max(1e-4, min(0.5, rtol))
    return {"probabilities_max_abs_diff": diff, "probabilities_tolerance": tolerance, "answer_agreement": agreement,
            "probabilities_ok": diff <= tolerance}


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


__all__ = ["DEFAULT_OPSET", "EXPORTERS", "MULTICLASS", "SALIENCY_NAME", "DeployModel", "export_onnx", "export_openvino", "onnx_to_openvino",
           "parity_check", "read_metadata"]
