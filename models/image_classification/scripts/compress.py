#!/usr/bin/env python3
"""Compress a trained model to int8 with NNCF, inside an accuracy budget, and export the int8 OpenVINO IR.

  python compress.py --load-weights outputs/best.pth --train-ann-files '' --train-data-roots DATA/train \\
                     --val-ann-files '' --val-data-roots DATA/val --save-checkpoints-to outputs_int8 \\
                     --nncf-quantization

1. Exports the float model as OpenVINO IR (<dir>/export_fp32/) and measures its top-1 (mAP for multi-label
   models) on the validation data.
2. Post-training quantization of that IR with NNCF's OpenVINO backend (the model that ships is the model
   quantized): activation ranges from compression.calibration_subset training images, fast bias correction,
   the template's preset and ignored scope; the int8 IR is measured on the validation data (<dir>/export_ptq/).
3. Quantization-aware fine-tuning, as compression.mode (--mode) says: auto (default) only if the int8 IR loses
   more than compression.max_accuracy_drop points, stopping as soon as the budget is met; qat always, for all
   its epochs, keeping the epoch whose int8 IR scores best; ptq never. It starts from NNCF's PyTorch
   post-training quantization of the float model (ptq.pth) and uses the template's loss and optimizer at
   base_learning_rate x compression.qat_lr_factor, for compression.qat_epochs epochs (--epochs; null: computed
   from the dataset size); --epochs is ignored, and the log says so, when no fine-tuning runs. Resumable:
   --resume-from <dir>/latest.pth. The PTQ IR ships unless fine-tuning beats it.
4. Ships the winning int8 IR in <dir>/export/model.xml, measures the float and int8 IRs' throughput on this
   machine and writes <dir>/metrics.yaml (scores, sizes, speed, the seconds of each step). With --int8-onnx
   (compression.int8_onnx) also an int8 ONNX (<dir>/export/model.onnx, standard QuantizeLinear/
   DequantizeLinear, scored with onnxruntime) from NNCF's PyTorch backend, for other runtimes and NPU
   compilers: OpenVINO cannot write ONNX. Exit status 3 when the budget cannot be met (outputs still written).

Data roots fall back to $TRAIN_DATA_ROOT / $VAL_DATA_ROOT. The int8 IR works with eval.py and predict.py as it
is; so does the int8 PyTorch checkpoint (<dir>/best.pth, written when fine-tuning runs or with --int8-onnx),
with export.py too.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from clsengine.checkpoint import load_checkpoint
from clsengine.checkpoint_saver import require_resumable
from clsengine.compression import MODES, is_quantized
from clsengine.errors import UserError
from clsengine.runlog import get_logger
from clsengine.utils import seed_everything, select_device
from workbench import cli
from workbench.classifier import model_from_checkpoint
from workbench.compression import CompressionJob, compress

WORK_DIR = Path(__file__).resolve().parent  # the work dir this script was instantiated into

# compress.py's own flags (its --epochs are the QAT epochs); the common ones are cli.FLAG_KEYS.
FLAG_KEYS = {"mode": "compression.mode", "epochs": "compression.qat_epochs",
             "max_accuracy_drop": "compression.max_accuracy_drop",
             "calibration_subset": "compression.calibration_subset", "int8_onnx": "compression.int8_onnx"}
BUDGET_NOT_MET = 3
# What makes a folder a compression run's (refused to a fresh run without --overwrite), and what --overwrite
# clears with it.
RUN_FILES = ("latest.pth", "best.pth", "ptq.pth", "metrics.yaml", "export_ptq")
CLEARED_ON_OVERWRITE = ("history.csv", "config.yaml", "compress.log", "training_curves.png", "tensorboard",
                        "export", "export_fp32", "skipped_images.txt")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-weights", default=None, help="the float checkpoint to compress (train.py's best.pth)")
    cli.add_data_args(p, "train", "TRAIN_DATA_ROOT")
    cli.add_data_args(p, "val", "VAL_DATA_ROOT")
    cli.add_dataset_args(p)
    p.add_argument("--save-checkpoints-to", default=str(WORK_DIR / "outputs_int8"),
                   help="output folder (default: WORK_DIR/outputs_int8)")
    p.add_argument("--nncf-quantization", action="store_true",
                   help="accepted for the seed's command lines; int8 quantization with NNCF is what this script "
                        "always does, with or without it")
    p.add_argument("--resume-from", default=None, help="latest.pth of an interrupted compression to continue")
    cli.add_overwrite_arg(p, "--save-checkpoints-to")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="auto: fine-tune (QAT) only when PTQ misses the budget; ptq: never; qat: always "
                        "(compression.mode)")
    p.add_argument("--epochs", type=int, default=None,
                   help="quantization-aware fine-tuning epochs whenever it runs (compression.qat_epochs; "
                        "0: post-training only); ignored, with a log line, when it does not")
    p.add_argument("--max-accuracy-drop", type=float, default=None,
                   help="accuracy budget: top-1 points int8 may lose (compression.max_accuracy_drop)")
    p.add_argument("--calibration-subset", type=int, default=None,
                   help="training images for calibration (compression.calibration_subset)")
    p.add_argument("--int8-onnx", action="store_true", default=None,
                   help="also write an int8 ONNX (export/model.onnx) through NNCF's PyTorch backend, for "
                        "onnxruntime and NPU compilers (compression.int8_onnx)")
    p.add_argument("--benchmark-seconds", type=float, default=3.0,
                   help="seconds of OpenVINO throughput measurement per IR (0: skip)")
    p.add_argument("--tensorboard-dir", default=None, help="TensorBoard folder (default: <output>/tensorboard)")
    cli.add_runtime_args(p)
    cli.add_template_args(p, WORK_DIR)
    return p.parse_intermixed_args()


def main() -> int:
    args = parse_args()
    overrides = cli.collect_overrides(args, FLAG_KEYS)
    resume = load_checkpoint(args.resume_from) if args.resume_from else None
    if resume is not None and not is_quantized(resume):
        raise UserError(f"{args.resume_from} is not a checkpoint written by compress.py")
    if resume is not None:
        require_resumable(resume, args.resume_from)
    weights = args.load_weights or (resume["quantization"]["float_weights"] if resume else None)
    if not weights:
        raise UserError("pass the float checkpoint to compress: --load-weights outputs/best.pth")
    float_ckpt = load_checkpoint(weights)
    if "config" not in float_ckpt:
        raise UserError(f"{weights} is a bare weights file; compress a checkpoint written by train.py")
    if is_quantized(float_ckpt):
        raise UserError(f"{weights} is already compressed; pass the float checkpoint written by train.py")
    t, classes, float_model = model_from_checkpoint(float_ckpt, weights, overrides)
    if resume is not None and t.compression.mode == "ptq":
        raise UserError("--resume-from continues quantization-aware training, which compression.mode ptq never "
                        "runs; resume with --mode auto or --mode qat")

    out = Path(args.save_checkpoints_to).resolve()
    lock = cli.claim_output(out, "compress.py", RUN_FILES, CLEARED_ON_OVERWRITE, args.resume_from, args.overwrite)
    logger = get_logger(out / "compress.log")
    for note in lock.notes:
        logger.warning(note)
    if args.nncf_quantization:
        logger.info("--nncf-quantization: accepted for the seed's command lines; compress.py always quantizes "
                    "to int8 with NNCF (the flag changes nothing)")
    seed_everything(t.training.seed, t.training.deterministic)
    device = select_device(t.gpu_num)
    train_scan, val_scan = cli.scan_train_val(args, t, logger, out, classes)
    summary = compress(CompressionJob(
        t, classes, float_model, Path(weights), train_scan, val_scan, out, device, logger, args.template, overrides,
        resume=resume, resume_path=args.resume_from, epochs_flag=args.epochs, benchmark_seconds=args.benchmark_seconds,
        calibration=float_ckpt.get("calibration"),
        tensorboard_dir=Path(args.tensorboard_dir or out / "tensorboard") if t.tensorboard else None))
    return 0 if summary["budget"]["met"] else BUDGET_NOT_MET


if __name__ == "__main__":
    cli.run(main)
