"""Int8 compression of a trained classifier inside an accuracy budget: what compress.py runs.

Post-training quantization first, quantization-aware fine-tuning when compression.mode asks for it, and every
decision judged on the OpenVINO IR that ships (IRJudge), not on PyTorch's fake quantization, whose numbers can
differ from real int8 kernels by a point or so. The score is top-1, or mAP for multi-label models.
"""
from __future__ import annotations

import copy
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from clsengine import data as datasets
from clsengine.checkpoint import load_checkpoint, save_checkpoint
from clsengine.checkpoint_saver import checkpoint_state
from clsengine.compression import AccuracyBudget, qat_epochs, quantization_state, quantize, runs_qat
from clsengine.export import export_openvino
from clsengine.fileio import write_text
from clsengine.loop import FitConfig, fit
from clsengine.metrics import primary_score
from clsengine.optim import create_scheduler
from clsengine.ov_core import openvino_core
from clsengine.speed import ov_throughput

from . import factories, loaders
from .classifier import load_classifier, model_from_checkpoint
from .template import Template, dump_config
from .versions import versions


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
    """The score (top-1, or mAP for multi-label models) of a model as it ships: exported to OpenVINO IR and
    run on the validation images by OpenVINO."""

    def __init__(self, t: Template, classes: list[str], val_samples: list[tuple[str, int]], template_path: str,
                 overrides: dict) -> None:
        self.t, self.classes, self.samples = t, classes, val_samples
        self.template_path, self.overrides = template_path, overrides

    def export(self, model: torch.nn.Module, xml: Path) -> Path:
        return export_openvino(model, xml, **factories.export_kwargs(self.t, self.classes))

    def score(self, xml: Path) -> float:
        ir = load_classifier(xml, template_path=self.template_path, overrides=self.overrides, classes=self.classes,
                             classes_source="the compressed checkpoint")
        ir.template = self.t
        logits, labels = ir.predict(self.samples, f"val ({xml.parent.name})")
        return primary_score(logits, labels)

    def __call__(self, model: torch.nn.Module) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            return self.score(self.export(model, Path(tmp) / "model.xml"))


@dataclass
class CompressionJob:
    """What compress.py hands over: the float model and its template, the data, where results go, and an
    interrupted run's checkpoint to continue (`resume`, read from `resume_path`)."""
    t: Template
    classes: list[str]
    float_model: torch.nn.Module
    float_weights: Path
    train_scan: datasets.DatasetScan
    val_scan: datasets.DatasetScan
    out: Path
    device: torch.device
    logger: logging.Logger
    template_path: str
    overrides: dict = field(default_factory=dict)
    resume: dict[str, Any] | None = None
    resume_path: str | None = None
    epochs_flag: int | None = None  # --epochs as given: its being ignored is logged
    benchmark_seconds: float = 3.0
    tensorboard_dir: Path | None = None

    @property
    def metric(self) -> tuple[str, str]:
        """(metrics.yaml key, the name logs use)."""
        return ("mAP", "mAP") if factories.is_multilabel(self.t) else ("top1", "top-1")


def compress(job: CompressionJob) -> dict[str, Any]:
    """Quantize `job`'s float model inside compression.max_accuracy_drop, write best.pth, the int8 IR
    (export/) beside the float IR (export_fp32/) and metrics.yaml in job.out; returns the metrics, whose
    ["budget"]["met"] says whether the shipped int8 IR meets the budget."""
    t, c, out, logger = job.t, job.t.compression, job.out, job.logger
    judge = IRJudge(t, job.classes, job.val_scan.samples, job.template_path, job.overrides)
    job.float_model.to(job.device)
    float_xml = judge.export(job.float_model, out / "export_fp32" / "model.xml")
    float_score = judge.score(float_xml)
    metric = job.metric[1]
    budget = AccuracyBudget(float_score, c.max_accuracy_drop, metric)
    logger.info(f"{t.name}: float IR {metric} {float_score:.2f} on {len(job.val_scan.samples)} val images; budget: "
                f"at most {c.max_accuracy_drop:g} points lost (int8 IR {metric} >= {budget.target:.2f}); "
                f"device {job.device}")
    model, ptq_score = _post_training(job, judge, budget)
    quant_info = {"nncf": quantization_state(model), "float_weights": str(job.float_weights.resolve()),
                  "float_score": float_score, "ptq_score": ptq_score, "max_accuracy_drop": c.max_accuracy_drop}
    config = {"template": t.to_dict(), "classes": job.classes,
              "run": {"compressed_from": str(job.float_weights.resolve()), "device": str(job.device),
                      "versions": versions()}}
    dump_config(config, out / "config.yaml")
    extra = {"config": config, "classes": job.classes, "arch": t.model.architecture, "quantization": quant_info}
    ptq_state = checkpoint_state(model, epoch=0, score=ptq_score, best_score=ptq_score, best_epoch=0, extra=extra,
                                 weights_from="ptq")
    if job.resume is None:
        save_checkpoint(ptq_state, out / "ptq.pth")  # kept: fine-tuning may end below it
    epochs_run = _fine_tune(job, model, judge, budget, ptq_score, extra)
    if epochs_run is None:  # no fine-tuning: the PTQ model is the result
        for name in ("best.pth", "latest.pth"):
            save_checkpoint(ptq_state, out / name)
    return _ship(job, judge, float_xml, float_score, ptq_score, epochs_run or 0)


