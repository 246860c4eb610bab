#!/usr/bin/env python3
"""Which score tells "none of my classes": classes held out of training on real photo sets, scored at test time.

  python tools/benchmark_unknown.py --data PHOTOS [PHOTOS ...] --holdout 2 --splits 2 --time-budget 60

For each --data folder (train/<class>/, val/<class>/, test/<class>/) and each of --splits held-out class sets
(--holdout classes each, drawn with a fixed seed per split), the known classes' train/ and val/ images are
linked into a temporary dataset, the template (default efficientnet_lite0, from its ImageNet snapshot) is
trained as a newcomer would (`train.py --time-budget`), which calibrates best.pth on val; then the known
classes' test images and the held-out classes' test images are scored with each rejection score of
clsengine.calibration (the maximum calibrated probability, the negative energy) under the fitted temperature.
Printed: per run and score, the AUROC (held-out images should score lower), and with that score's threshold
fitted as train.py fits it (keeping 95% of the correct validation answers, under the fitted temperature) the
share of known test images answered unknown, the top-1 on the rest, and the share of held-out images answered
unknown.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from benchmark_recipe import instantiate, run
from clsengine import data as datasets
from clsengine.calibration import REJECTION_SCORES, auroc, fit_rejection, rejection_scores
from workbench.classifier import load_classifier

KEEP = 0.95   # calibration.keep's default


def known_subset(data: Path, known: list[str], out: Path) -> Path:
    """train/ and val/ of the known classes only, as symlinks (no copy of the photos)."""
    for split in ("train", "val"):
        for name in known:
            target = out / split / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.symlink((data / split / name).resolve(), target)
    return out


def logits_of(model, folder: Path, classes: list[str]):
    """Logits of the images of `classes` under `folder`, and each image's index in `classes`."""
    samples = [(str(p), i) for i, name in enumerate(classes) for p in datasets.list_images(folder / name)[0]]
    logits, labels = model.predict(samples, folder.name, multihot=False)
    return logits, labels.numpy()


def one_run(data: Path, held_out: list[str], args: argparse.Namespace, out: Path) -> list[dict]:
    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    known = [c for c in classes if c not in held_out]
    subset = known_subset(data, known, out / "data")
    wd, log = out / "wd", out / "run.log"
    instantiate(args.template, wd, log, snapshot=True)
    run([sys.executable, "train.py", "--overwrite", "--train-data-roots", str(subset / "train"), "--val-data-roots",
         str(subset / "val"), "--time-budget", str(args.time_budget)], wd, log)
    model = load_classifier(wd / "outputs" / "best.pth", template_path=str(wd / "template.yaml"), overrides={},
                            classes=None, classes_source="")
    temperature = float(model.calibration.temperature)
    val, val_labels = logits_of(model, subset / "val", known)
    inside, labels = logits_of(model, data / "test", known)
    outside, _ = logits_of(model, data / "test", held_out)
    correct = inside.argmax(1).numpy() == labels
    rows = []
    for score in REJECTION_SCORES:
        s_in = rejection_scores(inside, temperature, score)
        s_out = rejection_scores(outside, temperature, score)
        # each score's threshold as train.py fits it: keep 95% of the correct validation answers
        right = torch.from_numpy(val.argmax(1).numpy() == val_labels)
        cut = fit_rejection(rejection_scores(val, temperature, score), right, KEEP)
        rejected = (s_in < cut).numpy()
        rows.append({"score": score, "auroc": auroc(s_in, s_out), "top1": 100 * correct.mean(),
                     "known_rejected": 100 * rejected.mean(), "top1_accepted": 100 * correct[~rejected].mean(),
                     "held_out_rejected": 100 * float((s_out < cut).float().mean())})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="+", required=True)
    parser.add_argument("--template", default="efficientnet_lite0")
    parser.add_argument("--holdout", type=int, default=2, help="classes held out of training per run")
    parser.add_argument("--splits", type=int, default=2, help="held-out class sets per dataset")
    parser.add_argument("--time-budget", default="60")
    parser.add_argument("--out", type=Path, default=Path("/tmp/unknown_bench"))
    args = parser.parse_args()
    table = []
    for data in args.data:
        classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
        for split in range(args.splits):
            held_out = sorted(np.random.default_rng(split).choice(classes, args.holdout, replace=False).tolist())
            out = args.out / f"{data.name}_{split}"
            for row in one_run(data, held_out, args, out):
                table.append((data.name, held_out, row))
                print(f"{data.name} held out {held_out}: {row}", flush=True)
    print(f"\n{args.template}, train.py --time-budget {args.time_budget}; {platform.machine()}, {os.cpu_count()} cores\n")
    print("| set | held out | score | AUROC | top-1 known | known answered unknown (%) | top-1 on the rest | "
          "held-out answered unknown (%) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, held_out, r in table:
        extra = f"{r['known_rejected']:.1f} | {r['top1_accepted']:.2f} | {r['held_out_rejected']:.1f}"
        print(f"| {name} | {', '.join(held_out)} | {r['score']} | {r['auroc']:.3f} | {r['top1']:.2f} | {extra} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
