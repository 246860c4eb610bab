"""The templates: they validate, their size/complexity metrics match the real models, the catalogue
(model_templates/README.md) is in sync, and schema errors name the file, the line and the key."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, TEMPLATE_NAMES, TEMPLATES_DIR
from workbench.template import TemplateError, load_template, parse_override

CATALOGUE_TOOL = REPO_ROOT / "tools" / "update_catalogue.py"
CATALOGUE = REPO_ROOT / "model_templates" / "README.md"


def template_path(name: str) -> Path:
    return TEMPLATES_DIR / name / "template.yaml"


def test_templates_found():
    assert len(TEMPLATE_NAMES) >= 8, TEMPLATE_NAMES


# ------------------------------------------------------------------------------------ (a) every template loads
@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_template_loads(name):
    t = load_template(template_path(name))
    assert t.name == name, "a template's name is its folder's name"
    assert t.domain == "image_classification"
    assert t.problem == TEMPLATES_DIR.name
    assert t.summary.strip()
    for key, unit in (("size", "Mp"), ("complexity", "GFLOPs")):
        metric = t.metric(key)
        assert metric is not None, f"{name}: no '{key}' metric"
        assert metric.unit == unit


# ------------------------------------------------------------------ (b) metrics match the model they describe
def close(recorded: float, actual: float) -> bool:
    """Recorded values have 3 decimals: within rounding, or 0.5% for the tiny ones."""
    return abs(recorded - actual) <= 0.0015 or abs(recorded - actual) <= 0.005 * abs(actual)


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_template_metrics_match_model(name):
    from clsengine.complexity import complexity
    from workbench.factories import build_model, input_size

    t = load_template(template_path(name))
    actual = complexity(build_model(t, 1000), input_size(t))
    size, gflops = t.metric("size").value, t.metric("complexity").value
    assert close(size, actual["size_mp"]), \
        f"{name}: metrics size is {size} Mp, the model has {actual['size_mp']:.3f} Mp"
    assert close(gflops, actual["complexity_gflops"]), \
        f"{name}: metrics complexity is {gflops} GFLOPs, the model needs {actual['complexity_gflops']:.3f} GFLOPs"


def test_metric_tolerance():
    assert close(0.113, 0.1134) and close(25.557, 25.5571) and close(1.0, 1.004)
    assert not close(0.113, 0.116) and not close(25.557, 25.8)


# ---------------------------------------------------------------------------------------- (c) the catalogue
def run_catalogue(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CATALOGUE_TOOL), *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=60)


def test_catalogue_in_sync():
    result = run_catalogue("--check")
    assert result.returncode == 0, f"run `python tools/update_catalogue.py`: {result.stderr}"


def test_catalogue_lists_every_template_with_working_links():
    text = CATALOGUE.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)]+)\)", text)
    for link in links:
        assert not link.startswith("/"), link
        assert (CATALOGUE.parent / link).exists(), f"broken link {link} in {CATALOGUE}"
    for name in TEMPLATE_NAMES:
        t = yaml.safe_load(template_path(name).read_text(encoding="utf-8"))
        row = next((line for line in text.splitlines() if line.startswith(f"| [{name}](")), None)
        assert row is not None, f"{name} missing from {CATALOGUE}"
        assert os.path.relpath(template_path(name), CATALOGUE.parent).replace(os.sep, "/") in row
        for metric in t["metrics"]:
            assert f"{metric['value']:.3f}" in row


def test_domain_link():
    link = REPO_ROOT / "model_templates" / "image_classification"
    assert link.is_symlink()
    assert not os.path.isabs(os.readlink(link)), "the link must be relative"
    assert link.resolve() == TEMPLATES_DIR.parent.resolve()


def copy_templates(dst_models: Path) -> Path:
    """A copy of every domain's model_templates under dst_models/<domain>/."""
    for templates in (REPO_ROOT / "models").glob("*/model_templates"):
        shutil.copytree(templates, dst_models / templates.parent.name / "model_templates",
                        ignore=shutil.ignore_patterns("__pycache__"))
    return dst_models


