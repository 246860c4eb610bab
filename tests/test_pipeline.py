"""The data pipeline's speed features: automatic loader processes, decoded images kept in memory, and the
benchmark script that measures pipeline vs model speed."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clsengine.data import ImageDataset, auto_workers, scan_folder
from clsengine.data import loader as loader_module
from conftest import TEMPLATES_DIR, make_image_folder


@pytest.mark.parametrize("cores, device, processes, expected", [
    (2, "cpu", 1, 0), (4, "cpu", 1, 0), (16, "cpu", 1, 2), (16, "cpu", 4, 0),
    (2, "cuda", 1, 1), (16, "cuda", 1, 8), (16, "cuda", 4, 3)])
def test_auto_workers(monkeypatch, cores, device, processes, expected):
    monkeypatch.setattr(loader_module.os, "cpu_count", lambda: cores)
    assert auto_workers(device, processes) == expected


def test_decoded_images_cached_when_small_enough(tmp_path: Path):
    scan = scan_folder(make_image_folder(tmp_path / "data", classes=2, per_class=3))
    plain = ImageDataset(scan.samples, scan.classes)
    cached = ImageDataset(scan.samples, scan.classes, cache_bytes=2 ** 20)
    too_small = ImageDataset(scan.samples, scan.classes, cache_bytes=32 * 32 * 3 * 6 - 1)  # one byte short
    assert cached._cache is not None and plain._cache is None and too_small._cache is None
    for i in range(len(scan.samples)):
        assert np.array_equal(cached[i][0], plain[i][0]) and cached[i][1] == plain[i][1]

    # A file that breaks after the scan is skipped (the next sample comes instead), cached or not.
    Path(scan.samples[0][0]).write_bytes(b"broken")
    broken = ImageDataset(scan.samples, scan.classes, cache_bytes=2 ** 20)
    with pytest.warns(UserWarning, match="skipping"):
        image, label = broken[0]
    assert np.array_equal(image, plain[1][0]) and label == scan.samples[1][1]


def test_workers_auto_or_count_in_templates(tmp_path: Path):
    from workbench.template import TemplateError, load_template

    path = TEMPLATES_DIR / "resnet18" / "template.yaml"
    assert load_template(path).training.workers == "auto"
    assert load_template(path, {"training.workers": 3}).training.workers == 3
    with pytest.raises(TemplateError, match="training.workers"):
        load_template(path, {"training.workers": "many"})
    with pytest.raises(TemplateError, match="training.workers"):
        load_template(path, {"training.workers": -1})


def test_benchmark_pipeline_prints_the_table(tmp_path: Path, monkeypatch, capsys):
    import benchmark_pipeline

    monkeypatch.setattr(sys, "argv", ["benchmark_pipeline.py", "--templates", "resnet18", "--sizes", "32",
                                      "--max-images", "16", "--out", str(tmp_path)])
    torch.manual_seed(0)
    assert benchmark_pipeline.main() == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| resnet18 | 32x32"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    pipeline, limit, loader, ratio = (float(c) for c in cells[4:8])
    # The ratio is the median of per-epoch-pair ratios: close to, not equal to, the ratio of the medians.
    assert pipeline > 0 and limit > 0 and loader > 0 and ratio == pytest.approx(pipeline / limit, rel=0.3)
    assert "auto (0)" in row or "auto (2)" in row


def test_benchmark_speed_options_prints_the_table(tmp_path: Path, monkeypatch, capsys):
    import benchmark_speed_options

    monkeypatch.setattr(sys, "argv", ["benchmark_speed_options.py", "--templates", "resnet18", "--sizes", "32",
                                      "--variants", "fp32", "channels_last", "--batch-size", "4", "--steps", "2",
                                      "--rounds", "1", "--out", str(tmp_path)])
    assert benchmark_speed_options.main() == 0
    out = capsys.readouterr().out
    rows = {cells[3]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in out.splitlines() if line.startswith("| resnet18 | 32x32"))}
    assert set(rows) == {"fp32", "channels_last"}
    assert rows["fp32"][2] == "4" and rows["fp32"][5] == "1.00x"
    fp32, channels_last = float(rows["fp32"][4]), float(rows["channels_last"][4])
    assert fp32 > 0 and float(rows["channels_last"][5].rstrip("x")) == pytest.approx(channels_last / fp32, abs=0.02)


def test_benchmark_speed_options_rejects_bad_arguments(monkeypatch, capsys):
    import benchmark_speed_options

    monkeypatch.setattr(sys, "argv", ["benchmark_speed_options.py", "--templates", "no_such_template"])
    assert benchmark_speed_options.main() == 2
    assert "no template no_such_template" in capsys.readouterr().err
