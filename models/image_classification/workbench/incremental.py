"""train.py --add-classes OLD_CHECKPOINT: new classes for a trained model without forgetting the old ones.

The new model is the old one with more outputs: the old classes keep their indices (the class order is the old
model's, then the new classes) and their head rows; the new rows start fresh. It trains on the new data with
the old model as a teacher of the old classes' logits (Learning without Forgetting: training.distillation with
teacher_classes subset) plus, optionally, a replay sample of N images per old class (--replay-per-class).

Where the old classes' images come from: a training data root holding only the new classes (the realistic
case) takes them from --replay-data-root (e.g. the old training set, or a folder of stored exemplars); a root
that already holds images of every old class takes them from itself, and --replay-per-class N then keeps N of
each (the memory a deployment could afford), all of them without the flag. After training, classes.txt and
add_classes_report.yaml (old classes' accuracy before and after, new classes' accuracy) are written.
"""
from __future__ import annotations

import argparse
import copy
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from clsengine import data as datasets
from clsengine.checkpoint import save_checkpoint
from clsengine.errors import UserError
from clsengine.fileio import write_text
from clsengine.incremental import extend_head_state, replay_sample
from clsengine.loop import predict
from clsengine.metrics import primary_score

from . import cli, factories, loaders
from .distill import load_teacher, teacher_checkpoint
from .template import Template, dump_config

CLASSES_FILE = "classes.txt"              # 'index name' lines: the new model's classes (a --class-id-path file)
REPORT_FILE = "add_classes_report.yaml"
INIT_FILE = "add_classes_init.pth"        # the extended model before training (the run's initial weights)
REPLAY_FILE = "replay_samples.txt"        # the old classes' images trained on: 'path<TAB>class' lines
OUTPUT_FILES = (CLASSES_FILE, REPORT_FILE, INIT_FILE, REPLAY_FILE)


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("adding classes to a trained model (Learning without Forgetting)")
    g.add_argument("--add-classes", default=None, metavar="OLD_CHECKPOINT",
                   help="start from this trained model (a checkpoint or a work dir) and add the training data's "
                        "other classes; the old model teaches its classes' outputs (training.distillation)")
    g.add_argument("--replay-per-class", type=int, default=None, metavar="N",
                   help="train with N images of each old class (from --replay-data-root, or from the training "
                        "data when it holds old classes; default: all there are)")
    g.add_argument("--replay-data-root", default=None, metavar="DIR",
                   help="class folders of the old classes' images (e.g. the old training set) for the replay "
                        "sample, when the training data holds only the new classes")