def test_catalogue_check_detects_changes(tmp_path):
    models = copy_templates(tmp_path / "models")
    output = tmp_path / "model_templates" / "README.md"
    options = ("--models-dir", str(models), "--output", str(output))

    result = run_catalogue(*options, "--check")
    assert result.returncode == 1 and "missing" in result.stderr

    result = run_catalogue(*options)
    assert result.returncode == 0, result.stderr
    assert run_catalogue(*options, "--check").returncode == 0
    assert (tmp_path / "model_templates" / "image_classification" / TEMPLATES_DIR.name).is_dir()
    # Same templates, same text: only the relative links differ from the repository's catalogue.
    assert output.read_text(encoding="utf-8") == CATALOGUE.read_text(encoding="utf-8").replace(
        "../models/", os.path.relpath(models, output.parent).replace(os.sep, "/") + "/")

    template = models / "image_classification" / "model_templates" / TEMPLATES_DIR.name / TEMPLATE_NAMES[0] / \
        "template.yaml"
    text = template.read_text(encoding="utf-8")
    batch_line = re.search(r"^\s*batch_size:\s*(\w+)", text, re.M)
    template.write_text(text.replace(batch_line.group(0), batch_line.group(0).replace(batch_line.group(1), "999")),
                        encoding="utf-8")
    result = run_catalogue(*options, "--check")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "out of date" in result.stderr and "update_catalogue.py" in result.stderr
    assert output.read_text(encoding="utf-8").count("| 999 |") == 0, "--check must not write"

    assert run_catalogue(*options).returncode == 0
    assert "| 999 |" in output.read_text(encoding="utf-8")
    assert run_catalogue(*options, "--check").returncode == 0


def test_catalogue_check_detects_new_template_and_missing_link(tmp_path):
    models = copy_templates(tmp_path / "models")
    output = tmp_path / "out" / "README.md"
    options = ("--models-dir", str(models), "--output", str(output))
    assert run_catalogue(*options).returncode == 0

    folder = models / "image_classification" / "model_templates" / TEMPLATES_DIR.name
    shutil.copytree(folder / TEMPLATE_NAMES[0], folder / "zz_new_template")
    assert run_catalogue(*options, "--check").returncode == 1
    assert run_catalogue(*options).returncode == 0
    assert "zz_new_template/template.yaml" in output.read_text(encoding="utf-8")

    (output.parent / "image_classification").unlink()
    result = run_catalogue(*options, "--check")
    assert result.returncode == 1 and "link" in result.stderr


# ------------------------------------------------------------------------------------ (d) schema validation
GOOD = """\
name: bad
domain: image_classification
problem: custom-classification
framework: pytorch
summary: a template for error tests
model:
  architecture: resnet18
  width_mult: 1.0
hyper_parameters:
  basic:
    batch_size: 8
    base_learning_rate: 0.01
    epochs: 1
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "template.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def line_of(text: str, fragment: str) -> int:
    """1-based number of the first line containing fragment."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if fragment in line)


def error(path: Path, overrides: dict | None = None) -> str:
    with pytest.raises(TemplateError) as info:
        load_template(path, overrides)
    return str(info.value)


def test_good_template_loads(tmp_path):
    t = load_template(write(tmp_path, GOOD))
    assert t.model.architecture == "resnet18" and t.hyper_parameters.basic.batch_size == 8


def test_unknown_key_suggests_close_match(tmp_path):
    text = GOOD.replace("  width_mult: 1.0", "  widht_mult: 0.5")
    path = write(tmp_path, text)
    message = error(path)
    assert f"{path}:{line_of(text, 'widht_mult')}:" in message
    assert "model.widht_mult" in message
    assert "did you mean 'width_mult'" in message


def test_wrong_type(tmp_path):
    text = GOOD.replace("batch_size: 8", 'batch_size: "big"')
    path = write(tmp_path, text)
    message = error(path)
    assert f"{path}:{line_of(text, 'batch_size')}:" in message
    assert "hyper_parameters.basic.batch_size" in message and "integer" in message and "big" in message


def test_missing_required_key(tmp_path):
    text = GOOD.replace("  architecture: resnet18\n", "")
    path = write(tmp_path, text)
    message = error(path)
    assert f"{path}:{line_of(text, 'model:')}:" in message
    assert "missing required key 'model.architecture'" in message


def test_unknown_architecture(tmp_path):
    text = GOOD.replace("architecture: resnet18", "architecture: resnet99")
    path = write(tmp_path, text)
    message = error(path)
    assert f"{path}:{line_of(text, 'resnet99')}:" in message
    assert "unknown architecture 'resnet99'" in message and "resnet18" in message


def test_invalid_yaml(tmp_path):
    text = GOOD.replace("  width_mult: 1.0", "  width_mult: 1.0: 2")
    path = write(tmp_path, text)
    message = error(path)
    assert f"{path}:{line_of(text, 'width_mult')}:" in message
    assert "invalid YAML" in message


def test_override_with_unknown_key(tmp_path):
    path = write(tmp_path, GOOD)
    message = error(path, {"model.widht_mult": 0.5})
    assert str(path) in message
    assert "command-line override" in message
    assert "model.widht_mult" in message and "did you mean 'width_mult'" in message


