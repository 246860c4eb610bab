"""Is a dataset mirror-symmetric? Horizontal flips double a photo set for free, but they turn a 3 into an
Ɛ and a "b" into a "d": on digits or text, a flipped image is another class, or none.

A dataset whose images are as likely to appear mirrored has class-mean images that are their own mirror
image, up to sampling noise. `mirror_asymmetry` measures how far they are from it, with the noise estimated
from the data itself (the difference of two half-sample means), so that a few dozen images per class do not
look asymmetric by chance.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np

from .image import UnreadableImageError, read_image

SIDE = 32            # px: class means at this size (orientation is a coarse property)
PER_CLASS = 64       # images read per class at most: the statistic needs means, not every image
MAX_IMAGES = 2000    # ...and in all (a 1000-class set reads 2 per class: a few seconds, not minutes)


@dataclass(frozen=True)
class MirrorAsymmetry:
    effect: float        # share of the class means' structure that is not mirror-symmetric: ~0 photos, ~0.2 digits
    vs_noise: float      # their asymmetry over what sampling noise alone gives: ~1 when symmetric
    images: int          # images read

    def __str__(self) -> str:
        return (f"class-mean images {self.effect:.0%} asymmetric, {self.vs_noise:.1f}x the sampling noise "
                f"({self.images} images)")


def _thumbnail(path: str) -> np.ndarray:
    grey = cv2.cvtColor(read_image(path), cv2.COLOR_RGB2GRAY).astype(np.float32)
    grey = cv2.resize(grey, (SIDE, SIDE), interpolation=cv2.INTER_AREA)
    return (grey - grey.mean()) / (grey.std() + 1e-6)    # each image counts alike, whatever its exposure


def mirror_asymmetry(samples: Sequence[tuple[str, Any]], per_class: int = PER_CLASS,
                     seed: int = 0) -> MirrorAsymmetry | None:
    """How far the class-mean images are from their mirror images, noise removed (what digits and photo sets
    measure: domain README, `training.augmentation.hflip`). None where it cannot tell: multi-label samples,
    fewer than 4 readable images in every class, or class means with no structure above the noise."""
    by_class: dict[int, list[str]] = {}
    for path, label in samples:
        if isinstance(label, (tuple, list)):
            return None
        by_class.setdefault(int(label), []).append(path)
    per_class = max(4, min(per_class, MAX_IMAGES // max(1, len(by_class))))
    rng = random.Random(seed)
    asymmetric = structure = noise_total = 0.0
    read = 0
    for paths in by_class.values():
        images = []
        for path in rng.sample(paths, min(per_class, len(paths))):
            try:
                images.append(_thumbnail(path))
            except UnreadableImageError:
                continue
        read += len(images)
        half = len(images) // 2
        if half < 2:
            continue
        a, b = np.mean(images[:half], axis=0), np.mean(images[half:2 * half], axis=0)
        mean = (a + b) / 2
        noise = float(np.sum((a - b) ** 2)) / 4                  # E ||mean - true mean||^2
        mirrored = float(np.sum((mean - mean[:, ::-1]) ** 2))     # 2 x noise when truly symmetric
        asymmetric += mirrored - 2 * noise
        structure += 2 * (float(np.sum((mean - mean.mean()) ** 2)) - noise)
        noise_total += 2 * noise
    if structure <= 0 or noise_total <= 0:
        return None
    return MirrorAsymmetry(effect=max(0.0, asymmetric / structure),
                           vs_noise=(asymmetric + noise_total) / noise_total, images=read)


__all__ = ["MirrorAsymmetry", "mirror_asymmetry"]
