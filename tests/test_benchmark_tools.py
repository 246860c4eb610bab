"""The benchmark scripts' parsing of train.log (their tables quote it)."""
from __future__ import annotations

from pathlib import Path

from benchmark_first_run import auto_summary


def test_auto_summary_reports_the_epochs_of_the_last_re_plan(tmp_path: Path):
    log = tmp_path / "train.log"
    log.write_text("\n".join([
        "2026-12-04 22:40:07,960 INFO auto hyper_parameters.basic.epochs = 10: time budget 135 s, 5 s spent: ...",
        "2026-12-04 22:40:07,960 INFO auto hyper_parameters.basic.batch_size = 64: 8000 training images x 10 ...",
        "2026-12-04 22:40:07,960 INFO auto training.optimizer.name = adamw: a short run (1250 steps < 10000): ...",
        "2026-12-04 22:40:07,960 INFO auto training.amp = bf16: not among the summarised keys",
        "2026-12-04 22:40:19,243 INFO Time budget: 8.9 s per epoch so far; 14 epochs fit in all (planned 10): ...",
        "2026-12-04 22:40:47,583 INFO Time budget: 9.6 s per epoch so far; 13 epochs fit in all (planned 14): ...",
        "2026-12-04 22:40:47,811 INFO epoch   4/13  loss 0.6016  val loss 0.6208  top-1  96.90",
    ]))
    assert auto_summary(log) == "epochs=13 batch=64 opt=adamw"