@dataclass
class AddClasses:
    """The old model of an --add-classes run and how the new one is made from it."""
    path: Path
    template: Template          # the old model's
    classes: list[str]          # the old model's, in its order
    model: torch.nn.Module
    per_class: int | None
    replay_root: str | None
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AddClasses | None:
        """None without --add-classes; the old model loaded (an unusable file is one UserError)."""
        if not args.add_classes:
            if args.replay_per_class is not None or args.replay_data_root:
                raise UserError("--replay-per-class and --replay-data-root need --add-classes OLD_CHECKPOINT")
            return None
        if args.replay_per_class is not None and args.replay_per_class < 0:
            raise UserError(f"--replay-per-class must be 0 or more, got {args.replay_per_class}")
        if args.load_weights:
            raise UserError("--add-classes starts from the old checkpoint: leave out --load-weights")
        path = teacher_checkpoint(args.add_classes, "--add-classes")
        t, classes, model = load_teacher(path)
        return cls(path, t, classes, model, args.replay_per_class, args.replay_data_root)

    def template_keys(self) -> dict[str, Any]:
        """Template keys below the command line's: the old model's architecture, input, task and loss (the
        weights are copied), its own distillation as the teacher of the old classes, and a fine-tuning of every
        layer, BatchNorm included: the old model already knows this domain, ImageNet's transfer rules (a few
        stages, frozen statistics) kept new classes 5 points lower on the digits (domain README)."""
        old = copy.deepcopy(self.template.to_dict())
        loss = old["training"]["loss"]
        if self.template.model.head == "cosine" and loss.get("scale") is None:  # the old logits' scale, kept
            loss["scale"] = factories.cosine_scale(self.template.training.loss, len(self.classes))
        return {"model": old["model"], "input": old["input"], "task": old["task"], "training.loss": loss,
                "data.classes": [], "training.transfer.linear_probe": False,  # a probe would refit the old rows
                "training.transfer.trainable_stages": "all", "training.transfer.freeze_bn": False,
                "training.transfer.fine_tune": True,
                "training.distillation.enabled": True, "training.distillation.teacher": str(self.path),
                "training.distillation.teacher_classes": "subset"}

    def scan(self, args: argparse.Namespace, t: Template, logger: logging.Logger, out: Path
             ) -> tuple[datasets.DatasetScan, datasets.DatasetScan]:
        """Training and validation data in the new class order (old, then new): the new classes' images plus the
        replay sample (REPLAY_FILE lists it), and the validation images of any of the classes."""
        train = cli.scan_split(args, "train", "TRAIN_DATA_ROOT", t)
        val = cli.scan_split(args, "val", "VAL_DATA_ROOT", t)
        for scan in (train, val):
            loaders.report_skipped(scan, logger, out / "skipped_images.txt")
        held = [c for c in train.classes if c in self.classes]
        if held and len(held) < len(self.classes):
            missing = [c for c in self.classes if c not in train.classes]
            raise UserError(f"--add-classes {self.path}: the old model's classes are not a subset of the training "
                            f"data's ({train.source} lacks {datasets.format_names(missing)}); give images of every "
                            f"old class, or of none (then --replay-data-root)")
        new = [c for c in train.classes if c not in self.classes]
        if not new:
            raise UserError(f"--add-classes {self.path}: no new class in {train.source}: all its classes are the "
                            f"old model's ({datasets.format_names(self.classes)})")
        classes = self.classes + new
        train = relabel(train, classes, "training data")
        n_old = len(self.classes)
        base = [s for s in train.samples if not _is_old(s[1], n_old)]
        pool = [s for s in train.samples if _is_old(s[1], n_old)] if held else self._stored(classes)
        chosen = self._replay(pool, n_old, logger)
        write_text(out / REPLAY_FILE, "".join(f"{p}\t{classes[l]}\n" for p, l in chosen))
        logger.info(f"--add-classes: {len(self.classes)} old classes (indices kept), {len(new)} new "
                    f"({datasets.format_names(new)}); replay: {len(chosen)} old-class images "
                    f"({'from the training data' if held else self.replay_root or 'none stored'})")
        return replace(train, samples=base + chosen), relabel(val, classes, "validation data")

    def _stored(self, classes: list[str]) -> list[tuple[str, int]]:
        """The old classes' images under --replay-data-root (other classes there are left out)."""
        if not self.replay_root:
            return []
        stored = datasets.scan_folder(Path(self.replay_root).expanduser().resolve())
        kept = [c for c in stored.classes if c in self.classes]
        if not kept:
            raise UserError(f"--replay-data-root {self.replay_root} holds none of the old classes "
                            f"({datasets.format_names(self.classes)})")
        return relabel(datasets.select_classes(stored, kept, "--replay-data-root"), classes, "replay data").samples

    def _replay(self, pool: list, n_old: int, logger: logging.Logger) -> list[tuple[str, int]]:
        """N images per old class drawn from `pool` (all of them without --replay-per-class); a warning, not an
        error, where fewer exist than asked (those are used)."""
        if any(not isinstance(label, int) for _, label in pool) and self.per_class is not None:
            raise UserError("--replay-per-class: single-label data only (a multi-label image has several classes)")
        chosen, short = replay_sample(pool, range(n_old), self.per_class, self.seed)
        if short:
            names = ", ".join(f"{self.classes[c]} ({n})" for c, n in list(short.items())[:10])
            logger.warning(f"--replay-per-class {self.per_class}: fewer stored images than asked for "
                           f"{len(short)} old class(es), all of them used: {names}")
        return chosen

    def initial_weights(self, t: Template, classes: list[str], out: Path, logger: logging.Logger) -> str:
        """The extended model (INIT_FILE): every old weight, the old head rows at the old classes' positions."""
        model = factories.build_model(t, len(classes))
        positions = [classes.index(c) for c in self.classes]
        state = extend_head_state(self.model.state_dict(), model.state_dict(), positions)
        path = save_checkpoint({"model": state, "classes": list(classes)}, out / INIT_FILE)
        logger.info(f"--add-classes: {self.path} extended from {len(self.classes)} to {len(classes)} outputs "
                    f"(old head rows kept, new rows fresh): {path}")
        return str(path)

    def report(self, out: Path, t: Template, val: datasets.DatasetScan, device: torch.device,
               logger: logging.Logger) -> dict[str, Any]:
        """CLASSES_FILE and REPORT_FILE, and the report's lines in the log: on the validation images, the old
        classes' score before (old model) and after (best.pth), the new classes' after."""
        classes = val.classes
        write_text(out / CLASSES_FILE, "".join(f"{i} {name}\n" for i, name in enumerate(classes)))
        _, _, new_model = load_teacher(out / "best.pth")
        report = {"old_checkpoint": str(self.path), "new_checkpoint": str(out / "best.pth"),
                  "old_classes": list(self.classes), "new_classes": classes[len(self.classes):],
                  "metric": "mAP" if factories.is_multilabel(t) else "top1", "validation": val.source,
                  **scores(self, t, new_model, val, device)}
        dump_config(report, out / REPORT_FILE)
        logger.info(report_line(report) + f"; {out / REPORT_FILE}, {out / CLASSES_FILE}")
        return report