def _post_training(job: CompressionJob, judge: IRJudge, budget: AccuracyBudget) -> tuple[torch.nn.Module, float]:
    """The post-training quantized model and its int8 IR's score (or the resumed quantized model's)."""
    t, c = job.t, job.t.compression
    if job.resume is not None:
        info = job.resume["quantization"]
        model = model_from_checkpoint(job.resume, job.resume_path, job.overrides)[2].to(job.device)
        return model, float(info["ptq_score"] if "ptq_score" in info else info["ptq_top1"])  # older runs: ptq_top1
    subset = calibration_samples(job.train_scan.samples, c.calibration_subset, t.training.seed)
    calibration = loaders.make_loader(loaders.dataset(t, subset, job.classes, loaders.eval_transform(t)), t, 1,
                                       train=False, device=job.device)
    job.logger.info(f"Post-training quantization: {len(calibration)} calibration images, preset {c.preset}, "
                    f"overflow fix {c.overflow_fix}"
                    + (f", float layers matching {c.ignored_scope}" if c.ignored_scope else ""))
    model = quantize(copy.deepcopy(job.float_model), calibration, subset_size=c.calibration_subset,
                     preset=c.preset, fast_bias_correction=c.fast_bias_correction,
                     ignored_patterns=c.ignored_scope, overflow_fix=c.overflow_fix, device=job.device)
    ptq_score = judge(model)
    job.logger.info(f"PTQ: {budget.describe(ptq_score)}")
    return model, ptq_score


def _fine_tune(job: CompressionJob, model: torch.nn.Module, judge: IRJudge, budget: AccuracyBudget,
               ptq_score: float, extra: dict) -> int | None:
    """Quantization-aware training as compression.mode says, each epoch judged by its int8 IR; the epochs
    run, or None when none was to run (the caller then ships the PTQ model)."""
    t, c, out, logger = job.t, job.t.compression, job.out, job.logger
    basic, metric = t.hyper_parameters.basic, job.metric[1]
    epochs = c.qat_epochs if c.qat_epochs is not None else qat_epochs(len(job.train_scan.samples), basic.batch_size)
    wanted = runs_qat(c.mode, budget.met(ptq_score))
    if job.resume is None and not (wanted and epochs > 0):
        reason = ("compression.qat_epochs is 0" if wanted else "compression.mode is ptq" if c.mode == "ptq"
                  else "PTQ met the accuracy budget")
        if job.epochs_flag is not None and not wanted:
            logger.info(f"--epochs {job.epochs_flag} ignored: no quantization-aware training runs ({reason})")
        elif not budget.met(ptq_score):
            logger.info(f"Quantization-aware training skipped ({reason})")
        return None
    lr = basic.base_learning_rate * c.qat_lr_factor
    stop_at_budget = c.mode == "auto"
    plan = (f"up to {epochs} epoch(s) at LR {lr:.3g}, stopping once the int8 IR's {metric} >= {budget.target:.2f}"
            if stop_at_budget else f"{epochs} epoch(s) at LR {lr:.3g} (compression.mode qat), keeping the epoch "
                                   f"whose int8 IR {metric} is best")
    logger.info(f"Quantization-aware training: {plan}")
    train_loader = loaders.train_loader(t, job.train_scan, job.device)
    optimizer = factories.build_optimizer(t, model, lr=lr)
    fit_cfg = FitConfig(epochs=epochs, output_dir=out, score_fn=judge, tensorboard_dir=job.tensorboard_dir,
                        max_grad_norm=t.training.optimizer.max_grad_norm, checkpoint_extra=extra)

    def budget_reached(epoch: int, row: dict) -> bool:
        reached = stop_at_budget and row["score"] >= budget.target
        if reached:
            logger.info(f"Target reached: {row['score']:.2f} >= {budget.target:.2f}")
        return reached

    criterion = factories.build_loss(t, len(job.classes), job.train_scan.counts()).to(job.device)
    result = fit(model, train_loader, loaders.val_loader(t, job.val_scan, job.device), criterion, optimizer,
                 qat_scheduler(optimizer, epochs, len(train_loader)), job.device, fit_cfg, logger, resume=job.resume,
                 on_epoch_end=budget_reached)
    if result["best_score"] <= ptq_score:  # fine-tuning did not beat PTQ: ship the PTQ model
        logger.info(f"Fine-tuning did not beat PTQ (int8 IR {metric} {result['best_score']:.2f} <= "
                    f"{ptq_score:.2f}): the PTQ model is the result")
        save_checkpoint(load_checkpoint(out / "ptq.pth"), out / "best.pth")
    return result["epochs_run"]


