#!/usr/bin/env python3
"""Export a checkpoint to OpenVINO IR and ONNX, then check both against PyTorch.

  python export.py --load-weights outputs/best.pth --save-model-to export [--onnx] [--openvino]
                   [--precision FP32|FP16] [--input-shape H W] [--static] [--opset N] [--explain]

The exported models take an image as the deployment side has it: planar, 0-255, in the template's
output_format.openvino_input_format channel order (BGR by default); channel order and mean/std
normalisation are part of the graph, and labels, input size and normalisation are stored in the
models' metadata. Without --onnx/--openvino both formats are written (as the template's output_format
says). ONNX is written by torch's current exporter (torch.onnx.export(dynamo=True)); where it fails (int8
models from compress.py, for example) the TorchScript exporter is used and the reason logged and stored in
the file's metadata; --exporter pins either. The parity check runs PyTorch, the ONNX file in onnxruntime
and in OpenVINO, and the IR in OpenVINO on the same images (real validation images when --val-data-roots
or $VAL_DATA_ROOT is given, random ones otherwise), writes parity.yaml and fails beyond tolerance.
With --explain the models have a second output, "saliency": the Recipro-CAM maps (N, classes, h, w) in
[0, 1] that explain.py overlays on images; the parity check compares it too.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import yaml

from clsengine import data as datasets
from clsengine.errors import UserError
from clsengine.fileio import write_text
from clsengine.inference import runtime_versions, target_devices
from clsengine.ov_core import openvino_core
from clsengine.compression import is_quantized
from clsengine.export import (DEFAULT_OPSET, EXPORTERS, INT8_MIN_AGREEMENT, INT8_RTOL, export_onnx, export_openvino,
                              onnx_to_openvino, parity_check)
from workbench import cli, factories
from workbench.classifier import load_training_checkpoint, model_from_checkpoint

WORK_DIR = Path(__file__).resolve().parent  # the work dir this script was instantiated into


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-weights", required=True, help="training checkpoint to export (best.pth, latest.pth)")
    p.add_argument("--save-model-to", default=str(WORK_DIR / "export"), help="output folder")
    p.add_argument("--onnx", action="store_true", help="write model.onnx")
    p.add_argument("--openvino", action="store_true", help="write model.xml + model.bin (OpenVINO IR)")
    p.add_argument("--precision", choices=("FP32", "FP16"), default="FP32", help="IR weight precision")
    p.add_argument("--input-shape", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="input height and width (default: the template's input.size)")
    p.add_argument("--static", action="store_true", default=None,
                   help="static input shape [1, 3, H, W], as NPU compilers need (default: the template's "
                        "output_format.static_shape)")
    p.add_argument("--opset", type=int, default=None,
                   help=f"ONNX opset (default: the exporter's own, {DEFAULT_OPSET['dynamo']} for dynamo, "
                        f"{DEFAULT_OPSET['torchscript']} for TorchScript)")
    p.add_argument("--exporter", choices=EXPORTERS, default="auto",
                   help="ONNX exporter: dynamo (torch.export-based), torchscript (legacy) or auto: dynamo, "
                        "TorchScript where dynamo fails (default)")
    p.add_argument("--explain", action="store_true",
                   help="add the saliency maps as a second output, 'saliency' (N, classes, h, w), for explain.py "
                        "and deployed models that show where they saw the class")
    p.add_argument("--val-data-roots", default=None,
                   help="folder of images (searched recursively) for the parity check (default: $VAL_DATA_ROOT)")
    p.add_argument("--parity-images", type=int, default=16, help="images used by the parity check")
    cli.add_template_args(p, WORK_DIR)
    return p.parse_intermixed_args()  # KEY=VALUE overrides may stand between flags


def parity_images(root: str | None, size: tuple[int, int], count: int, order: str) -> tuple[torch.Tensor, str]:
    """Images as deployment feeds them: (N, 3, H, W) float 0..255 in `order`; real ones when a root is given."""
    if root:
        files, _ = datasets.list_images(root)  # any images under the root: class folders or an annotated image folder
        step = max(1, len(files) // count)
        transform = datasets.build_deploy_transform(size, bgr=order == "BGR")
        batch = torch.stack([transform(datasets.read_image(path)) for path in files[::step][:count]])
        return batch, f"{len(batch)} images from {root}"
    batch = torch.rand(count, 3, *size, generator=torch.Generator().manual_seed(0)) * 255.0
    return batch, f"{count} random images"


def main() -> int:
    args = parse_args()
    weights = Path(args.load_weights)
    checkpoint = load_training_checkpoint(weights)
    t, classes, model = model_from_checkpoint(checkpoint, weights, cli.collect_overrides(args))
    if args.explain and is_quantized(checkpoint):
        raise UserError(f"--explain: {weights} is an int8 checkpoint; saliency maps are computed on the float "
                        f"model: export the checkpoint it was compressed from with --explain")

    shape = tuple(args.input_shape) if args.input_shape else None
    common = dict(factories.export_kwargs(t, classes, shape, args.static, checkpoint.get("calibration")),
                  opset=args.opset, exporter=args.exporter, explain=args.explain)
    size, order = common["input_size"], common["input_order"]
    want_onnx, want_ir = args.onnx, args.openvino
    if not (want_onnx or want_ir):
        want_onnx, want_ir = t.output_format.onnx, t.output_format.openvino
    out = Path(args.save_model_to)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if want_onnx:
        written.append(export_onnx(model, out / "model.onnx", **common))
    if want_ir:  # from the ONNX file just written, when there is one: both files are then one graph
        written.append(onnx_to_openvino(written[0], out / "model.xml", precision=args.precision) if written
                       else export_openvino(model, out / "model.xml", precision=args.precision, **common))
    if not written:
        raise UserError("nothing to export: pass --onnx and/or --openvino")

    images, source = parity_images(args.val_data_roots or os.environ.get("VAL_DATA_ROOT"), size,
                                   args.parity_images, order)
    tolerance = dict(atol=INT8_RTOL, min_top1_agreement=INT8_MIN_AGREEMENT) if is_quantized(checkpoint) else {}
    devices, missing = target_devices(t.inference_target, openvino_core().available_devices)
    if missing:
        print(f"note: inference_target {', '.join(missing)} not present here: the files are not run on it")
    if "NPU" in (d.upper() for d in t.inference_target) and not common["static_batch"]:
        print("warning: inference_target lists NPU, whose compilers need a static input shape: export with --static "
              "(or output_format.static_shape: true) for the NPU")
    report = parity_check(model, written, images, mean=t.input.mean, std=t.input.std, input_order=order,
                          train_order=t.input.channel_order, devices=devices or ["CPU"], **tolerance)
    summary = {"weights": str(weights.resolve()), "images": source, "runtimes": runtime_versions(),
               "devices": devices or ["CPU"], "targets_not_present": missing,
               "files": {Path(k).name: v for k, v in report.items()}}
    write_text(out / "parity.yaml", yaml.safe_dump(summary, sort_keys=False))
    for path, r in report.items():
        note = f" ({r['exporter_note']})" if r.get("exporter_note") else ""
        print(f"{Path(path).name}: written by the {r['exporter']} exporter{note}")
        for runtime, run in r["runtimes"].items():
            detail = f" ({run['error']})" if "error" in run else ""
            saliency = f", max |saliency diff| {run['saliency_max_abs_diff']:.3g}" if "saliency_max_abs_diff" in run else ""
            probs = (f", max |calibrated probability diff| {run['probabilities_max_abs_diff']:.3g}"
                     if "probabilities_max_abs_diff" in run else "")
            print(f"  {runtime}: max |logit diff| {run['max_abs_diff']:.3g}, top-1 agreement "
                  f"{100 * run['top1_agreement']:.1f}%{saliency}{probs} [{'ok' if run['ok'] else 'FAILED'}]{detail}")
    failed = [Path(p).name for p, r in report.items() if not r["ok"]]
    if failed:
        raise UserError(f"exported {', '.join(failed)} differ from the PyTorch model beyond tolerance "
                        f"(details in {out / 'parity.yaml'})")
    outputs = ["logits", *(["calibrated probabilities", "unknown" if t.task.type == "multiclass" else "predicted"]
                           if common["calibration"] else []), *(["saliency"] if args.explain else [])]
    print(f"Exported {', '.join(p.name for p in written)} to {out} ({size[0]}x{size[1]}, {order} 0-255 input; "
          f"outputs {', '.join(outputs)}); parity on {source}: ok")
    return 0


if __name__ == "__main__":
    cli.run(main)
