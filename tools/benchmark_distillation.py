#!/usr/bin/env python3
"""Does a stronger teacher pay for a small student at equal wall time? (training.distillation)

  python tools/benchmark_distillation.py --digits --student mobilenet_v3_small --teacher convnet_small \\
      --teacher-epochs 20 --epochs 3 --seeds 0 1 2
  python tools/benchmark_distillation.py --data PHOTOS --size 96 --student mobilenet_v3_small --teacher resnet18
  python tools/benchmark_distillation.py --data PHOTOS --size 96 --teacher efficientnet_lite0 --teacher-pretrained \
      --teacher-epochs 3 --epochs 10 --seeds 0 1 2        # a fine-tuned ImageNet teacher at its own 224 px

The teacher (--teacher template, --teacher-epochs) trains once on the training images. Then, for each seed, the
student trains without a teacher for --epochs epochs: its train wall time T is the budget. The student with the
teacher (training.distillation, --temperature, --weight) then trains with `train.py --time-budget T` (the
teacher's forward passes cost epochs), and also for --epochs epochs (what the teacher brings per epoch, at a
higher cost). Every run goes through the work-dir train.py with the template's other defaults; top-1 on val
(test/ when the data has one, best.pth chosen on val); mean over --seeds (± their spread).
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


def top1(checkpoint: Path, images: Path) -> float:
    """Top-1 (%) of a checkpoint on class folders (the classes it knows)."""
    from clsengine import data as datasets
    from clsengine.loop import predict
    from clsengine.metrics import primary_score
    from workbench import loaders
    from workbench.classifier import load_trained_model
    from workbench.incremental import relabel

    t, classes, model = load_trained_model(checkpoint)
    scan = datasets.scan_folder(images)
    scan = relabel(datasets.select_classes(scan, [c for c in scan.classes if c in classes]), classes, "eval")
    device = torch.device("cpu")
    return primary_score(*predict(model, loaders.val_loader(t, scan, device), device, progress=False))


def train(wd: Path, out: str, data: Path, extra: list[str], log: Path) -> dict:
    """train.py on data/train, data/val; its wall time, epochs and top-1 on the evaluation images."""
    seconds = run([sys.executable, "train.py", "--overwrite", "--save-checkpoints-to", out, "--workers", "0",
                   "--train-data-roots", str(data / "train"), "--val-data-roots", str(data / "val"),
                   "training.early_stopping_patience=null", "calibration.enabled=false", *extra], wd, log)
    return {"seconds": seconds, "epochs": epochs_trained(wd / out), "top1": top1(wd / out / "best.pth", scored_split(data))}


def _cell(rs: list[dict]) -> str:
    epochs = "/".join(str(e) for e in sorted({r["epochs"] for r in rs}))
    return f"{mean_spread([r['top1'] for r in rs])} | {epochs} | {statistics.mean(r['seconds'] for r in rs):.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_source(parser, "scikit-learn's digits at --size (the default)")
    parser.add_argument("--student", default="mobilenet_v3_small")
    parser.add_argument("--teacher", default="convnet_small", help="the teacher's template")
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the student without a teacher (T)")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--size", type=int, default=None, help="input.size (digits: written at this size, 32)")
    parser.add_argument("--teacher-pretrained", action="store_true",
                        help="the teacher starts from its template's ImageNet snapshot (e.g. efficientnet_lite0)")
    parser.add_argument("--teacher-size", type=int, default=None,
                        help="the teacher's input.size (default: --size; a pretrained teacher: its template's)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/distillation_bench"))
    args = parser.parse_args()
    for name in (args.student, args.teacher):
        if not (TEMPLATES / name / "template.yaml").is_file():
            print(f"error: no template {name} in {TEMPLATES}", file=sys.stderr)
            return 2
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        args.size = args.size or 32
    data = data_folder(args.data, args.out, args.size)
    size = [f"input.size=[{args.size},{args.size}]"] if args.size else []
    started = time.perf_counter()
    log = args.out / "teacher.log"
    log.unlink(missing_ok=True)
    teacher_wd = instantiate(args.teacher, args.out / "teacher", log, snapshot=args.teacher_pretrained)
    teacher_size = args.teacher_size or (None if args.teacher_pretrained else args.size)
    teacher_input = [f"input.size=[{teacher_size},{teacher_size}]"] if teacher_size else []
    teacher = train(teacher_wd, "outputs", data, ["--epochs", str(args.teacher_epochs), *teacher_input], log)
    print(f"teacher {args.teacher}: top-1 {teacher['top1']:.2f} ({teacher['epochs']} epochs, "
          f"{teacher['seconds']:.0f} s)", flush=True)
    distil = ["training.distillation.enabled=true", f"training.distillation.teacher={teacher_wd}",
              f"training.distillation.temperature={args.temperature}", f"training.distillation.weight={args.weight}"]
    results: dict[str, list[dict]] = {"alone": [], "teacher, equal time": [], "teacher, equal epochs": []}
    for seed in args.seeds:
        log = args.out / f"seed{seed}.log"
        log.unlink(missing_ok=True)
        wd = instantiate(args.student, args.out / f"student_seed{seed}", log)
        common = [f"training.seed={seed}", *size]
        alone = train(wd, "alone", data, ["--epochs", str(args.epochs), *common], log)
        runs = {"alone": alone,
                "teacher, equal time": train(wd, "time", data, ["--time-budget", str(round(alone["seconds"])),
                                                                 *common, *distil], log),
                "teacher, equal epochs": train(wd, "epochs", data, ["--epochs", str(args.epochs), *common, *distil],
                                               log)}
        for name, r in runs.items():
            results[name].append(r)
            print(f"seed {seed} {name:22s} top-1 {r['top1']:6.2f}  {r['epochs']:3d} epochs  {r['seconds']:6.1f} s",
                  flush=True)

    print(f"\nstudent {args.student}, teacher {args.teacher} ({args.teacher_epochs} epochs: top-1 "
          f"{teacher['top1']:.2f}, {teacher['seconds']:.0f} s), {data.name}" + (f" at {args.size}x{args.size}" if
                                                                                args.size else "")
          + f", T = {args.temperature:g}, weight {args.weight:g}, seeds {args.seeds}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.perf_counter() - started:.0f} s in all\n")
    print("| student | top-1 (%) | epochs | train wall time (s) |")
    print("|---|---:|---:|---:|")
    for name, rs in results.items():
        label = {"alone": f"alone, {args.epochs} epochs (T)", "teacher, equal time": "with the teacher, budget T",
                 "teacher, equal epochs": f"with the teacher, {args.epochs} epochs"}[name]
        print(f"| {label} | {_cell(rs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
