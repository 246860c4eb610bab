"""tools/run_demo.sh end to end (a short training budget), its summary, and a log free of third-party warnings;
the filter that keeps those out drops exactly the lines it names."""
from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

from clsengine.compression import THIRD_PARTY_NOISE, quiet_third_party_logs

REPO = Path(__file__).resolve().parents[1]

# What a third-party warning looks like in a log: torch's glog-style lines ("W1205 13:44:30.93 ... file.py:183]"),
# Python's warnings ("file.py:12: SomethingWarning: ..."), anything printed from an installed package's file.
THIRD_PARTY = re.compile(r"^[WE]\d{4} \d\d:\d\d:\d\d|\w+Warning: |site-packages/")


def test_demo_runs_every_step_and_prints_no_third_party_warning(tmp_path):
    env = {**os.environ, "DEMO_DIR": str(tmp_path / "demo"), "TIME_BUDGET": "8", "EPOCHS": "2"}
    result = subprocess.run(["bash", str(REPO / "tools" / "run_demo.sh")], env=env, capture_output=True, text=True,
                            timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    summary = log[log.index("Demo finished in"):]
    for step in ("train", "eval", "compress", "export", "eval_ir", "predict", "eval_predictions"):
        assert re.search(rf"^  {step} +\d+ s  \S", summary, re.M), (step, summary)
    assert "budget met" in summary and "parity ok" in summary and "359 prediction files" in summary
    noise = [line for line in log.splitlines() if THIRD_PARTY.search(line)]
    assert not noise, noise


def test_quiet_third_party_logs_drops_only_the_named_messages(caplog):
    quiet_third_party_logs()
    quiet_third_party_logs()  # idempotent: one filter per logger
    for name, text in THIRD_PARTY_NOISE.items():
        log = logging.getLogger(name)
        assert sum(type(f).__name__ == "_DropMessage" for f in log.filters) == 1
        with caplog.at_level(logging.WARNING, logger=name):
            caplog.clear()
            log.warning(f"something {text} here")
            log.warning("a warning that still matters")
        assert [r.getMessage() for r in caplog.records] == ["a warning that still matters"], name

