#!/usr/bin/env python3
"""Ablation of the training recipe at equal wall time: what each technique brings when every variant gets the
same minutes, not the same epochs.

  python tools/benchmark_recipe.py --digits --template mobilenet_v3_small --epochs 5 --seeds 0 1
  python tools/benchmark_recipe.py --data PHOTOS --template mobilenet_v3_small --epochs 10 --budgets 1 4
  python tools/benchmark_recipe.py --digits --equal-epochs --epochs 10            # the old, equal-epoch table

First the `plain` variant trains --epochs epochs; its wall time T is the reference. Then every variant
(plain included) trains with `train.py --time-budget` k x T for each k of --budgets (default 1 and 4): train.py
chooses the epochs that fit with that variant's own cost, so a technique that doubles the cost of a step gets
half the epochs, as it would for a user with a fixed amount of time. Every run goes through the real work-dir
scripts (train.py, then eval.py on best.pth; early stopping off), from each seed of --seeds; the table gives
the mean top-1 (and its spread over seeds), the epochs the budget allowed and the wall time.

Variants: `plain` switches every technique off (softmax and a linear head, no EMA, SAM, auxiliary model, LR
finder, light augmentation, no MixUp / CutMix), the `auto` rules still choosing batch, learning rate, optimizer
and schedule; `+X` is plain with X on; `auto` is the template's defaults, what a user gets; `published` pins
the published long-run recipe (SGD, plateau, SAM, auxiliary model, LR finder, full augmentation, EMA,
AM-softmax).

--data is a folder with train/ and val/ class folders (top-1 on val; on test/ if there is one, best.pth being
chosen on val); --digits writes scikit-learn's digits at --size.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = REPO_ROOT / "models" / "image_classification" / "model_templates" / "custom-classification"

TECHNIQUES: dict[str, tuple[list[str], list[str]]] = {
    # name: (overrides that switch it on, overrides that switch it off)
    "am_softmax": (["model.head=cosine", "training.loss.name=am_softmax"],
                   ["model.head=linear", "training.loss.name=softmax"]),
    "ema": (["training.ema.enabled=true"], ["training.ema.enabled=false"]),
    "sam": (["training.optimizer.sam.enabled=true"], ["training.optimizer.sam.enabled=false"]),
    "mutual": (["training.mutual_learning.enabled=true"], ["training.mutual_learning.enabled=false"]),
    # With the auto optimizer (AdamW in short runs) the range test needs an AdamW range, not the SGD one.
    "lr_finder": (["training.lr_finder.enabled=true", "training.lr_finder.min_lr=0.0002",
                   "training.lr_finder.max_lr=0.01"], ["training.lr_finder.enabled=false"]),
    "full_augmentation": (["training.augmentation_level=full"], ["training.augmentation_level=light"]),
    "mixup": (["training.augmentation.mixup_alpha=0.2"], ["training.augmentation.mixup_alpha=0"]),
    "cutmix": (["training.augmentation.cutmix_alpha=1.0"], ["training.augmentation.cutmix_alpha=0"]),
}
PUBLISHED = ["training.optimizer.name=sgd", "training.scheduler.name=plateau", "training.ema.enabled=true",
             "model.head=cosine", "training.loss.name=am_softmax", "training.optimizer.sam.enabled=true",
             "training.mutual_learning.enabled=true", "training.lr_finder.enabled=true",
             "training.augmentation_level=full"]


def variants(names: list[str]) -> dict[str, list[str]]:
    """Variant name -> its KEY=VALUE overrides (all of them when `names` is empty)."""
    plain = [o for _, off in TECHNIQUES.values() for o in off]
    table: dict[str, list[str]] = {"plain": plain}
    for name, (on, _) in TECHNIQUES.items():
        table[f"+{name}"] = plain + on
    table["auto"] = []
    table["published"] = PUBLISHED
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {', '.join(unknown)}; known: {', '.join(table)}")
    return {k: v for k, v in table.items() if not names or k in names}


def run(cmd: list[str], cwd: Path, log: Path, ok_codes: tuple[int, ...] = (0,)) -> float:
    """Run a command with its output appended to `log`; its wall time in seconds."""
    start = time.perf_counter()
    with open(log, "a") as out:
        result = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode not in ok_codes:
        raise SystemExit(f"error: {' '.join(cmd)} failed in {cwd}; see {log}")
    return time.perf_counter() - start


def instantiate(template: str, work_dir: Path, log: Path, snapshot: bool = False) -> Path:
    """The template's work dir, made afresh by tools/instantiate_template.py (with its ImageNet snapshot when
    `snapshot`, else to train from scratch)."""
    run([sys.executable, str(REPO_ROOT / "tools" / "instantiate_template.py"), str(TEMPLATES / template / "template.yaml"),
         str(work_dir), *([] if snapshot else ["--do-not-load-snapshot"]), "--overwrite"], REPO_ROOT, log)
    return work_dir


def scored_split(data: Path) -> Path:
    """Where a benchmark scores best.pth: data/test when the set has one, else data/val (which chose it)."""
    return data / "test" if (data / "test").is_dir() else data / "val"


def epochs_trained(output_dir: Path) -> int:
    """The epochs a train.py run trained: the rows of its history.csv."""
    return len((output_dir / "history.csv").read_text().strip().splitlines()) - 1


def top1_of(metrics_file: Path) -> float:
    """The top-1 that eval.py wrote to `metrics_file`."""
    metrics = yaml.safe_load(metrics_file.read_text())
    return float(next(m["value"] for m in metrics["metrics"] if m["key"] == "accuracy"))


def mean_spread(values: list[float]) -> str:
    """'mean ± standard deviation' (the mean alone for one value), two decimals."""
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread}"


def add_data_source(parser: argparse.ArgumentParser, digits_help: str, required: bool = False) -> None:
    """--data FOLDER or --digits, one of the two."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--data", type=Path, help="folder with train/ and val/ (and optionally test/) class folders")
    source.add_argument("--digits", action="store_true", help=digits_help)


