"""tools/benchmark_deploy.py works end to end on a tiny model: the table has its rows with positive numbers,
and bad input is one error line. These check that the script works, not how fast anything is."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import REPO_ROOT, assert_clean_error

SCRIPT = REPO_ROOT / "tools" / "benchmark_deploy.py"
TINY = ["--template", "resnet18", "--input-size", "32", "32", "--num-classes", "3"]
COLUMNS = ["model", "format", "precision", "throughput img/s", "latency median ms", "latency p90 ms"]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=300)


def parse_table(stdout: str) -> dict[tuple[str, str], tuple[float, float, float]]:
    """(format, precision) -> (throughput, median, p90) from the markdown table, checking its layout."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    table = [line for line in lines if line.startswith("|")]
    assert len(lines) == len(table) + 1, stdout  # one header line, then only the table: progress is on stderr
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    assert cells[0] == COLUMNS, cells[0]
    rows = {}
    for row in cells[2:]:
        assert row[0] == "resnet18", row
        rows[(row[1], row[2])] = tuple(float(v) for v in row[3:])
    return rows


def assert_positive(rows: dict, *keys: tuple[str, str]) -> None:
    for key in keys:
        assert key in rows, (key, sorted(rows))
        throughput, median, p90 = rows[key]
        assert throughput > 0 and 0 < median <= p90, (key, rows[key])


IR32, IR16, ONNX = ("OpenVINO IR (CPU)", "FP32"), ("OpenVINO IR (CPU)", "FP16"), ("ONNX via OpenVINO (CPU)", "FP32")
ORT = ("ONNX via onnxruntime (CPU)", "FP32")


def test_table_rows_and_saved_results(tmp_path):
    """One run: FP32/FP16 IR, ONNX and PyTorch rows, plus an --int8-ir row (here a plain FP32 IR standing
    in for a quantised file: the plumbing is what is tested); the exported files and benchmark.yaml are kept."""
    import torch

    from clsengine.export import export_openvino
    from clsengine.models.factory import IMAGENET_MEAN, IMAGENET_STD, create_model

    stand_in = export_openvino(create_model("resnet18", 3).eval(), tmp_path / "int8" / "model.xml", input_size=(32, 32),
                               mean=IMAGENET_MEAN, std=IMAGENET_STD, labels=["a", "b", "c"])
    out = tmp_path / "out"
    result = bench(*TINY, "--seconds", "0.2", "--batch-size", "4", "--int8-ir", str(stand_in), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    first = result.stdout.splitlines()[0]
    assert "resnet18" in first and "32x32" in first and "OpenVINO" in first and "torch" in first, first
    rows = parse_table(result.stdout)
    assert_positive(rows, IR32, IR16, ONNX, ORT, ("OpenVINO IR (CPU)", "INT8"), ("PyTorch eager (CPU)", "FP32"))
    assert "ONNX exporter: dynamo" in first and "onnxruntime" in first, first
    from clsengine.ov_core import openvino_core

    if not any(d.startswith("GPU") for d in openvino_core().available_devices):  # resnet18's targets: CPU, iGPU
        assert "inference_target not present here: iGPU" in first, first
    assert any(fmt.startswith("PyTorch eager (CUDA)") for fmt, _ in rows) == torch.cuda.is_available()
    assert {p.name for p in out.iterdir()} >= {"model_fp32.xml", "model_fp16.xml", "model.onnx", "benchmark.yaml"}
    saved = yaml.safe_load((out / "benchmark.yaml").read_text())
    assert [(r["format"], r["precision"]) for r in saved["rows"]] == list(rows)


@pytest.mark.parametrize("args, fragment", [
    (["--template", "no_such_template"], "no_such_template"),
    (["--load-weights", "missing/best.pth"], "missing/best.pth"),
])
def test_bad_input_is_one_error_line(args, fragment):
    assert_clean_error(bench(*args, "--seconds", "0.1", "--skip-torch"), fragment)


def test_unavailable_device_is_a_user_error(capsys):
    """In-process (the subprocess contract is covered above): the device is checked before any export."""
    import benchmark_deploy
    from workbench import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: benchmark_deploy.main(["--device", "TPU", "--skip-torch"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device TPU") and err.count("\n") == 1, err


def test_devices_follow_the_inference_target():
    """Without --device, each OpenVINO device of the template's inference_target that is present is timed."""
    import benchmark_deploy

    from clsengine.errors import UserError
    from clsengine.ov_core import openvino_core

    core = openvino_core()
    available = list(core.available_devices)
    devices, missing = benchmark_deploy.choose_devices(core, None, ["CPU", "iGPU", "NPU"])
    assert devices[0] == "CPU" and ("GPU" in devices) == any(d.startswith("GPU") for d in available)
    assert ("NPU" in missing) != any(d.startswith("NPU") for d in available)
    assert benchmark_deploy.choose_devices(core, "cpu", ["NPU"]) == (["CPU"], [])  # --device pins one
    if not any(d.startswith("NPU") for d in available):
        with pytest.raises(UserError, match="none of the template's inference_target"):
            benchmark_deploy.choose_devices(core, None, ["NPU"])
