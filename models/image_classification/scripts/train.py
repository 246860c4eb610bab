#!/usr/bin/env python3
"""Train this work dir's model on class folders, a label list or a COCO JSON.

  python train.py --train-ann-files '' --train-data-roots DATA/train \\
                  --val-ann-files '' --val-data-roots DATA/val --save-checkpoints-to outputs
  python train.py --train-ann-files train.txt --train-data-roots IMAGES --val-ann-files val.txt \\
                  --val-data-roots IMAGES --class-id-path classes.txt     # 'relative/path label' lines
  python train.py --train-ann-files train.json --val-ann-files val.json --category-map level1.json  # COCO

Data roots fall back to $TRAIN_DATA_ROOT / $VAL_DATA_ROOT. A dataset report (images per class, imbalance,
unlabeled and unreadable images, majority-class baseline) is printed and written to dataset_report.txt/.yaml
before training. Any template key can be overridden with
KEY=VALUE arguments (e.g. training.optimizer.name=adamw); the effective configuration is written to
<save-checkpoints-to>/config.yaml. An interrupted run continues with --resume-from <dir>/latest.pth.
A WORK_DIR/hpo_best.yaml written by optimize.py sets the learning rate, batch size and weight decay
(flags and KEY=VALUE overrides still win). After training, best.pth is calibrated on the validation set
(template section `calibration`: a temperature, multi-label per-class thresholds, an "unknown" threshold;
logged). A run whose loss explodes stops with one error line naming the learning rate and what was kept.

--add-classes OLD_CHECKPOINT adds the training data's other classes to a trained model: the old classes keep
their indices and head rows, the old model teaches their outputs (Learning without Forgetting), a replay sample of
their images may be mixed in; classes.txt and add_classes_report.yaml (old classes' accuracy before and after,
new classes') are written with the checkpoints:

  python train.py --add-classes outputs/best.pth --train-data-roots NEW --val-data-roots ALL \\
                  --replay-data-root OLD/train --replay-per-class 20 --save-checkpoints-to outputs_added
  python train.py --gpu-num 4 ...     # 4 processes on this machine (torchrun, DistributedDataParallel)
  torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      train.py ...                    # one of two machines; the other with --node-rank 1
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from clsengine import data as datasets
from clsengine import distributed as dist
from clsengine.checkpoint import load_checkpoint
from clsengine.checkpoint_saver import require_resumable
from clsengine.errors import UserError
from clsengine.fileio import write_text
from clsengine.runlog import get_logger
from clsengine.utils import seed_everything, select_device
from workbench import cli, factories, incremental
from workbench.calibrate import calibrate_checkpoint
from workbench.template import dump_config, load_template, template_from_dict
from workbench.training import train

WORK_DIR = Path(__file__).resolve().parent  # the work dir this script was instantiated into

# What makes a folder a run's (refused to a fresh run without --overwrite), and what --overwrite clears with it.
RUN_FILES = ("latest.pth", "best.pth")
CLEARED_ON_OVERWRITE = ("history.csv", "config.yaml", "train.log", "training_curves.png", "tensorboard",
                        "lr_finder.yaml", "lr_finder.png", "dataset_report.txt", "dataset_report.yaml",
                        "skipped_images.txt", *incremental.OUTPUT_FILES)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_data_args(p, "train", "TRAIN_DATA_ROOT")
    cli.add_data_args(p, "val", "VAL_DATA_ROOT")
    cli.add_dataset_args(p, training=True)
    p.add_argument("--save-checkpoints-to", default=str(WORK_DIR / "outputs"),
                   help="output folder: checkpoints, config.yaml, logs (default: WORK_DIR/outputs)")
    p.add_argument("--load-weights", default=None,
                   help="initial weights (default: WORK_DIR/snapshot.pth when instantiate fetched one)")
    p.add_argument("--resume-from", default=None, help="latest.pth of an interrupted run to continue")
    cli.add_overwrite_arg(p, "--save-checkpoints-to")
    p.add_argument("--load-aux-weights", default=None, action="append", metavar="PATH",
                   help="initial weights of the mutual-learning auxiliary models: a training checkpoint "
                        "holding them all (e.g. outputs/latest.pth), or the flag once per model")
    p.add_argument("--tensorboard-dir", default=None, help="TensorBoard folder (default: <output>/tensorboard)")
    p.add_argument("--epochs", type=int, default=None, help="override hyper_parameters.basic.epochs")
    p.add_argument("--time-budget", default=None, metavar="DURATION",
                   help="train for as many epochs as fit in this time here (180, 3m, 1.5h; --epochs or the "
                        "template's epochs stay the most); measured on a few steps, stopped at the deadline")
    p.add_argument("--base-learning-rate", type=float, default=None,
                   help="override hyper_parameters.basic.base_learning_rate")
    p.add_argument("--lr-finder", choices=("off", "fast_ai", "tpe", "grid"), default=None,
                   help="run the LR finder in this mode before training, or switch it off "
                        "(default: the template's training.lr_finder)")
    cli.add_runtime_args(p)
    incremental.add_args(p)
    cli.add_template_args(p, WORK_DIR)
    return p.parse_intermixed_args()  # KEY=VALUE overrides may stand between flags


def launch_processes(n: int) -> int:
    """Start n copies of this command through torchrun on this machine (one per GPU, or CPU processes
    with the gloo backend when there is no GPU); their exit status is this run's."""
    import subprocess

    if not torch.cuda.is_available():
        print(f"warning: no CUDA device: --gpu-num {n} starts {n} CPU processes (gloo backend), which exercises "
              f"the distributed path but is not faster than one process", file=sys.stderr)
    elif torch.cuda.device_count() < n:
        raise UserError(f"--gpu-num {n}: only {torch.cuda.device_count()} CUDA device(s) visible")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               sys.argv[0], *sys.argv[1:]]
    return subprocess.call(command)


