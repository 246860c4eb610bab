#!/usr/bin/env python3
"""Evaluate a model on a class-folder dataset and write metrics.yaml, or evaluate prediction files.

  python eval.py --load-weights outputs/best.pth --test-data-roots DATA/val --save-metrics-to metrics.yaml
  python eval.py --load-weights export/model.xml   # the exported IR (or export/model.onnx), same metrics
  python eval.py --preds predictions/ --gts ground_truth.json   # end-to-end: writes eval_results.txt

A model is a training checkpoint, bare weights (classes then come from the test folders and the model
from the work dir's template), an OpenVINO IR (.xml) or an ONNX file; all are fed the same images
(resized to the model's input size, 0..255, in its channel order). The test root falls back to
$TEST_DATA_ROOT. metrics.yaml holds top-1/top-5, per-class precision, recall and F1, macro F1, the
confusion matrix (also drawn as confusion_matrix.png beside it), the model's size and complexity and
the sha256 and size of the files evaluated.

With --preds, the folder holds one JSON per image as predict.py writes them
({"img_path": ..., "0_0": [[score, label], ...]}) and --gts one JSON object {image_path: label};
integer labels are class ids, named by --class-id-path or the folder's classes.json.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import yaml

from clsengine import data as D
from clsengine import predictions as P
from clsengine.errors import UserError
from clsengine.hub import sha256_of
from clsengine.metrics import classification_report
from clsengine.plots import plot_confusion_matrix
from workbench import cli
from workbench.classifier import load_classifier

FLAG_KEYS = {"batch_size": "hyper_parameters.basic.batch_size", "gpu_num": "gpu_num", "workers": "training.workers"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-weights", default=None,
                   help="model to evaluate: checkpoint (best.pth...), OpenVINO IR (.xml) or ONNX (.onnx)")
    cli.add_data_args(p, "test", "TEST_DATA_ROOT")
    p.add_argument("--save-metrics-to", default=str(cli.WORK_DIR / "metrics.yaml"),
                   help="metrics file to write (default: WORK_DIR/metrics.yaml)")
    p.add_argument("--save-output-to", default=None,
                   help="folder for per-image predictions (predictions.csv); with --preds, for eval_results.txt")
    p.add_argument("--device", default="CPU", help="OpenVINO device for .xml/.onnx models (CPU, GPU, NPU...)")
    e2e = p.add_argument_group("end-to-end evaluation of prediction files")
    e2e.add_argument("--preds", default=None, help="folder of per-image prediction JSON files (from predict.py)")
    e2e.add_argument("--gts", default=None, help="ground-truth JSON {image_path: label}")
    e2e.add_argument("--class-id-path", default=None, help="class-id JSON naming integer labels of --gts")
    cli.add_runtime_args(p)
    cli.add_template_args(p)
    return p.parse_intermixed_args()  # KEY=VALUE overrides may stand between flags


def evaluate_prediction_files(args: argparse.Namespace) -> int:
    if not (args.preds and args.gts):
        raise UserError("end-to-end evaluation needs both --preds PRED_DIR and --gts GT_JSON")
    pred_dir = Path(args.preds)
    preds = P.read_predictions(pred_dir)
    names_file = Path(args.class_id_path) if args.class_id_path else pred_dir / P.CLASSES_FILE
    classes = P.read_class_names(names_file) if names_file.is_file() or args.class_id_path else None
    report = P.evaluate_predictions(preds, P.read_ground_truth(args.gts, classes))
    out = Path(args.save_output_to) if args.save_output_to else pred_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_results.txt").write_text(report.to_text(str(pred_dir), args.gts), encoding="utf-8")
    accuracy = "  ".join(f"top-{k} {v:.2f}" for k, v in report.topk.items())
    print(f"{accuracy}  macro precision {report.macro['precision']:.2f}  recall {report.macro['recall']:.2f}  "
          f"F1 {report.macro['f1']:.2f} on {report.num_images} images; results in {out / 'eval_results.txt'}")
    if report.missing:
        print(f"warning: {len(report.missing)} ground-truth image(s) have no prediction, e.g. {report.missing[0]}")
    return 0


def main() -> int:
    args = parse_args()
    if args.preds or args.gts:
        return evaluate_prediction_files(args)
    if not args.load_weights:
        raise UserError("pass --load-weights MODEL (or --preds and --gts for prediction files)")
    overrides = cli.collect_overrides(args, FLAG_KEYS)
    scan = D.scan_folder(cli.data_root(args, "test", "TEST_DATA_ROOT"))
    model = load_classifier(args.load_weights, template_path=args.template, overrides=overrides,
                            classes=scan.classes, classes_source=f"test data {scan.root}", ov_device=args.device)
    classes = model.classes
    logits, labels = model.predict(scan.samples, "test")
    report = classification_report(logits, labels, classes)
    cx = model.complexity()

    metrics_path = Path(args.save_metrics_to)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    cm_png = plot_confusion_matrix(report["confusion_matrix"], classes, metrics_path.with_name("confusion_matrix.png"))
    result = {
        "model": {"path": str(Path(args.load_weights).resolve()), "format": model.kind,
                  "input_size": list(model.input_size), "input_order": model.input_order},
        "files": [{"name": f.name, "path": str(f.resolve()), "sha256": sha256_of(f), "size": f.stat().st_size}
                  for f in model.files],
        "metrics": [
            {"display_name": "Size", "key": "size", "unit": "Mp", "value": round(cx["size_mp"], 3)},
            {"display_name": "Complexity", "key": "complexity", "unit": "GFLOPs",
             "value": round(cx["complexity_gflops"], 3)},
            {"display_name": "Top-1 accuracy", "key": "accuracy", "unit": "%", "value": round(report["top1"], 2)},
            {"display_name": "Top-5 accuracy", "key": "accuracy_top5", "unit": "%", "value": round(report["top5"], 2)},
            {"display_name": "Macro F1", "key": "macro_f1", "unit": "%", "value": round(report["macro_f1"], 2)},
        ],
        "dataset": {"root": str(scan.root), "num_images": report["num_samples"], "skipped_files": len(scan.skipped)},
        "classes": classes,
        "per_class": report["per_class"],
        "confusion_matrix": report["confusion_matrix"],
        "confusion_matrix_png": str(cm_png.resolve()),
    }
    metrics_path.write_text(yaml.safe_dump(result, sort_keys=False), encoding="utf-8")

    if args.save_output_to:
        out_dir = Path(args.save_output_to)
        out_dir.mkdir(parents=True, exist_ok=True)
        probs = logits.softmax(dim=1)
        with open(out_dir / "predictions.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "prediction", "score"])
            for (path, label), p in zip(scan.samples, probs):
                writer.writerow([path, classes[label], classes[int(p.argmax())], f"{float(p.max()):.4f}"])
    if scan.skipped:
        print(f"warning: skipped {len(scan.skipped)} unreadable file(s), e.g. {scan.skipped[0][0]}")
    print(f"{model.kind}: top-1 {report['top1']:.2f}  top-5 {report['top5']:.2f}  macro F1 {report['macro_f1']:.2f}  "
          f"on {report['num_samples']} images; metrics in {metrics_path}, confusion matrix in {cm_png}")
    return 0


if __name__ == "__main__":
    cli.run(main)
