"""Run exported classifiers (OpenVINO IR or ONNX) the way deployment does, and count their cost.

An ExportedClassifier takes images as the exported graph wants them: (N, 3, H, W) float values 0..255
in the file's `input_order` (see clsengine.export.DeployModel); the file's metadata says which.
An ONNX file is run by onnxruntime unless OpenVINO is asked for: onnxruntime is the ONNX consumer
independent of OpenVINO, whose IR is converted from that same ONNX file, so checking the ONNX file with
OpenVINO alone could let a wrong ONNX graph hide behind OpenVINO's conversion.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .calibration import Calibration
from .errors import UserError
from .metadata import OUTPUT_NAME, PREDICTED_NAME, PROBS_NAME, SALIENCY_NAME, UNKNOWN_NAME, read_metadata
from .ov_core import openvino_core

EXPORTED_SUFFIXES = (".xml", ".onnx")
RUNTIMES = ("onnxruntime", "openvino")
_FLOAT_TYPES = ("f32", "f16", "bf16", "f64")
# onnxruntime's execution provider for each device name a user may give.
_ORT_PROVIDERS = {"CPU": "CPUExecutionProvider", "GPU": "CUDAExecutionProvider", "CUDA": "CUDAExecutionProvider"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def device_available(device: str, available: list[str]) -> bool:
    """Whether OpenVINO can run on `device`: 'GPU' matches 'GPU.0'; virtual devices (AUTO...) always can."""
    if device.split(":")[0] in ("AUTO", "MULTI", "HETERO", "BATCH"):  # virtual devices pick among the real ones
        return True
    return any(d == device or d.startswith(device + ".") for d in available)


# A template's inference_target names -> OpenVINO device names (an integrated GPU is OpenVINO's GPU device).
TARGET_DEVICES = {"CPU": "CPU", "IGPU": "GPU", "GPU": "GPU", "NPU": "NPU"}


def target_devices(targets: list[str], available: list[str]) -> tuple[list[str], list[str]]:
    """(OpenVINO devices of `targets` present here, target names absent here), in the targets' order."""
    present, missing = [], []
    for target in targets:
        device = TARGET_DEVICES[str(target).upper()]
        if device_available(device, available):
            present += [device] if device not in present else []
        else:
            missing.append(str(target))
    return present, missing


def runtimes_for(path: str | os.PathLike) -> tuple[str, ...]:
    """The runtimes that can run a file: an IR only OpenVINO, an ONNX file both (onnxruntime first)."""
    return RUNTIMES if Path(path).suffix == ".onnx" else ("openvino",)


def check_runtime(path: str | os.PathLike, runtime: str | None) -> str:
    """`runtime`, or the file's default one (onnxruntime for ONNX, OpenVINO for an IR), checked."""
    path = Path(path)
    if runtime is None:
        return runtimes_for(path)[0]
    runtime = str(runtime).lower()
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime '{runtime}': expected one of {', '.join(RUNTIMES)}")
    if runtime not in runtimes_for(path):
        raise UserError(f"{path} is an OpenVINO IR: only the openvino runtime runs it (onnxruntime runs .onnx files)")
    return runtime


def runtime_versions() -> dict[str, str]:
    """The version of each runtime installed here, for reports that name what checked a file."""
    import openvino as ov

    versions = {"openvino": ov.get_version()}
    try:
        import onnxruntime as ort

        versions["onnxruntime"] = ort.__version__
    except ImportError:
        versions["onnxruntime"] = "not installed"
    return versions


