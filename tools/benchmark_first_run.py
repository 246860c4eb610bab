#!/usr/bin/env python3
"""A user's first run: each template's defaults (its `auto` values) on a dataset, and optionally timm's train.py
on the same data, machine and epochs. Prints one table of top-1 and wall time.

  python tools/benchmark_first_run.py --digits --epochs 10                       # every single-label template
  python tools/benchmark_first_run.py --data PHOTOS --templates mobilenet_v3_small --epochs 20 \\
      --timm-dir /path/to/pytorch-image-models --timm-python /path/to/venv-with-timm/bin/python
  python tools/benchmark_first_run.py --data DIGITS28 --input-size 32 --epochs 5 --seeds 0 1 2
  python tools/benchmark_first_run.py --digits --time-budget 3m                  # the epochs that fit 3 minutes
  python tools/benchmark_first_run.py --data PHOTOS --templates efficientnet_lite0 --pretrained --probe \
      --epochs 100 --time-budget 150 --timm-dir ... --timm-python ... --timm-model tf_efficientnet_lite0 \
      --timm-epochs 3 --timm-lr 5e-4                                               # from ImageNet weights

--data is a folder with train/<class>/ and val/<class>/ (a test/ beside them is the held-out split: the top-1
is then measured there, best.pth being chosen on val). --digits writes scikit-learn's digits at 32x32.
Our side runs the work-dir scripts as a newcomer would: train.py with the data roots and --epochs only
(or --time-budget: train.py then chooses the epochs that fit; --epochs, if given, is their maximum;
--input-size adds input.size=[S,S], --set adds KEY=VALUE overrides), then eval.py on best.pth. The timm side
runs `train.py --data-dir DATA --train-split train --val-split val --model M --epochs N` with AdamW at
--timm-lr, batch --timm-batch-size, from scratch (see --pretrained), on the CPU; timm chooses its best checkpoint on the same val
split, and with a test/ split timm's validate.py scores that checkpoint there, as eval.py scores ours.
Wall time is each training process's, start to end, the LR finder and
validation included.

--pretrained starts our runs from the template's snapshot (instantiate_template.py copies it) and timm's from the
same file, its tensors mapped in order onto the timm model's (every shape checked) and given to timm's
--pretrained-path. --probe adds the transfer baseline: a scikit-learn logistic regression (default settings) on
the snapshot's frozen globally pooled features of the training images (evaluation transform), scored on the same
test split; its time is the training images' feature extraction and the fit.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

from benchmark_recipe import (TEMPLATES, add_data_source, data_folder, instantiate, mean_spread, run, scored_split,
                              top1_of)


def single_label_templates() -> list[str]:
    names = []
    for path in sorted(TEMPLATES.glob("*/template.yaml")):
        task = (yaml.safe_load(path.read_text()).get("task") or {}).get("type", "multiclass")
        if task != "multilabel":
            names.append(path.parent.name)
    return names


def auto_summary(train_log: Path) -> str:
    """The choices that matter most, from the `auto ...` lines of train.log (with a time budget, the epochs of
    the loop's last re-plan: those the schedule ended with)."""
    short = {"hyper_parameters.basic.epochs": "epochs", "hyper_parameters.basic.batch_size": "batch", "training.optimizer.name": "opt",
             "hyper_parameters.basic.base_learning_rate": "lr", "model.small_input": "small_input",
             "training.lr_finder.enabled": "lr_finder", "training.transfer.fine_tune": "fine_tune"}
    found = {}
    for line in train_log.read_text().splitlines():
        replanned = re.search(r"Time budget: .*?; (\d+) epochs fit in all", line)
        if replanned:
            found["epochs"] = replanned.group(1)
        if " auto " not in line:
            continue
        key, _, rest = line.split(" auto ", 1)[1].partition(" = ")
        if key in short:
            found[short[key]] = rest.split(":", 1)[0]
    return " ".join(f"{k}={v}" for k, v in found.items())


def ours(template: str, data: Path, args: argparse.Namespace, seed: int) -> dict:
    work_dir = args.out / f"{template}_seed{seed}"
    log = args.out / f"{work_dir.name}.log"
    log.unlink(missing_ok=True)
    instantiate(template, work_dir, log, snapshot=args.pretrained)
    extra = [f"input.size=[{args.input_size},{args.input_size}]"] if args.input_size else []
    length = (["--epochs", str(args.epochs)] if args.epochs else []) + (
        ["--time-budget", args.time_budget] if args.time_budget else [])
    seconds = run([sys.executable, "train.py", "--overwrite", "--train-data-roots", str(data / "train"),
                   "--val-data-roots", str(data / "val"), *length, f"training.seed={seed}", *extra, *args.set],
                  work_dir, log)
    run([sys.executable, "eval.py", "--load-weights", str(work_dir / "outputs" / "best.pth"), "--test-data-roots",
         str(scored_split(data)), *extra], work_dir, log)
    return {"name": template, "top1": top1_of(work_dir / "metrics.yaml"), "seconds": seconds,
            "notes": auto_summary(work_dir / "outputs" / "train.log")}


def timm(data: Path, args: argparse.Namespace, seed: int) -> dict:
    out = args.out / f"timm_{args.timm_model}_seed{seed}"
    log = args.out / f"{out.name}.log"
    log.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)  # timm appends to an earlier run's summary.csv
    classes = len([d for d in (data / "train").iterdir() if d.is_dir()])
    size = args.input_size or 224
    init = ["--pretrained", "--pretrained-path", str(timm_weights(args))] if args.pretrained else []
    seconds = run([str(args.timm_python), "train.py", "--data-dir", str(data), "--train-split", "train", "--val-split", "val",
                   "--model", args.timm_model, "--num-classes", str(classes), "--epochs", str(args.timm_epochs or args.epochs),
                   *init,
                   "--batch-size", str(args.timm_batch_size), "--opt", "adamw", "--lr", str(args.timm_lr),
                   "--input-size", "3", str(size), str(size), "--device", "cpu", "--workers", str(args.timm_workers),
                   "--seed", str(seed), "--output", str(out), "--experiment", "run", "--checkpoint-hist", "1",
                   "--log-interval", "1000",
                   *([] if args.timm_warmup_epochs is None else ["--warmup-epochs", str(args.timm_warmup_epochs)])],
                  args.timm_dir, log)
    if (data / "test").is_dir():  # timm's best checkpoint (chosen on val) scored on the held-out split, as ours
        results = args.out / f"{out.name}_test.json"
        run([str(args.timm_python), "validate.py", "--data-dir", str(data), "--split", "test", "--model", args.timm_model,
             "--num-classes", str(classes), "--checkpoint", str(out / "run" / "model_best.pth.tar"),
             "--input-size", "3", str(size), str(size), "--device", "cpu", "--workers", str(args.timm_workers),
             "--batch-size", "32", "--results-file", str(results), "--results-format", "json"],
            args.timm_dir, args.out / f"{out.name}_test.log")
        best = float(json.loads(results.read_text())["top1"])
    else:
        with open(out / "run" / "summary.csv", newline="") as f:
            best = max(float(row["eval_top1"]) for row in csv.DictReader(f))
    warmup = "" if args.timm_warmup_epochs is None else f" warmup={args.timm_warmup_epochs}"
    return {"name": f"timm {args.timm_model}", "top1": best, "seconds": seconds,
            "notes": f"{args.timm_epochs or args.epochs} epochs adamw lr={args.timm_lr:g} "
                     f"batch={args.timm_batch_size}{warmup}"}


