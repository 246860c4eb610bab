"""Int8 compression of a trained classifier inside an accuracy budget: what compress.py runs.

Post-training quantization of the float OpenVINO IR with NNCF's OpenVINO backend (the model that ships is the
model quantized and judged, and OpenVINO collects the statistics several times faster than NNCF's PyTorch
hooks); quantization-aware fine-tuning, which needs the PyTorch model, only when compression.mode asks for it,
starting from NNCF's PyTorch post-training quantization. Every decision is judged on an OpenVINO IR (IRJudge),
not on PyTorch's fake quantization, whose numbers can differ from real int8 kernels by a point or so. The score
is top-1, or mAP for multi-label models.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from clsengine import data as datasets
from clsengine.checkpoint import load_checkpoint, save_checkpoint
from clsengine.checkpoint_saver import checkpoint_state
from clsengine.compression import (AccuracyBudget, qat_epochs, quantization_state, quantize, quantize_ir,
                                   runs_qat)
from clsengine.export import export_onnx, export_openvino
from clsengine.fileio import atomic_outputs, write_text
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
                 overrides: dict, calibration: dict | None = None) -> None:
        self.t, self.classes, self.samples = t, classes, val_samples
        self.template_path, self.overrides = template_path, overrides
        self.calibration = calibration   # the float checkpoint's: every IR carries it (its logits are close)

    def export_kwargs(self) -> dict[str, Any]:
        return factories.export_kwargs(self.t, self.classes, calibration=self.calibration)

    def export(self, model: torch.nn.Module, xml: Path) -> Path:
        return export_openvino(model, xml, **self.export_kwargs())

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
    calibration: dict | None = None   # the float checkpoint's (clsengine.calibration), carried into every output
    tensorboard_dir: Path | None = None

    @property
    def metric(self) -> tuple[str, str]:
        """(metrics.yaml key, the name logs use)."""
        return ("mAP", "mAP") if factories.is_multilabel(self.t) else ("top1", "top-1")


def compress(job: CompressionJob) -> dict[str, Any]:
    """Quantize `job`'s float IR inside compression.max_accuracy_drop and ship the int8 IR (export/) beside the
    float IR (export_fp32/) with metrics.yaml in job.out; quantization-aware training (best.pth) when the mode
    asks for it, an int8 ONNX (export/model.onnx) when compression.int8_onnx does. Returns the metrics, whose
    ["budget"]["met"] says whether the shipped int8 IR meets the budget."""
    t, c, out, logger = job.t, job.t.compression, job.out, job.logger
    judge = IRJudge(t, job.classes, job.val_scan.samples, job.template_path, job.overrides, job.calibration)
    job.float_model.to(job.device)
    clock = Stopwatch()
    float_xml = judge.export(job.float_model, out / "export_fp32" / "model.xml")
    float_score = judge.score(float_xml)
    metric = job.metric[1]
    budget = AccuracyBudget(float_score, c.max_accuracy_drop, metric)
    logger.info(f"{t.name}: float IR {metric} {float_score:.2f} on {len(job.val_scan.samples)} val images; budget: "
                f"at most {c.max_accuracy_drop:g} points lost (int8 IR {metric} >= {budget.target:.2f}); "
                f"device {job.device}")
    clock.lap("float_ir")
    ptq_xml, ptq_score = _post_training_ir(job, judge, float_xml, budget)
    clock.lap("ptq")
    quant_info = {"float_weights": str(job.float_weights.resolve()), "float_score": float_score,
                  "ptq_score": ptq_score, "max_accuracy_drop": c.max_accuracy_drop}
    config = {"template": t.to_dict(), "classes": job.classes,
              "run": {"compressed_from": str(job.float_weights.resolve()), "device": str(job.device),
                      "versions": versions()}}
    dump_config(config, out / "config.yaml")
    epochs = _qat_epochs(job, budget, ptq_score)
    qat_won, epochs_run = False, 0
    if epochs is not None or c.int8_onnx:
        model, extra = _torch_post_training(job, quant_info, config, for_qat=epochs is not None)
        if epochs is not None:
            epochs_run, qat_won = _fine_tune(job, model, judge, budget, ptq_score, extra, epochs)
        clock.lap("pytorch")  # its PTQ, and fine-tuning when it runs
    return _ship(job, judge, float_xml, float_score, ptq_xml, ptq_score, epochs_run, qat_won, clock)


class Stopwatch:
    """Wall seconds of each step, for metrics.yaml."""

    def __init__(self) -> None:
        self.last, self.seconds = time.perf_counter(), {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self.last, 1)
        self.last = now


def _calibration_loader(job: CompressionJob, transform, device: torch.device) -> datasets.EpochLoader:
    """The same calibration images for either backend, one per batch (NNCF then counts images): `transform`
    gives them the IR's input format or the PyTorch model's."""
    t = job.t
    subset = calibration_samples(job.train_scan.samples, t.compression.calibration_subset, t.training.seed)
    return loaders.make_loader(loaders.dataset(t, subset, job.classes, transform), t, 1, train=False, device=device)


def _post_training_ir(job: CompressionJob, judge: IRJudge, float_xml: Path, budget: AccuracyBudget
                      ) -> tuple[Path, float]:
    """The float IR quantized by NNCF's OpenVINO backend (export_ptq/) and its score; a resumed run keeps its
    earlier PTQ IR."""
    t, c = job.t, job.t.compression
    xml = job.out / "export_ptq" / "model.xml"
    if job.resume is not None and xml.is_file():
        info = job.resume["quantization"]
        return xml, float(info["ptq_score"] if "ptq_score" in info else info["ptq_top1"])  # older runs: ptq_top1
    calibration = _calibration_loader(job, loaders.deploy_transform(t), torch.device("cpu"))
    job.logger.info(f"Post-training quantization of the float IR (NNCF, OpenVINO backend): {len(calibration)} "
                    f"calibration images, preset {c.preset}, overflow fix {c.overflow_fix}"
                    + (f", float operations matching {c.ignored_scope}" if c.ignored_scope else ""))
    quantize_ir(float_xml, xml, calibration, **_nncf_args(c))
    score = judge.score(xml)
    job.logger.info(f"PTQ: {budget.describe(score)}")
    return xml, score


def _nncf_args(c) -> dict[str, Any]:
    return dict(subset_size=c.calibration_subset, preset=c.preset, fast_bias_correction=c.fast_bias_correction,
                ignored_patterns=c.ignored_scope, overflow_fix=c.overflow_fix)


def _torch_post_training(job: CompressionJob, quant_info: dict, config: dict, for_qat: bool
                         ) -> tuple[torch.nn.Module, dict]:
    """NNCF's PyTorch post-training quantization, where quantization-aware training starts and where the int8
    ONNX comes from (ptq.pth, best.pth), or the resumed run's quantized model; with what its checkpoints
    carry besides the weights. compression.ignored_scope was
    checked against the IR's names; here it applies where it matches NNCF's PyTorch node names."""
    t, c = job.t, job.t.compression
    def extra(model: torch.nn.Module) -> dict:
        return {"config": config, "classes": job.classes, "arch": t.model.architecture,
                "quantization": {**quant_info, "nncf": quantization_state(model)},
                **({"calibration": job.calibration} if job.calibration else {})}

    if job.resume is not None:
        model = model_from_checkpoint(job.resume, job.resume_path, job.overrides)[2].to(job.device)
        return model, extra(model)
    calibration = _calibration_loader(job, loaders.eval_transform(t), job.device)
    uses = [use for use, wanted in (("quantization-aware training starts from it", for_qat),
                                    ("the int8 ONNX comes from it (compression.int8_onnx)", c.int8_onnx)) if wanted]
    job.logger.info(f"PyTorch model quantized too (NNCF, PyTorch backend, {len(calibration)} calibration images): "
                    + " and ".join(uses))
    model = quantize(copy.deepcopy(job.float_model), calibration, device=job.device, strict_scope=False,
                     **_nncf_args(c))
    carried = extra(model)
    state = checkpoint_state(model, epoch=0, score=quant_info["ptq_score"], best_score=quant_info["ptq_score"],
                             best_epoch=0, extra=carried, weights_from="ptq")
    for name in ("ptq.pth", "best.pth", "latest.pth"):  # best and latest: replaced by fine-tuning when it runs
        save_checkpoint(state, job.out / name)
    return model, carried


def _qat_epochs(job: CompressionJob, budget: AccuracyBudget, ptq_score: float) -> int | None:
    """The quantization-aware training epochs to run, or None (logged why) when none are."""
    c, logger = job.t.compression, job.logger
    basic = job.t.hyper_parameters.basic
    epochs = c.qat_epochs if c.qat_epochs is not None else qat_epochs(len(job.train_scan.samples), basic.batch_size)
    wanted = runs_qat(c.mode, budget.met(ptq_score))
    if job.resume is not None or (wanted and epochs > 0):
        return epochs
    reason = ("compression.qat_epochs is 0" if wanted else "compression.mode is ptq" if c.mode == "ptq"
              else "PTQ met the accuracy budget")
    if job.epochs_flag is not None and not wanted:
        logger.info(f"--epochs {job.epochs_flag} ignored: no quantization-aware training runs ({reason})")
    elif not budget.met(ptq_score):
        logger.info(f"Quantization-aware training skipped ({reason})")
    return None


def _fine_tune(job: CompressionJob, model: torch.nn.Module, judge: IRJudge, budget: AccuracyBudget,
               ptq_score: float, extra: dict, epochs: int) -> tuple[int, bool]:
    """Quantization-aware training as compression.mode says, each epoch judged by its int8 IR; (the epochs
    run, whether its best epoch beat the OpenVINO PTQ IR)."""
    t, c, out, logger = job.t, job.t.compression, job.out, job.logger
    metric = job.metric[1]
    lr = t.hyper_parameters.basic.base_learning_rate * c.qat_lr_factor
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
    if result["best_score"] <= ptq_score:
        logger.info(f"Fine-tuning did not beat PTQ (int8 IR {metric} {result['best_score']:.2f} <= "
                    f"{ptq_score:.2f}): the PTQ IR ships, best.pth is the PyTorch PTQ model")
        save_checkpoint(load_checkpoint(out / "ptq.pth"), out / "best.pth")
    return result["epochs_run"], result["best_score"] > ptq_score


def _copy_ir(src: Path, dst: Path) -> Path:
    with atomic_outputs(dst.with_suffix(".bin"), dst) as (tmp_bin, tmp_xml):
        shutil.copyfile(src.with_suffix(".bin"), tmp_bin)
        shutil.copyfile(src, tmp_xml)
    return dst


def _ship(job: CompressionJob, judge: IRJudge, float_xml: Path, float_score: float, ptq_xml: Path, ptq_score: float,
          epochs_run: int, qat_won: bool, clock: Stopwatch) -> dict[str, Any]:
    """The int8 IR that won (the PTQ IR, or best.pth's after fine-tuning) in export/ beside the float IR, both
    scored and timed, the int8 ONNX on request; metrics.yaml and the summary lines."""
    t, c, out = job.t, job.t.compression, job.out
    key, metric = job.metric
    int8_xml = out / "export" / "model.xml"
    best_model = None
    if qat_won or c.int8_onnx:
        best_model = model_from_checkpoint(load_checkpoint(out / "best.pth"), out / "best.pth", job.overrides)[2]
    if qat_won:
        judge.export(best_model, int8_xml)
    else:
        _copy_ir(ptq_xml, int8_xml)
    rows = {}
    core = openvino_core()
    for name, xml, score in (("float", float_xml, float_score), ("int8", int8_xml, judge.score(int8_xml))):
        speed = (ov_throughput(core, xml, "CPU", factories.input_size(t), job.benchmark_seconds)[0]
                 if job.benchmark_seconds > 0 else None)
        rows[name] = {key: round(score, 2), "ir": str(xml), "size_bytes": files_size(xml),
                      "throughput_img_s": round(speed, 1) if speed else None}
    if best_model is not None and c.int8_onnx:
        onnx_file = export_onnx(best_model, out / "export" / "model.onnx", **judge.export_kwargs())
        rows["int8_onnx"] = {key: round(judge.score(onnx_file), 2), "onnx": str(onnx_file),
                             "size_bytes": onnx_file.stat().st_size, "from": "best.pth (NNCF, PyTorch backend)"}
    clock.lap("ship")
    final = AccuracyBudget(rows["float"][key], c.max_accuracy_drop, metric)
    summary = {
        "budget": {"metric": key, "max_accuracy_drop": c.max_accuracy_drop, "met": final.met(rows["int8"][key]),
                   "drop": round(rows["float"][key] - rows["int8"][key], 2)},
        **rows,
        "steps": {"mode": c.mode, f"ptq_{key}": round(ptq_score, 2), "ptq_backend": "openvino",
                  "qat_epochs_run": epochs_run, "shipped": "qat" if qat_won else "ptq",
                  "best_checkpoint": str(out / "best.pth") if (out / "best.pth").is_file() else None,
                  "seconds": clock.seconds},
        "machine": {"cpu_count": os.cpu_count(), "benchmark_seconds": job.benchmark_seconds},
        "versions": versions(),
    }
    write_text(out / "metrics.yaml", yaml.safe_dump(summary, sort_keys=False))
    _log_summary(job, summary, int8_xml)
    return summary


def _log_summary(job: CompressionJob, summary: dict[str, Any], int8_xml: Path) -> None:
    c, out, logger = job.t.compression, job.out, job.logger
    key, metric = job.metric
    for name in ("float", "int8"):
        r = summary[name]
        logger.info(f"{name:5s} IR: {metric} {r[key]:6.2f}  size {r['size_bytes'] / 1e6:7.2f} MB"
                    + (f"  {r['throughput_img_s']:.1f} img/s" if r["throughput_img_s"] else ""))
    if "int8_onnx" in summary:
        r = summary["int8_onnx"]
        logger.info(f"int8 ONNX (onnxruntime): {metric} {r[key]:6.2f}  size {r['size_bytes'] / 1e6:7.2f} MB  "
                    f"{r['onnx']}")
    final = AccuracyBudget(summary["float"][key], c.max_accuracy_drop, metric)
    message = final.describe(summary["int8"][key])
    logger.info(f"{message[0].upper()}{message[1:]}. Int8 IR in {int8_xml}, metrics in {out / 'metrics.yaml'} "
                f"({', '.join(f'{k} {v:g} s' for k, v in summary['steps']['seconds'].items())})")
    if not summary["budget"]["met"]:
        fine_tune = "allow fine-tuning (--mode auto)" if c.mode == "ptq" else "fine-tune longer (--epochs)"
        logger.warning(f"The int8 model misses the accuracy budget; raise compression.max_accuracy_drop, {fine_tune}, "
                       f"or keep sensitive layers in float (compression.ignored_scope)")


__all__ = ["CompressionJob", "IRJudge", "calibration_samples", "compress", "files_size", "qat_scheduler"]
