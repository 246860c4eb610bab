"""Where a training run reports: a text log, a per-epoch CSV, TensorBoard scalars and a curves PNG."""
from __future__ import annotations

import csv
import logging
import os
import sys
import time
from pathlib import Path

from .fileio import atomic_output, write_error

# val_map and ema_val_map are filled for multi-label runs, the top-1/top-5 columns for the others.
HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_top1", "val_top5", "val_map", "ema_val_top1", "ema_val_map",
                  "lr", "epoch_time_s", "images_per_s")
PLOT_EVERY_S = 30.0  # the curves PNG is redrawn at most this often during a run, and at its end


class _LogFile(logging.FileHandler):
    """The run's log file; when it can no longer be written (full disk, permissions) one warning says so and
    the run goes on logging to the console, instead of logging's traceback for every record."""

    def __init__(self, path: str):
        try:
            super().__init__(path, mode="a", encoding="utf-8")
        except OSError as exc:
            raise (write_error(path, exc) or exc) from None

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        error = write_error(self.baseFilename, exc) if exc is not None else None
        print(f"warning: {error or f'cannot write {self.baseFilename}: {exc}'}; the log goes on on the console only",
              file=sys.stderr)
        for logger in [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]:
            if self in getattr(logger, "handlers", []):
                logger.removeHandler(self)
        try:
            self.close()
        except OSError:
            pass


def get_logger(log_file: str | os.PathLike | None = None, name: str = "clsengine",
               quiet: bool = False) -> logging.Logger:
    """Console (message only) plus an optional timestamped log file; `quiet` keeps warnings only (the
    other ranks of a distributed run, whose rank 0 reports)."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in logger.handlers):
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
    if log_file is not None:
        log_file = str(Path(log_file).resolve())
        for h in list(logger.handlers):
            if isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
                h.close()
        file_handler = _LogFile(log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file_handler)
    return logger


class RunLog:
    """Epoch-level records of a run. `history` is the source of truth and lives in every checkpoint,
    so a resumed run rewrites the CSV, curves and TensorBoard from it without duplicates."""

    def __init__(self, output_dir: Path, tensorboard_dir: Path | None, history: list[dict] | None = None,
                 write: bool = True):
        self.output_dir = Path(output_dir)
        self.write = write  # False: keep the history in memory only (ranks other than 0)
        self.history: list[dict] = list(history or [])
        self.csv_path = self.output_dir / "history.csv"
        self.curves_path = self.output_dir / "training_curves.png"
        self.writer = None
        self._plotted: tuple[float, int] | None = None  # (when, rows) of the last drawing of the curves
        if tensorboard_dir is not None and write:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(tensorboard_dir), purge_step=len(self.history) + 1)
        if write:
            self._write_csv()

    def add_epoch(self, row: dict) -> None:
        self.history.append({k: row.get(k, "") for k in HISTORY_FIELDS})
        if self.writer is None:
            return
        step = row["epoch"]
        scalars = {"train/loss": row["train_loss"], "train/lr": row["lr"], "train/images_per_s": row["images_per_s"],
                   "val/loss": row["val_loss"]}
        for key in ("val_top1", "val_top5", "val_map", "ema_val_top1", "ema_val_map"):
            if row.get(key, "") != "":
                scalars["val/" + key.removeprefix("val_")] = row[key]
        try:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        except OSError as exc:  # the run goes on: history.csv and the checkpoints hold the same numbers
            print(f"warning: {write_error(self.writer.log_dir, exc) or exc}; no more TensorBoard logging",
                  file=sys.stderr)
            self._close_writer()

    def flush(self) -> None:
        """history.csv after every epoch; the curves at most every PLOT_EVERY_S (a drawing costs a noticeable
        share of a short epoch) and at close."""
        if not self.write:
            return
        self._write_csv()
        if self._plotted is None or time.monotonic() - self._plotted[0] >= PLOT_EVERY_S:
            self._plot()

    def _plot(self) -> None:
        if self.history and (self._plotted is None or self._plotted[1] != len(self.history)):
            from .plots import plot_training_curves  # matplotlib: imported when a plot is drawn

            plot_training_curves(self.history, self.curves_path)
            self._plotted = (time.monotonic(), len(self.history))

    def _write_csv(self) -> None:
        with atomic_output(self.csv_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
            writer.writeheader()
            writer.writerows(self.history)

    def close(self) -> None:
        if self.write:
            self._plot()
        self._close_writer()

    def _close_writer(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError:
                pass
            self.writer = None
