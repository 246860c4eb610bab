#!/usr/bin/env python3
"""Does the data pipeline keep the model busy? Training images/s of the full pipeline against the model alone.

  python tools/benchmark_pipeline.py [--templates mobilenet_v3_large_1 resnet18] [--sizes 32 224]
                                     [--workers N] [--epochs 3] [--max-images 0] [--out /tmp/pipeline_bench]

For each template and input size, on scikit-learn's digits written as PNG files at that size (--max-images of
the 1438 training images), three measurements of the template's real training step (its model, loss, optimizer incl. SAM,
EMA, mutual learning; clsengine.loop.train_one_epoch):
  pipeline  images from disk: decoding, augmentation, batching by the template's loader (training.workers
            processes unless --workers), then forward, backward and step;
  limit     the same step on one batch already in memory, repeated as many times: the most this model can
            train on this machine;
  loader    the loader alone, its batches consumed and dropped.
After one warm-up epoch of each, --epochs pipeline epochs alternate with as many limit epochs (so that drifts
of the machine's speed hit both alike); medians are reported, with the median of the per-pair ratios
pipeline / limit (1.0: the data never keeps the model waiting).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmark_recipe import TEMPLATES, digits_dataset
from clsengine import data as datasets
from clsengine.loop import train_one_epoch
from clsengine.recipe import Recipe
from clsengine.utils import seed_everything, select_device
from workbench import auto
from workbench import factories, loaders
from workbench.template import Template, load_template, parse_override



class Repeated:
    """`steps` copies of one batch already in the device's memory: a loader that costs nothing."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor], steps: int, device: torch.device):
        self.batch, self.steps = tuple(x.to(device) for x in batch), steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return (self.batch for _ in range(self.steps))


@dataclass
class Training:
    """Everything one training step of a template needs, built as train.py builds it."""
    t: Template
    scan: datasets.DatasetScan
    device: torch.device
    model: torch.nn.Module
    recipe: Recipe
    optimizer: torch.optim.Optimizer
    loader: datasets.EpochLoader
    scheduler: object
    criterion: torch.nn.Module

    def epoch_speed(self, source, epoch: int, forward_models: list[torch.nn.Module] | None = None) -> float:
        """Images/s of one epoch of the template's real training step over `source` (a loader or Repeated)."""
        if hasattr(source, "set_epoch"):
            source.set_epoch(epoch)
        stats = train_one_epoch(self.model, source, self.criterion, self.optimizer, self.scheduler, self.device,
                                progress=False, recipe=self.recipe, forward_models=forward_models)
        return stats["images_per_s"]


def build_training(template: str, size: int, overrides: dict, out: Path, max_images: int = 0,
                   gpu_num: int = 0) -> Training:
    """The template at size x size (LR finder off) on the digits images, its model, recipe, optimizer, loader."""
    overrides = {**overrides, "input.size": [size, size], "training.lr_finder.enabled": False}
    t = load_template(TEMPLATES / template / "template.yaml", overrides)
    seed_everything(t.training.seed)
    device = select_device(gpu_num)
    data = digits_dataset(out / f"size{size}", size)
    scan = datasets.scan_folder(data / "train")
    if max_images and len(scan.samples) > max_images:  # every class kept, in proportion
        step = len(scan.samples) / max_images
        scan.samples = [scan.samples[int(i * step)] for i in range(max_images)]
    n = len(scan.classes)
    t, _ = auto.resolve(t, auto.run_facts(t, len(scan.samples), n, device.type, samples=scan.samples))  # as train.py
    model = factories.build_model(t, n).to(device)
    recipe = factories.build_recipe(t, model, n, device)
    optimizer = factories.build_optimizer(t, [model, *recipe.aux_models])
    loader = loaders.train_loader(t, scan, device)
    scheduler = factories.build_scheduler(t, optimizer, len(loader))
    return Training(t, scan, device, model, recipe, optimizer, loader, scheduler, factories.build_loss(t, n).to(device))


def measure(template: str, size: int, args: argparse.Namespace) -> dict:
    overrides = dict(parse_override(o) for o in args.set)
    if args.workers is not None:
        overrides["training.workers"] = args.workers
    run = build_training(template, size, overrides, args.out, args.max_images, args.gpu_num)
    t, scan, loader, epoch_speed = run.t, run.scan, run.loader, run.epoch_speed
    repeated = Repeated(next(iter(loader)), len(loader), run.device)
    epoch_speed(loader, 0)               # warm-up: allocations, kernels, first decoding
    epoch_speed(repeated, 0)
    # Pipeline and limit epochs alternate, so that drifts of the machine's speed hit both alike.
    pairs = [(epoch_speed(loader, e), epoch_speed(repeated, e)) for e in range(1, args.epochs + 1)]
    pipeline = statistics.median(p for p, _ in pairs)
    limit = statistics.median(q for _, q in pairs)
    ratio = statistics.median(p / q for p, q in pairs)
    count = start = 0.0
    for epoch in range(args.epochs + 1):
        loader.set_epoch(epoch)
        if epoch == 1:
            start = time.perf_counter()
        for images, _ in loader:
            count += images.shape[0] if epoch else 0
    loader_only = count / (time.perf_counter() - start)
    workers = loaders.loader_workers(t, run.device)
    return {"template": template, "size": size, "images": len(scan.samples),
            "workers": f"{t.training.workers} ({workers})" if t.training.workers == "auto" else workers,
            "batch": t.hyper_parameters.basic.batch_size, "pipeline": pipeline, "limit": limit,
            "loader": loader_only, "ratio": ratio}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--templates", nargs="+", default=["mobilenet_v3_large_1", "resnet18"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 224])
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: the template's)")
    parser.add_argument("--epochs", type=int, default=3, help="timed pipeline/limit epoch pairs after the warm-up")
    parser.add_argument("--max-images", type=int, default=0, help="training images used (0: all 1438)")
    parser.add_argument("--gpu-num", type=int, default=0, help="1: train on the first CUDA device")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="template overrides for every run, e.g. training.amp=bf16")
    parser.add_argument("--out", type=Path, default=Path("/tmp/pipeline_bench"))
    args = parser.parse_args()
    for name in args.templates:
        if not (TEMPLATES / name / "template.yaml").is_file():
            print(f"error: no template {name} in {TEMPLATES}", file=sys.stderr)
            return 2
    rows = []
    for name in args.templates:
        for size in args.sizes:
            row = measure(name, size, args)
            rows.append(row)
            print(f"{name} {size}x{size}: pipeline {row['pipeline']:.0f}  limit {row['limit']:.0f}  "
                  f"loader {row['loader']:.0f} img/s  ratio {row['ratio']:.2f}", file=sys.stderr, flush=True)
    device = "CUDA " + torch.cuda.get_device_name(0) if args.gpu_num and torch.cuda.is_available() else "CPU"
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {device}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; full template recipe, "
          f"{args.epochs} timed epoch(s) of {rows[0]['images']} digits images"
          + (f"; {' '.join(args.set)}" if args.set else "") + "\n")
    print("| template | input | batch | workers | pipeline (img/s) | model limit (img/s) | loader alone (img/s) "
          "| pipeline / limit |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['template']} | {r['size']}x{r['size']} | {r['batch']} | {r['workers']} | {r['pipeline']:.0f} | "
              f"{r['limit']:.0f} | {r['loader']:.0f} | {r['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
