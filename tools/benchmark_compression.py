#!/usr/bin/env python3
"""Float vs int8: train templates on a small real dataset, compress them with compress.py, print one table.

  python tools/benchmark_compression.py [--templates mobilenet_v3_large_1 resnet18] [--epochs 12]
                                        [--max-accuracy-drop 1.0] [--out /tmp/compression_bench]

Data: scikit-learn's bundled handwritten digits (real images, offline) as class folders at --size pixels.
Each template runs the real work-dir scripts: train.py from scratch (the demo's short-budget recipe: SAM,
the auxiliary model and the LR finder off, cosine schedule), then compress.py on best.pth with the
template's compression settings (post-training quantization, fine-tuning only while the budget is missed).
The table reports compress.py's metrics.yaml: float and int8 IR top-1 on the validation images, IR sizes
on disk and OpenVINO throughput (THROUGHPUT hint, CPU) measured on this machine at the training size; and,
since 32x32 inputs leave a CPU mostly waiting on overheads, the throughput of the same float and int8 models
exported at --speed-size (224: speed only, accuracy is not measured there). --reuse keeps work dirs that
already hold compress.py's results.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import yaml

from benchmark_recipe import TEMPLATES, digits_dataset, instantiate, run
from clsengine.checkpoint import load_checkpoint
from clsengine.export import export_openvino
from clsengine.speed import ov_throughput
from workbench import factories
from workbench.classifier import model_from_checkpoint

# The demo's recipe for a short budget from scratch (tools/run_demo.sh).
SHORT_RECIPE = ["--lr-finder", "off", "training.scheduler.name=cosine", "training.optimizer.sam.enabled=false",
                "training.mutual_learning.enabled=false", "training.early_stopping_patience=null"]


def throughput_at(checkpoint: Path, size: int, out: Path, seconds: float, val: Path) -> dict[str, float]:
    """Images/s of a checkpoint's model exported at size x size, as a float IR and as that IR quantized the way
    compress.py quantizes (NNCF's OpenVINO backend; calibrated on 32 validation images at that size: speed
    only, accuracy is not measured there)."""
    from clsengine import data as datasets
    from clsengine.compression import quantize_ir
    from clsengine.ov_core import openvino_core

    t, classes, model = model_from_checkpoint(load_checkpoint(checkpoint), checkpoint)
    float_xml = export_openvino(model, out / "float" / "model.xml",
                                **factories.export_kwargs(t, classes, (size, size), static_batch=False))
    scan = datasets.scan_folder(val)
    images = datasets.ImageDataset(scan.samples[::max(1, len(scan.samples) // 32)][:32], scan.classes,
                                   datasets.build_deploy_transform((size, size),
                                                                   bgr=t.output_format.openvino_input_format == "BGR"))
    int8_xml = quantize_ir(float_xml, out / "int8" / "model.xml", [(images[i][0][None], 0) for i in range(len(images))],
                           subset_size=len(images))
    return {kind: ov_throughput(openvino_core(), xml, "CPU", (size, size), seconds)[0]
            for kind, xml in (("float", float_xml), ("int8", int8_xml))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--templates", nargs="+", default=["mobilenet_v3_large_1", "resnet18"])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-accuracy-drop", type=float, default=None,
                        help="accuracy budget in top-1 points (default: each template's compression.max_accuracy_drop)")
    parser.add_argument("--benchmark-seconds", type=float, default=10.0, help="throughput measurement per IR")
    parser.add_argument("--speed-size", type=int, default=224, help="input side for the extra throughput columns")
    parser.add_argument("--reuse", action="store_true", help="keep work dirs that already hold compress.py results")
    parser.add_argument("--out", type=Path, default=Path("/tmp/compression_bench"))
    args = parser.parse_args()

    missing = [name for name in args.templates if not (TEMPLATES / name / "template.yaml").is_file()]
    if missing:
        print(f"error: no template {', '.join(missing)} in {TEMPLATES}", file=sys.stderr)
        return 2
    data = digits_dataset(args.out, args.size)
    data_args = ["--train-data-roots", str(data / "train"), "--val-data-roots", str(data / "val"),
                 "--workers", str(args.workers)]
    budget = ["--max-accuracy-drop", str(args.max_accuracy_drop)] if args.max_accuracy_drop is not None else []
    rows = []
    for name in args.templates:
        work_dir = args.out / name
        log = args.out / f"{name}.log"
        compress_s = float("nan")
        if not (args.reuse and (work_dir / "outputs_int8" / "metrics.yaml").is_file()):
            log.unlink(missing_ok=True)
            instantiate(name, work_dir, log)
            run([sys.executable, "train.py", "--overwrite", *data_args, "--epochs", str(args.epochs), "--batch-size",
                 str(args.batch_size), f"input.size=[{args.size},{args.size}]", *SHORT_RECIPE], work_dir, log)
            compress_s = run([sys.executable, "compress.py", "--overwrite", "--load-weights", "outputs/best.pth", *data_args,
                              "--save-checkpoints-to", "outputs_int8", "--nncf-quantization", "--benchmark-seconds",
                              str(args.benchmark_seconds), *budget], work_dir, log, ok_codes=(0, 3))
        metrics = yaml.safe_load((work_dir / "outputs_int8" / "metrics.yaml").read_text())
        history = work_dir / "outputs_int8" / "history.csv"
        qat = len(history.read_text().splitlines()) - 1 if history.is_file() else 0
        speed = throughput_at(work_dir / "outputs" / "best.pth", args.speed_size,
                              args.out / f"{name}_{args.speed_size}", args.benchmark_seconds, data / "val")
        rows.append((name, metrics, qat, speed, compress_s))
        print(f"{name}: float {metrics['float']['top1']:.2f}, int8 {metrics['int8']['top1']:.2f}, "
              f"{qat} fine-tuning epoch(s), {speed['float']:.0f} vs {speed['int8']:.0f} img/s at {args.speed_size}",
              flush=True)

    print(f"\ndigits {args.size}x{args.size} (1438 train / 359 val), {args.epochs} epochs from scratch, "
          f"batch {args.batch_size}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    big = f"{args.speed_size}x{args.speed_size}"
    print(f"| template | float top-1 (%) | int8 top-1 (%) | drop | budget met | QAT epochs | float IR (MB) | "
          f"int8 IR (MB) | float img/s | int8 img/s | float img/s {big} | int8 img/s {big} | compress time (s) |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, m, qat, speed, compress_s in rows:
        f, q = m["float"], m["int8"]
        took = f"{compress_s:.0f}" if compress_s == compress_s else "reused"  # NaN: results reused
        print(f"| {name} | {f['top1']:.2f} | {q['top1']:.2f} | {m['budget']['drop']:.2f} | "
              f"{'yes' if m['budget']['met'] else 'no'} (≤ {m['budget']['max_accuracy_drop']:g}) | {qat} | "
              f"{f['size_bytes'] / 1e6:.2f} | {q['size_bytes'] / 1e6:.2f} | {f['throughput_img_s']:.0f} | "
              f"{q['throughput_img_s']:.0f} | {speed['float']:.0f} | {speed['int8']:.0f} | {took} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
