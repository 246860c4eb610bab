#!/usr/bin/env python3
"""New classes without forgetting, at equal wall time: train.py --add-classes against the usual reference points.

  python tools/benchmark_incremental.py --digits --template convnet_small --epochs 5 --seeds 0 1
  python tools/benchmark_incremental.py --data PHOTOS --new-classes ants --template mobilenet_v3_small --size 96

The classes split into old ones and new ones (digits: old 0-6, new 7-9; --data: --new-classes, default the last
third). The old model trains on the old classes' training images (--old-epochs). Then, each from the old model:
(a) `--add-classes` on the new classes' images only, with the old model as the teacher of its classes (LwF) and a
replay sample of --replay-per-class images per old class, for --epochs epochs: its train wall time T is the
budget of the others, which train with `train.py --time-budget T`: (b) naive fine-tuning on the new classes'
images alone (`--add-classes` without teacher nor replay: the old classes are forgotten), (c) joint fine-tuning
on every training image (`--add-classes` on all the data: the upper bound of an incremental step), and (d)
joint training from scratch on every image with the old model's time added to T (what retraining costs).
Scores: top-1 on the old classes' validation images (test/ when the data has one) of the old model (before)
and of each new model (after), on the new classes' images, on all; mean over --seeds (± their spread).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmark_recipe import (TEMPLATES, add_data_source, data_folder, epochs_trained, instantiate, mean_spread, run,
                              scored_split)
OLD_DIGITS = [str(d) for d in range(7)]


def link_classes(source: Path, target: Path, names: list[str]) -> Path:
    """target/<name> -> source/<name> for each class (symbolic links: no copies)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        link = target / name
        if not link.exists():
            link.symlink_to((source / name).resolve(), target_is_directory=True)
    return target


