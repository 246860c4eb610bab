#!/usr/bin/env python3
"""Write scikit-learn's bundled 8x8 handwritten digits as a class-folder dataset (offline, real data).

  python tools/make_digits_dataset.py OUTPUT_DIR [--size 32] [--val-fraction 0.2] [--per-class N]

Creates OUTPUT_DIR/train/<digit>/*.png and OUTPUT_DIR/val/<digit>/*.png: 1797 images, 10 classes,
upscaled to --size pixels, split per class with a fixed seed so the split is the same every time, and
OUTPUT_DIR/val_ground_truth.json ({image path: digit}, the ground truth `eval.py --gts` reads).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise SystemExit("error: scikit-learn is not installed (it comes with nncf; run ./init_venv.sh)") from None
    digits = sk_load_digits()
    return digits.images, digits.target


def write_dataset(output: Path, size: int = 32, val_fraction: float = 0.2, per_class: int | None = None,
                  seed: int = 0) -> dict[str, int]:
    """Write the split; returns the number of images per split."""
    images, targets = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    truth: dict[str, str] = {}
    for digit in range(10):
        index = np.flatnonzero(targets == digit)
        rng.shuffle(index)
        if per_class is not None:
            index = index[:per_class]
        n_val = max(1, int(round(len(index) * val_fraction)))
        for split, chosen in (("val", index[:n_val]), ("train", index[n_val:])):
            folder = output / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                pixels = (images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
                path = folder / f"{i:04d}.png"
                Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR).save(path)
                counts[split] += 1
                if split == "val":
                    truth[str(path.resolve())] = str(digit)
    (output / "val_ground_truth.json").write_text(json.dumps(truth, indent=0), encoding="utf-8")
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="dataset folder to create")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each class kept for validation")
    parser.add_argument("--per-class", type=int, default=None, help="use at most this many images per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0.0 < args.val_fraction < 1.0:
        print("error: --val-fraction must be between 0 and 1", file=sys.stderr)
        return 2
    counts = write_dataset(args.output, args.size, args.val_fraction, args.per_class, args.seed)
    print(f"Wrote {counts['train']} train and {counts['val']} val images of 10 digit classes to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
