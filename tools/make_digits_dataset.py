#!/usr/bin/env python3
"""Write scikit-learn's bundled 8x8 handwritten digits as a dataset (offline, real data).

  python tools/make_digits_dataset.py OUTPUT_DIR [--size 32] [--val-fraction 0.2] [--per-class N]
  python tools/make_digits_dataset.py OUTPUT_DIR --long-tail 0.05     # imbalanced training split
  python tools/make_digits_dataset.py OUTPUT_DIR --multilabel          # 2x2 grids of digits, COCO JSON

Creates OUTPUT_DIR/train/<digit>/*.png and OUTPUT_DIR/val/<digit>/*.png: 1797 images, 10 classes,
upscaled to --size pixels, split per class with a fixed seed so the split is the same every time, and
OUTPUT_DIR/val_ground_truth.json ({image path: digit}, the ground truth `eval.py --gts` reads).
--long-tail R keeps, of digit d's training images, the share R^(d/9) (digit 0 all, digit 9 the share R);
validation stays balanced. --multilabel writes instead OUTPUT_DIR/images/*.png, each a 2x2 grid holding
1 to 3 digits in random cells, and OUTPUT_DIR/train.json / val.json in COCO form (image-level labels as
zero-area boxes, categories "0".."9"): the labels of an image are the distinct digits it shows.
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
                  seed: int = 0, long_tail: float | None = None) -> dict[str, int]:
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
        train = index[n_val:]
        if long_tail is not None:
            train = train[:max(1, int(round(len(train) * long_tail ** (digit / 9))))]
        for split, chosen in (("val", index[:n_val]), ("train", train)):
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


def write_multilabel(output: Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """2x2 grids of digits (validation grids use digits no training grid uses), with COCO annotations."""
    images, targets = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    n_val = int(round(len(order) * val_fraction))
    pools = {"val": order[:n_val], "train": order[n_val:]}
    (output / "images").mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, pool in pools.items():
        coco: dict[str, list] = {"images": [], "annotations": [],
                                 "categories": [{"id": d + 1, "name": str(d)} for d in range(10)]}
        for n in range(len(pool)):
            grid = np.zeros((16, 16), dtype=np.float64)
            cells = rng.choice(4, size=int(rng.integers(1, 4)), replace=False)
            digits = set()
            for cell in cells:
                i = int(rng.choice(pool))
                y, x = divmod(int(cell), 2)
                grid[y * 8:(y + 1) * 8, x * 8:(x + 1) * 8] = images[i]
                digits.add(int(targets[i]))
            name = f"images/{split}_{n:04d}.png"
            pixels = (grid * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR).save(output / name)
            image_id = len(coco["images"]) + 1
            coco["images"].append({"id": image_id, "file_name": name, "width": size, "height": size})
            for d in sorted(digits):
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                            "category_id": d + 1, "bbox": [0, 0, 0, 0], "area": 0})
        (output / f"{split}.json").write_text(json.dumps(coco), encoding="utf-8")
        counts[split] = len(pool)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="dataset folder to create")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each class kept for validation")
    parser.add_argument("--per-class", type=int, default=None, help="use at most this many images per class")
    parser.add_argument("--long-tail", type=float, default=None, metavar="R",
                        help="imbalanced training split: digit d keeps the share R^(d/9) of its images")
    parser.add_argument("--multilabel", action="store_true",
                        help="2x2 grids of 1-3 digits with COCO annotations (labels: the digits shown)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0.0 < args.val_fraction < 1.0:
        print("error: --val-fraction must be between 0 and 1", file=sys.stderr)
        return 2
    if args.long_tail is not None and not 0.0 < args.long_tail <= 1.0:
        print("error: --long-tail must be in (0, 1]", file=sys.stderr)
        return 2
    if args.multilabel:
        counts = write_multilabel(args.output, args.size, args.val_fraction, args.seed)
        print(f"Wrote {counts['train']} train and {counts['val']} val multi-label images to {args.output}/images, "
              f"annotations in train.json and val.json")
        return 0
    counts = write_dataset(args.output, args.size, args.val_fraction, args.per_class, args.seed, args.long_tail)
    print(f"Wrote {counts['train']} train and {counts['val']} val images of 10 digit classes to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