def prepare_data(args: argparse.Namespace) -> tuple[Path, list[str], list[str]]:
    """The data folder (train/, val/[, test/]), the old classes and the new ones; the split folders under out/."""
    data = data_folder(args.data, args.out, args.size)
    classes = sorted(d.name for d in (data / "train").iterdir() if d.is_dir())
    if args.data is None:
        old = OLD_DIGITS
    elif args.new_classes:
        old = [c for c in classes if c not in args.new_classes]
    else:
        old = classes[:len(classes) - max(1, len(classes) // 3)]
    new = [c for c in classes if c not in old]
    if not old or not new:
        raise SystemExit(f"error: need old and new classes, got old {old}, new {new}")
    split = args.out / "split"
    link_classes(data / "train", split / "old_train", old)
    link_classes(data / "val", split / "old_val", old)
    link_classes(data / "train", split / "new_train", new)
    return data, old, new


def evaluate(checkpoint: Path, images: Path, old: list[str]) -> dict[str, float | None]:
    """Top-1 of a checkpoint on the old classes' images, the new ones' and all, of the classes it knows."""
    from clsengine import data as datasets
    from clsengine.loop import predict
    from workbench import loaders
    from workbench.classifier import load_trained_model
    from workbench.incremental import relabel

    t, classes, model = load_trained_model(checkpoint)
    scan = datasets.scan_folder(images)
    scan = relabel(datasets.select_classes(scan, [c for c in scan.classes if c in classes]), classes, "eval")
    device = torch.device("cpu")
    logits, labels = predict(model, loaders.val_loader(t, scan, device), device, progress=False)
    right = logits.argmax(1) == labels
    is_old = torch.tensor([classes[int(i)] in old for i in labels])

    def top1(mask: torch.Tensor) -> float | None:
        return 100.0 * float(right[mask].float().mean()) if mask.any() else None

    return {"old": top1(is_old), "new": top1(~is_old), "all": top1(torch.ones_like(is_old))}


def train(wd: Path, out: str, args: list[str], log: Path) -> tuple[float, int]:
    """train.py in the work dir; (its wall time, the epochs it trained)."""
    seconds = run([sys.executable, "train.py", "--overwrite", "--save-checkpoints-to", out, "--workers", "0",
                   "training.early_stopping_patience=null", "calibration.enabled=false", *args], wd, log)
    return seconds, epochs_trained(wd / out)


def one_seed(seed: int, args: argparse.Namespace, data: Path, old: list[str]) -> dict[str, dict]:
    """The old model, then the four variants; {variant: scores, seconds and epochs}."""
    wd = args.out / f"wd_seed{seed}"
    log = args.out / f"seed{seed}.log"
    log.unlink(missing_ok=True)
    instantiate(args.template, wd, log)
    split, test = args.out / "split", scored_split(data)
    common = [f"training.seed={seed}", *([f"input.size=[{args.size},{args.size}]"] if args.size else [])]
    old_s, old_ep = train(wd, "old", ["--train-data-roots", str(split / "old_train"), "--val-data-roots",
                                      str(split / "old_val"), "--epochs", str(args.old_epochs), *common], log)
    old_ckpt = wd / "old" / "best.pth"
    before = evaluate(old_ckpt, test, old)["old"]
    val = ["--val-data-roots", str(data / "val")]
    add = ["--add-classes", str(old_ckpt), *val, f"training.seed={seed}"]
    results = {}
    seconds, epochs = train(wd, "a", [*add, "--train-data-roots", str(split / "new_train"), "--replay-data-root",
                                      str(split / "old_train"), "--replay-per-class", str(args.replay_per_class),
                                      "--epochs", str(args.epochs)], log)
    results["a"] = {"seconds": seconds, "epochs": epochs}
    budget = ["--time-budget", str(round(seconds))]
    variants = {"b": [*add, "--train-data-roots", str(split / "new_train"), "training.distillation.enabled=false",
                      *budget],
                "c": [*add, "--train-data-roots", str(data / "train"), *budget],
                "d": ["--train-data-roots", str(data / "train"), *val, *common, "--time-budget",
                      str(round(seconds + old_s))]}
    for name, extra in variants.items():
        seconds, epochs = train(wd, name, extra, log)
        results[name] = {"seconds": seconds, "epochs": epochs}
    for name, r in results.items():
        r.update(evaluate(wd / name / "best.pth", test, old), before=before)
        print(f"seed {seed} {name}: old {before:.2f} -> {r['old']:.2f}, new {r['new']:.2f}, all {r['all']:.2f}, "
              f"{r['epochs']} epochs, {r['seconds']:.0f} s", flush=True)
    results["old model"] = {"seconds": old_s, "epochs": old_ep, "before": before, "old": before, "new": None,
                            "all": None}
    return results


LABELS = {"old model": "old model (old classes only)",
          "a": "(a) `--add-classes` + replay {n}/class (LwF)",
          "b": "(b) naive fine-tuning on the new classes' images",
          "c": "(c) `--add-classes` on all training images (joint fine-tuning)",
          "d": "(d) joint training from scratch (T + the old model's time)"}


def _mean(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    return mean_spread(values) if values else "–"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_source(parser, "scikit-learn's digits at --size (the default)")
    parser.add_argument("--new-classes", nargs="*", default=[], help="--data: the new classes (default: last third)")
    parser.add_argument("--template", default="convnet_small")
    parser.add_argument("--old-epochs", type=int, default=5, help="epochs of the old model")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of (a); its wall time is the others' budget")
    parser.add_argument("--replay-per-class", type=int, default=20)
    parser.add_argument("--size", type=int, default=None, help="input.size (digits: written at this size, 32)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/incremental_bench"))
    args = parser.parse_args()
    if not (TEMPLATES / args.template / "template.yaml").is_file():
        print(f"error: no template {args.template} in {TEMPLATES}", file=sys.stderr)
        return 2
    if args.data is None and args.size is None:
        args.size = 32
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    data, old, new = prepare_data(args)
    started = time.perf_counter()
    runs = [one_seed(seed, args, data, old) for seed in args.seeds]
    print(f"\n{args.template}, {data.name}" + (f" at {args.size}x{args.size}" if args.size else "")
          + f": old classes {', '.join(old)}; new {', '.join(new)}; seeds {args.seeds}; T = (a)'s train wall time; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.perf_counter() - started:.0f} s in all\n")
    print("| variant | old classes top-1 before → after (%) | new classes top-1 (%) | all (%) | epochs | "
          "train wall time (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for key in ("old model", "a", "b", "c", "d"):
        rs = [r[key] for r in runs]
        epochs = "/".join(str(e) for e in sorted({r["epochs"] for r in rs}))
        change = _mean([r['before'] for r in rs]) + ("" if key == "old model" else f" → {_mean([r['old'] for r in rs])}")
        print(f"| {LABELS[key].format(n=args.replay_per_class)} | {change} | {_mean([r['new'] for r in rs])} | "
              f"{_mean([r['all'] for r in rs])} | "
              f"{epochs} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
