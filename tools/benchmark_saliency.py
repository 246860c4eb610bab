#!/usr/bin/env python3
"""Saliency sanity checks for every single-label template: train briefly on the bundled digits, then run
`explain.py --check` on the trained checkpoint and print one markdown table.

  python tools/benchmark_saliency.py [--templates resnet18 convnet_small] [--epochs 3] [--check-images 32]
                                     [--size 32] [--out /tmp/saliency_bench]

Data: scikit-learn's bundled handwritten digits (real images, offline) as class folders at --size pixels
(tools/make_digits_dataset.py; 1438 train / 359 val). Each template runs the real work-dir scripts:
train.py from scratch for --epochs with the demo's short-budget recipe (SAM, the auxiliary model and the LR
finder off, cosine schedule; tools/benchmark_compression.py), except efficientnet_lite0, which starts from
its ImageNet weights (the template's snapshot, as instantiate_template.py copies it; --no-pretrained-lite0
trains it from scratch like the others); then explain.py --check on outputs/best.pth with --check-images
images of val/. The table gives val top-1 (best epoch), the randomisation check's mean rank correlation and
SSIM between the trained and the re-initialised model's Recipro-CAM maps, the deletion AUC of the saliency
order and of random orders (their ratio is the check's value), the verdict, and the seconds of training and
of the check. --reuse keeps work dirs whose training finished (best.pth present).
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
from pathlib import Path

import yaml

from benchmark_compression import SHORT_RECIPE
from benchmark_first_run import single_label_templates
from benchmark_recipe import TEMPLATES, digits_dataset, instantiate, run
from clsengine.saliency_checks import MAX_DELETION_RATIO, MAX_RANK_CORRELATION

PRETRAINED = {"efficientnet_lite0"}   # templates whose snapshot (ImageNet weights) is the starting point


def best_top1(history: Path) -> float:
    """The best validation top-1 of a run (of the model or of its EMA, whichever best.pth kept), from history.csv."""
    with open(history, newline="") as f:
        return max(float(r[k]) for r in csv.DictReader(f) for k in ("val_top1", "ema_val_top1") if r.get(k))


def refresh_work_dir(name: str, args: argparse.Namespace, log: Path) -> None:
    """(Re)instantiate a template's work dir: its scripts are copies, refreshed even where --reuse keeps outputs."""
    instantiate(name, args.out / name, log, snapshot=name in PRETRAINED and args.pretrained_lite0)


def train(name: str, data: Path, args: argparse.Namespace, log: Path) -> float:
    """Train one template (see the module doc); the training's wall time in seconds."""
    work_dir = args.out / name
    return run([sys.executable, "train.py", "--overwrite", "--train-data-roots", str(data / "train"),
                "--val-data-roots", str(data / "val"), "--epochs", str(args.epochs), "--workers", str(args.workers),
                f"input.size=[{args.size},{args.size}]", "tensorboard=false", *SHORT_RECIPE, *args.set], work_dir, log)


def check(name: str, data: Path, args: argparse.Namespace, log: Path) -> tuple[dict, float]:
    """explain.py --check on the template's best.pth: its YAML report and wall time (exit 4, a failed check,
    is a result, not an error)."""
    work_dir = args.out / name
    seconds = run([sys.executable, "explain.py", "--load-weights", "outputs/best.pth", "--input", str(data / "val"),
                   "--save-to", "saliency_checks", "--check", "--check-images", str(args.check_images)],
                  work_dir, log, ok_codes=(0, 4))
    return yaml.safe_load((work_dir / "saliency_checks" / "saliency_checks.yaml").read_text()), seconds


def row(name: str, args: argparse.Namespace, report: dict, train_s: float | None, check_s: float) -> str:
    r, d = report["checks"]["randomisation"], report["checks"]["deletion"]
    start = "ImageNet" if name in PRETRAINED and args.pretrained_lite0 else "scratch"
    top1 = best_top1(args.out / name / "outputs" / "history.csv")
    trained = f"{train_s:.0f}" if train_s is not None else "reused"
    return (f"| {name} | {start} | {top1:.1f} | {r['value']:.3f} | {r['ssim_mean']:.3f} | {d['auc_saliency']:.3f} | "
            f"{d['auc_random']:.3f} | {d['value']:.3f} | {'pass' if report['passed'] else 'FAIL'} | {trained} | "
            f"{check_s:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--templates", nargs="+", default=None, help="default: every single-label template")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--check-images", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="template overrides for train.py")
    parser.add_argument("--no-pretrained-lite0", dest="pretrained_lite0", action="store_false",
                        help="train efficientnet_lite0 from scratch too")
    parser.add_argument("--reuse", action="store_true", help="keep work dirs whose training finished")
    parser.add_argument("--out", type=Path, default=Path("/tmp/saliency_bench"))
    args = parser.parse_args()

    names = args.templates or single_label_templates()
    missing = [n for n in names if not (TEMPLATES / n / "template.yaml").is_file()]
    if missing:
        print(f"error: no template {', '.join(missing)} in {TEMPLATES}", file=sys.stderr)
        return 2
    data = digits_dataset(args.out, args.size)
    rows = []
    for name in names:
        log = args.out / f"{name}.log"
        train_s = None
        reuse = args.reuse and (args.out / name / "outputs" / "best.pth").is_file()
        if not reuse:
            log.unlink(missing_ok=True)
        refresh_work_dir(name, args, log)
        if not reuse:
            train_s = train(name, data, args, log)
        report, check_s = check(name, data, args, log)
        rows.append(row(name, args, report, train_s, check_s))
        print(rows[-1], flush=True)

    print(f"\ndigits {args.size}x{args.size} (1438 train / 359 val), {args.epochs} epochs, explain.py --check on "
          f"{args.check_images} val images; {platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print(f"| template | init | val top-1 (%) | randomisation: rank corr. (< {MAX_RANK_CORRELATION:g}) | SSIM | "
          f"deletion AUC saliency | deletion AUC random | ratio (< {MAX_DELETION_RATIO:g}) | checks | train (s) | "
          f"check (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
