"""Template -> transforms, datasets and batch loaders (training, validation, the linear probe's)."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from clsengine import auto as rules
from clsengine import data as datasets
from clsengine import distributed as dist

from .factories import eval_batch_size, input_size, is_multilabel
from .template import AUTO, Template


def eval_transform(t: Template) -> datasets.transforms.Pipeline:
    return datasets.build_eval_transform(input_size(t), t.input.mean, t.input.std, bgr=t.input.channel_order == "BGR")


def deploy_transform(t: Template) -> datasets.transforms.Pipeline:
    """Images as the exported model takes them: 0..255, in the IR's input channel order (compress.py
    calibrates the IR on these)."""
    return datasets.build_deploy_transform(input_size(t), bgr=t.output_format.openvino_input_format == "BGR")


def train_transform(t: Template) -> datasets.transforms.Pipeline:
    aug = t.training.augmentation
    if aug.hflip == AUTO:  # a template not resolved against its data: the photo default
        aug = dataclasses.replace(aug, hflip=rules.HFLIP_P)
    return datasets.build_train_transform(input_size(t), t.input.mean, t.input.std, aug,
                                          bgr=t.input.channel_order == "BGR")


def report_skipped(scan: datasets.DatasetScan, logger: logging.Logger, out_file: Path | None = None) -> None:
    """Log unreadable files (skipped, never fatal) and list them all in out_file."""
    if not scan.skipped:
        return
    logger.warning(f"{scan.source}: skipped {len(scan.skipped)} unreadable file(s), e.g. {scan.skipped[0][0]}"
                   + (f"; full list in {out_file}" if out_file else ""))
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        with open(out_file, "a", encoding="utf-8") as f:
            f.writelines(f"{path}\t{reason}\n" for path, reason in scan.skipped)


def loader_workers(t: Template, device: torch.device) -> int:
    """training.workers, with auto resolved for this device and the processes sharing the machine."""
    if t.training.workers != "auto":
        return int(t.training.workers)
    return datasets.auto_workers(device.type, dist.info().world_size)


def make_loader(dataset: datasets.ImageDataset, t: Template, batch_size: int, train: bool, device: torch.device,
                sample_weights: list[float] | None = None) -> datasets.EpochLoader:
    return datasets.EpochLoader(dataset, batch_size=batch_size, shuffle=train, workers=loader_workers(t, device),
                         seed=t.training.seed, drop_last=train, pin_memory=device.type == "cuda",
                         sample_weights=sample_weights)


def dataset(t: Template, samples: list, classes: list[str], transform, cache: bool = False) -> datasets.ImageDataset:
    """Images with labels as the task wants them: class indices, or multi-hot vectors for multi-label;
    `cache`: decoded once and kept in memory when they fit in data.cache_mb (datasets read every epoch)."""
    return datasets.ImageDataset(samples, classes, transform, multilabel=is_multilabel(t),
                          cache_bytes=t.data.cache_mb * 2 ** 20 if cache else 0)


def train_loader(t: Template, scan: datasets.DatasetScan, device: torch.device) -> datasets.EpochLoader:
    """Augmented, shuffled training batches; class-balanced draws with data.balanced_sampler."""
    weights = datasets.sample_weights(scan.samples, scan.counts()) if t.data.balanced_sampler else None
    return make_loader(dataset(t, scan.samples, scan.classes, train_transform(t), cache=True), t,
                       t.hyper_parameters.basic.batch_size, train=True, device=device, sample_weights=weights)


def val_loader(t: Template, scan: datasets.DatasetScan, device: torch.device) -> datasets.EpochLoader:
    return make_loader(dataset(t, scan.samples, scan.classes, eval_transform(t), cache=True), t,
                       eval_batch_size(t), train=False, device=device)


def probe_loader(t: Template, scan: datasets.DatasetScan, device: torch.device) -> datasets.EpochLoader:
    """The training images as the linear probe sees them: evaluation transform, in order, decoded once."""
    return make_loader(dataset(t, scan.samples, scan.classes, eval_transform(t)), t, eval_batch_size(t), train=False,
                       device=device)


__all__ = ["dataset", "eval_transform", "loader_workers", "make_loader", "probe_loader", "report_skipped", "train_loader", "train_transform", "val_loader"]
