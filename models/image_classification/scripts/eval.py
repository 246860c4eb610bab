#!/usr/bin/env python3
"""Evaluate a model on a test set (class folders, label list or COCO JSON) and write metrics.yaml, or
evaluate prediction files.

  python eval.py --load-weights outputs/best.pth --test-data-roots DATA/val --save-metrics-to metrics.yaml
  python eval.py --load-weights export/model.xml   # the exported IR (or export/model.onnx), same metrics
  python eval.py --load-weights export/model.onnx --runtime openvino   # ONNX in OpenVINO, not onnxruntime
  python eval.py --load-weights outputs/best.pth --test-ann-files test.json --test-data-roots IMAGES
  python eval.py --preds predictions/ --gts ground_truth.json   # end-to-end: writes eval_results.txt

A model is a training checkpoint, bare weights (classes then come from the test folders and the model
from the work dir's template), an OpenVINO IR (.xml) or an ONNX file; all are fed the same images
(resized to the model's input size, 0..255, in its channel order). A checkpoint runs in PyTorch, an IR in
OpenVINO, an ONNX file in onnxruntime (or OpenVINO with --runtime openvino); metrics.yaml names the runtime. The test root falls back to
$TEST_DATA_ROOT. metrics.yaml holds top-1 and top-5 (with more than 5 classes), per-class precision, recall and F1, macro F1, the
confusion matrix (also drawn as confusion_matrix.png beside it), the model's size and complexity and
the sha256 and size of the files evaluated. For a multi-label model it holds mAP, per-class AP and
precision/recall/F1 at the model's threshold (micro and macro) and the exact-match ratio instead. A model
trained on some of the classes (--classes) is evaluated on the test images of those classes.

A calibrated model (train.py calibrates best.pth on the validation set; --calibrate refits on the test data
and stores the result in the checkpoint) adds a "calibration" block: NLL, Brier score and ECE (15 bins)
before and after, a reliability diagram (reliability.png beside metrics.yaml), and for a single-label model
the share of images answered "unknown" with the top-1 on the rest (and, with --ood-data-roots, the AUROC of
the rejection score on images of none of its classes), for a multi-label one F1 at the global threshold and
at the per-class thresholds.

With --preds, the folder holds one JSON per image as predict.py writes them
({"img_path": ..., "0_0": [[score, label], ...]}) and --gts one JSON object {image_path: label};
integer labels are class ids, named by --class-id-path or the folder's classes.json.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import yaml

from clsengine import data as datasets
from clsengine import predictions
from clsengine.checkpoint import load_checkpoint
from clsengine.errors import UserError
from clsengine.fileio import atomic_output, write_text
from clsengine.hub import sha256_of
from clsengine.metrics import classification_report, multilabel_report
from clsengine.plots import plot_confusion_matrix
from clsengine.runlog import get_logger
from workbench import cli
from workbench.calibrate import calibrate_checkpoint, calibration_report
from workbench.classifier import load_classifier
from workbench.template import load_template
from workbench.versions import versions

WORK_DIR = Path(__file__).resolve().parent  # the work dir this script was instantiated into



def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-weights", default=None,
                   help="model to evaluate: checkpoint (best.pth...), OpenVINO IR (.xml) or ONNX (.onnx)")
    cli.add_data_args(p, "test", "TEST_DATA_ROOT")
    cli.add_dataset_args(p)
    p.add_argument("--save-metrics-to", default=str(WORK_DIR / "metrics.yaml"),
                   help="metrics file to write (default: WORK_DIR/metrics.yaml)")
    p.add_argument("--save-output-to", default=None,
                   help="folder for per-image predictions (predictions.csv); with --preds, for eval_results.txt")
    cli.add_exported_model_args(p)
    cal = p.add_argument_group("calibrated scores and the \"unknown\" answer")
    cal.add_argument("--calibrate", action="store_true",
                     help="fit the calibration (template section `calibration`) on these images and store it in the "
                          "checkpoint (train.py does so on the validation set after training)")
    cal.add_argument("--ood-data-roots", default=None, metavar="DIR",
                     help="images of none of the model's classes (searched recursively): the AUROC of the "
                          "rejection score and the share of them answered unknown")
    e2e = p.add_argument_group("end-to-end evaluation of prediction files")
    e2e.add_argument("--preds", default=None, help="folder of per-image prediction JSON files (from predict.py)")
    e2e.add_argument("--gts", default=None, help="ground-truth JSON {image_path: label}")
    cli.add_runtime_args(p)
    cli.add_template_args(p, WORK_DIR)
    return p.parse_intermixed_args()  # KEY=VALUE overrides may stand between flags


def evaluate_prediction_files(args: argparse.Namespace) -> int:
    if not (args.preds and args.gts):
        raise UserError("end-to-end evaluation needs both --preds PRED_DIR and --gts GT_JSON")
    pred_dir = Path(args.preds)
    preds = predictions.read_predictions(pred_dir)
    names_file = Path(args.class_id_path) if args.class_id_path else pred_dir / predictions.CLASSES_FILE
    classes = predictions.read_class_names(names_file) if names_file.is_file() or args.class_id_path else None
    truth = predictions.read_ground_truth(args.gts, classes)
    report = predictions.evaluate_predictions(preds, truth, model_classes=classes)
    for warning in report.warnings:
        print(f"warning: {warning}")
    out = Path(args.save_output_to) if args.save_output_to else pred_dir
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "eval_results.txt", report.to_text(str(pred_dir), args.gts))
    accuracy = "  ".join(f"top-{k} {v:.2f}" for k, v in report.topk.items())
    print(f"{accuracy}  macro precision {report.macro['precision']:.2f}  recall {report.macro['recall']:.2f}  "
          f"F1 {report.macro['f1']:.2f} on {report.num_images} images; results in {out / 'eval_results.txt'}")
    if report.missing:
        print(f"warning: {len(report.missing)} ground-truth image(s) have no prediction, e.g. {report.missing[0]}")
    return 0


def _size_metrics(model) -> list[dict]:
    cx = model.complexity()
    return [{"display_name": "Size", "key": "size", "unit": "Mp", "value": round(cx["size_mp"], 3)},
            {"display_name": "Complexity", "key": "complexity", "unit": "GFLOPs",
             "value": round(cx["complexity_gflops"], 3)}]


def _percent(name: str, key: str, value: float) -> dict:
    return {"display_name": name, "key": key, "unit": "%", "value": round(value, 2)}


def multiclass_results(model, logits, labels, metrics_path: Path) -> tuple[dict, str]:
    """metrics.yaml content and the summary line of a single-label model."""
    report = classification_report(logits, labels, model.classes)
    cm_png = plot_confusion_matrix(report["confusion_matrix"], model.classes,
                                   metrics_path.with_name("confusion_matrix.png"))
    result = {
        "metrics": _size_metrics(model) + [_percent("Top-1 accuracy", "accuracy", report["top1"])]
        + ([_percent("Top-5 accuracy", "accuracy_top5", report["top5"])] if "top5" in report else [])
        + [_percent("Macro F1", "macro_f1", report["macro_f1"])],
        "per_class": report["per_class"],
        "confusion_matrix": report["confusion_matrix"],
        "confusion_matrix_png": str(cm_png.resolve()),
    }
    top5 = f"  top-5 {report['top5']:.2f}" if "top5" in report else ""
    return result, (f"top-1 {report['top1']:.2f}{top5}  macro F1 {report['macro_f1']:.2f}  "
                    f"on {report['num_samples']} images; metrics in {metrics_path}, confusion matrix in {cm_png}")


def multilabel_results(model, logits, labels, metrics_path: Path) -> tuple[dict, str]:
    """metrics.yaml content and the summary line of a multi-label model: mAP and scores at the threshold."""
    r = multilabel_report(logits, labels, model.classes, model.threshold, model.background_index)
    result = {
        "metrics": _size_metrics(model) + [
            _percent("mAP", "mAP", r["mAP"]),
            _percent(f"Micro F1 at {r['threshold']:g}", "micro_f1", r["micro"]["f1"]),
            _percent(f"Macro F1 at {r['threshold']:g}", "macro_f1", r["macro"]["f1"]),
            _percent("Exact match", "exact_match", r["exact_match"])],
        "threshold": r["threshold"],
        "background_label": model.task.get("background_label"),
        "micro": r["micro"],
        "macro": r["macro"],
        "per_class": r["per_class"],
    }
    return result, (f"mAP {r['mAP']:.2f}  micro P/R/F1 {r['micro']['precision']:.2f}/{r['micro']['recall']:.2f}/"
                    f"{r['micro']['f1']:.2f} at {r['threshold']:g}  exact match {r['exact_match']:.2f}  on "
                    f"{r['num_samples']} images; metrics in {metrics_path}")


def checkpoint_data_settings(weights: str, ann_file: str, overrides: dict) -> dict:
    """The data settings a training checkpoint was trained with that decide how the test data reads, where
    neither a flag nor KEY=VALUE says otherwise: the COCO category map (for a COCO test file). The class
    subset needs none: the model's classes select the test images."""
    if not str(ann_file).lower().endswith(".json") or "data.category_map" in overrides \
            or Path(weights).suffix.lower() in (".xml", ".onnx") or not Path(weights).is_file():
        return {}
    template = load_checkpoint(weights).get("config", {}).get("template", {})
    category_map = template.get("data", {}).get("category_map") if isinstance(template, dict) else None
    return {"data.category_map": category_map} if category_map else {}


