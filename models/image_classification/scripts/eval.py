#!/usr/bin/env python3
"""Evaluate a checkpoint on a class-folder dataset and write metrics.yaml.

  python eval.py --load-weights outputs/latest.pth --test-ann-files '' --test-data-roots DATA/val \\
                 --save-metrics-to metrics.yaml

The test root falls back to $TEST_DATA_ROOT. metrics.yaml holds top-1/top-5, per-class precision,
recall and F1, macro F1, the confusion matrix (also drawn as confusion_matrix.png beside it), the
model's complexity and the sha256 and size of the weights evaluated.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import yaml

from clsengine import data as D
from clsengine.checkpoint import load_checkpoint, load_model_weights, load_state_dict_file
from clsengine.complexity import complexity
from clsengine.hub import sha256_of
from clsengine.loop import predict
from clsengine.metrics import classification_report
from clsengine.plots import plot_confusion_matrix
from clsengine.utils import select_device
from workbench import builders as B
from workbench import cli
from workbench.template import load_template, template_from_dict

FLAG_KEYS = {"batch_size": "hyper_parameters.basic.batch_size", "gpu_num": "gpu_num", "workers": "training.workers"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-weights", required=True, help="checkpoint to evaluate (latest.pth, best.pth...)")
    cli.add_data_args(p, "test", "TEST_DATA_ROOT")
    p.add_argument("--save-metrics-to", default=str(cli.WORK_DIR / "metrics.yaml"),
                   help="metrics file to write (default: WORK_DIR/metrics.yaml)")
    p.add_argument("--save-output-to", default=None,
                   help="folder for per-image predictions (predictions.csv)")
    cli.add_runtime_args(p)
    cli.add_template_args(p)
    return p.parse_intermixed_args()  # KEY=VALUE overrides may stand between flags


def main() -> int:
    args = parse_args()
    overrides = cli.collect_overrides(args, FLAG_KEYS)
    weights_path = Path(args.load_weights)
    checkpoint = load_checkpoint(weights_path)
    scan = D.scan_folder(cli.data_root(args, "test", "TEST_DATA_ROOT"))
    if "config" in checkpoint:  # our training checkpoint: it knows its model and classes
        t = template_from_dict(checkpoint["config"]["template"], f"checkpoint {weights_path}", overrides)
        classes = list(checkpoint["classes"])
        D.check_same_classes(classes, scan.classes, f"checkpoint {weights_path}", f"test data {scan.root}")
    else:  # bare weights: the work dir's template and the test folders define the model
        t = load_template(args.template, overrides)
        classes = scan.classes
    device = select_device(t.gpu_num)
    model = B.build_model(t, len(classes))
    load_model_weights(model, load_state_dict_file(weights_path), str(weights_path))
    model.to(device)

    dataset = D.ImageDataset(scan.samples, classes, B.eval_transform(t))
    loader = B.make_loader(dataset, t, t.hyper_parameters.basic.batch_size, train=False, device=device)
    logits, labels = predict(model, loader, device, desc="test")
    report = classification_report(logits, labels, classes)
    cx = complexity(model, B.input_size(t))

    metrics_path = Path(args.save_metrics_to)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    cm_png = plot_confusion_matrix(report["confusion_matrix"], classes, metrics_path.with_name("confusion_matrix.png"))
    result = {
        "files": [{"name": weights_path.name, "path": str(weights_path.resolve()), "sha256": sha256_of(weights_path),
                   "size": weights_path.stat().st_size}],
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
    print(f"top-1 {report['top1']:.2f}  top-5 {report['top5']:.2f}  macro F1 {report['macro_f1']:.2f}  "
          f"on {report['num_samples']} images; metrics in {metrics_path}, confusion matrix in {cm_png}")
    return 0


if __name__ == "__main__":
    cli.run(main)
