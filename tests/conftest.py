"""Shared fixtures: tiny generated image folders, template instantiation, running work-dir scripts."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
DOMAIN_DIR = REPO_ROOT / "models" / "image_classification"
TEMPLATES_DIR = DOMAIN_DIR / "model_templates" / "custom-classification"
TEMPLATE_NAMES = sorted(p.parent.name for p in TEMPLATES_DIR.glob("*/template.yaml"))


COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40), (40, 220, 220)]


def make_image_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = 32, seed: int = 0) -> Path:
    """<root>/class_<i>/<j>.png: noisy images whose mean colour identifies the class (learnable)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            noise = rng.integers(0, 90, size=(size, size, 3))
            image = np.clip(np.array(COLOURS[c % len(COLOURS)]) * 0.6 + noise, 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / f"{j}.png")
    return root


MULTILABEL_CLASSES = ["red", "green", "blue"]


def make_multilabel_images(root: Path, count: int, seed: int, size: int = 32) -> list[tuple[str, list[int]]]:
    """<root>/images/<i>.png on a grey noisy background with one colour patch per label (1 or 2 of
    MULTILABEL_CLASSES, so every label set is learnable); returns (relative path, label indices) pairs."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(count):
        labels = sorted(rng.choice(3, size=1 + i % 2, replace=False).tolist())
        image = np.clip(110 + rng.integers(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
        for slot, label in enumerate(labels):
            y = slot * (size // 2)
            image[y:y + size // 2 - 2, 2:size - 2] = COLOURS[label]
        name = f"images/{i}.png"
        Image.fromarray(image).save(root / name)
        items.append((name, labels))
    return items


def write_multilabel_coco(root: Path, items: list[tuple[str, list[int]]], name: str) -> Path:
    """A COCO JSON whose image-level labels are zero-area boxes (category ids 1..3)."""
    import json

    coco = {"images": [{"id": i + 1, "file_name": path} for i, (path, _) in enumerate(items)],
            "annotations": [{"id": len(items) * k + i, "image_id": i + 1, "category_id": label + 1,
                             "bbox": [0, 0, 0, 0]} for i, (_, labels) in enumerate(items)
                            for k, label in enumerate(labels)],
            "categories": [{"id": c + 1, "name": n} for c, n in enumerate(MULTILABEL_CLASSES)]}
    path = root / name
    path.write_text(json.dumps(coco), encoding="utf-8")
    return path


def pytest_configure(config) -> None:
    """Under pytest-xdist (pytest.ini: two workers) each worker takes one core: the scripts and tools it starts
    run one intra-op thread (its own tests already do, see _one_torch_thread), so two workers never
    oversubscribe a 2-core machine, where torch then runs many times slower."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"


