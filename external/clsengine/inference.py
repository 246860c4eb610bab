"""Run exported classifiers (OpenVINO IR or ONNX) the way deployment does, and count their cost.

An ExportedClassifier takes images as the exported graph wants them: (N, 3, H, W) float values 0..255
in the file's `input_order` (see clsengine.export.DeployModel); the file's metadata says which.
OpenVINO runs both formats (it reads .onnx directly), so no second runtime is needed.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .export import SALIENCY_NAME, read_metadata

EXPORTED_SUFFIXES = (".xml", ".onnx")
_FLOAT_TYPES = ("f32", "f16", "bf16", "f64")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def device_available(device: str, available: list[str]) -> bool:
    """Whether OpenVINO can run on `device`: 'GPU' matches 'GPU.0'; virtual devices (AUTO...) always can."""
    if device.split(":")[0] in ("AUTO", "MULTI", "HETERO", "BATCH"):  # virtual devices pick among the real ones
        return True
    return any(d == device or d.startswith(device + ".") for d in available)


class ExportedClassifier:
    """An exported classifier compiled by OpenVINO on `device` (CPU, GPU, NPU...).

    Call it with a (N, 3, H, W) tensor or array of 0..255 values; it returns logits of the same kind.
    `explain` returns the logits and the saliency maps of a file exported with explain=True (`saliency`).
    A file exported with a static batch of 1 is run one image at a time, as it will be in deployment.
    """

    def __init__(self, path: str | os.PathLike, device: str = "CPU") -> None:
        import openvino as ov

        self.path = Path(path)
        if self.path.suffix not in EXPORTED_SUFFIXES:
            raise UserError(f"{self.path}: expected an OpenVINO IR (.xml) or ONNX (.onnx) file")
        if self.path.suffix == ".xml" and not self.path.with_suffix(".bin").is_file():
            raise UserError(f"{self.path}: its weights file {self.path.with_suffix('.bin').name} is missing")
        meta = read_metadata(self.path)
        self.labels: list[str] = meta["labels"]
        self.input_size: tuple[int, int] = tuple(meta["input_size"])
        self.input_order: str = meta["input_order"]
        self.mean, self.std = meta["mean"], meta["std"]
        self.task: dict = meta["task"]   # {"type": "multiclass"} or multilabel with threshold / background_label
        self.saliency: dict | None = meta["saliency"]   # {"output", "method"} when it has a saliency output
        core = ov.Core()
        if not device_available(device, core.available_devices):
            raise UserError(f"OpenVINO device '{device}' is not available here; available: "
                            f"{', '.join(core.available_devices)}")
        try:
            self.ov_model = core.read_model(str(self.path))
            # Full f32 on CPU, so that accuracy measured here is the exported file's, not a bf16 rounding's.
            config = {"INFERENCE_PRECISION_HINT": "f32"} if device == "CPU" else {}
            self.compiled = core.compile_model(self.ov_model, device, config)
        except RuntimeError as exc:
            raise UserError(f"OpenVINO cannot load {self.path}: {_first_line(exc)}") from None
        batch = self.ov_model.input(0).get_partial_shape()[0]
        self.static_batch = batch.get_length() if batch.is_static else None
        n_out = self.ov_model.output(0).get_partial_shape()[-1]
        if n_out.is_static and n_out.get_length() != len(self.labels):
            raise UserError(f"{self.path}: {n_out.get_length()} outputs but {len(self.labels)} labels in its metadata")

    @property
    def files(self) -> list[Path]:
        """The files that make up the model (an IR is .xml + .bin)."""
        return [self.path, self.path.with_suffix(".bin")] if self.path.suffix == ".xml" else [self.path]

    def _run(self, images: np.ndarray, outputs: tuple[int, ...] = (0,)) -> list[np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if self.static_batch is not None and images.shape[0] != self.static_batch:
            if self.static_batch != 1:
                raise UserError(f"{self.path} has a static batch of {self.static_batch}; got {images.shape[0]} images")
            results = [self.compiled(images[i:i + 1]) for i in range(images.shape[0])]
            return [np.concatenate([r[k] for r in results]) for k in outputs]
        result = self.compiled(images)
        return [np.asarray(result[k]) for k in outputs]

    def __call__(self, images: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        if isinstance(images, torch.Tensor):
            return torch.from_numpy(self._run(images.detach().cpu().numpy())[0])
        return self._run(np.asarray(images))[0]

    def explain(self, images: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | tuple[np.ndarray, ...]:
        """(logits, saliency maps (N, classes, h, w) in [0, 1]) of a file exported with explain=True."""
        if not self.saliency:
            raise UserError(f"{self.path} has no saliency output (it was exported without explain=True)")
        name = self.saliency.get("output", SALIENCY_NAME)
        try:
            port = self.compiled.output(name)
        except RuntimeError:
            raise UserError(f"{self.path}: its metadata names a saliency output '{name}' the model lacks") from None
        as_tensor = isinstance(images, torch.Tensor)
        logits, maps = self._run(images.detach().cpu().numpy() if as_tensor else np.asarray(images), (0, port))
        return (torch.from_numpy(logits), torch.from_numpy(maps)) if as_tensor else (logits, maps)

    def complexity(self) -> dict[str, float]:
        return ir_complexity(self.ov_model, self.input_size)


def ir_complexity(ov_model, input_size: tuple[int, int]) -> dict[str, float]:
    """Parameters (millions) and GFLOPs (2 x MACs of convolutions and matrix products) of one image.

    Counted on the graph as exported, so batch norms folded into convolutions are not parameters of
    their own: the size can be slightly below the PyTorch model's.
    """
    model = ov_model.clone()
    h, w = input_size
    model.reshape({model.input(0).get_any_name(): [1, 3, int(h), int(w)]})
    params = 0
    flops = 0
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "Constant" and op.get_output_element_type(0).get_type_name() in _FLOAT_TYPES:
            params += int(np.prod(list(op.get_output_shape(0)), dtype=np.int64))
        elif kind in ("Convolution", "GroupConvolution"):
            out = int(np.prod(list(op.get_output_shape(0)), dtype=np.int64))
            kernel = list(op.input(1).get_shape())  # [Cout, Cin, k...] or [G, Cout/G, Cin/G, k...]
            per_output = int(np.prod(kernel[1:] if kind == "Convolution" else kernel[2:], dtype=np.int64))
            flops += 2 * out * per_output
        elif kind == "MatMul":
            a = list(op.input(0).get_shape())
            transpose_a = bool(op.get_attributes().get("transpose_a", False))
            inner = a[-2] if transpose_a and len(a) > 1 else a[-1]
            flops += 2 * int(np.prod(list(op.get_output_shape(0)), dtype=np.int64)) * int(inner)
    return {"size_mp": params / 1e6, "complexity_gflops": flops / 1e9}


def is_exported_model(path: str | os.PathLike) -> bool:
    return Path(path).suffix in EXPORTED_SUFFIXES


__all__ = ["ExportedClassifier", "device_available", "ir_complexity", "is_exported_model", "EXPORTED_SUFFIXES"]
