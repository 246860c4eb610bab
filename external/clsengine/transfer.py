"""Fine-tuning from pretrained weights on a small CPU: a linear probe, then the last stages (LP-FT).

On a 2-core CPU a few hundred photos at 224 px give full fine-tuning a handful of epochs in minutes, and a
fresh random head makes its first steps tear at the pretrained features (Kumar et al. 2022). A linear probe
costs one forward pass: the backbone's pooled features are computed once (each training image also flipped
when flips suit the data), and the head is fitted to them as a multinomial logistic regression in seconds,
its L2 strength chosen on the validation features. Fine-tuning then starts from that head, training only
the last `trainable` stages of the backbone (models.freeze_stages: the others frozen, so their backward pass is
never computed), with frozen BatchNorm layers keeping their running statistics (models.batchnorm.train_mode).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .models.factory import classifier
from .models.heads import last_linear
from .utils import autocast

PROBE_L2 = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)  # per-sample L2 tried (sklearn C=1 on 720 images: 7e-4)


def _last_linear(model: nn.Module) -> nn.Linear:
    head = classifier(model)
    if isinstance(head, nn.Linear):
        return head
    try:
        return last_linear(head)[2]
    except UserError:
        raise UserError("the linear probe needs a linear classifier (model.head: linear)") from None


@torch.no_grad()
def pooled_features(model: nn.Module, loader, device: torch.device, flip: bool = False,
                    memory_format: torch.memory_format = torch.contiguous_format,
                    amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What the model's last linear layer receives for every image of `loader` (evaluation mode: the pooled
    features, after any layers of the head before it), and the labels; with `flip`, each image's mirror image
    too (twice the rows)."""
    model.eval()
    feats, labels = [], []
    hook = _last_linear(model).register_forward_hook(lambda m, inputs, out: feats.append(inputs[0].float().cpu()))
    try:
        for images, y in loader:
            images = images.to(device, memory_format=memory_format)
            for view in ([images, torch.flip(images, dims=[3])] if flip else [images]):
                with autocast(device.type, amp_dtype):
                    model(view)
                labels.append(y)
    finally:
        hook.remove()
    return torch.cat(feats), torch.cat(labels)


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
                            max_iter: int = 200, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (weights, bias) minimising mean cross-entropy (with the training loss's
    label smoothing) + l2/2 |W|^2 by L-BFGS; the features are not standardised, so the weights apply to the
    model's own features."""
    w = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y, label_smoothing=label_smoothing) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


@dataclass
class ProbeResult:
    l2: float
    train_top1: float
    val_errors: int
    val_rows: int
    val_loss: float
    train_rows: int
    seconds: float

    @property
    def val_top1(self) -> float:
        return 100.0 * (self.val_rows - self.val_errors) / max(1, self.val_rows)

    def describe(self) -> str:
        return (f"Linear probe: head fitted on {self.train_rows} pooled feature vectors computed once "
                f"(L2 {self.l2:g}, chosen on validation loss from {', '.join(f'{v:g}' for v in PROBE_L2)}): "
                f"train top-1 {self.train_top1:.2f}, val top-1 {self.val_top1:.2f}, val loss {self.val_loss:.4f}, "
                f"{self.seconds:.1f} s")


def linear_probe(model: nn.Module, train_loader, val_loader, num_classes: int, device: torch.device,
                 flip: bool = False, memory_format: torch.memory_format = torch.contiguous_format,
                 amp_dtype: torch.dtype | None = None, label_smoothing: float = 0.0) -> ProbeResult:
    """Fit the model's last linear layer (in place) on frozen features; the L2 strength with the lowest
    validation loss wins. The loaders must not augment (evaluation transforms). `label_smoothing`: the
    training loss's, so that fine-tuning starts at its own loss's optimum for the head (a head fitted without
    it is confident far beyond what a smoothed loss wants, and the first epoch pulls its logits down, costing
    1-5 points of validation top-1 on four photo sets)."""
    linear = _last_linear(model)
    if linear.out_features != num_classes:
        raise UserError(f"the model's classifier has {linear.out_features} outputs, not {num_classes}")
    started = time.perf_counter()
    x, y = pooled_features(model, train_loader, device, flip, memory_format, amp_dtype)
    vx, vy = pooled_features(model, val_loader, device, False, memory_format, amp_dtype)
    best = None
    for l2 in PROBE_L2:
        w, b = fit_logistic_regression(x, y, num_classes, l2, label_smoothing=label_smoothing)
        val_loss = float(F.cross_entropy(vx @ w.T + b, vy, label_smoothing=label_smoothing))
        if best is None or (math.isfinite(val_loss) and not val_loss >= best[0]):
            best = (val_loss, l2, w, b)
    val_loss, l2, w, b = best
    with torch.no_grad():
        linear.weight.copy_(w.to(linear.weight))
        if linear.bias is not None:
            linear.bias.copy_(b.to(linear.bias))

    def errors(f: torch.Tensor, t: torch.Tensor) -> int:
        return int(((f @ w.T + b).argmax(1) != t).sum())

    return ProbeResult(l2=l2, train_top1=100.0 * (len(y) - errors(x, y)) / len(y), val_errors=errors(vx, vy),
                       val_rows=len(vy), val_loss=val_loss, train_rows=len(y), seconds=time.perf_counter() - started)


__all__ = ["PROBE_L2", "ProbeResult", "fit_logistic_regression", "linear_probe", "pooled_features"]