def main() -> int:
    args = parse_args()
    if args.preds or args.gts:
        return evaluate_prediction_files(args)
    if not args.load_weights:
        raise UserError("pass --load-weights MODEL (or --preds and --gts for prediction files)")
    overrides = cli.collect_overrides(args)
    trained_with = checkpoint_data_settings(args.load_weights, args.test_ann_files, overrides)
    if trained_with:
        print("note: reading the test data as the model was trained: "
              + ", ".join(f"{k}={v}" for k, v in trained_with.items()))
    scan = cli.scan_split(args, "test", "TEST_DATA_ROOT", load_template(args.template, {**trained_with, **overrides}))
    model = load_classifier(args.load_weights, template_path=args.template, overrides=overrides,
                            classes=scan.classes, classes_source=f"test data ({scan.source})", device=args.device,
                            runtime=args.runtime,
                            allow_subset=True)
    classes = model.classes
    if classes != scan.classes:  # a model trained on some of the classes: evaluated on those
        print(f"note: the model knows {len(classes)} of the {len(scan.classes)} test classes; evaluating on those")
        scan = datasets.select_classes(scan, classes, what=f"classes of {args.load_weights}")
    if args.calibrate:
        calibrate_checkpoint(Path(args.load_weights), scan, args.template, overrides, get_logger(None))
        model = load_classifier(args.load_weights, template_path=args.template, overrides=overrides,
                                classes=scan.classes, classes_source=f"test data ({scan.source})", allow_subset=True)
    logits, labels = model.predict(scan.samples, "test")

    metrics_path = Path(args.save_metrics_to)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    results = multilabel_results if model.multilabel else multiclass_results
    task_result, summary = results(model, logits, labels, metrics_path)
    if model.calibration is not None:
        task_result["calibration"], line = calibration_report(
            model, logits, labels, metrics_path.with_name("reliability.png"), ood_logits(model, args.ood_data_roots))
        summary += f"\n  {line}"
    elif args.ood_data_roots:
        print("note: --ood-data-roots needs a calibrated model (eval.py --calibrate, or train.py's best.pth)")
    result = {
        "model": {"path": str(Path(args.load_weights).resolve()), "format": model.kind, "runtime": model.runtime,
                  "input_size": list(model.input_size), "input_order": model.input_order, "task": model.task["type"]},
        "files": [{"name": f.name, "path": str(f.resolve()), "sha256": sha256_of(f), "size": f.stat().st_size}
                  for f in model.files],
        "dataset": {"source": scan.source, "num_images": int(len(labels)), "skipped_files": len(scan.skipped),
                    "unlabeled_images": len(scan.unlabeled)},
        "classes": classes,
        **task_result,
        "versions": versions(),
    }
    write_text(metrics_path, yaml.safe_dump(result, sort_keys=False))

    if args.save_output_to:
        write_per_image(Path(args.save_output_to), model, scan.samples, model.probabilities(logits))
    if scan.skipped:
        print(f"warning: skipped {len(scan.skipped)} unreadable file(s), e.g. {scan.skipped[0][0]}")
    print(f"{model.kind} ({model.runtime}): {summary}")
    return 0


