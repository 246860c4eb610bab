"""Prediction files and their end-to-end evaluation against a ground-truth JSON.

Formats (those of Kneron's classification tools, so their evaluation scripts and ours read each other's):
- one JSON per image: {"img_path": path, "0_0": [[score, label], ...]}, best first;
- ground truth: one JSON object {image_path: label, ...};
- class-id file: a JSON list of class names, or an object {"0": name, ...} or {name: 0, ...}.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .data.annotations import read_class_names  # re-exported: clsengine.predictions.read_class_names
from .errors import UserError
from .fileio import atomic_output, load_json, write_text
from .metrics import confusion_matrix, meaningful_ks, precision_recall_f1

PRED_KEY = "0_0"
CLASSES_FILE = "classes.json"
UNKNOWN_LABEL = "unknown"   # summary.csv's answer for an image a calibrated model rejects
SUMMARY_FILE = "summary.csv"


def top_k(probs: np.ndarray, classes: list[str], k: int) -> list[list]:
    """[[score, label], ...] of the k best classes of one probability vector, best first."""
    k = max(1, min(int(k), len(classes)))
    order = np.argsort(-probs, kind="stable")[:k]
    return [[round(float(probs[i]), 6), classes[i]] for i in order]


def above_threshold(probs: np.ndarray, classes: list[str], threshold: float | Sequence[float]) -> list[list]:
    """[[score, label], ...] of every label whose probability reaches `threshold` (multi-label; one for all, or
    one per class), best first."""
    order = np.argsort(-probs, kind="stable")
    cut = np.broadcast_to(np.asarray(threshold, dtype=np.float64), probs.shape)
    return [[round(float(probs[i]), 6), classes[i]] for i in order if probs[i] >= cut[i]]


def prediction_file(out_dir: Path, image: str, base: Path, suffix: str = ".json") -> Path:
    """Where the JSON (or another file, `suffix`) of `image` goes: its path under `base` + suffix, so that
    images with the same name in different folders do not overwrite each other."""
    relative = Path(image).resolve().relative_to(base)
    return out_dir / relative.with_name(relative.name + suffix)


def mirror_base(images: list[str], root: str | os.PathLike | None = None) -> Path:
    """The folder whose tree per-image output files mirror: `root` when it is a folder holding every image,
    else the images' deepest common folder."""
    parents = [str(Path(image).resolve().parent) for image in images]
    base = Path(root).resolve() if root is not None and Path(root).is_dir() else Path(os.path.commonpath(parents))
    if not all(Path(p).is_relative_to(base) for p in parents):
        base = Path(os.path.commonpath(parents))
    return base


def write_predictions(out_dir: str | os.PathLike, images: list[str], probs: np.ndarray, classes: list[str],
                      k: int, root: str | os.PathLike | None = None, threshold: float | Sequence[float] | None = None,
                      unknown: Sequence[bool] | None = None) -> Path:
    """One prediction JSON per image, plus summary.csv (top-1 per image) and classes.json in `out_dir`.

    With `threshold` (multi-label models; one, or one per class) each JSON lists every label whose probability
    reaches it, possibly none, and is marked "multilabel": true; summary.csv then holds all of them,
    ';'-separated. With `unknown` (a calibrated single-label model's rejections) each JSON says "unknown":
    true or false, its top-k scores unchanged, and summary.csv's label is "unknown" for a rejected image.
    """
    import csv

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = mirror_base(images, root)
    with atomic_output(out_dir / SUMMARY_FILE) as tmp, open(tmp, "w", newline="", encoding="utf-8") as summary:
        writer = csv.writer(summary)
        writer.writerow(["img_path", "label", "score"] if threshold is None else ["img_path", "labels", "scores"])
        for n, (image, p) in enumerate(zip(images, probs)):
            path = prediction_file(out_dir, image, base)
            path.parent.mkdir(parents=True, exist_ok=True)
            if threshold is None:
                best = top_k(p, classes, k)
                rejected = {"unknown": bool(unknown[n])} if unknown is not None else {}
                write_text(path, json.dumps({"img_path": image, PRED_KEY: best, **rejected}))
                writer.writerow([image, UNKNOWN_LABEL if rejected.get("unknown") else best[0][1], f"{best[0][0]:.6f}"])
            else:
                found = above_threshold(p, classes, threshold)
                write_text(path, json.dumps({"img_path": image, PRED_KEY: found, "multilabel": True}))
                writer.writerow([image, ";".join(label for _, label in found),
                                 ";".join(f"{score:.6f}" for score, _ in found)])
    write_text(out_dir / CLASSES_FILE, json.dumps(classes, indent=1))
    return out_dir / SUMMARY_FILE