def test_override_with_wrong_type(tmp_path):
    path = write(tmp_path, GOOD)
    message = error(path, {"hyper_parameters.basic.epochs": "many"})
    assert "command-line override" in message and "hyper_parameters.basic.epochs" in message


def test_override_applies(tmp_path):
    t = load_template(write(tmp_path, GOOD), {"model.width_mult": 0.5, "training.optimizer.name": "adamw"})
    assert t.model.width_mult == 0.5 and t.training.optimizer.name == "adamw"


# --------------------------------------------------------------------------------------- (e) parse_override
def test_parse_override():
    key, value = parse_override("a.b=0.1")
    assert key == "a.b" and isinstance(value, float) and value == 0.1
    assert parse_override("a=[32,32]") == ("a", [32, 32])
    assert parse_override("a=null") == ("a", None)
    assert parse_override("training.optimizer.name=adamw") == ("training.optimizer.name", "adamw")
    assert parse_override("a=x=y") == ("a", "x=y")


@pytest.mark.parametrize("text", ["novalue", "=1", "a..b=1", "a=[1,"])
def test_parse_override_rejects(text):
    with pytest.raises(TemplateError):
        parse_override(text)


# ------------------------------------------------------------------------- task and data sections
def test_task_and_loss_must_agree(tmp_path):
    text = GOOD + "task:\n  type: multilabel\n"
    path = write(tmp_path, text)
    message = error(path)  # the default softmax loss is single-label
    assert f"{path}" in message and "training.loss.name" in message and "bce or asl" in message
    t = load_template(path, {"training.loss.name": "asl"})
    assert t.task.type == "multilabel" and t.training.loss.asl_gamma_neg == 4.0
    message = error(write(tmp_path, GOOD), {"training.loss.name": "bce"})
    assert "softmax or am_softmax for task.type multiclass" in message
    message = error(write(tmp_path, GOOD + "task:\n  background_label: bg\n"))
    assert "task.background_label" in message


def test_data_section_values(tmp_path):
    t = load_template(write(tmp_path, GOOD + "data:\n  class_weights: [1, 2.5]\n  classes: [a, b]\n"))
    assert t.data.class_weights == [1.0, 2.5] and t.data.classes == ["a", "b"] and t.data.format == "auto"
    assert load_template(write(tmp_path, GOOD), {"data.class_weights": "auto"}).data.class_weights == "auto"
    text = GOOD + "data:\n  class_weights: sometimes\n"
    path = write(tmp_path, text)
    message = error(path)
    assert f"{path}:{line_of(text, 'class_weights')}:" in message and "none, auto or a list" in message
    assert "a list without repeated names" in error(write(tmp_path, GOOD + "data:\n  classes: [a, a]\n"))
    assert "one of auto, folders, list, coco" in error(write(tmp_path, GOOD + "data:\n  format: csv\n"))


def test_removed_and_invalid_target_keys(tmp_path):
    """training_target was dropped (the device follows gpu_num); inference_target names known devices."""
    base = template_path("resnet18").read_text()
    old = tmp_path / "old.yaml"
    old.write_text(base + "training_target: [GPU, CPU]\n")
    with pytest.raises(TemplateError, match=r"old.yaml:\d+: 'training_target' is no longer a template key: .*delete it"):
        load_template(old)
    bad = tmp_path / "bad.yaml"
    bad.write_text(base.replace("inference_target: [CPU, iGPU]", "inference_target: [CPU, TPU]"))
    with pytest.raises(TemplateError, match=r"bad.yaml:\d+: .*inference_target"):
        load_template(bad)
    assert load_template(template_path("efficientnet_b0_npu")).inference_target == ["CPU", "iGPU", "NPU"]


def test_compression_mode_values(tmp_path):
    assert load_template(write(tmp_path, GOOD)).compression.mode == "auto"
    assert load_template(write(tmp_path, GOOD + "compression:\n  mode: qat\n")).compression.mode == "qat"
    text = GOOD + "compression:\n  mode: always\n"
    path = write(tmp_path, text)
    message = error(path)
    assert f"{path}:{line_of(text, 'mode: always')}:" in message
    assert "'compression.mode' must be one of auto, ptq, qat, got 'always'" in message
    text = GOOD + "compression:\n  mode: qat\n  qat_epochs: 0\n"
    path = write(tmp_path, text)
    message = error(path)  # quantization-aware training requested with no epoch to run it
    assert f"{path}:{line_of(text, 'qat_epochs')}:" in message and "at least 1 when compression.mode is qat" in message
    assert "command-line override compression.mode" in error(write(tmp_path, GOOD), {"compression.mode": "int8"})
