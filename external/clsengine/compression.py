"""Int8 quantization with NNCF: post-training quantization, the quantized model's state for checkpoints,
and the rules compression follows (whether and how long to fine-tune, and the accuracy budget).

A quantized model is the original torch module with NNCF's fake-quantizers hooked in: it trains like any
other module (quantization-aware training), its checkpoint is a plain dict holding its state dict and
NNCF's configuration (`quantization_state`), and ONNX / OpenVINO export turns the fake-quantizers into int8
(`strip_quantizers` first gives them the standard ONNX form).
"""
from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn

from .errors import UserError

# NNCF compiles its CPU kernels on first use and gives up after 60 s, which a loaded 2-core machine can
# exceed; init_venv.sh builds them ahead, and without a limit a first build here is slow, not fatal.
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")

# Lines printed from inside NNCF's imports that a user can do nothing about (the CUDA probe of torch's extension
# builder on a machine without CUDA; a deprecation inside torchao, which NNCF's PyTorch backend imports).
THIRD_PARTY_NOISE = {"torch.utils.cpp_extension": "No CUDA runtime is found",
                     "torch.utils._pytree": "is an Enum subclass and is now natively supported"}


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_third_party_logs() -> None:
    """Drop exactly the THIRD_PARTY_NOISE messages at their loggers (every other record of those loggers, and
    every warning of ours, still shows). Idempotent."""
    for name, text in THIRD_PARTY_NOISE.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in log.filters):
            log.addFilter(_DropMessage(text))


quiet_third_party_logs()  # before anything here imports NNCF
PRESETS = ("performance", "mixed")
# When quantization-aware training follows PTQ (see runs_qat).
MODES = ("auto", "ptq", "qat")
OVERFLOW_FIX = {"enable": "enable", "first_layer": "first_layer_only", "disable": "disable"}   # symmetric activations | asymmetric activations (better for non-ReLU nets)
# Quantization-aware training budget: this many optimizer steps, in whole epochs, capped (see qat_epochs).
QAT_TARGET_STEPS = 300
QAT_MAX_EPOCHS = 10