def read_predictions(pred_dir: str | os.PathLike) -> dict[str, list[tuple[float, str]]]:
    """{img_path: [(score, label), ...]} from every prediction JSON under `pred_dir` (others are ignored)."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise UserError(f"prediction folder {pred_dir} does not exist")
    preds: dict[str, list[tuple[float, str]]] = {}
    for file in sorted(pred_dir.rglob("*.json")):
        data = load_json(file, "prediction file")
        if not (isinstance(data, dict) and "img_path" in data and PRED_KEY in data):
            continue  # classes.json and other side files
        if data.get("multilabel"):
            raise UserError(f"prediction file {file} holds multi-label predictions; end-to-end evaluation of "
                            f"prediction files is for single-label models (evaluate the model with eval.py "
                            f"--load-weights on an annotated test set)")
        try:
            entries = [(float(score), str(label)) for score, label in data[PRED_KEY]]
        except (TypeError, ValueError):
            entries = []
        if not entries:
            raise UserError(f"prediction file {file}: '{PRED_KEY}' must be a non-empty list of [score, label] pairs")
        preds[str(data["img_path"])] = entries
    if not preds:
        raise UserError(f"no prediction JSON ({{\"img_path\": ..., \"{PRED_KEY}\": ...}}) under {pred_dir}")
    return preds


def read_ground_truth(path: str | os.PathLike, classes: list[str] | None = None) -> dict[str, str]:
    """{img_path: label name}; integer labels are looked up in `classes` (from a class-id file)."""
    data = load_json(path, "ground-truth file")
    if not isinstance(data, dict) or not data:
        raise UserError(f"ground-truth file {path}: expected a non-empty JSON object {{image_path: label}}")
    truth = {}
    for image, label in data.items():
        if isinstance(label, int) and not isinstance(label, bool) and classes is not None:
            if not 0 <= label < len(classes):
                raise UserError(f"ground-truth file {path}: label {label} of {image} is not a class id "
                                f"(0..{len(classes) - 1})")
            label = classes[label]
        elif not isinstance(label, (str, int)) or isinstance(label, bool):
            raise UserError(f"ground-truth file {path}: label of {image} must be a class name or id, got {label!r}")
        truth[str(image)] = str(label)
    return truth


def _match(preds: dict[str, Any], truth: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """{prediction key: ground-truth key} by path as written, then resolved path, then unique file name."""
    def norm(p: str) -> str:
        return os.path.normpath(p)

    def resolved(p: str) -> str:
        return str(Path(p).resolve())

    def name_index(keys) -> dict[str, str]:
        counts = Counter(Path(k).name for k in keys)
        return {Path(k).name: k for k in keys if counts[Path(k).name] == 1}

    by_norm = {norm(p): p for p in preds}
    by_resolved = {resolved(p): p for p in preds}
    by_name = name_index(preds)
    matched, missing = {}, []
    for gt in truth:
        key = by_norm.get(norm(gt)) or by_resolved.get(resolved(gt)) or by_name.get(Path(gt).name)
        if key is None or key in matched:
            missing.append(gt)
        else:
            matched[key] = gt
    return matched, missing


@dataclass
class PredictionReport:
    num_images: int
    topk: dict[int, float]                       # k -> accuracy %
    macro: dict[str, float]                      # precision / recall / f1 %
    per_class: dict[str, dict[str, float]]
    missing: list[str] = field(default_factory=list)   # ground-truth images without a prediction
    unmatched: int = 0                                  # predictions without ground truth
    warnings: list[str] = field(default_factory=list)  # e.g. ground-truth labels the model does not know

    def to_text(self, pred_dir: str, gt_path: str) -> str:
        lines = [f"predictions: {pred_dir}", f"ground truth: {gt_path}",
                 f"images evaluated: {self.num_images} (ground truth without prediction: {len(self.missing)}, "
                 f"predictions without ground truth: {self.unmatched})", ""]
        lines += [f"top-{k} accuracy: {v:.2f} %" for k, v in self.topk.items()]
        lines += [f"macro {name if name != 'f1' else 'F1'}: {v:.2f} %" for name, v in self.macro.items()]
        width = max(12, *(len(c) for c in self.per_class))
        lines += ["", f"{'class':<{width}} {'precision':>9} {'recall':>7} {'F1':>7} {'support':>7}"]
        lines += [f"{c:<{width}} {r['precision']:>9.2f} {r['recall']:>7.2f} {r['f1']:>7.2f} {int(r['support']):>7d}"
                  for c, r in self.per_class.items()]
        if self.missing:
            lines += ["", "ground truth without prediction:"] + [f"  {m}" for m in self.missing[:50]]
            if len(self.missing) > 50:
                lines.append(f"  ... and {len(self.missing) - 50} more")
        return "\n".join(lines) + "\n"


def _names(labels: set[str], most: int = 8) -> str:
    shown = sorted(labels)[:most]
    return ", ".join(shown) + (f", ... ({len(labels)} in all)" if len(labels) > most else "")


def evaluate_predictions(preds: dict[str, list[tuple[float, str]]], truth: dict[str, str],
                         ks: tuple[int, ...] = (1, 5), model_classes: list[str] | None = None) -> PredictionReport:
    """Top-k accuracy and top-1 precision/recall/F1 per class (classes of the ground truth and of the top-1
    predictions); macro averages are over the classes present in the ground truth. The model's label space
    is `model_classes` (its classes.json) or the labels its predictions name. Ground truth that shares no
    label with it is an error (another label space: ids against names, another class list); ground-truth
    labels it lacks are a warning. Top-k is reported for k below the number of classes only (with k classes
    it is 100 by definition) and at most the length of the prediction lists (top-5 of 3-long lists is top-3)."""
    matched, missing = _match(preds, truth)
    if not matched:
        raise UserError("no prediction matches a ground-truth image (compare the img_path values with the "
                        "ground truth's keys)")
    known = set(model_classes) if model_classes else {label for p in matched for _, label in preds[p]}
    wanted = {truth[g] for g in matched.values()}
    warnings = []
    if not wanted & known:
        raise UserError(f"the ground-truth labels ({_names(wanted)}) share no name with the model's labels "
                        f"({_names(known)}): the two use different label spaces (class ids against names? pass "
                        f"the class list with --class-id-path)")
    if wanted - known:
        warnings.append(f"{len(wanted - known)} ground-truth label(s) the model does not predict: "
                        f"{_names(wanted - known)} (the model's labels: {_names(known)}); their images count as "
                        f"errors")
    classes = sorted(set(truth.values()) | {entries[0][1] for entries in preds.values() if entries})
    index = {c: i for i, c in enumerate(classes)}
    longest = max(len(preds[p]) for p in matched)
    ks = meaningful_ks(len(known | wanted), tuple(sorted({max(1, min(k, longest)) for k in ks})))
    labels, tops, hits = [], [], {k: 0 for k in ks}
    for pred_key, gt_key in matched.items():
        ranked = [label for _, label in sorted(preds[pred_key], key=lambda e: -e[0])]
        label = truth[gt_key]
        labels.append(index[label])
        tops.append(index[ranked[0]])
        for k in ks:
            hits[k] += label in ranked[:k]
    n = len(labels)
    labels_np = np.array(labels)
    cm = confusion_matrix(np.array(tops), labels_np, len(classes))
    precision, recall, f1, support = precision_recall_f1(cm)
    present = support > 0
    per_class = {c: {"precision": 100 * float(precision[i]), "recall": 100 * float(recall[i]),
                     "f1": 100 * float(f1[i]), "support": int(support[i])} for i, c in enumerate(classes)}
    return PredictionReport(
        num_images=n,
        topk={k: 100.0 * hits[k] / n for k in ks},
        macro={name: 100.0 * float(values[present].mean()) for name, values in
               (("precision", precision), ("recall", recall), ("f1", f1))},
        per_class=per_class, missing=missing, unmatched=len(preds) - len(matched), warnings=warnings)


__all__ = ["read_class_names", "top_k", "above_threshold", "write_predictions", "read_predictions", "read_ground_truth",
           "evaluate_predictions", "PredictionReport", "CLASSES_FILE", "SUMMARY_FILE"]
