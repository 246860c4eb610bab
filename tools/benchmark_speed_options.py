#!/usr/bin/env python3
"""Which speed options pay off on this machine? Training images/s of each template's real training step under
channels_last, bf16 autocast and torch.compile, against the plain fp32 step.

  python tools/benchmark_speed_options.py [--templates mobilenet_v3_small resnet18] [--sizes 32 224]
                                          [--variants fp32 channels_last bf16 compile] [--batch-size N]
                                          [--steps 6] [--rounds 3] [--gpu-num 1]

The step is the template's own (model, loss, optimizer incl. SAM, EMA, mutual learning: clsengine.loop's
train_one_epoch), on one batch of the digits images already in memory, repeated --steps times: the model limit of
tools/benchmark_pipeline.py, so the data pipeline plays no part. Variants:
  fp32           training.channels_last=false, training.amp=none
  channels_last  training.channels_last=true (weights and batches NHWC)
  bf16           training.amp=bf16 (autocast), contiguous layout
  compile        fp32, the forward passes of the model and its partners through torch.compile (inductor);
                 its first step, which compiles, is reported apart
  compile+channels_last  both
After one warm-up pass of each, --rounds rounds run every variant once in turn (so that drifts of the machine's
speed hit all alike); medians are reported with the speed-up over fp32 of the same round.
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

from benchmark_pipeline import TEMPLATES, Repeated, build_training

VARIANTS = {
    "fp32": {"training.channels_last": False, "training.amp": "none"},
    "channels_last": {"training.channels_last": True, "training.amp": "none"},
    "bf16": {"training.channels_last": False, "training.amp": "bf16"},
    "compile": {"training.channels_last": False, "training.amp": "none"},
    "compile+channels_last": {"training.channels_last": True, "training.amp": "none"},
}


def measure(template: str, size: int, args: argparse.Namespace) -> list[dict]:
    runs, first_step = {}, {}
    for name in args.variants:
        overrides = dict(VARIANTS[name])
        if args.batch_size:
            overrides["hyper_parameters.basic.batch_size"] = args.batch_size
        run = build_training(template, size, overrides, args.out, gpu_num=args.gpu_num)
        forward = None
        if name.startswith("compile"):
            forward = [torch.compile(m) for m in (run.model, *run.recipe.aux_models)]
        repeated = Repeated(next(iter(run.loader)), args.steps, run.device)
        start = time.perf_counter()
        run.epoch_speed(Repeated(repeated.batch, 1, run.device), 0, forward)    # warm-up (compiles)
        first_step[name] = time.perf_counter() - start
        run.epoch_speed(repeated, 0, forward)
        runs[name] = (run, repeated, forward)
        print(f"  {template} {size}x{size} {name}: first step {first_step[name]:.1f} s", file=sys.stderr, flush=True)
    speeds: dict[str, list[float]] = {name: [] for name in args.variants}
    for r in range(1, args.rounds + 1):
        for name, (run, repeated, forward) in runs.items():
            speeds[name].append(run.epoch_speed(repeated, r, forward))
    rows = []
    for name in args.variants:
        base = speeds.get("fp32")
        rows.append({"template": template, "size": size, "batch": runs[name][1].batch[0].shape[0], "variant": name,
                     "speed": statistics.median(speeds[name]), "first": first_step[name],
                     "speedup": statistics.median(s / b for s, b in zip(speeds[name], base)) if base else None})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--templates", nargs="+", default=["mobilenet_v3_small", "resnet18"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 224])
    parser.add_argument("--variants", nargs="+", default=["fp32", "channels_last", "bf16"], choices=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=0, help="batch size (default: the template's)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per timed pass")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes of every variant")
    parser.add_argument("--gpu-num", type=int, default=0, help="1: train on the first CUDA device")
    parser.add_argument("--out", type=Path, default=Path("/tmp/pipeline_bench"), help="where the digits images go")
    args = parser.parse_args()
    for name in args.templates:
        if not (TEMPLATES / name / "template.yaml").is_file():
            print(f"error: no template {name} in {TEMPLATES}", file=sys.stderr)
            return 2
    if args.steps < 1 or args.rounds < 1:
        print("error: --steps and --rounds must be at least 1", file=sys.stderr)
        return 2
    rows = [row for name in args.templates for size in args.sizes for row in measure(name, size, args)]
    device = "CUDA " + torch.cuda.get_device_name(0) if args.gpu_num and torch.cuda.is_available() else "CPU"
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {device}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; full template recipe, {args.steps} steps per "
          f"pass, median of {args.rounds} rounds\n")
    print("| template | input | batch | variant | train img/s | vs fp32 | first step (s) |")
    print("|---|---|---:|---|---:|---:|---:|")
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        print(f"| {r['template']} | {r['size']}x{r['size']} | {r['batch']} | {r['variant']} | {r['speed']:.1f} | "
              f"{speedup} | {r['first']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