def _nncf_settings(subset_size: int, preset: str, fast_bias_correction: bool, ignored_patterns: Iterable[str],
                   overflow_fix: str, strict_scope: bool = True) -> dict[str, Any]:
    """nncf.quantize's keyword arguments, checked: the same for the PyTorch and the OpenVINO backend
    (`strict_scope`: an ignored pattern that matches no operation is an error)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    if overflow_fix not in OVERFLOW_FIX:
        raise UserError(f"overflow_fix must be one of {', '.join(OVERFLOW_FIX)}, got '{overflow_fix}'")
    if preset not in PRESETS:
        raise UserError(f"quantization preset must be one of {', '.join(PRESETS)}, got '{preset}'")
    if subset_size < 1:
        raise UserError(f"calibration subset size must be positive, got {subset_size}")
    patterns = list(ignored_patterns)
    return dict(subset_size=subset_size, fast_bias_correction=fast_bias_correction,
                preset=nncf.QuantizationPreset(preset),
                ignored_scope=nncf.IgnoredScope(patterns=patterns, validate=strict_scope) if patterns else None,
                advanced_parameters=AdvancedQuantizationParameters(
                    overflow_fix=OverflowFix(OVERFLOW_FIX[overflow_fix])))


def _run_nncf(model: Any, dataset: Any, settings: dict[str, Any]) -> Any:
    import nncf

    try:
        return nncf.quantize(model, dataset, **settings)
    except nncf.ValidationError as exc:  # e.g. an ignored pattern that matches no layer
        first = (str(exc).strip().splitlines() or ["invalid quantization settings"])[0]
        raise UserError(f"quantization: {first}") from None


def quantize(model: nn.Module, batches: Iterable, *, subset_size: int = 300, preset: str = "performance",
             fast_bias_correction: bool = True, ignored_patterns: Iterable[str] = (), overflow_fix: str = "enable",
             device: torch.device | str = "cpu", strict_scope: bool = True) -> nn.Module:
    """Post-training int8 quantization of a PyTorch model (the start of quantization-aware training): NNCF
    collects activation ranges on `subset_size` calibration items of `batches` (an iterable of (images,
    labels); batch size 1 gives NNCF exactly `subset_size` images) and applies bias correction. Layers whose
    NNCF node name matches a regex of `ignored_patterns` stay float (`strict_scope`: a pattern that matches
    none is an error; off where the patterns were written for the IR's names, see quantize_ir). `overflow_fix` "enable" stores weights in
    7 bits so that CPUs without VNNI (AVX2 only), whose int8 kernels accumulate pairs in saturating int16,
    compute what the PyTorch simulation computes.
    The model is returned quantized (the same module, modified in place, in eval mode)."""
    import nncf

    settings = _nncf_settings(subset_size, preset, fast_bias_correction, ignored_patterns, overflow_fix, strict_scope)
    model.eval()
    return _run_nncf(model, nncf.Dataset(batches, lambda batch: batch[0].to(device)), settings)


def quantize_ir(xml_in: str | os.PathLike, xml_out: str | os.PathLike, batches: Iterable, *, subset_size: int = 300,
                preset: str = "performance", fast_bias_correction: bool = True, ignored_patterns: Iterable[str] = (),
                overflow_fix: str = "enable") -> Path:
    """Post-training int8 quantization of an OpenVINO IR with NNCF's OpenVINO backend: the deployed model is
    the one quantized, and OpenVINO computes the statistics several times faster than NNCF's PyTorch hooks.
    `batches` yields (images, labels) in the IR's own input format (0..255 images in its channel order);
    `ignored_patterns` match the IR's operation names. The IR's metadata (rt_info) is carried over; written
    atomically (.bin, then .xml) to `xml_out`."""
    import nncf
    import openvino as ov

    from .fileio import atomic_outputs
    from .ov_core import openvino_core

    settings = _nncf_settings(subset_size, preset, fast_bias_correction, ignored_patterns, overflow_fix)
    xml_out = Path(xml_out)
    xml_out.parent.mkdir(parents=True, exist_ok=True)
    model = openvino_core().read_model(str(xml_in))
    quantized = _run_nncf(model, nncf.Dataset(batches, lambda batch: np.asarray(batch[0], dtype=np.float32)), settings)
    with atomic_outputs(xml_out.with_suffix(".bin"), xml_out) as (_, tmp_xml):
        ov.save_model(quantized, str(tmp_xml), compress_to_fp16=False)
    return xml_out


def quantization_state(model: nn.Module) -> dict[str, Any]:
    """What, besides the state dict, rebuilds a quantized model (NNCF's config of its quantizers)."""
    import nncf.torch

    return nncf.torch.get_config(model)


def restore_quantized(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """Hook the quantizers described by `state` into a freshly built float `model` (then load its state dict).
    NNCF only instantiates classes from its own modules here."""
    import nncf.torch

    try:
        return nncf.torch.load_from_config(model, state)
    except Exception as exc:  # a config from another architecture or NNCF version
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot restore the quantized model: {first}") from None


def has_quantizers(model: nn.Module) -> bool:
    """Whether NNCF has hooked quantizers into `model` (nncf is only imported once something used it)."""
    if "nncf" not in sys.modules:
        return False
    from nncf.torch.function_hook.wrapper import is_wrapped

    return is_wrapped(model)


def strip_quantizers(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """A copy of a quantized model with NNCF's quantizers replaced by torch's own fake-quantize modules, which
    the ONNX exporter writes as standard QuantizeLinear/DequantizeLinear pairs: onnxruntime runs those as well
    as OpenVINO does, whereas NNCF's own FakeQuantize ONNX op is known to OpenVINO only."""
    import nncf

    return nncf.strip(model, do_copy=True, strip_format=nncf.StripFormat.NATIVE, example_input=example_input)


def is_quantized(checkpoint: dict[str, Any]) -> bool:
    return "quantization" in checkpoint


def qat_epochs(num_train_images: int, batch_size: int, max_epochs: int = QAT_MAX_EPOCHS,
               target_steps: int = QAT_TARGET_STEPS) -> int:
    """Epochs of quantization-aware training: enough whole epochs for `target_steps` optimizer steps (a few
    hundred steps at a low learning rate recover most of the PTQ loss), at most `max_epochs`, at least one.
    A small dataset thus gets several passes, a large one a single partial-budget epoch."""
    steps_per_epoch = max(1, num_train_images // max(1, batch_size))
    return max(1, min(int(max_epochs), math.ceil(target_steps / steps_per_epoch)))


def runs_qat(mode: str, ptq_met_budget: bool) -> bool:
    """Whether quantization-aware training follows post-training quantization: never for "ptq" (the fast
    path, even when the budget is missed), always for "qat" (the caller asked for fine-tuning, e.g. to
    beat PTQ's accuracy), and for "auto" only when the PTQ model misses the budget: fine-tuning costs
    epochs of training that a met budget does not need."""
    if mode not in MODES:
        raise UserError(f"compression mode must be one of {', '.join(MODES)}, got '{mode}'")
    return mode == "qat" or (mode == "auto" and not ptq_met_budget)


@dataclass(frozen=True)
class AccuracyBudget:
    """The int8 model may lose at most `max_drop` points of its score (top-1, or the named `metric`) against
    the float model."""
    float_score: float
    max_drop: float
    metric: str = "top-1"

    @property
    def target(self) -> float:
        return self.float_score - self.max_drop

    def met(self, int8_score: float) -> bool:
        return int8_score >= self.target - 1e-9

    def describe(self, int8_score: float) -> str:
        drop = self.float_score - int8_score
        verdict = "met" if self.met(int8_score) else "NOT met"
        return (f"accuracy budget {verdict}: int8 {self.metric} {int8_score:.2f} vs float {self.float_score:.2f} "
                f"(drop {drop:.2f} points, budget {self.max_drop:.2f})")


__all__ = ["quiet_third_party_logs", "quantize", "quantize_ir", "quantization_state", "restore_quantized", "is_quantized", "qat_epochs", "runs_qat",
           "AccuracyBudget", "PRESETS", "MODES"]