def main() -> int:
    started = time.monotonic()
    args = parse_args()
    sources = cli.override_sources(args)
    if args.lr_finder is not None:
        sources["training.lr_finder.enabled"] = (args.lr_finder != "off", "--lr-finder")
        if args.lr_finder != "off":
            sources["training.lr_finder.mode"] = (args.lr_finder, "--lr-finder")
    overrides = {key: value for key, (value, _) in sources.items()}
    resume = load_checkpoint(args.resume_from) if args.resume_from else None
    adding = incremental.AddClasses.from_args(args)  # --add-classes: the old model (None without the flag)
    hpo_file = WORK_DIR / cli.HPO_BEST
    if resume is not None:
        if "config" not in resume:
            raise UserError(f"{args.resume_from} is a weights file, not a training checkpoint; "
                            f"use --load-weights to start from it")
        require_resumable(resume, args.resume_from)
        # The checkpoint's configuration is authoritative; flags given now (e.g. --epochs) still apply.
        t = template_from_dict(resume["config"]["template"], f"checkpoint {args.resume_from}", overrides)
        hpo = {}
    else:
        hpo = cli.hpo_overrides(hpo_file)  # optimize.py's result, below the command line
        t = load_template(args.template, {**hpo, **(adding.template_keys() if adding else {}), **overrides})
    if t.gpu_num > 1 and not dist.launched_by_torchrun():
        return launch_processes(t.gpu_num)

    world, device = dist.init_from_env(use_cuda=t.gpu_num >= 1 and torch.cuda.is_available())
    if not world.enabled:
        device = select_device(t.gpu_num)
    out = Path(args.save_checkpoints_to).resolve()
    lock = cli.claim_output(out, "train.py", RUN_FILES, CLEARED_ON_OVERWRITE, args.resume_from, args.overwrite)
    logger = get_logger(out / "train.log" if world.is_main else None, quiet=not world.is_main)
    for note in lock.notes:
        logger.warning(note)
    seed_everything(t.training.seed, t.training.deterministic)

    train_scan, val_scan = (adding.scan(args, t, logger, out) if adding else
                            cli.scan_train_val(args, t, logger, out, resume["classes"] if resume else None))
    classes = train_scan.classes
    if t.task.background_label is not None and t.task.background_label not in classes:
        raise UserError(f"task.background_label '{t.task.background_label}' is not one of the classes "
                        f"({datasets.format_names(classes)})")
    report = datasets.dataset_report(train_scan, val_scan)
    text = datasets.format_dataset_report(report)
    logger.info(text)
    if world.is_main:
        dump_config(report, out / "dataset_report.yaml")
        write_text(out / "dataset_report.txt", text + "\n")
    if (line := cli.describe_sources(sources, hpo, hpo_file)) is not None:
        logger.info(line)
    logger.info(f"{t.name}: {len(classes)} classes ({t.task.type}), {len(train_scan.samples)} train / "
                f"{len(val_scan.samples)} val images, device {device}"
                + (f", {world.world_size} processes" if world.enabled else ""))

    weights = args.load_weights
    if weights is None and (WORK_DIR / "snapshot.pth").is_file():
        weights = str(WORK_DIR / "snapshot.pth")
    weights = adding.initial_weights(t, classes, out, logger) if adding and resume is None else weights
    if resume is not None:
        weights = None
    logger.info(f"Initial weights: {weights}" if weights else "Training from scratch")
    tensorboard_dir = Path(args.tensorboard_dir or out / "tensorboard") if t.tensorboard else None
    result = train(t, train_scan, val_scan, out, device, logger, weights=weights, resume=resume,
                   aux_weights=args.load_aux_weights, run_info={"resumed_from": args.resume_from},
                   tensorboard_dir=tensorboard_dir, started=started)
    dist.shutdown()  # the calibration is rank 0's alone
    if result is not None and world.is_main and t.calibration.enabled and (out / "best.pth").is_file():
        calibrate_checkpoint(out / "best.pth", val_scan, args.template, overrides, logger)
    if adding is not None and result is not None and world.is_main:
        adding.report(out, t, val_scan, device, logger)  # classes.txt, old/new classes' accuracy
    if result is not None:
        score = "mAP" if factories.is_multilabel(t) else "top-1"
        written = [n for n in ("latest.pth", "best.pth", "config.yaml", "train.log", "history.csv",
                               "training_curves.png") if (out / n).is_file()]
        logger.info(f"Done: best val {score} {result['best_score']:.2f} at epoch {result['best_epoch']}. "
                    f"Results in {out}: {', '.join(written)}"
                    + (f", TensorBoard logs in {tensorboard_dir}" if tensorboard_dir else ""))
    return 0


if __name__ == "__main__":
    cli.run(main)
