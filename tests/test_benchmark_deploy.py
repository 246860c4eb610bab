"""tools/benchmark_deploy.py works end to end on a tiny model: the table has its rows with positive numbers,
and bad input is one error line. These check that the script works, not how fast anything is."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


@pytest.fixture(scope="module")
def openvino_only(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("bench_ov")
    return bench(*TINY, "--seconds", "0.3", "--skip-torch", "--out", str(out)), out


def test_openvino_rows(openvino_only):
    result, out = openvino_only
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    first = result.stdout.splitlines()[0]
    assert "resnet18" in first and "32x32" in first and "OpenVINO" in first and "torch" in first, first
    rows = parse_table(result.stdout)
    assert_positive(rows, IR32, IR16, ONNX)
    assert not any(fmt.startswith("PyTorch") for fmt, _ in rows), rows
    assert {p.name for p in out.iterdir()} >= {"model_fp32.xml", "model_fp16.xml", "model.onnx", "benchmark.yaml"}
    saved = yaml.safe_load((out / "benchmark.yaml").read_text())
    assert [(r["format"], r["precision"]) for r in saved["rows"]] == list(rows)


def test_torch_and_int8_rows(openvino_only, tmp_path):
    """Without --skip-torch a PyTorch row is added; --int8-ir adds a row for the given IR (here the FP32 one,
    standing in for a quantised file: the plumbing is what is tested)."""
    _, first_out = openvino_only
    result = bench(*TINY, "--seconds", "0.2", "--batch-size", "4", "--int8-ir", str(first_out / "model_fp32.xml"))
    assert result.returncode == 0, result.stderr
    rows = parse_table(result.stdout)
    assert_positive(rows, IR32, IR16, ONNX, ("OpenVINO IR (CPU)", "INT8"), ("PyTorch eager (CPU)", "FP32"))


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
