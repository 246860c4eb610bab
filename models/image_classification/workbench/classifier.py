"""One loader for every model file eval.py and predict.py accept: a training checkpoint, bare weights,
an OpenVINO IR or an ONNX file. Each comes back as a Classifier fed the same deployment-format images
(0..255, resized to the input size, channels in `input_order`), so a checkpoint and its exported files
are measured on exactly the same inputs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from clsengine import data as datasets
from clsengine.calibration import Calibration
from clsengine.checkpoint import load_checkpoint, load_model_weights, load_state_dict_file
from clsengine.complexity import complexity
from clsengine.compression import is_quantized, restore_quantized
from clsengine.errors import UserError
from clsengine.export import DeployModel
from clsengine.inference import ExportedClassifier, is_exported_model
from clsengine.loop import predict
from clsengine.metrics import multilabel_probs
from clsengine.utils import select_device

from . import factories, loaders
from .template import Template, load_template, template_from_dict


@dataclass
class Classifier:
    run: Callable[[torch.Tensor], torch.Tensor]   # (N, 3, H, W) 0..255 in input_order -> logits
    classes: list[str]
    input_size: tuple[int, int]
    input_order: str
    device: torch.device
    files: list[Path]
    kind: str                                      # "checkpoint", "OpenVINO IR" or "ONNX"
    runtime: str                                   # what runs it: "PyTorch", "OpenVINO" or "onnxruntime"
    complexity: Callable[[], dict[str, float]]
    template: Template   # the checkpoint's; for exported files the work dir's (it sets batch size and workers)
    task: dict           # {"type": "multiclass"} or {"type": "multilabel", "threshold", "background_label"}
    # Like `run`, but -> (logits, saliency maps (N, classes, h, w) in [0, 1]); None for an exported file without
    # a saliency output (export.py --explain writes one) and for int8 checkpoints (see clsengine.saliency)
    explain: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    # Fitted on the validation set after training (clsengine.calibration); None: raw softmax / sigmoid scores
    calibration: Calibration | None = None

    @property
    def multilabel(self) -> bool:
        return self.task["type"] == "multilabel"

    @property
    def threshold(self) -> float:
        """The global multi-label threshold (task.threshold): the fallback of per-class thresholds."""
        return float(self.task.get("threshold", 0.5))

    @property
    def thresholds(self) -> float | list[float]:
        """What decides a multi-label answer: the calibrated per-class thresholds, else the global one."""
        if self.calibration is not None and self.calibration.thresholds:
            return list(self.calibration.thresholds)
        return self.threshold

    @property
    def background_index(self) -> int | None:
        name = self.task.get("background_label")
        return self.classes.index(name) if name in self.classes else None

    def probabilities(self, logits: torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        """Softmax, or for multi-label independent sigmoids (with the background label suppressed); of the
        calibrated logits (logits / temperature) unless `calibrated` is False or there is no calibration."""
        calibration = self.calibration if calibrated else None
        if self.multilabel:
            return multilabel_probs(calibration.scaled(logits) if calibration else logits, self.background_index,
                                    self.thresholds if calibration else self.threshold)
        return calibration.probabilities(logits, False) if calibration else logits.float().softmax(dim=1)

    def unknown(self, logits: torch.Tensor) -> torch.Tensor:
        """True for each image answered "unknown" (single-label, calibrated with a rejection threshold)."""
        if self.multilabel or self.calibration is None:
            return torch.zeros(len(logits), dtype=torch.bool)
        return self.calibration.unknown(logits)

    def transform(self) -> datasets.transforms.Pipeline:
        return datasets.build_deploy_transform(self.input_size, bgr=self.input_order == "BGR")

    def predict(self, samples: list[tuple[str, int]], desc: str, multihot: bool | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of (path, label) samples, and the labels of the samples decoded: multi-hot for a
        multi-label model unless `multihot` is False (labels that are not classes, e.g. image indices)."""
        t = self.template
        dataset = datasets.ImageDataset(samples, self.classes, self.transform(),
                                 multilabel=self.multilabel if multihot is None else multihot)
        loader = loaders.make_loader(dataset, t, factories.eval_batch_size(t), train=False, device=self.device)
        return predict(self.run, loader, self.device, desc=f"{desc} ({self.kind}, {self.runtime})")


