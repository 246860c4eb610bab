#!/usr/bin/env python3
"""Ablation of the training recipe: train one template with each technique on and off, same epoch budget.

  python tools/benchmark_recipe.py [--template mobilenet_v3_large_1] [--epochs 10] [--out /tmp/recipe_bench]

Data: scikit-learn's bundled handwritten digits (real images, offline), written as class folders and
upscaled to --size. Every variant runs the real work-dir scripts (train.py, then eval.py on best.pth)
from the same seed; early stopping is off so each gets exactly --epochs epochs. Prints a markdown
table of top-1 and wall time per variant.

Variants: `plain` switches every technique off (softmax + linear head, SGD, no EMA, no mutual learning,
no LR finder, no AugMix and none of the extra photometric ops); `+X` is plain with X on; `full` is the
template's own recipe; `full -X` is the template's recipe with X off.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = REPO_ROOT / "models" / "image_classification" / "model_templates" / "custom-classification"

TECHNIQUES: dict[str, tuple[list[str], list[str]]] = {
    # name: (overrides that switch it on, overrides that switch it off)
    "am_softmax": (["model.head=cosine", "training.loss.name=am_softmax"],
                   ["model.head=linear", "training.loss.name=softmax"]),
    "sam": (["training.optimizer.sam.enabled=true"], ["training.optimizer.sam.enabled=false"]),
    "ema": (["training.ema.enabled=true"], ["training.ema.enabled=false"]),
    "mutual": (["training.mutual_learning.enabled=true"], ["training.mutual_learning.enabled=false"]),
    "lr_finder": (["training.lr_finder.enabled=true"], ["training.lr_finder.enabled=false"]),
    "augmix": (["training.augmentation.augmix=true"], ["training.augmentation.augmix=false"]),
    "bf16": (["training.amp=bf16"], ["training.amp=none"]),
}
EXTRA_AUG_OFF = ["training.augmentation.posterize_p=0", "training.augmentation.equalize_p=0",
                 "training.augmentation.noise_p=0", "training.augmentation.blur_p=0",
                 "training.augmentation.cutout_p=0", "training.augmentation.rotate_p=0"]


def variants(names: list[str]) -> dict[str, list[str]]:
    plain = [o for _, off in TECHNIQUES.values() for o in off] + EXTRA_AUG_OFF
    table: dict[str, list[str]] = {"plain": plain}
    for name, (on, _) in TECHNIQUES.items():
        table[f"+{name}"] = plain + on
    table["full"] = []
    for name, (_, off) in TECHNIQUES.items():
        table[f"full -{name}"] = off
    return {k: v for k, v in table.items() if not names or k in names}


def run(cmd: list[str], cwd: Path, log: Path, ok_codes: tuple[int, ...] = (0,)) -> float:
    """Run a command with its output appended to `log`; its wall time in seconds."""
    start = time.perf_counter()
    with open(log, "a") as out:
        result = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode not in ok_codes:
        raise SystemExit(f"error: {' '.join(cmd)} failed in {cwd}; see {log}")
    return time.perf_counter() - start


def digits_dataset(out: Path, size: int) -> Path:
    """out/digits with train/ and val/ class folders at size x size (written once, then reused)."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / "digits"
    if not (data / "train").is_dir():
        run([sys.executable, str(REPO_ROOT / "tools" / "make_digits_dataset.py"), str(data), "--size", str(size)],
            REPO_ROOT, out / "data.log")
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--template", default="mobilenet_v3_large_1")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/recipe_bench"))
    parser.add_argument("--variants", nargs="*", default=[], help="subset of variant names (default: all)")
    args = parser.parse_args()

    template = TEMPLATES / args.template / "template.yaml"
    if not template.is_file():
        print(f"error: no template {args.template} in {TEMPLATES}", file=sys.stderr)
        return 2
    data = digits_dataset(args.out, args.size)
    rows = []
    for name, overrides in variants(args.variants).items():
        work_dir = args.out / name.replace(" ", "_").replace("+", "plus_").replace("-", "minus_")
        log = args.out / f"{work_dir.name}.log"
        log.unlink(missing_ok=True)
        run([sys.executable, str(REPO_ROOT / "tools" / "instantiate_template.py"), str(template), str(work_dir),
             "--do-not-load-snapshot", "--overwrite"], REPO_ROOT, log)
        train_s = run([sys.executable, "train.py", "--train-data-roots", str(data / "train"), "--val-data-roots",
                       str(data / "val"), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                       "--workers", str(args.workers), f"input.size=[{args.size},{args.size}]",
                       "training.early_stopping_patience=null", *overrides], work_dir, log)
        run([sys.executable, "eval.py", "--load-weights", str(work_dir / "outputs" / "best.pth"),
             "--test-data-roots", str(data / "val"), "--workers", str(args.workers)], work_dir, log)
        metrics = yaml.safe_load((work_dir / "metrics.yaml").read_text())
        top1 = next(m["value"] for m in metrics["metrics"] if m["key"] == "accuracy")
        rows.append((name, top1, train_s))
        print(f"{name:16s} top-1 {top1:6.2f}  train {train_s:7.1f} s", flush=True)

    base = next((top1 for name, top1, _ in rows if name == "plain"), None)
    print(f"\n{args.template}, digits {args.size}x{args.size} (1438 train / 359 val), {args.epochs} epochs, "
          f"batch {args.batch_size}, from scratch; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores\n")
    print("| variant | val top-1 (%) | vs plain | train wall time (s) |")
    print("|---|---:|---:|---:|")
    for name, top1, seconds in rows:
        delta = f"{top1 - base:+.2f}" if base is not None else ""
        print(f"| {name} | {top1:.2f} | {delta} | {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
