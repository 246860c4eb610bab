"""Calibration of a trained checkpoint (the template's `calibration` section): train.py runs it on the validation
set after training, eval.py --calibrate on the data it is given. The result is stored in the checkpoint, from
where eval.py, predict.py and export.py (into the exported graph) apply it."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from clsengine import data as datasets
from clsengine.calibration import Calibration, auroc, calibrate, quality, reliability
from clsengine.checkpoint import load_checkpoint, save_checkpoint
from clsengine.compression import is_quantized
from clsengine.errors import UserError
from clsengine.metrics import multilabel_report
from clsengine.plots import plot_reliability

from .classifier import Classifier, load_classifier
from .template import Template


def fit(t: Template, logits: torch.Tensor, labels: torch.Tensor) -> Calibration:
    """The template's calibration of a model from its validation logits."""
    c = t.calibration
    reject = c.rejection_score != "none"
    return calibrate(logits, labels, t.task.type == "multilabel", keep=c.keep if reject else None,
                     rejection_score=c.rejection_score if reject else "max_prob",
                     target_precision=c.target_precision, default_threshold=t.task.threshold)


def describe(calibration: Calibration) -> str:
    """One log line: what was fitted and what it changed."""
    before, after = calibration.fitted_on["before"], calibration.fitted_on["after"]
    t = calibration.temperature
    temperature = (f"temperature {t:.3g}" if isinstance(t, float)
                   else f"per-class temperatures {min(t):.3g}..{max(t):.3g}")
    line = (f"Calibration on {calibration.fitted_on['images']} images: {temperature}; NLL {before['nll']:.4f} -> "
            f"{after['nll']:.4f}, ECE {before['ece']:.2f} -> {after['ece']:.2f} %")
    if calibration.thresholds:
        line += f"; per-class thresholds {min(calibration.thresholds):.3g}..{max(calibration.thresholds):.3g}"
    if calibration.reject_below is not None:
        line += (f"; \"unknown\" below {calibration.rejection_score} {calibration.reject_below:.4g} (keeps "
                 f"{100 * calibration.keep:g}% of the correct answers)")
    return line


def calibrate_checkpoint(path: Path, scan: datasets.DatasetScan, template_path: str, overrides: dict,
                         logger: logging.Logger) -> Calibration:
    """Fit the calibration of the checkpoint at `path` on `scan`'s images and store it there (atomically)."""
    checkpoint = load_checkpoint(path)
    if "config" not in checkpoint:
        raise UserError(f"{path} holds bare weights; calibrate a checkpoint written by train.py")
    if is_quantized(checkpoint):
        raise UserError(f"{path} is an int8 checkpoint: calibrate the float checkpoint (compress.py carries its "
                        f"calibration over)")
    model = load_classifier(path, template_path=template_path, overrides=overrides, classes=scan.classes,
                            classes_source=f"data ({scan.source})", checkpoint=checkpoint)
    logits, labels = model.predict(scan.samples, "calibration")
    calibration = fit(model.template, logits, labels)
    checkpoint["calibration"] = calibration.to_dict()
    save_checkpoint(checkpoint, path)
    logger.info(describe(calibration))
    return calibration


def calibration_report(model: Classifier, logits: torch.Tensor, labels: torch.Tensor, png: Path,
                       ood_logits: torch.Tensor | None = None) -> tuple[dict[str, Any], str]:
    """metrics.yaml's "calibration" block of a calibrated model on evaluation data, and its summary line:
    NLL, Brier and ECE before (raw scores) and after calibration with a reliability diagram (`png`); for a
    single-label model the share answered "unknown" and the accuracy on the rest, and with `ood_logits`
    (images of no training class) the AUROC of the rejection score and the share of them rejected; for a
    multi-label model macro/micro F1 at the global threshold and at the per-class thresholds."""
    c, multilabel = model.calibration, model.multilabel
    raw, calibrated = model.probabilities(logits, calibrated=False), model.probabilities(logits)
    curves = {"before": reliability(raw, labels, multilabel)[1], "after": reliability(calibrated, labels, multilabel)[1]}
    block: dict[str, Any] = {"temperature": c.temperature, "before": quality(raw, labels, multilabel),
                             "after": quality(calibrated, labels, multilabel),
                             "reliability_png": str(plot_reliability(curves, png, "Reliability (validation-fitted "
                                                                                   "temperature)").resolve())}
    line = (f"calibrated: NLL {block['before']['nll']:.4f} -> {block['after']['nll']:.4f}, ECE "
            f"{block['before']['ece']:.2f} -> {block['after']['ece']:.2f} %")
    if multilabel:
        block["thresholds"] = _threshold_comparison(model, logits, labels)
        line += (f"; macro F1 {block['thresholds']['global']['macro_f1']:.2f} at {model.threshold:g} -> "
                 f"{block['thresholds']['per_class']['macro_f1']:.2f} at per-class thresholds")
    elif c.reject_below is not None:
        block["unknown"] = _rejection_report(c, logits, labels, ood_logits)
        u = block["unknown"]
        line += (f"; unknown: {u['rejected_percent']:.1f}% of the images, top-1 on the rest "
                 f"{u['accuracy_accepted']:.2f} (all: {u['accuracy_all']:.2f})")
        if "ood" in u:
            line += (f"; out-of-distribution images: AUROC {u['ood']['auroc']:.3f}, "
                     f"{u['ood']['rejected_percent']:.1f}% answered unknown")
    return block, line


def _rejection_report(c: Calibration, logits: torch.Tensor, labels: torch.Tensor,
                      ood_logits: torch.Tensor | None) -> dict[str, Any]:
    rejected = c.unknown(logits)
    correct = logits.argmax(dim=1) == labels.long()
    accepted = ~rejected
    report: dict[str, Any] = {
        "score": c.rejection_score, "threshold": c.reject_below, "keep": c.keep,
        "rejected_percent": round(100.0 * float(rejected.float().mean()), 2),
        "accuracy_all": round(100.0 * float(correct.float().mean()), 2),
        "accuracy_accepted": round(100.0 * float(correct[accepted].float().mean()), 2) if accepted.any() else None,
    }
    if ood_logits is not None and len(ood_logits):
        report["ood"] = {"images": int(len(ood_logits)),
                         "auroc": round(auroc(c.rejection(logits), c.rejection(ood_logits)), 4),
                         "rejected_percent": round(100.0 * float(c.unknown(ood_logits).float().mean()), 2)}
    return report


def _threshold_comparison(model: Classifier, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    c = model.calibration
    rows = {}
    for name, threshold, scores in (("global", model.threshold, logits),   # what an uncalibrated model does
                                    ("per_class", model.thresholds, c.scaled(logits))):
        r = multilabel_report(scores, labels, model.classes, threshold, model.background_index)
        rows[name] = {"macro_f1": round(r["macro"]["f1"], 2), "micro_f1": round(r["micro"]["f1"], 2),
                      "per_class_f1": {k: round(v["f1"], 2) for k, v in r["per_class"].items()},
                      "threshold": r["threshold"]}
    return rows


__all__ = ["calibrate_checkpoint", "calibration_report", "describe", "fit"]
