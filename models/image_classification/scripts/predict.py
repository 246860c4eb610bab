#!/usr/bin/env python3
"""Top-K predictions for one image or a folder of images, from a checkpoint, an OpenVINO IR or ONNX.

  python predict.py --load-weights export/model.xml --input photos/ --save-to predictions [--topk 5]
                    [--class-id-path classes.json] [--device CPU]

Writes one JSON per image, {"img_path": path, "0_0": [[score, label], ...]} (best first, softmax
scores), mirroring the input folder's tree, plus summary.csv (top-1 per image) and classes.json in
--save-to. A calibrated model (train.py calibrates best.pth; export.py carries it into the files) gives
calibrated scores, and each JSON says "unknown": true where the image scores below the model's rejection
threshold (summary.csv's label is then "unknown"). A multi-label model lists instead every label whose
sigmoid score reaches its threshold (its calibrated per-class thresholds, else task.threshold; --threshold
overrides both), possibly none, and summary.csv holds them all. Labels are the class names the model holds
(training checkpoints and exported files carry them), or those of --class-id-path (a JSON list of names, or
{"0": name, ...}), which bare weights need.
Evaluate the output with: python eval.py --preds PRED_DIR --gts GT_JSON
"""
from __future__ import annotations

import argparse
from pathlib import Path

from clsengine import data as datasets
from clsengine import predictions
from clsengine.errors import UserError
from workbench import cli
from workbench.classifier import load_classifier

WORK_DIR = Path(__file__).resolve().parent  # the work dir this script was instantiated into



def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-weights", required=True,
                   help="model: training checkpoint (best.pth), OpenVINO IR (.xml) or ONNX (.onnx)")
    p.add_argument("--input", required=True, help="an image file or a folder of images (searched recursively)")
    p.add_argument("--save-to", default=str(WORK_DIR / "predictions"), help="output folder")
    p.add_argument("--topk", type=int, default=5, help="classes listed per image (default 5)")
    p.add_argument("--class-id-path", default=None, help="class names: JSON list or {\"0\": name, ...}")
    p.add_argument("--threshold", type=float, default=None,
                   help="multi-label models: list labels scoring at least this (default: the calibrated per-class "
                        "thresholds, else the model's task.threshold)")
    cli.add_exported_model_args(p)
    cli.add_runtime_args(p)
    cli.add_template_args(p, WORK_DIR)
    return p.parse_intermixed_args()


def main() -> int:
    args = parse_args()
    if args.topk < 1:
        raise UserError(f"--topk must be 1 or more, got {args.topk}")
    overrides = cli.collect_overrides(args)
    names = predictions.read_class_names(args.class_id_path) if args.class_id_path else None
    model = load_classifier(args.load_weights, template_path=args.template, overrides=overrides, classes=names,
                            classes_source=f"class-id file {args.class_id_path}", device=args.device,
                            runtime=args.runtime)
    files, skipped = datasets.list_images(args.input)
    # The sample's "label" is its index in `files`, so each result stays tied to its image.
    logits, index = model.predict([(f, i) for i, f in enumerate(files)], "predict", multihot=False)
    probs = model.probabilities(logits).numpy()
    images = [files[int(i)] for i in index]
    threshold = (args.threshold if args.threshold is not None else model.thresholds) if model.multilabel else None
    unknown = model.unknown(logits).tolist() if model.calibration is not None and not model.multilabel else None
    summary = predictions.write_predictions(args.save_to, images, probs, model.classes, args.topk, root=args.input,
                                            threshold=threshold, unknown=unknown)
    if unknown is not None:
        print(f"Answered \"unknown\" for {sum(unknown)} of {len(images)} image(s) (calibrated "
              f"{model.calibration.rejection_score} below {model.calibration.reject_below:.4g})")
    for path, reason in skipped:
        print(f"warning: skipped {path}: {reason}")
    print(f"Predicted {len(images)} image(s) with the {model.kind} {args.load_weights}; "
          f"one JSON per image in {Path(args.save_to)}, top-1 summary in {summary}")
    return 0


if __name__ == "__main__":
    cli.run(main)