def digits_dataset(out: Path, size: int) -> Path:
    """out/digits with train/ and val/ class folders at size x size (written once, then reused)."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / "digits"
    if not (data / "train").is_dir():
        run([sys.executable, str(REPO_ROOT / "tools" / "make_digits_dataset.py"), str(data), "--size", str(size)],
            REPO_ROOT, out / "data.log")
    return data


def data_folder(data: Path | None, out: Path, size: int) -> Path:
    """--data, checked to hold train/ and val/ class folders (else one error line, exit status 2), or without it
    scikit-learn's digits at `size`, written once under `out`."""
    if data is None:
        return digits_dataset(out, size)
    data = data.resolve()
    if not (data / "train").is_dir() or not (data / "val").is_dir():
        print(f"error: {data} must hold train/ and val/ class folders", file=sys.stderr)
        raise SystemExit(2)
    return data


def train_and_eval(name: str, overrides: list[str], length: list[str], data: Path, size: int | None, seed: int,
                   args: argparse.Namespace) -> dict:
    """One variant through train.py and eval.py: its top-1, train wall time and the epochs it trained."""
    slug = name.replace(" ", "_").replace("+", "plus_").replace("-", "minus_")
    work_dir = args.out / f"{slug}_{'_'.join(length).replace('--', '')}_seed{seed}"
    log = args.out / f"{work_dir.name}.log"
    log.unlink(missing_ok=True)
    instantiate(args.template, work_dir, log)
    size_override = [f"input.size=[{size},{size}]"] if size else []
    seconds = run([sys.executable, "train.py", "--overwrite", "--train-data-roots", str(data / "train"),
                   "--val-data-roots", str(data / "val"), *length, f"training.seed={seed}", "training.early_stopping_patience=null",
                   *size_override, *overrides], work_dir, log)
    run([sys.executable, "eval.py", "--load-weights", str(work_dir / "outputs" / "best.pth"), "--test-data-roots",
         str(scored_split(data)), *size_override], work_dir, log)
    config = yaml.safe_load((work_dir / "outputs" / "config.yaml").read_text())
    return {"top1": top1_of(work_dir / "metrics.yaml"), "seconds": seconds,
            "epochs": config["template"]["hyper_parameters"]["basic"]["epochs"],
            "epochs_run": epochs_trained(work_dir / "outputs")}