# The longest modules, longest first (30-170 s each on one core of a 2-core EPYC, `pytest -v --durations=0`).
# pytest.ini's `--dist loadfile` hands whole modules to the two workers in collection order; starting with the
# long ones leaves the short ones to even out the end, instead of one worker finishing a long module alone
# (the suite: 515-525 s in alphabetical order, 488 s with this one).
LONGEST_FIRST = ("test_workflow.py", "test_compress.py", "test_export.py", "test_demo.py", "test_deploy_workflow.py",
                 "test_run_folder.py", "test_calibration.py", "test_recipe_workflow.py", "test_distributed.py",
                 "test_dataset_workflow.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def run_in_process(wd: Path, script: str, *args: str, monkeypatch) -> int:
    """Run a work-dir script's main() in this process, as `python script args` from the work dir would,
    without paying torch's import time again; returns the exit status (2 for a user error)."""
    import importlib.util
    import logging

    from workbench import cli

    logger = logging.getLogger("clsengine")  # its console handler would still hold an earlier test's stdout
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()

    monkeypatch.chdir(wd)
    monkeypatch.setattr(sys, "argv", [str(wd / script), *args])
    for env in ("TRAIN_DATA_ROOT", "VAL_DATA_ROOT", "TEST_DATA_ROOT"):
        monkeypatch.delenv(env, raising=False)
    spec = importlib.util.spec_from_file_location(f"wd_{script[:-3]}", wd / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        cli.run(module.main)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def run_captured(wd: Path, script: str, *args: str, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """run_in_process with its output captured, shaped like run_script's result (for assert_clean_error)."""
    capsys.readouterr()
    code = run_in_process(wd, script, *args, monkeypatch=monkeypatch)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess([script, *args], code, captured.out, captured.err)


@contextlib.contextmanager
def one_torch_thread():
    """In-process tests use tiny workloads: one intra-op thread avoids oversubscribing a small CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


def train_on_shapes(wd: Path, data: Path, epochs: int, size: int, monkeypatch) -> int:
    """train.py in process on data/train and data/val of synthetic shapes, with a plain recipe: no crop that cuts
    the shape off, no colour jitter on colour classes; returns the exit status."""
    return run_in_process(wd, "train.py", "--train-data-roots", str(data / "train"), "--val-data-roots",
                          str(data / "val"), "--epochs", str(epochs), "--base-learning-rate", "0.005",
                          "--workers", "0", f"input.size=[{size},{size}]",
                          "training.augmentation.random_resized_crop_scale=[1.0,1.0]",
                          "training.augmentation.color_jitter_p=0", "tensorboard=false", monkeypatch=monkeypatch)


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """train/ and val/ folders with 3 classes of 32x32 images."""
    make_image_folder(tmp_path / "data" / "train", per_class=4, seed=1)
    make_image_folder(tmp_path / "data" / "val", per_class=2, seed=2)
    return tmp_path / "data"


def instantiate(template: str | Path, work_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run tools/instantiate_template.py as a user would."""
    template_path = Path(template)
    if not template_path.is_file():
        template_path = TEMPLATES_DIR / str(template) / "template.yaml"
    return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "instantiate_template.py"), str(template_path),
                           str(work_dir), *extra], capture_output=True, text=True, cwd=DOMAIN_DIR)


def run_script(work_dir: Path, script: str, *args: str, env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a work-dir script (train.py, eval.py...) from inside the work dir."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("TRAIN_DATA_ROOT", "VAL_DATA_ROOT", "TEST_DATA_ROOT")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=work_dir,
                          env=full_env, timeout=timeout)


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: non-zero exit, one 'error:' line naming what is wrong, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], (fragment, error_lines[0])


def trained_work_dir(root: Path, template: str = "resnet18", epochs: int = 2, per_class: int = 6,
                     val_per_class: int = 3, batch_size: int = 6) -> dict:
    """A work dir of `template` trained at 32x32 on 3 colour classes: {"wd", "train", "val", "root"}."""
    train = make_image_folder(root / "data" / "train", per_class=per_class, seed=1)
    val = make_image_folder(root / "data" / "val", per_class=val_per_class, seed=2)
    wd = root / "wd"
    assert instantiate(template, wd, "--do-not-load-snapshot").returncode == 0
    result = run_script(wd, "train.py", "--train-data-roots", str(train), "--val-data-roots", str(val),
                        "--epochs", str(epochs), "--batch-size", str(batch_size), "--workers", "0",
                        "input.size=[32,32]")
    assert result.returncode == 0, result.stderr
    return {"wd": wd, "train": train, "val": val, "root": root}


@pytest.fixture(scope="module")
def module_dir(request, tmp_path_factory) -> Path:
    """A folder for one test module's shared fixtures (a trained work dir, exports), removed when the module
    ends unless one of its tests failed (then kept for a look, as pytest keeps a failed test's tmp_path)."""
    failed_before = request.session.testsfailed
    path = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def leaves_no_trace(folder: Path):
    """Remove what the body adds to `folder` (a session fixture's work dir shared by many tests), so that a full
    run's disk use stays near one test's."""
    before = set(folder.iterdir())
    try:
        yield
    finally:
        for path in set(folder.iterdir()) - before:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def trained_resnet18(tmp_path_factory) -> dict:
    """One resnet18 work dir trained for 2 epochs, shared by the deployment and compression tests (each
    writes into its own sub-folders of it)."""
    return trained_work_dir(tmp_path_factory.mktemp("trained_resnet18"))


@pytest.fixture
def work_dir(tmp_path: Path):
    """A factory: work_dir('mobilenet_v3_small') instantiates that template into a fresh folder."""
    def make(template: str = "mobilenet_v3_small") -> Path:
        path = tmp_path / f"wd_{template}"
        result = instantiate(template, path, "--do-not-load-snapshot")
        assert result.returncode == 0, result.stderr
        return path
    return make
