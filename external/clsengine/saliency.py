"""Saliency maps: where in the image a classifier found each class, without a backward pass (Recipro-CAM).

Recipro-CAM (Byun & Lee 2022, the method OpenVINO Training Extensions ships) masks the backbone's last
feature map F (N, C, h, w) to one spatial position at a time, runs the classifier head on each masked map,
and takes the class scores it gives (softmax; sigmoid for multi-label) as the saliency of that position. It
needs only "features" and "head from features", so it works for every architecture here, whatever the head:
CAM proper (feature maps weighted by the classifier's weights) needs one linear layer right after the
pooling, which MobileNetV3's two-layer head and the cosine classifier of the AM-softmax templates are not.

Every head here starts with global average pooling, so a feature map masked to position k pools to
F[:, :, k] / (h w): the h*w masked maps cost one head pass over h*w pooled vectors (a few matrix products),
cheap enough to run beside the logits at inference and to export as a second graph output.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn as nn

from .errors import UserError
from .models.factory import forward_features, forward_head

METHOD = "recipro_cam"


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each (image, class) map of (N, K, h, w) to [0, 1] (a constant map becomes 0)."""
    low = maps.amin(dim=(2, 3), keepdim=True)
    high = maps.amax(dim=(2, 3), keepdim=True)
    return (maps - low) / (high - low).clamp_min(1e-12)


def recipro_cam(features: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], multilabel: bool = False,
                normalize: bool = True) -> torch.Tensor:
    """Recipro-CAM maps (N, K, h, w) of a feature map (N, C, h, w) for a `head` that pools globally first.

    The score of class c at position k is the head's score of c for the feature map kept at k alone (zero
    elsewhere); `normalize` scales each map to [0, 1]. The head sees (N*h*w, C, 1, 1) maps already pooled."""
    n, c, h, w = features.shape
    # Image i kept at position k alone, globally pooled: F[i, :, k] / (h*w), at row i*h*w + k.
    masked = features.flatten(2).transpose(1, 2).reshape(-1, c, 1, 1) / (h * w)
    logits = head(masked)
    scores = logits.sigmoid() if multilabel else logits.softmax(dim=1)
    k = scores.shape[1]
    maps = scores.reshape(-1, h * w, k).transpose(1, 2).reshape(-1, k, h, w)
    return normalize_maps(maps) if normalize else maps


def check_explainable(model: nn.Module) -> None:
    """Refuse what logits_and_saliency cannot split into features and head: a model not built by
    create_model, or an int8 (NNCF) one, whose quantizers act only within its own forward (its feature
    map and head run apart would be float, and so would an exported file's logits)."""
    if not hasattr(model, "arch_name"):
        raise UserError(f"saliency maps need a model built by clsengine.models.create_model, got "
                        f"{type(model).__name__}")
    if any(type(m).__module__.split(".")[0] == "nncf" for m in model.modules()):
        raise UserError("saliency maps are computed on float models; this one is int8 (NNCF): explain the "
                        "float model it was quantized from")


def logits_and_saliency(model: nn.Module, images: torch.Tensor, multilabel: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits model(images) gives and their Recipro-CAM maps in [0, 1], from one pass of the backbone
    (`images` normalised as the network was trained; `model` built by clsengine.models.create_model)."""
    features = forward_features(model, images)
    return forward_head(model, features), recipro_cam(features, partial(forward_head, model), multilabel)


def upsample(saliency: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (h, w) map resized bilinearly to `size` (H, W), e.g. the original image's, for display."""
    return cv2.resize(np.asarray(saliency, dtype=np.float32), (int(size[1]), int(size[0])),
                      interpolation=cv2.INTER_LINEAR)


def overlay(image: np.ndarray, saliency: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """An RGB uint8 image with the (h, w) map in [0, 1] blended over it as a jet heat map (red: salient).

    The map covers the whole image: models see it resized without a crop."""
    heat = upsample(saliency, image.shape[:2])
    colours = cv2.applyColorMap(np.clip(heat * 255.0 + 0.5, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    blended = alpha * colours.astype(np.float32) + (1.0 - alpha) * image.astype(np.float32)
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


__all__ = ["METHOD", "check_explainable", "logits_and_saliency", "normalize_maps", "overlay", "recipro_cam", "upsample"]
