"""Albumentations pipelines: training augmentation and deterministic evaluation preprocessing.

Training order: geometric ops (random resized crop, flips, rotate) -> AugMix -> photometric ops (colour jitter,
posterize, equalize, blur, noise) -> cutout -> normalise -> tensor. Why: geometry fixes the output size first,
AugMix mixes op chains of the clean crop, photometric ops then act on the mix, and cutout comes last so nothing
later blurs, noises or recolours its fill.

AugMix is ours (albumentations 2.0.8 has none), with torchvision's (`torchvision.transforms.v2.AugMix`) operation
list and magnitude bins, each operation computing what PIL's does (tests compare them) with cv2 look-up tables,
warps and numpy: several times faster than torchvision's tensor ops on small images, where augmenting in the
training process must keep up with the model. It follows Hendrycks et al. (2020): `width` chains of `depth`
ops (depth -1: 1..3 at random), chain weights drawn from Dirichlet(alpha), the mixed chains blended with the original by a
Beta(alpha, alpha) skip connection, ops from the paper's list (autocontrast, equalize, posterize, solarize, rotate,
shear, translate, plus brightness/colour/contrast/sharpness: torchvision's all_ops=True, as timm's "augmix-m5-w3"
recipe also uses them; the paper left those four out only to keep clear of the ImageNet-C corruptions).
Deviations from the paper's reference code, both small: the severity picks one of the first `severity` of 10
magnitude bins (the reference samples a continuous level in [0.1, severity]), and the blend is cast back to uint8
by truncation.

Randomness: albumentations 2.x keeps its own generators, seeded from OS entropy, and ignores np.random / random /
torch seeds, so copies of one pipeline in DataLoader workers would repeat the same augmentation stream (and the
same again every epoch). A Pipeline built with `reseed=True` (all training pipelines) therefore reseeds the
albumentations generators (AugMix's included) from the torch global RNG on every call.
Output is thus a function of the image and the torch seed, which DataLoader sets per worker from the loader seed.

Channels: the compose always works on RGB (colour jitter, AugMix's colour op and similar assume RGB); with
bgr=True the channels are reversed after normalisation. `mean` and `std` are given in the network's channel order
on the 0..255 scale, as deployment-side tools expect.
"""
from __future__ import annotations

import functools
import math
import os
import random
from dataclasses import dataclass, fields
from typing import Any, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network version check at import
import albumentations as A
import cv2
import numpy as np
import torch

from ..errors import UserError

AUGMIX_MAX_SEVERITY = 10   # torchvision's magnitude bins


