#!/usr/bin/env python3
"""Search the learning rate, batch size and weight decay with optuna; the next train.py run uses the best.

  python optimize.py --train-data-roots DATA/train --val-data-roots DATA/val [--search-budget 0.5]
                     [--n-trials 20] [--storage sqlite:////shared/hpo.db] [--study-name my_search]

Each trial trains hpo.epochs_per_trial epochs with the template's recipe (LR finder off, no checkpoints)
at parameters drawn by TPE from the template's hpo ranges, scored by val top-1 (mAP for multi-label);
a trial below the median of earlier trials at the same epoch is pruned. The search ends after --n-trials
trials or when its time is spent: --search-budget x the duration of one normal training run
(hyper_parameters.basic.epochs epochs), estimated from the first epoch. The study lives in --storage
(default: an SQLite file WORK_DIR/hpo/study.db); workers on several machines share one study through one
database URL and --study-name. The best parameters (over all workers' trials) go to WORK_DIR/hpo_best.yaml,
which train.py then applies (its flags and KEY=VALUE overrides still win; delete the file to stop).
Data flags are train.py's, and fall back to $TRAIN_DATA_ROOT / $VAL_DATA_ROOT.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

from clsengine.fileio import write_text
from clsengine.hpo import Budget, SearchSpace, create_study, search
from clsengine.rundir import claim_run_folder
from clsengine.runlog import get_logger
from clsengine.utils import seed_everything, select_device
from workbench import auto, cli, factories
from workbench.template import load_template, template_from_dict
from workbench.training import train

WORK_DIR = Path(__file__).resolve().parent  # the work dir this script was instantiated into

# optimize.py's own flags; the common ones are cli.FLAG_KEYS.
FLAG_KEYS = {"search_budget": "hpo.time_budget", "n_trials": "hpo.n_trials", "epochs_per_trial": "hpo.epochs_per_trial"}
# hpo_best.yaml keys: the template keys train.py overrides with the search's result.
PARAM_KEYS = {"learning_rate": "hyper_parameters.basic.base_learning_rate",
              "weight_decay": "training.optimizer.weight_decay", "batch_size": "hyper_parameters.basic.batch_size"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_data_args(p, "train", "TRAIN_DATA_ROOT")
    cli.add_data_args(p, "val", "VAL_DATA_ROOT")
    cli.add_dataset_args(p, training=True)
    p.add_argument("--search-budget", type=float, default=None, metavar="RATIO",
                   help="search time as a ratio of one normal training run (hpo.time_budget), e.g. 0.5")
    p.add_argument("--time-budget", type=float, default=None, dest="old_time_budget",
                   help=argparse.SUPPRESS)  # its spelling before train.py's --time-budget became a duration
    p.add_argument("--n-trials", type=int, default=None, help="at most this many trials here (hpo.n_trials)")
    p.add_argument("--epochs-per-trial", type=int, default=None, help="epochs of each trial (hpo.epochs_per_trial)")
    p.add_argument("--storage", default=None,
                   help="optuna storage URL (default: sqlite:///WORK_DIR/hpo/study.db); e.g. "
                        "postgresql://user:pass@host/db for workers on several machines")
    p.add_argument("--study-name", default=None, help="study to create or join (default: the template's name)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new study in WORK_DIR/hpo (default: a rerun continues the study there)")
    p.add_argument("--save-to", default=str(WORK_DIR / cli.HPO_BEST),
                   help=f"where the best parameters go (default: WORK_DIR/{cli.HPO_BEST}, read by train.py)")
    cli.add_runtime_args(p)
    cli.add_template_args(p, WORK_DIR)
    args = p.parse_intermixed_args()
    if args.old_time_budget is not None:
        print(f"note: optimize.py --time-budget is now --search-budget (a ratio of one training run; train.py's "
              f"--time-budget is a duration): using --search-budget {args.old_time_budget:g}", file=sys.stderr)
        args.search_budget = args.search_budget if args.search_budget is not None else args.old_time_budget
    return args


def main() -> int:
    args = parse_args()
    overrides = cli.collect_overrides(args, FLAG_KEYS)
    t = load_template(args.template, overrides)
    out = WORK_DIR / "hpo"
    notes = []
    if args.storage is None:  # the work dir's own study: one optimize.py at a time; a rerun continues it
        notes = claim_run_folder(out, "optimize.py", run_names=("study.db",), resuming=not args.overwrite,
                                 overwrite=args.overwrite, resume_hint="", clear_names=("optimize.log",)).notes
    else:
        out.mkdir(parents=True, exist_ok=True)  # a shared storage: workers on other processes join the study
    logger = get_logger(out / "optimize.log")
    for note in notes:
        logger.warning(note)
    seed_everything(t.training.seed, t.training.deterministic)
    device = select_device(t.gpu_num)
    train_scan, val_scan = cli.scan_train_val(args, t, logger, out)
    # The recipe of the full run being tuned: its `auto` values are decided for its epochs, then kept by every trial.
    t, choices = auto.resolve(t, auto.run_facts(t, len(train_scan.samples), len(train_scan.classes), device.type,
                                                samples=train_scan.samples))
    for choice in choices:
        logger.info(str(choice))
    h, basic = t.hpo, t.hyper_parameters.basic

    lr_range = h.learning_rate or [basic.base_learning_rate / 10, basic.base_learning_rate * 10]
    space = SearchSpace(learning_rate=tuple(lr_range), weight_decay=tuple(h.weight_decay), batch_size=h.batch_size)
    epochs = h.epochs_per_trial or max(1, basic.epochs // 5)
    storage = args.storage or f"sqlite:///{out / 'study.db'}"
    name = args.study_name or t.name
    metric = "mAP" if factories.is_multilabel(t) else "top-1"
    logger.info(f"{t.name}: optuna study '{name}' in {storage}; up to {h.n_trials} trials of {epochs} epoch(s), "
                f"time budget {h.time_budget:g} x a {basic.epochs}-epoch run; score: val {metric}; "
                f"learning rate {lr_range[0]:.3g}..{lr_range[1]:.3g}, weight decay {h.weight_decay[0]:.3g}.."
                f"{h.weight_decay[1]:.3g}" + (f", batch size in {h.batch_size}" if h.batch_size else ""))

    def train_trial(params: dict, report) -> float:
        trial_overrides = {PARAM_KEYS[k]: v for k, v in params.items()}
        trial_overrides.update({"hyper_parameters.basic.epochs": epochs, "hyper_parameters.basic.time_budget": None,
                                "training.lr_finder.enabled": False, "training.early_stopping_patience": None})
        trial_t = template_from_dict(t.to_dict(), "hpo trial", trial_overrides)
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            result = train(trial_t, train_scan, val_scan, Path(tmp), device, logger, checkpoints=False,
                           on_epoch_end=lambda epoch, row: report(epoch, row["score"]))
        return result["best_score"]

    study = create_study(storage, name, seed=t.training.seed)
    if study.trials:
        logger.info(f"Continuing study '{name}': {len(study.trials)} earlier trial(s) count towards the best "
                    f"(--overwrite starts a new study)" if args.storage is None else
                    f"Joining study '{name}': {len(study.trials)} trial(s) so far")
    summary = search(study, train_trial, space, Budget(h.time_budget, basic.epochs), h.n_trials, logger)
    best = {"params": {PARAM_KEYS[k]: v for k, v in summary["params"].items()},
            "score": round(summary["score"], 2), "metric": metric, "study": name, "storage": storage,
            "epochs_per_trial": epochs, "complete_trials": summary["complete_trials"],
            "pruned_trials": summary["pruned_trials"], "elapsed_s": summary["elapsed_s"],
            "budget_s": summary["budget_s"]}
    save_to = Path(args.save_to)
    write_text(save_to, yaml.safe_dump(best, sort_keys=False))
    chosen = ", ".join(f"{k.rsplit('.', 1)[1]} {v:.4g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[1]} {v}"
                       for k, v in best["params"].items())
    logger.info(f"Best of {summary['complete_trials']} complete trial(s) ({summary['pruned_trials']} pruned): "
                f"{chosen} -> val {metric} {summary['score']:.2f}. Written to {save_to}; train.py applies it.")
    return 0


if __name__ == "__main__":
    cli.run(main)