def snapshot_file(template: str) -> Path:
    from clsengine import hub
    from workbench.template import load_template

    location = load_template(TEMPLATES / template / "template.yaml").snapshot.location
    return hub.package_file(location) if hub.is_package(location) else Path(location)


def timm_weights(args: argparse.Namespace) -> Path:
    """The template's snapshot with its tensors renamed, in order, to the timm model's (run in timm's Python)."""
    out = args.out / f"timm_init_{args.timm_model}.pth"
    code = (
        "import sys, torch, timm\n"
        "src = torch.load(sys.argv[1], map_location='cpu', weights_only=True)\n"
        "own = timm.create_model(sys.argv[2]).state_dict()\n"
        "assert len(src) == len(own), (len(src), len(own))\n"
        "for (a, x), (b, y) in zip(src.items(), own.items()):\n"
        "    assert x.shape == y.shape, (a, b, x.shape, y.shape)\n"
        "torch.save(dict(zip(own, src.values())), sys.argv[3])\n")
    run([str(args.timm_python), "-c", code, str(snapshot_file(args.templates[0])), args.timm_model, str(out)],
        args.timm_dir, args.out / "timm_init.log")
    return out


def probe(template: str, data: Path, args: argparse.Namespace) -> dict:
    """Logistic regression (scikit-learn, default settings) on the snapshot's frozen pooled features."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from clsengine.data import scan_dataset
    from clsengine.models import load_pretrained
    from clsengine.transfer import pooled_features
    from workbench import factories, loaders
    from workbench.template import load_template

    t = load_template(TEMPLATES / template / "template.yaml")
    device = torch.device("cpu")

    def features(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        scan = scan_dataset(str(data / split), fmt="folders")
        model = factories.build_model(t, len(scan.classes))
        load_pretrained(model, snapshot_file(template))
        return pooled_features(model, loaders.probe_loader(t, scan, device), device)

    started = time.perf_counter()  # the probe's training: features of the training images and the fit
    x, y = features("train")
    classifier = LogisticRegression(max_iter=5000).fit(x.numpy(), y.numpy())
    seconds = time.perf_counter() - started
    tx, ty = features(scored_split(data).name)
    top1 = 100.0 * classifier.score(tx.numpy(), ty.numpy())
    return {"name": f"{template} logistic-regression probe", "top1": top1, "seconds": seconds,
            "notes": "frozen pooled features, scikit-learn LogisticRegression()"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_source(parser, "scikit-learn's digits at 32x32 (written to --out)", required=True)
    parser.add_argument("--templates", nargs="*", default=None,
                        help="default: every single-label template; the flag alone: none (timm only)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (with --time-budget: their maximum)")
    parser.add_argument("--time-budget", default=None, metavar="DURATION",
                        help="train.py --time-budget for our runs (180, 3m): it chooses the epochs that fit")
    parser.add_argument("--input-size", type=int, default=None, help="input.size=[S,S] for our templates, and timm's")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="template overrides for our runs")
    parser.add_argument("--timm-dir", type=Path, default=None, help="a checkout of pytorch-image-models")
    parser.add_argument("--timm-python", type=Path, default=Path(sys.executable),
                        help="the interpreter that runs timm's train.py (one where timm is installed)")
    parser.add_argument("--timm-model", default="mobilenetv3_small_100")
    parser.add_argument("--timm-lr", type=float, default=2e-3)
    parser.add_argument("--timm-epochs", type=int, default=None, help="timm's epochs (default: --epochs)")
    parser.add_argument("--timm-warmup-epochs", type=int, default=None,
                        help="timm's --warmup-epochs (default: timm's own, 5; a run of a few epochs is all warm-up)")
    parser.add_argument("--pretrained", action="store_true",
                        help="start from the (first) template's snapshot, ours and timm's (see above)")
    parser.add_argument("--probe", action="store_true",
                        help="add a logistic-regression probe on the first template's snapshot features")
    parser.add_argument("--timm-batch-size", type=int, default=32)
    parser.add_argument("--timm-workers", type=int, default=2,
                        help="timm's loader processes (its train.py cannot load in the training process)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/first_run_bench"))
    args = parser.parse_args()

    templates = single_label_templates() if args.templates is None else args.templates
    unknown = [t for t in templates if not (TEMPLATES / t / "template.yaml").is_file()]
    if unknown:
        print(f"error: no template {', '.join(unknown)} in {TEMPLATES}", file=sys.stderr)
        return 2
    if args.epochs is None and (args.time_budget is None or args.timm_dir is not None):
        print("error: give --epochs (timm's train.py needs them), or --time-budget for our runs alone",
              file=sys.stderr)
        return 2
    if args.timm_dir is not None and not (args.timm_dir / "train.py").is_file():
        print(f"error: {args.timm_dir} holds no train.py (a pytorch-image-models checkout?)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    data = data_folder(None if args.digits else args.data, args.out, 32)
    if args.digits:
        args.input_size = args.input_size or 32

    runs: dict[str, list[dict]] = {}
    started = time.perf_counter()
    for seed in args.seeds:
        jobs = [(t, lambda t=t: ours(t, data, args, seed)) for t in templates]
        if args.timm_dir is not None:
            jobs.append((f"timm {args.timm_model}", lambda: timm(data, args, seed)))
        if args.probe and seed == args.seeds[0]:
            jobs.append(("probe", lambda: probe(templates[0], data, args)))
        for name, job in jobs:
            result = job()
            runs.setdefault(name, []).append(result)
            print(f"{name:28s} seed {seed}  top-1 {result['top1']:6.2f}  {result['seconds']:6.1f} s  {result['notes']}",
                  flush=True)

    split = scored_split(data).name
    length = " ".join(([f"{args.epochs} epochs"] if args.epochs else []) +
                      ([f"time budget {args.time_budget}"] if args.time_budget else []))
    print(f"\n{data.name}: {length}" + (f", input {args.input_size}x{args.input_size}" if args.input_size
                                                    else "") + f", top-1 on {split}, seeds {args.seeds}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.perf_counter() - started:.0f} s in all\n")
    print("| run | top-1 (%) | train wall time (s) | choices |")
    print("|---|---:|---:|---|")
    for name, results in runs.items():
        print(f"| {name} | {mean_spread([r['top1'] for r in results])} | {statistics.mean(r['seconds'] for r in results):.0f} "
              f"| {results[0]['notes']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
