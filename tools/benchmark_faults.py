#!/usr/bin/env python3
"""Kill a real training N times and resume it each time: is anything lost?

  python tools/benchmark_faults.py --kills 20                       # scikit-learn's digits, mobilenet_v3_small
  python tools/benchmark_faults.py --kills 20 --data PHOTOS --template resnet18 --epochs 10

A reference run trains uninterrupted. The same run (same seed) is then started and SIGKILLed again and again,
each time resumed with `train.py --resume-from latest.pth` (or started again while there is none), until
--kills kills have landed; then it runs to its end. The kills take turns: at a random moment of an epoch, and
at each kind of write (latest.pth, best.pth, history.csv, config.yaml, training_curves.png: the process kills
itself through the CLSENGINE_FAULT test hook after the file's temporary copy is written and before it replaces
the file, the worst moment), with a random-moment kill as the fallback where the write does not come soon.
After every kill each file of the run folder is read back (checkpoints, CSV, YAML, PNG). Printed: kills,
successful resumes, epochs lost per kill, unreadable files, and whether the final history equals the
reference's epoch for epoch.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from benchmark_recipe import REPO_ROOT, TEMPLATES, digits_dataset

from clsengine.checkpoint import load_checkpoint
from clsengine.errors import UserError
from clsengine.fileio import FAULT_ENV

KINDS = ("epoch", "latest.pth", "best.pth", "history.csv", "config.yaml", "training_curves.png")
BAR_LINE = re.compile(r"^epoch (\d+)/(\d+):")  # the progress bar of an epoch being trained


def unreadable_files(folder: Path) -> list[str]:
    """Files of the run folder that do not read back as what they are."""
    from PIL import Image

    bad = []
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        try:
            if path.suffix == ".pth":
                load_checkpoint(path)
            elif path.suffix == ".csv":
                with open(path, newline="") as f:
                    rows = list(csv.DictReader(f))
                if rows and any(None in row for row in rows):
                    raise ValueError("ragged rows")
            elif path.suffix == ".yaml":
                yaml.safe_load(path.read_text())
            elif path.suffix == ".png":
                with Image.open(path) as image:
                    image.load()
        except (UserError, ValueError, OSError, yaml.YAMLError) as exc:
            bad.append(f"{path.name} ({exc})")
    return bad


def checkpoint_epoch(path: Path) -> int:
    return int(load_checkpoint(path)["epoch"]) if path.is_file() else 0


class Attempt:
    """One train.py process: its output (progress bars included: text mode reads their carriage returns as
    line ends) is read as it comes; a timer may kill it `delay` s after training begins (the Recipe line)."""

    def __init__(self, cmd: list[str], cwd: Path, log: Path, env: dict[str, str], delay: float | None):
        self.epochs_started: list[int] = []
        self.timer_fired = False
        self.process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, bufsize=1)
        self.training = threading.Event()
        reader = threading.Thread(target=self._read, args=(log,), daemon=True)
        reader.start()
        if delay is not None:
            threading.Thread(target=self._kill_after, args=(delay,), daemon=True).start()
        self.returncode = self.process.wait()
        reader.join()

    def _read(self, log: Path) -> None:
        with open(log, "a") as out:
            for line in self.process.stdout:
                out.write(line)
                if line.startswith("Recipe:"):
                    self.training.set()
                match = BAR_LINE.match(line.strip())
                if match:
                    self.epochs_started.append(int(match.group(1)))

    def _kill_after(self, delay: float) -> None:
        if not self.training.wait(timeout=600):
            return
        time.sleep(delay)
        if self.process.poll() is None:
            self.timer_fired = True
            self.process.send_signal(signal.SIGKILL)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--template", default="mobilenet_v3_small")
    p.add_argument("--data", type=Path, default=None, help="train/ and val/ class folders (default: digits)")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=30, help="enough that the kills land before the end")
    p.add_argument("--seed", type=int, default=0, help="of the kill schedule (the training seed is the template's)")
    p.add_argument("--out", type=Path, default=Path("faults_out"))
    args = p.parse_args()

    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve() if args.data else digits_dataset(args.out, 32)
    work_dir = args.out / "wd"
    log = args.out / "runs.log"
    log.unlink(missing_ok=True)
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "instantiate_template.py"),
                    str(TEMPLATES / args.template / "template.yaml"), str(work_dir), "--do-not-load-snapshot",
                    "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    common = [sys.executable, "train.py", "--train-data-roots", str(data / "train"), "--val-data-roots",
              str(data / "val"), "--epochs", str(args.epochs), f"input.size=[{args.input_size},{args.input_size}]"]
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}

    start = time.perf_counter()
    reference = Attempt(common + ["--save-checkpoints-to", "reference", "--overwrite"], work_dir, log, env, None)
    if reference.returncode != 0:
        raise SystemExit(f"error: the reference run failed; see {log}")
    reference_s = time.perf_counter() - start
    epoch_s = reference_s / args.epochs
    ref_history = load_checkpoint(work_dir / "reference" / "latest.pth")["history"]

    rng = random.Random(args.seed)
    out = work_dir / "faulty"
    latest = out / "latest.pth"
    kills, resumes, failed_starts, lost, unreadable, by_kind = 0, 0, 0, [], [], {k: 0 for k in KINDS}
    attempt_no = 0
    final = None
    while final is None:
        kind = KINDS[attempt_no % len(KINDS)] if kills < args.kills else None
        attempt_no += 1
        resume = latest.is_file()
        cmd = common + ["--save-checkpoints-to", "faulty"] + (["--resume-from", str(latest)] if resume else
                                                              ["--overwrite"])
        run_env = dict(env)
        delay = None
        if kind == "epoch":
            delay = rng.uniform(0.0, 1.5 * epoch_s)
        elif kind is not None:
            # The n-th write of that file in this process; history.csv is also written when the run starts.
            run_env[FAULT_ENV] = f"kill:{kind}:{rng.randint(1, 2)}"
            delay = 3.0 * epoch_s  # fallback: a kill at a random moment if the write does not come
        before = checkpoint_epoch(latest)
        attempt = Attempt(cmd, work_dir, log, run_env, delay)
        after = checkpoint_epoch(latest)
        if resume:
            resumed_ok = attempt.returncode in (0, -signal.SIGKILL) and (after >= before)
            resumes += resumed_ok
            failed_starts += not resumed_ok
        if attempt.returncode == -signal.SIGKILL:
            kills += 1
            landed = "epoch" if attempt.timer_fired else kind
            by_kind[landed] += 1
            # Epochs begun in this process and not in latest.pth: the one being trained, at most.
            lost.append(max(0, max(attempt.epochs_started, default=after) - after))
            unreadable += [f"after kill {kills}: {name}" for name in unreadable_files(out)]
        elif attempt.returncode == 0:
            final = attempt
        else:
            raise SystemExit(f"error: train.py exited with {attempt.returncode}; see {log}")
        if attempt_no > 4 * args.kills + 10:
            raise SystemExit(f"error: no end after {attempt_no} attempts; see {log}")

    history = load_checkpoint(latest)["history"]
    keys = ("epoch", "train_loss", "val_loss", "val_top1", "ema_val_top1")
    same = len(history) == len(ref_history) and all(
        str(a.get(k)) == str(b.get(k)) for a, b in zip(history, ref_history) for k in keys)
    diff = max((abs(float(a["val_top1"]) - float(b["val_top1"])) for a, b in zip(history, ref_history)), default=0.0)
    best = load_checkpoint(out / "best.pth")
    ref_best = load_checkpoint(work_dir / "reference" / "best.pth")

    print(f"\n{args.template} at {args.input_size}x{args.input_size}, {args.epochs} epochs on {data}; "
          f"{platform.machine()}, {os.cpu_count()} cores; reference run {reference_s:.0f} s "
          f"({epoch_s:.1f} s per epoch, start-up included)\n")
    print("| measure | value |\n|---|---|")
    print(f"| kills (SIGKILL) | {kills} ({', '.join(f'{k} {v}' for k, v in by_kind.items() if v)}) |")
    print(f"| resumes that continued | {resumes} of {resumes + failed_starts} |")
    print(f"| epochs lost per kill | max {max(lost, default=0)}, total {sum(lost)} |")
    print(f"| unreadable files after a kill | {len(unreadable)} |")
    print(f"| best.pth epoch / top-1, interrupted vs reference | {best['epoch']} / {best['score']:.2f} vs "
          f"{ref_best['epoch']} / {ref_best['score']:.2f} |")
    print(f"| history equal to the reference, epoch for epoch | {'yes' if same else f'no (val top-1 up to {diff:.2f} apart)'} |")
    for line in unreadable:
        print(f"unreadable: {line}")
    return 0 if not unreadable and failed_starts == 0 and max(lost, default=0) <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