def _head_outputs(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """Class count of a weights file: rows of the last 2-D weight inside the model's classifier."""
    prefix = f"{model.head_name}."
    rows = [v.shape[0] for k, v in state.items()
            if k.removeprefix("module.").startswith(prefix) and k.endswith("weight") and v.dim() == 2]
    return rows[-1] if rows else None


def model_from_checkpoint(checkpoint: dict[str, Any], source: str | Path, overrides: dict[str, Any] | None = None
                          ) -> tuple[Template, list[str], torch.nn.Module]:
    """Template, classes and model (in eval mode) of a training or compressed checkpoint (compressed ones
    come back with their int8 quantizers in place)."""
    t = template_from_dict(checkpoint["config"]["template"], f"checkpoint {source}", overrides)
    classes = [str(c) for c in checkpoint["classes"]]
    model = factories.build_model(t, len(classes))
    if is_quantized(checkpoint):
        model = restore_quantized(model, checkpoint["quantization"]["nncf"])
    load_model_weights(model, checkpoint["model"], str(source))
    return t, classes, model.eval()


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by train.py or compress.py; bare weights are refused: only such a checkpoint
    says which model and classes the weights are for."""
    checkpoint = load_checkpoint(path)
    if "config" not in checkpoint:
        raise UserError(f"{path} is a bare weights file; a checkpoint written by train.py or compress.py is "
                        f"needed (it holds the classes and the model configuration)")
    return checkpoint


def load_trained_model(path: str | Path, overrides: dict[str, Any] | None = None
                       ) -> tuple[Template, list[str], torch.nn.Module]:
    """model_from_checkpoint for a file (see load_training_checkpoint)."""
    return model_from_checkpoint(load_training_checkpoint(path), path, overrides)


def _check_classes(own: list[str], classes: list[str] | None, own_source: str, classes_source: str,
                   allow_subset: bool) -> None:
    if classes is None or (allow_subset and set(own) < set(classes)):
        return
    datasets.check_same_classes(own, classes, own_source, classes_source)


def load_classifier(path: str | Path, *, template_path: str, overrides: dict[str, Any], classes: list[str] | None,
                    classes_source: str, device: str = "CPU", runtime: str | None = None,
                    allow_subset: bool = False, checkpoint: dict[str, Any] | None = None) -> Classifier:
    """Open `path` for inference.

    `device` and `runtime` say how an exported file runs (runtime None: onnxruntime for ONNX, OpenVINO for IR);
    a checkpoint runs in PyTorch on the template's device.
    `classes` (named by `classes_source`, e.g. the test folder) are needed for bare weights, which do not
    know their classes, and are checked against the classes a training checkpoint or exported file holds
    (`allow_subset`: the model may know only some of them, e.g. one trained with --classes). `checkpoint`: the
    file at `path` as the caller has already read it.
    """
    path = Path(path)
    if is_exported_model(path):
        exported = ExportedClassifier(path, device, runtime)
        _check_classes(exported.labels, classes, str(path), classes_source, allow_subset)
        return Classifier(run=exported, classes=exported.labels, input_size=exported.input_size,
                          input_order=exported.input_order, device=torch.device("cpu"), files=exported.files,
                          kind="OpenVINO IR" if path.suffix == ".xml" else "ONNX", runtime=exported.runtime_name,
                          complexity=exported.complexity,
                          template=load_template(template_path, overrides), task=exported.task,
                          explain=exported.explain if exported.saliency else None, calibration=exported.calibration)
    if path.suffix == ".bin" and path.with_suffix(".xml").is_file():
        raise UserError(f"{path} is the weights half of an OpenVINO IR; pass {path.with_suffix('.xml')}")
    checkpoint = load_checkpoint(path) if checkpoint is None else checkpoint
    quantized = is_quantized(checkpoint)
    if "config" in checkpoint:  # written by train.py or compress.py: it knows its model and classes
        t, own, model = model_from_checkpoint(checkpoint, path, overrides)
        _check_classes(own, classes, f"checkpoint {path}", classes_source, allow_subset)
        classes = own
    else:  # bare weights: the work dir's template and the caller's classes define the model
        t = load_template(template_path, overrides)
        if classes is None:
            raise UserError(f"{path} holds bare weights without class names; pass them (--class-id-path)")
        model = factories.build_model(t, len(classes))
        state = load_state_dict_file(path)  # the tensors of `checkpoint`, whatever its layout
        n_out = _head_outputs(model, state)
        if n_out is not None and n_out != len(classes):
            raise UserError(f"{path} has a classifier for {n_out} classes, but {classes_source} has {len(classes)}")
        load_model_weights(model, state, str(path))
    device = select_device(t.gpu_num)
    order = t.output_format.openvino_input_format
    deploy = DeployModel(model, t.input.mean, t.input.std, input_order=order,
                         train_order=t.input.channel_order).to(device).eval()
    explain = None if quantized else DeployModel(model, t.input.mean, t.input.std, input_order=order,
                                                 train_order=t.input.channel_order, explain=True,
                                                 multilabel=factories.is_multilabel(t)).to(device).eval()
    size = factories.input_size(t)
    return Classifier(run=deploy, classes=classes, input_size=size, input_order=order, device=device,
                      files=[path], kind="int8 checkpoint" if quantized else "checkpoint", runtime="PyTorch",
                      complexity=lambda: complexity(model, size), template=t, task=factories.task_metadata(t),
                      explain=explain, calibration=Calibration.from_dict(checkpoint.get("calibration")))

