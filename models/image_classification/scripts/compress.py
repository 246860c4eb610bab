#!/usr/bin/env python3
"""Compress a trained model to int8 with NNCF, inside an accuracy budget, and export the int8 OpenVINO IR.

  python compress.py --load-weights outputs/best.pth --train-ann-files '' --train-data-roots DATA/train \\
                     --val-ann-files '' --val-data-roots DATA/val --save-checkpoints-to outputs_int8 \\
                     --nncf-quantization

1. Measures the float model's top-1 (mAP for multi-label models) on the validation data.
2. Post-training quantization (nncf.quantize): activation ranges from compression.calibration_subset
   training images, fast bias correction, the template's preset and ignored scope.
3. Quantization-aware fine-tuning from the PTQ model, as compression.mode (--mode) says: auto (default)
   only if the int8 model loses more than compression.max_accuracy_drop points, stopping as soon as the
   budget is met; qat always, for all its epochs, keeping the epoch whose int8 IR scores best; ptq never.
   It uses the template's loss and optimizer at base_learning_rate x compression.qat_lr_factor, for
   compression.qat_epochs epochs (--epochs; null: computed from the dataset size); --epochs is ignored,
   and the log says so, when no fine-tuning runs. Resumable: --resume-from <dir>/latest.pth.
4. Exports the best int8 model as OpenVINO IR (<dir>/export/model.xml) and the float one beside it
   (<dir>/export_fp32/), measures both IRs on the validation data and their throughput on this machine,
   and writes <dir>/metrics.yaml. Exit status 3 when the budget cannot be met (outputs are still written).

Data roots fall back to $TRAIN_DATA_ROOT / $VAL_DATA_ROOT. The int8 checkpoint (<dir>/best.pth) and IR work
with eval.py, export.py and predict.py as they are.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from clsengine.checkpoint import load_checkpoint, save_checkpoint
from clsengine.compression import (MODES, AccuracyBudget, is_quantized, qat_epochs, quantization_state, quantize,
                                   runs_qat)
from clsengine.errors import UserError
from clsengine.fileio import write_text
from clsengine.export import export_openvino
from clsengine.checkpoint_saver import checkpoint_state
from clsengine.loop import FitConfig, fit
from clsengine.metrics import primary_score
from clsengine.optim import create_scheduler
from clsengine.ov_core import openvino_core
from clsengine.runlog import get_logger
from clsengine.speed import ov_throughput
from clsengine.utils import seed_everything, select_device
from workbench import builders
from workbench import cli
from workbench.classifier import load_classifier, model_from_checkpoint
from workbench.template import Template, dump_config

WORK_DIR = Path(__file__).resolve().parent  # the work dir this script was instantiated into

# compress.py's own flags (its --epochs are the QAT epochs); the common ones are cli.FLAG_KEYS.
FLAG_KEYS = {"mode": "compression.mode", "epochs": "compression.qat_epochs",
             "max_accuracy_drop": "compression.max_accuracy_drop",
             "calibration_subset": "compression.calibration_subset"}
BUDGET_NOT_MET = 3
# What makes a folder a compression run's (refused to a fresh run without --overwrite), and what --overwrite
# clears with it.
RUN_FILES = ("latest.pth", "best.pth", "ptq.pth")
CLEARED_ON_OVERWRITE = ("history.csv", "config.yaml", "compress.log", "metrics.yaml", "training_curves.png",
                        "tensorboard", "export", "export_fp32", "skipped_images.txt")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-weights", default=None, help="the float checkpoint to compress (train.py's best.pth)")
    cli.add_data_args(p, "train", "TRAIN_DATA_ROOT")
    cli.add_data_args(p, "val", "VAL_DATA_ROOT")
    cli.add_dataset_args(p)
    p.add_argument("--save-checkpoints-to", default=str(WORK_DIR / "outputs_int8"),
                   help="output folder (default: WORK_DIR/outputs_int8)")
    p.add_argument("--nncf-quantization", action="store_true",
                   help="int8 quantization with NNCF: the compression this script applies (also without the flag)")
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
    p.add_argument("--benchmark-seconds", type=float, default=3.0,
                   help="seconds of OpenVINO throughput measurement per IR (0: skip)")
    p.add_argument("--tensorboard-dir", default=None, help="TensorBoard folder (default: <output>/tensorboard)")
    cli.add_runtime_args(p)
    cli.add_template_args(p, WORK_DIR)
    return p.parse_intermixed_args()


def calibration_samples(samples: list[tuple[str, int]], count: int, seed: int) -> list[tuple[str, int]]:
    """A fixed random subset of the training images (all of them when there are fewer)."""
    if len(samples) <= count:
        return list(samples)
    chosen = np.random.default_rng(seed).choice(len(samples), size=count, replace=False)
    return [samples[i] for i in sorted(chosen)]


def files_size(xml: Path) -> int:
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


def qat_scheduler(optimizer: torch.optim.Optimizer, epochs: int, iters_per_epoch: int):
    """Cosine decay from the reduced LR over the fine-tuning epochs, no warm-up: the weights are trained already."""
    return create_scheduler(optimizer, "cosine", max(1, epochs), iters_per_epoch, warmup_epochs=0)


class IRJudge:
    """Top-1 (mAP for multi-label) of a model as it ships: exported to OpenVINO IR and run on the validation
    images by OpenVINO.

    Budget decisions use it rather than PyTorch's fake-quantization, whose numbers can differ from real
    int8 kernels by a point or so."""

    def __init__(self, t: Template, classes: list[str], val_samples: list[tuple[str, int]], template_path: str,
                 overrides: dict) -> None:
        self.t, self.classes, self.samples = t, classes, val_samples
        self.template_path, self.overrides = template_path, overrides

    def export(self, model: torch.nn.Module, xml: Path) -> Path:
        return export_openvino(model, xml, **builders.export_kwargs(self.t, self.classes))

    def top1(self, xml: Path) -> float:
        ir = load_classifier(xml, template_path=self.template_path, overrides=self.overrides, classes=self.classes,
                             classes_source="the compressed checkpoint")
        ir.template = self.t
        logits, labels = ir.predict(self.samples, f"val ({xml.parent.name})")
        return primary_score(logits, labels)

    def __call__(self, model: torch.nn.Module) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            return self.top1(self.export(model, Path(tmp) / "model.xml"))


def main() -> int:
    args = parse_args()
    overrides = cli.collect_overrides(args, FLAG_KEYS)
    resume = load_checkpoint(args.resume_from) if args.resume_from else None
    if resume is not None and not is_quantized(resume):
        raise UserError(f"{args.resume_from} is not a checkpoint written by compress.py")
    weights = args.load_weights or (resume["quantization"]["float_weights"] if resume else None)
    if not weights:
        raise UserError("pass the float checkpoint to compress: --load-weights outputs/best.pth")
    float_ckpt = load_checkpoint(weights)
    if "config" not in float_ckpt:
        raise UserError(f"{weights} is a bare weights file; compress a checkpoint written by train.py")
    if is_quantized(float_ckpt):
        raise UserError(f"{weights} is already compressed; pass the float checkpoint written by train.py")
    t, classes, float_model = model_from_checkpoint(float_ckpt, weights, overrides)
    c = t.compression
    if resume is not None and c.mode == "ptq":
        raise UserError("--resume-from continues quantization-aware training, which compression.mode ptq never "
                        "runs; resume with --mode auto or --mode qat")

    out = Path(args.save_checkpoints_to).resolve()
    lock = cli.claim_output(out, "compress.py", RUN_FILES, CLEARED_ON_OVERWRITE, args.resume_from, args.overwrite)
    logger = get_logger(out / "compress.log")
    for note in lock.notes:
        logger.warning(note)
    seed_everything(t.training.seed, t.training.deterministic)
    device = select_device(t.gpu_num)
    train_scan, val_scan = cli.scan_train_val(args, t, logger, out, classes)

    basic = t.hyper_parameters.basic
    train_loader = builders.train_loader(t, train_scan, device)
    val_loader = builders.val_loader(t, val_scan, device)
    calibration = builders.make_loader(builders.dataset(t, calibration_samples(train_scan.samples, c.calibration_subset,
                                                                 t.training.seed), classes, builders.eval_transform(t)),
                                t, 1, train=False, device=device)
    criterion = builders.build_loss(t, len(classes), train_scan.counts()).to(device)
    float_model.to(device)
    judge = IRJudge(t, classes, val_scan.samples, args.template, overrides)

    float_xml = judge.export(float_model, out / "export_fp32" / "model.xml")
    float_top1 = judge.top1(float_xml)
    key, metric = ("mAP", "mAP") if builders.is_multilabel(t) else ("top1", "top-1")  # metrics.yaml key, log name
    budget = AccuracyBudget(float_top1, c.max_accuracy_drop, metric)
    logger.info(f"{t.name}: float IR {metric} {float_top1:.2f} on {len(val_scan.samples)} val images; budget: at "
                f"most {c.max_accuracy_drop:g} points lost (int8 IR {metric} >= {budget.target:.2f}); device {device}")

    # Post-training quantization (or the resumed quantized model).
    if resume is None:
        logger.info(f"Post-training quantization: {len(calibration)} calibration images, preset {c.preset}, "
                    f"overflow fix {c.overflow_fix}"
                    + (f", float layers matching {c.ignored_scope}" if c.ignored_scope else ""))
        model = quantize(copy.deepcopy(float_model), calibration, subset_size=c.calibration_subset,
                         preset=c.preset, fast_bias_correction=c.fast_bias_correction,
                         ignored_patterns=c.ignored_scope, overflow_fix=c.overflow_fix, device=device)
        ptq_top1 = judge(model)
        logger.info(f"PTQ: {budget.describe(ptq_top1)}")
    else:
        model = model_from_checkpoint(resume, args.resume_from, overrides)[2].to(device)
        ptq_top1 = float(resume["quantization"]["ptq_top1"])
    quant_info = {"nncf": quantization_state(model), "float_weights": str(Path(weights).resolve()),
                  "float_top1": float_top1, "ptq_top1": ptq_top1, "max_accuracy_drop": c.max_accuracy_drop}
    config = {"template": t.to_dict(), "classes": classes,
              "run": {"compressed_from": str(Path(weights).resolve()), "device": str(device)}}
    dump_config(config, out / "config.yaml")
    extra = {"config": config, "classes": classes, "arch": t.model.architecture, "quantization": quant_info}
    ptq_state = checkpoint_state(model, epoch=0, score=ptq_top1, best_score=ptq_top1, best_epoch=0, extra=extra,
                                 weights_from="ptq")
    if resume is None:
        save_checkpoint(ptq_state, out / "ptq.pth")  # kept: fine-tuning may end below it

    # Quantization-aware fine-tuning as compression.mode says; epochs are judged by the int8 IR.
    epochs = c.qat_epochs if c.qat_epochs is not None else qat_epochs(len(train_scan.samples), basic.batch_size)
    wanted = runs_qat(c.mode, budget.met(ptq_top1))
    epochs_run = 0
    if resume is not None or (wanted and epochs > 0):
        lr = basic.base_learning_rate * c.qat_lr_factor
        stop_at_budget = c.mode == "auto"
        plan = (f"up to {epochs} epoch(s) at LR {lr:.3g}, stopping once the int8 IR's {metric} >= {budget.target:.2f}"
                if stop_at_budget else f"{epochs} epoch(s) at LR {lr:.3g} (compression.mode qat), keeping the epoch "
                                       f"whose int8 IR {metric} is best")
        logger.info(f"Quantization-aware training: {plan}")
        optimizer = builders.build_optimizer(t, model, lr=lr)
        scheduler = qat_scheduler(optimizer, epochs, len(train_loader))
        tensorboard_dir = Path(args.tensorboard_dir or out / "tensorboard") if t.tensorboard else None
        fit_cfg = FitConfig(epochs=epochs, output_dir=out, score_fn=judge, tensorboard_dir=tensorboard_dir,
                            max_grad_norm=t.training.optimizer.max_grad_norm, checkpoint_extra=extra)

        def budget_reached(epoch: int, row: dict) -> bool:
            reached = stop_at_budget and row["score"] >= budget.target
            if reached:
                logger.info(f"Target reached: {row['score']:.2f} >= {budget.target:.2f}")
            return reached

        result = fit(model, train_loader, val_loader, criterion, optimizer, scheduler, device, fit_cfg, logger,
                     resume=resume, on_epoch_end=budget_reached)
        epochs_run = result["epochs_run"]
        if result["best_score"] <= ptq_top1:  # fine-tuning did not beat PTQ: ship the PTQ model
            logger.info(f"Fine-tuning did not beat PTQ (int8 IR {metric} {result['best_score']:.2f} <= "
                        f"{ptq_top1:.2f}): the PTQ model is the result")
            save_checkpoint(load_checkpoint(out / "ptq.pth"), out / "best.pth")
    else:  # the PTQ model is the result
        reason = ("compression.qat_epochs is 0" if wanted else "compression.mode is ptq" if c.mode == "ptq"
                  else "PTQ met the accuracy budget")
        if args.epochs is not None and not wanted:
            logger.info(f"--epochs {args.epochs} ignored: no quantization-aware training runs ({reason})")
        elif not budget.met(ptq_top1):
            logger.info(f"Quantization-aware training skipped ({reason})")
        for name in ("best.pth", "latest.pth"):
            save_checkpoint(ptq_state, out / name)

    # The shipped files: the int8 IR of the best model, beside the float IR, both measured.
    _, _, best_model = model_from_checkpoint(load_checkpoint(out / "best.pth"), out / "best.pth", overrides)
    int8_xml = judge.export(best_model, out / "export" / "model.xml")
    rows = {}
    core = openvino_core()
    for name, xml, top1 in (("float", float_xml, float_top1), ("int8", int8_xml, judge.top1(int8_xml))):
        speed = (ov_throughput(core, xml, "CPU", builders.input_size(t), args.benchmark_seconds)[0]
                 if args.benchmark_seconds > 0 else None)
        rows[name] = {key: round(top1, 2), "ir": str(xml), "size_bytes": files_size(xml),
                      "throughput_img_s": round(speed, 1) if speed else None}
    final = AccuracyBudget(rows["float"][key], c.max_accuracy_drop, metric)
    summary = {
        "budget": {"metric": key, "max_accuracy_drop": c.max_accuracy_drop, "met": final.met(rows["int8"][key]),
                   "drop": round(rows["float"][key] - rows["int8"][key], 2)},
        "float": rows["float"], "int8": rows["int8"],
        "steps": {"mode": c.mode, f"ptq_{key}": round(ptq_top1, 2), "qat_epochs_run": epochs_run,
                  "best_checkpoint": str(out / "best.pth")},
        "machine": {"cpu_count": os.cpu_count(), "benchmark_seconds": args.benchmark_seconds},
    }
    write_text(out / "metrics.yaml", yaml.safe_dump(summary, sort_keys=False))
    for name in ("float", "int8"):
        r = rows[name]
        logger.info(f"{name:5s} IR: {metric} {r[key]:6.2f}  size {r['size_bytes'] / 1e6:7.2f} MB"
                    + (f"  {r['throughput_img_s']:.1f} img/s" if r["throughput_img_s"] else ""))
    message = final.describe(rows["int8"][key])
    logger.info(f"{message[0].upper()}{message[1:]}. Int8 IR in {int8_xml}, checkpoint {out / 'best.pth'}, "
                f"metrics in {out / 'metrics.yaml'}")
    if not final.met(rows["int8"][key]):
        fine_tune = "allow fine-tuning (--mode auto)" if c.mode == "ptq" else "fine-tune longer (--epochs)"
        logger.warning(f"The int8 model misses the accuracy budget; raise compression.max_accuracy_drop, {fine_tune}, "
                       f"or keep sensitive layers in float (compression.ignored_scope)")
        return BUDGET_NOT_MET
    return 0


if __name__ == "__main__":
    cli.run(main)