def _cell(results: list[dict]) -> str:
    epochs = sorted({r["epochs_run"] for r in results})
    return (f"{mean_spread([r['top1'] for r in results])} ({'/'.join(map(str, epochs))} ep, "
            f"{statistics.mean(r['seconds'] for r in results):.0f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_source(parser, "scikit-learn's digits at --size (the default)")
    parser.add_argument("--template", default="mobilenet_v3_small")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the plain reference run")
    parser.add_argument("--budgets", type=float, nargs="*", default=[1.0, 4.0],
                        help="time budgets as multiples of the plain run's train wall time")
    parser.add_argument("--equal-epochs", action="store_true",
                        help="every variant trains --epochs epochs instead (no time budget)")
    parser.add_argument("--size", type=int, default=32, help="digits: image side; --data: input.size (default: "
                                                             "the template's)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/recipe_bench"))
    parser.add_argument("--variants", nargs="*", default=[], help="subset of variant names (default: all)")
    args = parser.parse_args()

    if not (TEMPLATES / args.template / "template.yaml").is_file():
        print(f"error: no template {args.template} in {TEMPLATES}", file=sys.stderr)
        return 2
    table = variants(args.variants)
    args.out.mkdir(parents=True, exist_ok=True)
    data = data_folder(args.data, args.out, args.size)
    size = args.size if args.data is None or "--size" in sys.argv else None

    started = time.perf_counter()
    titles = [f"{args.epochs} epochs"] if args.equal_epochs else [f"{k:g} x T" for k in args.budgets]
    references: list[float] = []                # T of each seed
    results: dict[tuple[str, str], list[dict]] = {}
    for seed in args.seeds:
        if args.equal_epochs:
            lengths = {titles[0]: ["--epochs", str(args.epochs)]}
        else:
            reference = train_and_eval("plain", variants(["plain"])["plain"], ["--epochs", str(args.epochs)], data,
                                       size, seed, args)
            references.append(reference["seconds"])
            print(f"reference: plain, {args.epochs} epochs, seed {seed}: top-1 {reference['top1']:.2f} in "
                  f"T = {reference['seconds']:.0f} s", flush=True)
            lengths = {title: ["--time-budget", str(round(k * reference["seconds"]))]
                       for title, k in zip(titles, args.budgets)}
        for title, length in lengths.items():
            for name, overrides in table.items():
                result = train_and_eval(name, overrides, length, data, size, seed, args)
                results.setdefault((name, title), []).append(result)
                print(f"{name:20s} {title:10s} seed {seed}  top-1 {result['top1']:6.2f}  "
                      f"{result['epochs_run']:3d} epochs  {result['seconds']:6.1f} s", flush=True)

    length_text = (f"every variant {args.epochs} epochs" if args.equal_epochs else
                   f"T = the plain run's train wall time at {args.epochs} epochs ({statistics.mean(references):.0f} s)")
    print(f"\n{args.template}, {data.name}" + (f" at {size}x{size}" if size else "") + f", from scratch, seeds "
          f"{args.seeds}; {length_text}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.perf_counter() - started:.0f} s in all\n")
    print("| variant | " + " | ".join(f"top-1 (%) at {t}" for t in titles) + " |")
    print("|---|" + "---:|" * len(titles))
    for name in table:
        print(f"| {name} | " + " | ".join(_cell(results[(name, t)]) for t in titles) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