@dataclass
class AugmentationConfig:
    """Training augmentation. Probabilities of 0 (augmix False) switch a transform off; all new ones start off."""
    random_resized_crop_scale: tuple[float, float] = (0.6, 1.0)
    hflip: float | str = 0.5           # a template may say "auto": clsengine.auto.hflip decides from the data
    vflip: float = 0.0
    rotate_limit: float = 0.0          # degrees, rotation sampled in [-limit, limit]
    rotate_p: float = 0.0
    color_jitter: float = 0.0          # brightness/contrast/saturation strength
    color_jitter_p: float = 0.0
    posterize_p: float = 0.0
    posterize_bits: int = 4            # bits kept per channel, 1..7
    equalize_p: float = 0.0            # per-channel histogram equalisation
    noise_p: float = 0.0
    noise_std: float = 0.05            # Gaussian noise standard deviation, fraction of 255, in (0, 1]
    blur_p: float = 0.0
    blur_limit: int = 5                # largest Gaussian kernel (odd, >= 3); the size is drawn from the odd 3..limit
    cutout_p: float = 0.0
    cutout_holes: int = 1              # number of square holes, filled with the normalisation mean
    cutout_size: float = 0.25          # hole side as a fraction of the image side, in (0, 1]
    augmix: bool = False
    augmix_severity: int = 5           # 1..10
    augmix_width: int = 3              # number of chains, >= 1
    augmix_depth: int = -1             # ops per chain; -1: random 1..3
    augmix_alpha: float = 1.0          # Dirichlet / Beta parameter, > 0
    # Batch mixing (torchvision's MixUp / CutMix, on whole batches in the training loop; soft targets):
    mixup_alpha: float = 0.0           # Beta(alpha, alpha) mixing weight; 0 switches MixUp off
    cutmix_alpha: float = 0.0          # Beta(alpha, alpha) box area; 0 switches CutMix off
    mix_p: float = 1.0                 # share of batches mixed (one of the two, at random, when both are on)

    def validate(self) -> None:
        """Raise UserError naming the first field with an unusable value."""
        def fail(name: str, rule: str) -> UserError:
            error = UserError(f"augmentation.{name} {rule}, got {getattr(self, name)!r}")
            error.field = name  # lets a caller point at the key in its own configuration file
            return error

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise fail(name, "must be a number")
            return float(value)

        def integer(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise fail(name, "must be an integer")
            return int(value)

        for f in fields(self):
            if f.name.endswith("_p") or f.name in ("hflip", "vflip"):
                if not 0.0 <= number(f.name) <= 1.0:
                    raise fail(f.name, "must be a probability in [0, 1]")
        scale = self.random_resized_crop_scale
        if (not isinstance(scale, (tuple, list)) or len(scale) != 2
                or any(isinstance(s, bool) or not isinstance(s, (int, float)) for s in scale)
                or not 0 < scale[0] <= scale[1] <= 1):
            raise fail("random_resized_crop_scale", "must be [min, max] with 0 < min <= max <= 1")
        for name in ("rotate_limit", "color_jitter"):
            if number(name) < 0:
                raise fail(name, "must be >= 0")
        if not 1 <= integer("posterize_bits") <= 7:
            raise fail("posterize_bits", "must be an integer in 1..7")
        if not 0 < number("noise_std") <= 1:
            raise fail("noise_std", "must be in (0, 1] (a fraction of 255)")
        blur = integer("blur_limit")
        if blur < 3 or blur % 2 == 0:
            raise fail("blur_limit", "must be an odd kernel size >= 3")
        if integer("cutout_holes") < 1:
            raise fail("cutout_holes", "must be >= 1")
        if not 0 < number("cutout_size") <= 1:
            raise fail("cutout_size", "must be in (0, 1] (a fraction of the image side)")
        if not isinstance(self.augmix, bool):
            raise fail("augmix", "must be true or false")
        if not 1 <= integer("augmix_severity") <= AUGMIX_MAX_SEVERITY:
            raise fail("augmix_severity", f"must be an integer in 1..{AUGMIX_MAX_SEVERITY}")
        if integer("augmix_width") < 1:
            raise fail("augmix_width", "must be >= 1")
        depth = integer("augmix_depth")
        if depth != -1 and depth < 1:
            raise fail("augmix_depth", "must be -1 (random 1..3) or >= 1")
        if not number("augmix_alpha") > 0:
            raise fail("augmix_alpha", "must be > 0")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if number(name) < 0:
                raise fail(name, "must be >= 0 (0: off)")

    @property
    def mixes(self) -> bool:
        return self.mix_p > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


def build_batch_mix(aug: AugmentationConfig, num_classes: int):
    """MixUp and/or CutMix (torchvision.transforms.v2) applied to a whole batch with probability mix_p:
    (images, class indices) -> (mixed images, soft targets of shape (N, num_classes)); None when both are off.
    Draws come from torch's RNG, so seeded runs and resumed runs mix the same way."""
    if not aug.mixes:
        return None
    from torchvision.transforms import v2

    mixers = [cls(alpha=alpha, num_classes=num_classes)
              for alpha, cls in ((aug.mixup_alpha, v2.MixUp), (aug.cutmix_alpha, v2.CutMix)) if alpha > 0]
    mix = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
    return v2.RandomApply([mix], p=aug.mix_p) if aug.mix_p < 1 else mix


def _magnitudes(low: float, high: float) -> np.ndarray:
    return np.linspace(low, high, AUGMIX_MAX_SEVERITY)


# AugMix's operations (all_ops: the paper's list plus brightness/colour/contrast/sharpness) on HxWx3 uint8 arrays,
# each (function(image, magnitude), magnitudes per severity bin or None, signed), with torchvision's magnitude
# bins. They reproduce PIL's ImageOps/ImageEnhance/Image.transform results (exactly, but for warps where a source
# coordinate falls on a pixel edge; tests/test_transforms.py compares them) with numpy and cv2 look-up tables and
# warps, which at 32x32 are several times faster than PIL (which builds its tables in Python, per call) and than
# tensor ops.
_VALUES = np.arange(256, dtype=np.float64)
_GREY = np.array([19595, 38470, 7471], dtype=np.int64)   # PIL's RGB -> L weights, 16-bit fixed point


def _table(values: np.ndarray) -> np.ndarray:
    table = np.clip(values, 0, 255).astype(np.uint8)
    table.flags.writeable = False   # cached tables are shared
    return table


_IDENTITY = _table(_VALUES)


@functools.lru_cache(maxsize=4096)
def _blend_table(base: float, factor: float) -> np.ndarray:
    """Table of PIL's Image.blend(constant `base`, image, factor) per value: in float32, truncated, clipped."""
    base32 = np.float32(base)
    return _table(np.trunc(base32 + np.float32(factor) * (_VALUES.astype(np.float32) - base32)))


@functools.lru_cache(maxsize=4096)
def _stretch_table(lo: int, hi: int) -> np.ndarray:
    """ImageOps.autocontrast's table: lo..hi stretched to 0..255."""
    scale = 255.0 / (hi - lo)
    return _table(np.trunc(_VALUES * scale - lo * scale))


def _affine(a: np.ndarray, matrix: Sequence[float]) -> np.ndarray:
    """PIL's Image.transform(AFFINE, matrix, NEAREST): `matrix` maps output to input coordinates (pixel edges
    at integers in PIL, pixel centres in cv2, hence the half-pixel shifts); outside pixels are black."""
    m0, m1, m2, m3, m4, m5 = matrix
    inverse = np.array([[m0, m1, m2 + 0.5 * (m0 + m1) - 0.5], [m3, m4, m5 + 0.5 * (m3 + m4) - 0.5]])
    h, w = a.shape[:2]
    return cv2.warpAffine(a, inverse, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _rotate(a: np.ndarray, degrees: float) -> np.ndarray:
    """PIL's Image.rotate(degrees, NEAREST): counter-clockwise about the image centre."""
    h, w = a.shape[:2]
    angle = -math.radians(degrees)
    c, s = math.cos(angle), math.sin(angle)
    cx, cy = w / 2, h / 2
    return _affine(a, (c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy))


def _grey(a: np.ndarray) -> np.ndarray:
    return (a.reshape(-1, 3).astype(np.int64) @ _GREY + 0x8000) >> 16


def _posterize(a: np.ndarray, bits: float) -> np.ndarray:
    return cv2.LUT(a, _IDENTITY & np.uint8((0xFF << (8 - int(bits))) & 0xFF))


def _solarize(a: np.ndarray, threshold: float) -> np.ndarray:
    return cv2.LUT(a, _table(np.where(_VALUES >= threshold, 255 - _VALUES, _VALUES)))


def _brightness(a: np.ndarray, m: float) -> np.ndarray:
    return cv2.LUT(a, _blend_table(0.0, 1.0 + m))                         # blend with black


def _contrast(a: np.ndarray, m: float) -> np.ndarray:
    return cv2.LUT(a, _blend_table(float(int(_grey(a).mean() + 0.5)), 1.0 + m))  # with the mean grey level


def _color(a: np.ndarray, m: float) -> np.ndarray:
    grey = _grey(a).reshape(*a.shape[:2], 1).astype(np.float32)            # blend with the image in grey
    return np.clip(np.trunc(grey + np.float32(1.0 + m) * (a - grey)), 0, 255).astype(np.uint8)


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13


def _sharpness(a: np.ndarray, m: float) -> np.ndarray:
    """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter of the image (border pixels left as they are)."""
    smooth = a.astype(np.float32)
    smooth[1:-1, 1:-1] = np.floor(cv2.filter2D(smooth, -1, _SMOOTH, borderType=cv2.BORDER_REPLICATE)[1:-1, 1:-1]
                                  + 0.5)
    return np.clip(np.trunc(smooth + np.float32(1.0 + m) * (a - smooth)), 0, 255).astype(np.uint8)


def _per_channel(a: np.ndarray, tables: list[np.ndarray]) -> np.ndarray:
    return cv2.LUT(a, np.stack(tables, axis=1).reshape(256, 1, len(tables)))


def _autocontrast(a: np.ndarray, _: float) -> np.ndarray:
    """ImageOps.autocontrast: stretch each channel to 0..255 (channels with a single value stay)."""
    tables = []
    for channel in cv2.split(a):
        lo, hi = cv2.minMaxLoc(channel)[:2]
        tables.append(_IDENTITY if hi <= lo else _stretch_table(int(lo), int(hi)))
    return _per_channel(a, tables)


def _equalize(a: np.ndarray, _: float) -> np.ndarray:
    """ImageOps.equalize: histogram equalisation per channel (a channel with one value, or whose values but the
    last fill under 255 pixels, stays)."""
    channels = a.shape[2]
    hist = np.bincount((a.reshape(-1, channels) + np.arange(0, 256 * channels, 256)).ravel(),
                       minlength=256 * channels).reshape(channels, 256)
    last = hist[np.arange(channels), 255 - np.argmax(hist[:, ::-1] > 0, axis=1)]
    step = (hist.sum(axis=1) - last) // 255
    keep = step == 0
    step[keep] = 1
    tables = (np.cumsum(hist, axis=1) - hist + (step // 2)[:, None]) // step[:, None]
    tables[keep] = _IDENTITY
    return cv2.LUT(a, np.ascontiguousarray(_table(tables).T).reshape(256, 1, channels))


_AUGMIX_OPS = (
    (lambda a, m: _affine(a, (1, m, -m * a.shape[0] / 2, 0, 1, 0)), _magnitudes(0.0, 0.3), True),     # shear x
    (lambda a, m: _affine(a, (1, 0, 0, m, 1, -m * a.shape[1] / 2)), _magnitudes(0.0, 0.3), True),     # shear y
    (lambda a, m: _affine(a, (1, 0, m * a.shape[1], 0, 1, 0)), _magnitudes(0.0, 1 / 3), True),         # translate x
    (lambda a, m: _affine(a, (1, 0, 0, 0, 1, m * a.shape[0])), _magnitudes(0.0, 1 / 3), True),         # translate y
    (_rotate, _magnitudes(0.0, 30.0), True),
    (_brightness, _magnitudes(0.0, 0.9), True),
    (_color, _magnitudes(0.0, 0.9), True),
    (_contrast, _magnitudes(0.0, 0.9), True),
    (_sharpness, _magnitudes(0.0, 0.9), True),
    (_posterize, np.maximum(1, 4 - np.round(np.arange(AUGMIX_MAX_SEVERITY) / 2.25)).astype(int), False),  # 4..1 bits
    (_solarize, _magnitudes(255.0, 0.0), False),
    (_autocontrast, None, False),
    (_equalize, None, False),
)


class AugMix(A.ImageOnlyTransform):
    """AugMix (Hendrycks et al. 2020) as an albumentations transform on HxWx3 uint8 arrays: `width` chains of
    `depth` random ops (-1: 1..3), chain weights from Dirichlet(alpha), blended with the image by
    Beta(alpha, alpha). torchvision's operation list and magnitude bins, run as PIL does them in numpy and cv2
    (faster than torchvision's tensor implementation on small images, which matters when images are augmented
    in the training process). All random draws come from the transform's numpy generator, which
    a reseeding Pipeline sets from the torch global RNG on every call."""

    def __init__(self, severity: int = 3, width: int = 3, depth: int = -1, alpha: float = 1.0, p: float = 1.0):
        super().__init__(p=p)
        self.severity = severity
        self.width = width
        self.depth = depth
        self.alpha = alpha

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        rng = self.random_generator
        # Every draw of the image at once: one numpy call each instead of one per op.
        depths = rng.integers(1, 4, size=self.width) if self.depth <= 0 else np.full(self.width, self.depth)
        count = int(depths.sum())
        ops, bins = rng.integers(len(_AUGMIX_OPS), size=count), rng.integers(self.severity, size=count)
        negative = rng.random(count) < 0.5
        weights = rng.dirichlet(np.full(self.width, float(self.alpha)))
        skip = float(rng.beta(self.alpha, self.alpha))
        img = np.ascontiguousarray(img)
        mix = np.float32(skip) * img.astype(np.float32)
        k = 0
        for w, depth in zip(weights, depths):
            x = img
            for _ in range(depth):
                fn, magnitudes, signed = _AUGMIX_OPS[ops[k]]
                m = 0.0 if magnitudes is None else float(magnitudes[bins[k]])
                x = fn(x, -m if signed and negative[k] else m)
                k += 1
            mix += np.float32((1.0 - skip) * w) * x
        return mix.astype(np.uint8)  # truncation, as torchvision

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("severity", "width", "depth", "alpha")


class ToTensor:
    """HxWxC float array (already normalised) to a CxHxW float32 tensor."""

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))


class Pipeline:
    """Apply an albumentations Compose to an RGB uint8 array and return a tensor (picklable for workers).

    With bgr=True the channels of the compose's (normalised) output are reversed, for networks trained on BGR
    input. With reseed=True the compose's generators are reseeded from the torch global RNG on every call, so the
    output depends only on the image and the torch seed (see the module docstring)."""

    def __init__(self, compose: A.Compose, bgr: bool = False, reseed: bool = True):
        self.compose = compose
        self.bgr = bgr
        self.reseed = reseed
        self.to_tensor = ToTensor()
        self._np_rng = np.random.Generator(np.random.PCG64(0))
        self._py_rng = random.Random(0)

    def _reseed(self) -> None:
        # Set the generators' state in place from four torch draws: much cheaper than building new generators
        # (SeedSequence hashing), which cost a third of the time of a small (32x32) pipeline.
        a, b, c, d = torch.randint(0, 2 ** 62, (4,)).tolist()
        self._np_rng.bit_generator.state = {"bit_generator": "PCG64", "has_uint32": 0, "uinteger": 0,
                                            "state": {"state": (a << 62) | b, "inc": (c << 62) | d | 1}}
        self._py_rng.seed(a ^ (c << 64) ^ d)
        self.compose.set_random_state(self._np_rng, self._py_rng)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if self.reseed:
            self._reseed()
        out = self.compose(image=image)["image"]
        if self.bgr:
            out = out[:, :, ::-1]
        return self.to_tensor(out)


def _rgb_order(values: Sequence[float], bgr: bool) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    return values[::-1] if bgr else values


def _normalize(mean: Sequence[float], std: Sequence[float]) -> A.Normalize:
    # mean/std on the 0..255 scale, in the compose's (RGB) channel order.
    return A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0)


def build_eval_transform(size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                         bgr: bool = False) -> Pipeline:
    """Resize to the model input (no crop, so nothing at the border is lost) and normalise."""
    h, w = size
    ops = [A.Resize(h, w, interpolation=cv2.INTER_LINEAR), _normalize(_rgb_order(mean, bgr), _rgb_order(std, bgr))]
    return Pipeline(A.Compose(ops), bgr=bgr, reseed=False)


def build_deploy_transform(size: Sequence[int], bgr: bool = False) -> Pipeline:
    """What a deployed (exported) model is fed: the eval resize, no normalisation (the graph does it),
    values 0..255 as float, channels in the model's input order."""
    h, w = size
    return Pipeline(A.Compose([A.Resize(h, w, interpolation=cv2.INTER_LINEAR)]), bgr=bgr, reseed=False)


def build_train_transform(size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                          aug: AugmentationConfig, bgr: bool = False) -> Pipeline:
    """Training pipeline in the module docstring's order; output always (3, h, w) float32. Validates `aug`."""
    aug.validate()
    h, w = size
    mean, std = _rgb_order(mean, bgr), _rgb_order(std, bgr)
    # Geometric.
    ops: list = [A.RandomResizedCrop(size=(h, w), scale=tuple(aug.random_resized_crop_scale))]
    if aug.hflip > 0:
        ops.append(A.HorizontalFlip(p=aug.hflip))
    if aug.vflip > 0:
        ops.append(A.VerticalFlip(p=aug.vflip))
    if aug.rotate_p > 0 and aug.rotate_limit > 0:
        ops.append(A.Rotate(limit=aug.rotate_limit, p=aug.rotate_p, border_mode=cv2.BORDER_REFLECT_101))
    # AugMix.
    if aug.augmix:
        ops.append(AugMix(severity=aug.augmix_severity, width=aug.augmix_width, depth=aug.augmix_depth,
                          alpha=aug.augmix_alpha, p=1.0))
    # Photometric.
    if aug.color_jitter_p > 0 and aug.color_jitter > 0:
        s = aug.color_jitter
        ops.append(A.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(0.5, s / 4), p=aug.color_jitter_p))
    if aug.posterize_p > 0:
        ops.append(A.Posterize(num_bits=aug.posterize_bits, p=aug.posterize_p))
    if aug.equalize_p > 0:
        ops.append(A.Equalize(mode="cv", by_channels=True, p=aug.equalize_p))
    if aug.blur_p > 0:
        ops.append(A.GaussianBlur(blur_limit=(3, aug.blur_limit), sigma_limit=(0.5, 3.0), p=aug.blur_p))
    if aug.noise_p > 0:
        ops.append(A.GaussNoise(std_range=(aug.noise_std, aug.noise_std), per_channel=True, p=aug.noise_p))
    # Cutout: square holes in pixels of the (already h x w) crop, at least one pixel, filled with the mean so
    # that they are ~0 after normalisation. (A float range would round 1.0 to a 1-pixel hole in albumentations.)
    if aug.cutout_p > 0:
        hole_h, hole_w = max(1, round(aug.cutout_size * h)), max(1, round(aug.cutout_size * w))
        fill = tuple(int(np.clip(round(m), 0, 255)) for m in mean)
        ops.append(A.CoarseDropout(num_holes_range=(aug.cutout_holes, aug.cutout_holes),
                                   hole_height_range=(hole_h, hole_h), hole_width_range=(hole_w, hole_w),
                                   fill=fill, p=aug.cutout_p))
    ops.append(_normalize(mean, std))
    return Pipeline(A.Compose(ops), bgr=bgr, reseed=True)