def _ship(job: CompressionJob, judge: IRJudge, float_xml: Path, float_score: float, ptq_score: float,
          epochs_run: int) -> dict[str, Any]:
    """The int8 IR of best.pth beside the float IR, both scored and timed; metrics.yaml and the summary lines."""
    t, c, out, logger = job.t, job.t.compression, job.out, job.logger
    key, metric = job.metric
    _, _, best_model = model_from_checkpoint(load_checkpoint(out / "best.pth"), out / "best.pth", job.overrides)
    int8_xml = judge.export(best_model, out / "export" / "model.xml")
    rows = {}
    core = openvino_core()
    for name, xml, score in (("float", float_xml, float_score), ("int8", int8_xml, judge.score(int8_xml))):
        speed = (ov_throughput(core, xml, "CPU", factories.input_size(t), job.benchmark_seconds)[0]
                 if job.benchmark_seconds > 0 else None)
        rows[name] = {key: round(score, 2), "ir": str(xml), "size_bytes": files_size(xml),
                      "throughput_img_s": round(speed, 1) if speed else None}
    final = AccuracyBudget(rows["float"][key], c.max_accuracy_drop, metric)
    summary = {
        "budget": {"metric": key, "max_accuracy_drop": c.max_accuracy_drop, "met": final.met(rows["int8"][key]),
                   "drop": round(rows["float"][key] - rows["int8"][key], 2)},
        "float": rows["float"], "int8": rows["int8"],
        "steps": {"mode": c.mode, f"ptq_{key}": round(ptq_score, 2), "qat_epochs_run": epochs_run,
                  "best_checkpoint": str(out / "best.pth")},
        "machine": {"cpu_count": os.cpu_count(), "benchmark_seconds": job.benchmark_seconds},
        "versions": versions(),
    }
    write_text(out / "metrics.yaml", yaml.safe_dump(summary, sort_keys=False))
    for name in ("float", "int8"):
        r = rows[name]
        logger.info(f"{name:5s} IR: {metric} {r[key]:6.2f}  size {r['size_bytes'] / 1e6:7.2f} MB"
                    + (f"  {r['throughput_img_s']:.1f} img/s" if r["throughput_img_s"] else ""))
    message = final.describe(rows["int8"][key])
    logger.info(f"{message[0].upper()}{message[1:]}. Int8 IR in {int8_xml}, checkpoint {out / 'best.pth'}, "
                f"metrics in {out / 'metrics.yaml'}")
    if not summary["budget"]["met"]:
        fine_tune = "allow fine-tuning (--mode auto)" if c.mode == "ptq" else "fine-tune longer (--epochs)"
        logger.warning(f"The int8 model misses the accuracy budget; raise compression.max_accuracy_drop, {fine_tune}, "
                       f"or keep sensitive layers in float (compression.ignored_scope)")
    return summary


__all__ = ["CompressionJob", "IRJudge", "calibration_samples", "compress", "files_size", "qat_scheduler"]
