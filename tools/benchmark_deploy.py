#!/usr/bin/env python3
"""Inference speed of a classifier as deployed: OpenVINO IR (FP32, FP16, optional INT8), ONNX in
onnxruntime and in OpenVINO, and PyTorch.

  python tools/benchmark_deploy.py [--template mobilenet_v3_large_1 | --load-weights outputs/best.pth]
                                   [--input-size H W] [--num-classes 1000] [--seconds 10] [--batch-size 32]
                                   [--device CPU] [--int8-ir model_int8.xml] [--out DIR] [--skip-torch]

The model is exported with clsengine.export as the work-dir export.py does it (preprocessing in the graph,
0-255 input in the template's output_format.openvino_input_format order), then each file is timed with
OpenVINO on each device of the template's inference_target that is present here (or on --device alone):
  throughput  PERFORMANCE_HINT=THROUGHPUT, an AsyncInferQueue of OPTIMAL_NUMBER_OF_INFER_REQUESTS
              requests of batch 1 kept full for --seconds: images/s;
  latency     PERFORMANCE_HINT=LATENCY, synchronous batch-1 requests for --seconds after a warm-up:
              median and 90th percentile in ms.
The ONNX file is run by OpenVINO and by onnxruntime on CPU. PyTorch eager
rows (unless --skip-torch) time the same model, preprocessing included, under torch.inference_mode:
throughput with --batch-size images per forward, latency with batch 1; on CPU with torch's default
thread count, and on CUDA as well when a CUDA device is present.

Without --load-weights the model is randomly initialised (speed does not depend on weight values) with
--num-classes outputs. With a training checkpoint, its own template and classes are used.
Prints a header line and one markdown table on stdout (progress goes to stderr); with --out, the
exported files and benchmark.yaml (the same rows) are written there.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import openvino as ov
import torch
import torch.nn as nn
import yaml

from clsengine.errors import UserError
from clsengine.export import DeployModel, export_onnx, export_openvino, read_metadata
from clsengine.inference import ExportedClassifier, device_available, runtime_versions, target_devices
from clsengine.ov_core import openvino_core
from clsengine.speed import latency_ms, ov_latency, ov_throughput, random_images, timed_calls
from workbench import factories
from workbench import cli
from workbench.classifier import load_trained_model
from workbench.template import Template, load_template

REPO_ROOT = Path(__file__).resolve().parent.parent
DOMAIN_DIR = REPO_ROOT / "models" / "image_classification"
TEMPLATES = DOMAIN_DIR / "model_templates" / "custom-classification"

DEFAULT_TEMPLATE = "mobilenet_v3_large_1"
OV_DEVICES = ("CPU", "GPU", "NPU")


@dataclass
class Row:
    """One line of the table (and of benchmark.yaml)."""
    model: str
    format: str
    precision: str
    throughput_img_s: float
    latency_median_ms: float
    latency_p90_ms: float
    throughput_setup: str = ""


@dataclass
class Subject:
    """The model under test and the deployment settings its template gives it."""
    name: str
    template: Template
    model: nn.Module
    labels: list[str]
    size: tuple[int, int]
    source: str


# ------------------------------------------------------------------------------------------- inputs
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--template", default=None,
                   help=f"template name under {TEMPLATES.relative_to(REPO_ROOT)} or a template.yaml path "
                        f"(default: {DEFAULT_TEMPLATE}; with --load-weights, the checkpoint's own template)")
    p.add_argument("--load-weights", default=None, help="training checkpoint written by train.py (optional)")
    p.add_argument("--num-classes", type=int, default=1000, help="outputs of a randomly initialised model")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="network input height and width (default: the template's input.size)")
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each measurement")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward for PyTorch throughput")
    p.add_argument("--device", default=None,
                   help="OpenVINO device: CPU, or GPU / NPU when available (default: every device of the template's "
                        "inference_target present here)")
    p.add_argument("--int8-ir", default=None, help="an already quantised IR (.xml) to add as an INT8 row")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the exported files and benchmark.yaml (default: a temporary folder)")
    p.add_argument("--skip-torch", action="store_true", help="no PyTorch eager rows")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Reject impossible values before minutes of export and timing are spent."""
    if args.seconds <= 0:
        raise UserError(f"--seconds must be positive, got {args.seconds}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.num_classes < 1:
        raise UserError(f"--num-classes must be at least 1, got {args.num_classes}")
    if args.input_size is not None and min(args.input_size) < 1:
        raise UserError(f"--input-size needs positive values, got {args.input_size}")
    if args.int8_ir is not None:
        path = Path(args.int8_ir)
        if path.suffix != ".xml" or not path.is_file() or not path.with_suffix(".bin").is_file():
            raise UserError(f"--int8-ir {path}: expected an existing OpenVINO IR .xml with its .bin beside it")


def choose_devices(core: ov.Core, device: str | None, targets: list[str]) -> tuple[list[str], list[str]]:
    """(devices to time, inference targets absent here): --device alone, else the template's targets present."""
    if device is not None:
        return [check_device(core, device)], []
    present, missing = target_devices(targets, list(core.available_devices))
    if not present:
        raise UserError(f"none of the template's inference_target ({', '.join(targets)}) is present here (OpenVINO "
                        f"lists {', '.join(core.available_devices)}); pass --device")
    return present, missing


def check_device(core: ov.Core, device: str) -> str:
    """The OpenVINO device name, upper-cased; 'GPU' matches 'GPU.0' and the like."""
    device = device.upper()
    available = list(core.available_devices)
    if device.split(".")[0] not in OV_DEVICES:
        raise UserError(f"--device {device}: expected one of {', '.join(OV_DEVICES)} "
                        f"(available here: {', '.join(available)})")
    if not device_available(device, available):
        raise UserError(f"--device {device} is not available here (OpenVINO lists {', '.join(available)})")
    return device


def resolve_template(name_or_path: str) -> Path:
    """A template.yaml path as given, or the template of that name in the catalogue."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    named = TEMPLATES / name_or_path / "template.yaml"
    if named.is_file():
        return named
    known = sorted(p.parent.name for p in TEMPLATES.glob("*/template.yaml"))
    raise UserError(f"unknown template '{name_or_path}': not a file and not one of {', '.join(known)}")


def load_subject(args: argparse.Namespace) -> Subject:
    """The model to time: from a checkpoint (its template, classes and weights) or freshly initialised."""
    if args.load_weights:
        weights = Path(args.load_weights)
        if args.template:
            print(f"note: --template {args.template} ignored, {weights} carries its own template", file=sys.stderr)
        t, labels, model = load_trained_model(weights)
        source = f"weights {weights.name}"
    else:
        t = load_template(resolve_template(args.template or DEFAULT_TEMPLATE))
        labels = [f"class_{i}" for i in range(args.num_classes)]
        model = factories.build_model(t, len(labels))
        source = "random init"
    size = (int(args.input_size[0]), int(args.input_size[1])) if args.input_size else factories.input_size(t)
    return Subject(t.name, t, model.eval(), labels, size, f"{source}, {len(labels)} classes")


# ------------------------------------------------------------------------------------------- export
def export_all(subject: Subject, out: Path) -> list[tuple[str, str, Path]]:
    """(format, precision, path) of the FP32 IR, FP16 IR and ONNX file, exported as export.py does it."""
    # a dynamic batch: PyTorch and onnxruntime are timed at --batch-size
    common = factories.export_kwargs(subject.template, subject.labels, subject.size, static_batch=False)
    progress("exporting FP32 IR, FP16 IR and ONNX")
    return [
        ("OpenVINO IR", "FP32", export_openvino(subject.model, out / "model_fp32.xml", precision="FP32", **common)),
        ("OpenVINO IR", "FP16", export_openvino(subject.model, out / "model_fp16.xml", precision="FP16", **common)),
        ("ONNX", "FP32", export_onnx(subject.model, out / "model.onnx", **common)),
    ]


# ------------------------------------------------------------------------------------------- timing
def progress(message: str) -> None:
    print(f"[benchmark] {message}", file=sys.stderr, flush=True)


def batch_throughput(step: Callable[[], object], batch: int, seconds: float) -> float:
    """Images/s of a framework that runs one batch per call."""
    durations = timed_calls(step, seconds, warmup=2)
    return batch * len(durations) / sum(durations)


def bench_openvino(core: ov.Core, name: str, fmt: str, precision: str, path: Path, device: str,
                   size: tuple[int, int], seconds: float) -> Row:
    fmt = "ONNX via OpenVINO" if fmt == "ONNX" else fmt
    progress(f"{fmt} {precision} on {device}: throughput")
    throughput, setup = ov_throughput(core, path, device, size, seconds)
    progress(f"{fmt} {precision} on {device}: latency")
    median, p90 = ov_latency(core, path, device, size, seconds)
    return Row(name, f"{fmt} ({device})", precision, throughput, median, p90, setup)


def bench_onnxruntime(name: str, path: Path, size: tuple[int, int], batch: int, seconds: float) -> Row:
    """The ONNX file in onnxruntime on CPU, as eval.py runs it (clsengine.inference)."""
    model = ExportedClassifier(path, runtime="onnxruntime")
    many, one = random_images((batch, 3, *size)), random_images((1, 3, *size))
    progress("ONNX via onnxruntime on CPU: throughput")
    throughput = batch_throughput(lambda: model(many), batch, seconds)
    progress("ONNX via onnxruntime on CPU: latency")
    median, p90 = latency_ms(timed_calls(lambda: model(one), seconds))
    return Row(name, "ONNX via onnxruntime (CPU)", "FP32", throughput, median, p90, f"batch {batch}")


def bench_torch(subject: Subject, device: torch.device, batch: int, seconds: float) -> Row:
    """PyTorch eager on `device`, the deployed preprocessing included (as in the exported graph);
    a copy is moved, so the subject stays on CPU for the next row."""
    t = subject.template
    model = DeployModel(copy.deepcopy(subject.model), t.input.mean, t.input.std, t.output_format.openvino_input_format,
                        t.input.channel_order).to(device).eval()
    many = torch.from_numpy(random_images((batch, 3, *subject.size))).to(device)
    one = many[:1].clone()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward(x: torch.Tensor) -> Callable[[], None]:
        def step() -> None:
            model(x)
            sync()
        return step

    label = device.type.upper()
    with torch.inference_mode():
        progress(f"PyTorch eager on {label}: throughput (batch {batch})")
        throughput = batch_throughput(forward(many), batch, seconds)
        progress(f"PyTorch eager on {label}: latency")
        median, p90 = latency_ms(timed_calls(forward(one), seconds))
    return Row(subject.name, f"PyTorch eager ({label})", "FP32", throughput, median, p90, f"batch {batch}")


# ------------------------------------------------------------------------------------------- report
def header(subject: Subject, core: ov.Core, devices: list[str], missing: list[str], exporter: str, load: float) -> str:
    """What was measured, where: enough to compare two tables (and to see a machine that was busy)."""
    cpu = core.get_property("CPU", "FULL_DEVICE_NAME") if "CPU" in core.available_devices else ""
    cpu = cpu or platform.processor() or platform.machine()
    parts = [f"{subject.name} ({subject.source}), input {subject.size[0]}x{subject.size[1]}",
             f"CPU: {cpu}, {os.cpu_count()} cores, load average {load:.2f} at start"]
    parts += [f"OpenVINO device {d}: {core.get_property(d, 'FULL_DEVICE_NAME')}" for d in devices if d != "CPU"]
    if missing:
        parts.append(f"inference_target not present here: {', '.join(missing)}")
    parts.append(f"ONNX exporter: {exporter}")
    if torch.cuda.is_available():
        parts.append(f"CUDA: {torch.cuda.get_device_name()}")
    parts.append(f"OpenVINO {ov.get_version()}, onnxruntime {runtime_versions()['onnxruntime']}, torch {torch.__version__} "
                 f"({torch.get_num_threads()} threads)")
    return "; ".join(parts)


def table(rows: list[Row]) -> str:
    lines = ["| model | format | precision | throughput img/s | latency median ms | latency p90 ms |",
             "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r.model} | {r.format} | {r.precision} | {r.throughput_img_s:.1f} | "
              f"{r.latency_median_ms:.2f} | {r.latency_p90_ms:.2f} |" for r in rows]
    return "\n".join(lines)


def write_yaml(path: Path, title: str, rows: list[Row], seconds: float) -> None:
    data = {"header": title, "seconds_per_measurement": seconds, "rows": [asdict(r) for r in rows]}
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def run_benchmarks(args: argparse.Namespace, subject: Subject, core: ov.Core, devices: list[str],
                   files: list[tuple[str, str, Path]]) -> list[Row]:
    rows = [bench_openvino(core, subject.name, fmt, precision, path, device, subject.size, args.seconds)
            for device in devices for fmt, precision, path in files]
    onnx_path = next(path for fmt, _, path in files if fmt == "ONNX")
    rows.append(bench_onnxruntime(subject.name, onnx_path, subject.size, args.batch_size, args.seconds))
    if not args.skip_torch:
        rows.append(bench_torch(subject, torch.device("cpu"), args.batch_size, args.seconds))
        if torch.cuda.is_available():
            rows.append(bench_torch(subject, torch.device("cuda"), args.batch_size, args.seconds))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    core = openvino_core()
    subject = load_subject(args)
    devices, missing = choose_devices(core, args.device, subject.template.inference_target)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory(prefix="benchmark_deploy_") as tmp:
        out = args.out if args.out is not None else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        files = export_all(subject, out)
        exporter = read_metadata(files[-1][2])["exporter"]
        if args.int8_ir:
            files.append(("OpenVINO IR", "INT8", Path(args.int8_ir)))
        rows = run_benchmarks(args, subject, core, devices, files)
    title = header(subject, core, devices, missing, exporter, load)
    print(title)
    print()
    print(table(rows))
    if args.out is not None:
        write_yaml(args.out / "benchmark.yaml", title, rows, args.seconds)
    return 0


if __name__ == "__main__":
    cli.run(main)