def ood_logits(model, roots: str | None):
    """Logits of the images under `roots` (none of the model's classes), or None."""
    if not roots:
        return None
    files, _ = datasets.list_images(roots)
    if not files:
        raise UserError(f"--ood-data-roots {roots}: no images found")
    return model.predict([(f, i) for i, f in enumerate(files)], "out-of-distribution", multihot=False)[0]


def write_per_image(out_dir: Path, model, samples: list, probs) -> None:
    """predictions.csv: each image's true label(s) and prediction(s) with their scores."""
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = model.classes
    with atomic_output(out_dir / "predictions.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if model.multilabel:
            writer.writerow(["path", "labels", "predictions", "scores"])
            for (path, label), p in zip(samples, probs):
                truth = label if isinstance(label, (tuple, list)) else (label,)
                found = predictions.above_threshold(p.numpy(), classes, model.threshold)
                writer.writerow([path, ";".join(classes[i] for i in truth), ";".join(n for _, n in found),
                                 ";".join(f"{s:.4f}" for s, _ in found)])
        else:
            writer.writerow(["path", "label", "prediction", "score"])
            for (path, label), p in zip(samples, probs):
                writer.writerow([path, classes[label], classes[int(p.argmax())], f"{float(p.max()):.4f}"])


if __name__ == "__main__":
    cli.run(main)
