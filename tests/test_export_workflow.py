"""export.py in a work dir: IR and ONNX from a training checkpoint, parity-checked, clear errors."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from clsengine.export import read_metadata
from conftest import assert_clean_error, run_script


def test_export_script_writes_parity_checked_ir_and_onnx(tmp_path: Path, tiny_dataset: Path, work_dir) -> None:
    wd = work_dir("resnet18")
    train = run_script(wd, "train.py", "--train-data-roots", str(tiny_dataset / "train"), "--val-data-roots",
                       str(tiny_dataset / "val"), "--epochs", "1", "--batch-size", "4", "--workers", "0",
                       "input.size=[32,32]")
    assert train.returncode == 0, train.stderr
    result = run_script(wd, "export.py", "--load-weights", str(wd / "outputs" / "best.pth"),
                        env={"VAL_DATA_ROOT": str(tiny_dataset / "val")})
    assert result.returncode == 0, result.stderr
    export = wd / "export"
    assert (export / "model.onnx").is_file() and (export / "model.xml").is_file() and (export / "model.bin").is_file()
    parity = yaml.safe_load((export / "parity.yaml").read_text())
    assert parity["images"].startswith("6 images from")
    for name in ("model.onnx", "model.xml"):
        assert parity["files"][name]["ok"] and parity["files"][name]["top1_agreement"] == 1.0
    meta = read_metadata(export / "model.xml")
    assert meta["labels"] == ["class_0", "class_1", "class_2"] and tuple(meta["input_size"]) == (32, 32)
    assert meta["input_order"] == "BGR"

    static = run_script(wd, "export.py", "--load-weights", str(wd / "outputs" / "best.pth"), "--openvino",
                        "--static", "--precision", "FP16", "--input-shape", "48", "48", "--save-model-to",
                        str(tmp_path / "npu"))
    assert static.returncode == 0, static.stderr
    assert not (tmp_path / "npu" / "model.onnx").exists()
    assert tuple(read_metadata(tmp_path / "npu" / "model.xml")["input_size"]) == (48, 48)

    bare = tmp_path / "bare.pth"
    torch.save(torch.load(wd / "outputs" / "best.pth", weights_only=True)["model"], bare)
    assert_clean_error(run_script(wd, "export.py", "--load-weights", str(bare)), "bare weights")
    assert_clean_error(run_script(wd, "export.py", "--load-weights", str(tmp_path / "none.pth")), "none.pth")