def _is_old(label: int | tuple[int, ...], n_old: int) -> bool:
    return any(i < n_old for i in label) if isinstance(label, (tuple, list)) else label < n_old


def relabel(scan: datasets.DatasetScan, classes: list[str], what: str) -> datasets.DatasetScan:
    """`scan` with its labels renumbered to `classes` (which must hold all of its classes)."""
    unknown = [c for c in scan.classes if c not in classes]
    if unknown:
        raise UserError(f"{what} ({scan.source}): classes neither old nor new: {datasets.format_names(unknown)}")
    index = [classes.index(c) for c in scan.classes]
    samples = [(p, tuple(index[i] for i in label) if isinstance(label, (tuple, list)) else index[label])
               for p, label in scan.samples]
    return replace(scan, classes=list(classes), samples=samples)


def _predict(t: Template, model: torch.nn.Module, scan: datasets.DatasetScan, device: torch.device):
    model.to(device)
    return predict(model, loaders.val_loader(t, scan, device), device, progress=False)


def scores(old: AddClasses, t: Template, new_model: torch.nn.Module, val: datasets.DatasetScan,
           device: torch.device) -> dict[str, Any]:
    """Top-1 (mAP for multi-label) of the old model and the new one on the old and the new classes' images."""
    n_old = len(old.classes)
    logits, labels = _predict(t, new_model, val, device)
    if labels.dim() == 2:  # multi-label: mAP over the old classes' columns (before / after) and the new ones'
        before, _ = _predict(old.template, old.model, _old_scan(val, n_old, old.classes, True), device)
        return {"old_classes_before": primary_score(before, labels[:, :n_old]),
                "old_classes_after": primary_score(logits[:, :n_old], labels[:, :n_old]),
                "new_classes_after": primary_score(logits[:, n_old:], labels[:, n_old:]),
                "all_after": primary_score(logits, labels), "images": len(labels)}
    is_old = labels < n_old
    old_scan = _old_scan(val, n_old, old.classes, False)
    before = _predict(old.template, old.model, old_scan, device) if old_scan.samples else None
    return {"old_classes_before": primary_score(*before) if before else None,
            "old_classes_after": primary_score(logits[is_old], labels[is_old]) if is_old.any() else None,
            "old_classes_after_among_old": primary_score(logits[is_old][:, :n_old], labels[is_old])
            if is_old.any() else None,
            "new_classes_after": primary_score(logits[~is_old], labels[~is_old]) if (~is_old).any() else None,
            "all_after": primary_score(logits, labels), "old_images": int(is_old.sum()),
            "new_images": int((~is_old).sum())}


def _old_scan(val: datasets.DatasetScan, n_old: int, old_classes: list[str], multilabel: bool) -> datasets.DatasetScan:
    """The validation images the old model can be scored on, labelled in its classes."""
    if multilabel:
        samples = [(p, tuple(i for i in label if i < n_old)) for p, label in val.samples]
    else:
        samples = [(p, label) for p, label in val.samples if label < n_old]
    return replace(val, classes=list(old_classes), samples=samples)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def report_line(report: dict[str, Any]) -> str:
    metric = "top-1" if report["metric"] == "top1" else "mAP"
    return (f"Added classes: {len(report['old_classes'])} old classes {metric} "
            f"{_percent(report['old_classes_before'])} before (old model) -> {_percent(report['old_classes_after'])}"
            f" after; {len(report['new_classes'])} new classes {_percent(report['new_classes_after'])}; all "
            f"{_percent(report['all_after'])} (validation)")


__all__ = ["AddClasses", "CLASSES_FILE", "INIT_FILE", "OUTPUT_FILES", "REPLAY_FILE", "REPORT_FILE", "add_args",
           "relabel", "report_line", "scores"]