class _OpenVINOSession:
    """The file compiled by OpenVINO on `device`; at full f32 on CPU, so that accuracy measured here is the
    exported file's, not a bf16 rounding's."""

    def __init__(self, path: Path, device: str) -> None:
        core = openvino_core()
        if not device_available(device, core.available_devices):
            raise UserError(f"OpenVINO device '{device}' is not available here; available: "
                            f"{', '.join(core.available_devices)}")
        try:
            self.ov_model = core.read_model(str(path))
            config = {"INFERENCE_PRECISION_HINT": "f32"} if device == "CPU" else {}
            self.compiled = core.compile_model(self.ov_model, device, config)
        except RuntimeError as exc:
            raise UserError(f"OpenVINO cannot load {path}: {_first_line(exc)}") from None
        batch = self.ov_model.input(0).get_partial_shape()[0]
        self.static_batch = batch.get_length() if batch.is_static else None
        n_out = self.ov_model.output(0).get_partial_shape()[-1]
        self.num_outputs = n_out.get_length() if n_out.is_static else None
        self.output_names = [next(iter(o.get_names()), str(i)) for i, o in enumerate(self.compiled.outputs)]
        self.name = "OpenVINO"

    def __call__(self, images: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        result = self.compiled(images)
        return [np.asarray(result[self.compiled.output(name)]) for name in outputs]


class _OnnxRuntimeSession:
    """The ONNX file in an onnxruntime InferenceSession on `device` (CPU; GPU through CUDA when installed)."""

    def __init__(self, path: Path, device: str) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("onnxruntime is not installed: run ./init_venv.sh, or pass --runtime openvino") from None
        provider = _ORT_PROVIDERS.get(device.split(".")[0].upper())
        available = ort.get_available_providers()
        if provider is None or provider not in available:
            raise UserError(f"onnxruntime cannot run on device '{device}' here (its execution providers: "
                            f"{', '.join(available)}); use the openvino runtime for that device")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its optimizer's notes are not the user's concern
        try:
            self.session = ort.InferenceSession(str(path), options, providers=[provider])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable or invalid graphs
            raise UserError(f"onnxruntime cannot load {path}: {_first_line(exc)}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        batch = self.session.get_inputs()[0].shape[0]
        self.static_batch = batch if isinstance(batch, int) else None
        n_out = self.session.get_outputs()[0].shape[-1]
        self.num_outputs = n_out if isinstance(n_out, int) else None
        self.name = "onnxruntime"

    def __call__(self, images: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        return [np.asarray(a) for a in self.session.run(outputs, {self.input_name: images})]


class ExportedClassifier:
    """An exported classifier run by `runtime` on `device` (CPU, GPU, NPU...).

    runtime: "onnxruntime" or "openvino"; None = the file's default (onnxruntime for .onnx, OpenVINO for .xml).
    Call it with a (N, 3, H, W) tensor or array of 0..255 values; it returns logits of the same kind.
    `explain` returns the logits and the saliency maps of a file exported with explain=True (`saliency`).
    A file exported with a static batch of 1 is run one image at a time, as it will be in deployment.
    """

    def __init__(self, path: str | os.PathLike, device: str = "CPU", runtime: str | None = None) -> None:
        self.path = Path(path)
        if self.path.suffix not in EXPORTED_SUFFIXES:
            raise UserError(f"{self.path}: expected an OpenVINO IR (.xml) or ONNX (.onnx) file")
        if self.path.suffix == ".xml" and not self.path.with_suffix(".bin").is_file():
            raise UserError(f"{self.path}: its weights file {self.path.with_suffix('.bin').name} is missing")
        self.runtime = check_runtime(self.path, runtime)
        meta = read_metadata(self.path)
        self.metadata: dict[str, Any] = meta
        self.labels: list[str] = meta["labels"]
        self.input_size: tuple[int, int] = tuple(meta["input_size"])
        self.input_order: str = meta["input_order"]
        self.mean, self.std = meta["mean"], meta["std"]
        self.task: dict = meta["task"]   # {"type": "multiclass"} or multilabel with threshold / background_label
        self.saliency: dict | None = meta["saliency"]   # {"output", "method"} when it has a saliency output
        # Fitted on the validation set (clsengine.calibration); the file then has calibrated outputs too
        self.calibration: Calibration | None = Calibration.from_dict(meta["calibration"])
        opener: Callable[[Path, str], Any] = _OnnxRuntimeSession if self.runtime == "onnxruntime" else _OpenVINOSession
        self._session = opener(self.path, device)
        self.static_batch: int | None = self._session.static_batch
        self.output_names: list[str] = self._session.output_names
        self._logits = OUTPUT_NAME if OUTPUT_NAME in self.output_names else self.output_names[0]
        n_out = self._session.num_outputs
        if n_out is not None and n_out != len(self.labels):
            raise UserError(f"{self.path}: {n_out} outputs but {len(self.labels)} labels in its metadata")

    @property
    def runtime_name(self) -> str:
        """How reports name the runtime: 'onnxruntime' or 'OpenVINO'."""
        return self._session.name

    @property
    def files(self) -> list[Path]:
        """The files that make up the model (an IR is .xml + .bin)."""
        return [self.path, self.path.with_suffix(".bin")] if self.path.suffix == ".xml" else [self.path]

    def _run(self, images: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if self.static_batch is not None and images.shape[0] != self.static_batch:
            if self.static_batch != 1:
                raise UserError(f"{self.path} has a static batch of {self.static_batch}; got {images.shape[0]} images")
            results = [self._session(images[i:i + 1], outputs) for i in range(images.shape[0])]
            return [np.concatenate([r[k] for r in results]) for k in range(len(outputs))]
        return self._session(images, outputs)

    def __call__(self, images: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        if isinstance(images, torch.Tensor):
            return torch.from_numpy(self._run(images.detach().cpu().numpy(), [self._logits])[0])
        return self._run(np.asarray(images), [self._logits])[0]

    def explain(self, images: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | tuple[np.ndarray, ...]:
        """(logits, saliency maps (N, classes, h, w) in [0, 1]) of a file exported with explain=True."""
        if not self.saliency:
            raise UserError(f"{self.path} has no saliency output (it was exported without explain=True)")
        name = self.saliency.get("output", SALIENCY_NAME)
        if name not in self.output_names:
            raise UserError(f"{self.path}: its metadata names a saliency output '{name}' the model lacks")
        as_tensor = isinstance(images, torch.Tensor)
        logits, maps = self._run(images.detach().cpu().numpy() if as_tensor else np.asarray(images),
                                 [self._logits, name])
        return (torch.from_numpy(logits), torch.from_numpy(maps)) if as_tensor else (logits, maps)

    def calibrated(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated probabilities, the answer: "unknown" (N,) or multi-label "predicted" (N, classes)) as the
        file's own graph computes them (export with a calibration)."""
        answer = PREDICTED_NAME if self.task["type"] == "multilabel" else UNKNOWN_NAME
        missing = [n for n in (PROBS_NAME, answer) if n not in self.output_names]
        if self.calibration is None or missing:
            raise UserError(f"{self.path} has no calibrated outputs (exported from an uncalibrated checkpoint)")
        probs, decided = self._run(np.asarray(images), [PROBS_NAME, answer])
        return probs, decided

    def complexity(self) -> dict[str, float]:
        """Counted on the graph OpenVINO reads from the file, whichever runtime runs it."""
        ov_model = getattr(self._session, "ov_model", None)
        if ov_model is None:
            ov_model = openvino_core().read_model(str(self.path))
        return ir_complexity(ov_model, self.input_size)


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


__all__ = ["ExportedClassifier", "EXPORTED_SUFFIXES", "RUNTIMES", "TARGET_DEVICES", "check_runtime", "device_available", "ir_complexity",
           "is_exported_model", "runtime_versions", "runtimes_for",
           "target_devices"]
