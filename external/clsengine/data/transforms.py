"""Albumentations pipelines: training augmentation and deterministic evaluation preprocessing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import albumentations as A
import cv2
import numpy as np
import torch


@dataclass
class AugmentationConfig:
    """Training augmentation. Probabilities of 0 switch a transform off."""
    random_resized_crop_scale: tuple[float, float] = (0.6, 1.0)
    hflip: float = 0.5
    vflip: float = 0.0
    rotate_limit: float = 0.0
    rotate_p: float = 0.0
    color_jitter: float = 0.0          # brightness/contrast/saturation strength
    color_jitter_p: float = 0.0


class ToTensor:
    """HxWxC float array (already normalised) to a CxHxW float32 tensor."""

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))


class Pipeline:
    """Apply an albumentations Compose to an RGB uint8 array and return a tensor (picklable for workers).

    With bgr=True the channels are reversed first, for networks trained on BGR input."""

    def __init__(self, compose: A.Compose, bgr: bool = False):
        self.compose = compose
        self.bgr = bgr
        self.to_tensor = ToTensor()

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if self.bgr:
            image = np.ascontiguousarray(image[:, :, ::-1])
        return self.to_tensor(self.compose(image=image)["image"])


def _normalize(mean: Sequence[float], std: Sequence[float]) -> A.Normalize:
    # mean/std are given on the 0..255 scale, as deployment-side tools expect.
    return A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0)


def build_eval_transform(size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                         bgr: bool = False) -> Pipeline:
    """Resize to the model input (no crop, so nothing at the border is lost) and normalise."""
    h, w = size
    return Pipeline(A.Compose([A.Resize(h, w, interpolation=cv2.INTER_LINEAR), _normalize(mean, std)]), bgr=bgr)


def build_train_transform(size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                          aug: AugmentationConfig, bgr: bool = False) -> Pipeline:
    h, w = size
    ops: list = [A.RandomResizedCrop(size=(h, w), scale=tuple(aug.random_resized_crop_scale))]
    if aug.hflip > 0:
        ops.append(A.HorizontalFlip(p=aug.hflip))
    if aug.vflip > 0:
        ops.append(A.VerticalFlip(p=aug.vflip))
    if aug.rotate_p > 0 and aug.rotate_limit > 0:
        ops.append(A.Rotate(limit=aug.rotate_limit, p=aug.rotate_p, border_mode=cv2.BORDER_REFLECT_101))
    if aug.color_jitter_p > 0 and aug.color_jitter > 0:
        s = aug.color_jitter
        ops.append(A.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(0.5, s / 4), p=aug.color_jitter_p))
    ops.append(_normalize(mean, std))
    return Pipeline(A.Compose(ops), bgr=bgr)
