#!/usr/bin/env python3
"""Class balance and multi-label on real data: what class weights, the balanced sampler and the
multi-label losses buy, measured through the work-dir scripts.

  python tools/benchmark_datasets.py [--epochs 10] [--out /tmp/datasets_bench] [--parts balance multilabel]

balance: scikit-learn's digits with a long-tailed training split (digit d keeps 0.05^(d/9) of its
  images: 142 zeros, 7 nines; validation stays balanced), trained with no counter-measure, with
  `--class-weights auto`, with `--balanced-sampler`, and with both. Reports val top-1, macro F1 and the
  recall of the rarest digit.
multilabel: 2x2 grids of 1-3 digits (COCO annotations, labels = the digits shown), trained with the
  asymmetric loss and with BCE. Reports val mAP, micro F1 at 0.5 and the exact-match ratio.

Both use the template's architecture with the plain recipe of tools/benchmark_recipe.py (no SAM, EMA,
mutual learning, LR finder or AugMix), so that only the dataset options differ; train.py then eval.py on
best.pth, from the same seed, at 32x32.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import yaml

from benchmark_recipe import REPO_ROOT, instantiate, run, variants

PLAIN = variants(["plain"])["plain"]


def make_data(out: Path, option: str) -> Path:
    data = out / option.strip("-")
    if not data.is_dir():
        out.mkdir(parents=True, exist_ok=True)
        extra = ["--long-tail", "0.05"] if option == "--long-tail" else [option]
        run([sys.executable, str(REPO_ROOT / "tools" / "make_digits_dataset.py"), str(data), *extra], REPO_ROOT,
            out / "data.log")
    return data


def train_and_eval(template: str, name: str, out: Path, data_args: list[str], test_args: list[str],
                   extra: list[str], args: argparse.Namespace) -> tuple[dict, float]:
    work_dir = out / name
    log = out / f"{name}.log"
    log.unlink(missing_ok=True)
    instantiate(template, work_dir, log)
    seconds = run([sys.executable, "train.py", "--overwrite", *data_args, "--epochs", str(args.epochs), "--batch-size",
                   str(args.batch_size), "--workers", str(args.workers), "input.size=[32,32]",
                   "training.early_stopping_patience=null", *PLAIN, *extra], work_dir, log)
    run([sys.executable, "eval.py", "--load-weights", str(work_dir / "outputs" / "best.pth"), *test_args,
         "--workers", str(args.workers)], work_dir, log)
    return yaml.safe_load((work_dir / "metrics.yaml").read_text()), seconds


def metric(metrics: dict, key: str) -> float:
    return next(m["value"] for m in metrics["metrics"] if m["key"] == key)


def balance(args: argparse.Namespace) -> list[str]:
    data = make_data(args.out, "--long-tail")
    data_args = ["--train-data-roots", str(data / "train"), "--val-data-roots", str(data / "val")]
    table = ["| counter-measure | val top-1 (%) | macro F1 (%) | recall of digit 9 (7 train images) | train (s) |",
             "|---|---:|---:|---:|---:|"]
    for name, extra in (("none", []), ("class weights auto", ["--class-weights", "auto"]),
                        ("balanced sampler", ["--balanced-sampler"]),
                        ("both", ["--class-weights", "auto", "--balanced-sampler"])):
        metrics, seconds = train_and_eval(args.balance_template, "balance_" + name.replace(" ", "_"), args.out,
                                          data_args, ["--test-data-roots", str(data / "val")], extra, args)
        row = (f"| {name} | {metric(metrics, 'accuracy'):.2f} | {metric(metrics, 'macro_f1'):.2f} | "
               f"{metrics['per_class']['9']['recall']:.1f} | {seconds:.0f} |")
        print(row, flush=True)
        table.append(row)
    return table


def multilabel(args: argparse.Namespace) -> list[str]:
    data = make_data(args.out, "--multilabel")
    data_args = ["--train-ann-files", str(data / "train.json"), "--val-ann-files", str(data / "val.json")]
    table = ["| loss | val mAP (%) | micro F1 at 0.5 (%) | exact match (%) | train (s) |", "|---|---:|---:|---:|---:|"]
    for loss in ("asl", "bce"):
        metrics, seconds = train_and_eval(args.multilabel_template, f"multilabel_{loss}", args.out, data_args,
                                          ["--test-ann-files", str(data / "val.json")],
                                          [f"training.loss.name={loss}"],
                                          args)
        row = (f"| {loss} | {metric(metrics, 'mAP'):.2f} | {metric(metrics, 'micro_f1'):.2f} | "
               f"{metric(metrics, 'exact_match'):.2f} | {seconds:.0f} |")
        print(row, flush=True)
        table.append(row)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="*", default=["balance", "multilabel"], choices=("balance", "multilabel"))
    parser.add_argument("--balance-template", default="mobilenet_v3_large_1")
    parser.add_argument("--multilabel-template", default="mobilenet_v3_large_1_multilabel")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/datasets_bench"))
    args = parser.parse_args()
    tables = {part: (balance if part == "balance" else multilabel)(args) for part in args.parts}
    print(f"\n{args.epochs} epochs, batch {args.batch_size}, 32x32, plain recipe, from scratch; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    for part, table in tables.items():
        template = args.balance_template if part == "balance" else args.multilabel_template
        print(f"\n{part} ({template}):\n")
        print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
