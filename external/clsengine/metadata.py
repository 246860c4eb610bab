"""What an exported file says about itself: labels, task, input size, preprocessing and how it was exported.

Stored in the ONNX file's metadata_props and in the IR's rt_info["model_info"]; written by clsengine.export,
read by clsengine.inference and every consumer that needs no Python at all (keys and values are strings).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from .errors import UserError
from .ov_core import openvino_core

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
SALIENCY_NAME = "saliency"  # last output of an explain=True export: (N, classes, h, w) saliency maps in [0, 1]
# Outputs of a calibrated export (after the logits): calibrated probabilities (N, classes), and the answer:
# single-label "unknown" (N,), 1.0 where the image is rejected; multi-label "predicted" (N, classes), 1.0 where a
# label reaches its own threshold.
PROBS_NAME = "probabilities"
UNKNOWN_NAME = "unknown"
PREDICTED_NAME = "predicted"
CHANNEL_ORDERS = ("RGB", "BGR")
RT_SECTION = "model_info"
MULTICLASS = {"type": "multiclass"}
# Written by export; "exporter" is "dynamo" or "torchscript", "exporter_note" why the fallback was used.
_KEYS = ("labels", "input_size", "mean", "std", "input_order", "model_type", "task", "exporter", "exporter_note",
         "opset", "saliency", "calibration")


def check_order(order: str) -> str:
    order = str(order).upper()
    if order not in CHANNEL_ORDERS:
        raise UserError(f"channel order must be one of {', '.join(CHANNEL_ORDERS)}, got '{order}'")
    return order


def check_task(task: Mapping[str, Any] | None) -> dict[str, Any]:
    """How outputs are read: {"type": "multiclass"} (softmax, argmax) or {"type": "multilabel", "threshold": t,
    "background_label": name or None} (sigmoid per label)."""
    task = dict(task or MULTICLASS)
    if task.get("type") not in ("multiclass", "multilabel"):
        raise UserError(f"task type must be multiclass or multilabel, got {task.get('type')!r}")
    return task


def check_input_size(input_size: tuple[int, int]) -> tuple[int, int]:
    if len(input_size) != 2 or min(int(v) for v in input_size) < 1:
        raise UserError(f"input_size must be (H, W) with positive values, got {input_size}")
    return int(input_size[0]), int(input_size[1])


def build_metadata(input_size: tuple[int, int], mean, std, input_order: str, labels: list[str],
                   task: Mapping[str, Any] | None = None, saliency: Mapping[str, str] | None = None,
                   calibration: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The string key/values every exported file carries (the exporter keys are added by export_onnx);
    `saliency` ({"output": name, "method": ...}) for a file with a saliency output, `calibration`
    (clsengine.calibration.Calibration.to_dict()) for one with calibrated outputs."""
    h, w = check_input_size(input_size)
    return {
        **({"saliency": json.dumps(dict(saliency))} if saliency else {}),
        **({"calibration": json.dumps(dict(calibration))} if calibration else {}),
        "task": json.dumps(check_task(task)),
        "labels": json.dumps([str(label) for label in labels]),
        "input_size": f"{h},{w}",
        "mean": json.dumps([float(v) for v in mean]),
        "std": json.dumps([float(v) for v in std]),
        "input_order": check_order(input_order),
        "model_type": "classification",
    }


def read_metadata(path: str | os.PathLike) -> dict:
    """Labels, input size, preprocessing and exporter stored by export_onnx / export_openvino (.onnx or .xml)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    if path.suffix not in (".onnx", ".xml"):
        raise UserError(f"{path}: expected a .onnx or .xml file")
    try:
        raw = read_raw_metadata(path)
    except Exception as exc:  # protobuf, XML and OpenVINO errors: the file is not a model of that format
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot read {path} as {'ONNX' if path.suffix == '.onnx' else 'OpenVINO IR'}: "
                        f"{message}") from None
    if "labels" not in raw:
        raise UserError(f"{path} has no export metadata (was it written by clsengine.export?)")
    return _parse(raw)


def read_raw_metadata(path: Path) -> dict[str, str]:
    if path.suffix == ".onnx":
        import onnx

        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    ov_model = openvino_core().read_model(str(path))
    return {key: ov_model.get_rt_info([RT_SECTION, key]).astype(str)
            for key in _KEYS if ov_model.has_rt_info([RT_SECTION, key])}


def _parse(raw: dict[str, str]) -> dict:
    h, w = (int(v) for v in raw["input_size"].split(","))
    return {
        "labels": list(json.loads(raw["labels"])),
        "input_size": (h, w),
        "mean": [float(v) for v in json.loads(raw["mean"])],
        "std": [float(v) for v in json.loads(raw["std"])],
        "input_order": raw["input_order"],
        "model_type": raw.get("model_type", "classification"),
        "task": check_task(json.loads(raw["task"]) if "task" in raw else None),
        "exporter": raw.get("exporter", "torchscript"),   # files written before the exporter was recorded
        "exporter_note": raw.get("exporter_note", ""),
        "opset": int(raw["opset"]) if raw.get("opset", "").isdigit() else None,
        # {"output": name, "method": "recipro_cam"} for a file exported with explain=True, else None
        "saliency": json.loads(raw["saliency"]) if "saliency" in raw else None,
        # clsengine.calibration.Calibration as a dict for a file with calibrated outputs, else None
        "calibration": json.loads(raw["calibration"]) if "calibration" in raw else None,
    }


__all__ = ["INPUT_NAME", "MULTICLASS", "OUTPUT_NAME", "PREDICTED_NAME", "PROBS_NAME", "SALIENCY_NAME", "UNKNOWN_NAME", "build_metadata", "check_input_size", "check_order",
           "check_task", "read_metadata"]
