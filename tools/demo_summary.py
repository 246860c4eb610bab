#!/usr/bin/env python3
"""The end of tools/run_demo.sh: one table of every step's result and wall time, read from the files the
steps wrote (so what it shows is what a user finds in the work dir).

  python tools/demo_summary.py WORK_DIR STEP_SECONDS_FILE TOTAL_SECONDS
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import yaml


def metric(metrics_file: Path, key: str) -> float:
    """A value of eval.py's metrics.yaml list."""
    return next(m["value"] for m in yaml.safe_load(metrics_file.read_text())["metrics"] if m["key"] == key)


def rows(wd: Path) -> list[tuple[str, str, str]]:
    """(step, result, where it is written) for each step of the demo."""
    history = list(csv.DictReader((wd / "outputs" / "history.csv").open()))
    best = max(max(float(r["val_top1"] or 0), float(r["ema_val_top1"] or 0)) for r in history)
    compressed = yaml.safe_load((wd / "outputs_int8" / "metrics.yaml").read_text())
    parity = yaml.safe_load((wd / "export" / "parity.yaml").read_text())
    checks = parity["files"].values()
    worst = max(entry.get("max_abs_diff", 0.0) for entry in checks)
    e2e = (wd / "predictions" / "eval_results.txt").read_text()
    top1 = re.search(r"top-1 accuracy: ([\d.]+) %", e2e).group(1)
    f1 = re.search(r"macro F1: ([\d.]+) %", e2e).group(1)
    seconds = compressed["steps"]["seconds"]
    predicted = sum(1 for p in (wd / "predictions").rglob("*.json") if p.parent != wd / "predictions")
    return [
        ("train", f"{len(history)} epochs, best val top-1 {best:.2f}", "outputs/ (best.pth, train.log, history.csv)"),
        ("eval", f"top-1 {metric(wd / 'metrics.yaml', 'accuracy'):.2f}, macro F1 "
                 f"{metric(wd / 'metrics.yaml', 'macro_f1'):.2f} (chance 10)", "metrics.yaml, confusion_matrix.png"),
        ("compress", f"float IR {compressed['float']['top1']:.2f} -> int8 IR {compressed['int8']['top1']:.2f} "
                     f"(budget {'met' if compressed['budget']['met'] else 'NOT met'}), "
                     f"{compressed['float']['size_bytes'] / 1e6:.1f} -> {compressed['int8']['size_bytes'] / 1e6:.1f} MB"
                     f"; PTQ {seconds['ptq']:g} s", "outputs_int8/ (export/model.xml, metrics.yaml)"),
        ("export", f"IR + ONNX, parity {'ok' if all(e['ok'] for e in checks) else 'FAILED'} "
                   f"(max |diff| {worst:.1e})", "export/ (model.xml, model.onnx, parity.yaml)"),
        ("eval_ir", f"top-1 {metric(wd / 'export' / 'metrics.yaml', 'accuracy'):.2f}", "export/metrics.yaml"),
        ("predict", f"{predicted} prediction files (one per image)", "predictions/"),
        ("eval_predictions", f"top-1 {top1}, macro F1 {f1}", "predictions/eval_results.txt"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("step_seconds", type=Path, help="lines 'STEP SECONDS' written by run_demo.sh")
    parser.add_argument("total_seconds", type=int)
    args = parser.parse_args()
    times = dict(line.split() for line in args.step_seconds.read_text().splitlines() if line.strip())
    table = rows(args.work_dir)
    width = max(len(step) for step, _, _ in table)
    print(f"\nDemo finished in {args.total_seconds // 60} min {args.total_seconds % 60} s. Results in {args.work_dir}:")
    for step, result, where in table:
        print(f"  {step:<{width}}  {times.get(step, '?'):>4} s  {result}  [{where}]")
    print(f"  (data and instantiation: {int(times.get('data', 0)) + int(times.get('instantiate', 0))} s)")
    print(f"TensorBoard: tensorboard --logdir {args.work_dir / 'outputs' / 'tensorboard'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
