"""Training augmentation and evaluation preprocessing: shapes, exact normalisation, each op, seeds, pickling."""
from __future__ import annotations

import dataclasses
import pickle
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from clsengine.data import AugmentationConfig, build_eval_transform, build_train_transform
from clsengine.errors import UserError

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
SIZE = (24, 32)                 # (h, w), deliberately not square
OFF = dict(random_resized_crop_scale=(1.0, 1.0), hflip=0.0)   # everything off, crop keeps the whole image


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def textured(h: int = 30, w: int = 40, seed: int = 0, low: int = 60, high: int = 190) -> np.ndarray:
    """A gradient plus noise, low contrast (so equalisation has something to stretch), RGB uint8."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, w)[None, :, None] * np.array([1.0, 0.5, -0.5])
    image = low + (high - low) * (0.5 + 0.3 * ramp + 0.2 * rng.random((h, w, 3)))
    return np.clip(image, 0, 255).astype(np.uint8)


def train(seed: int = 0, bgr: bool = False, mean=MEAN, std=STD, size=SIZE, image=None, **fields) -> torch.Tensor:
    pipeline = build_train_transform(size, mean, std, AugmentationConfig(**{**OFF, **fields}), bgr=bgr)
    seed_all(seed)
    return pipeline(textured() if image is None else image)


def pixels(out: torch.Tensor, mean=MEAN, std=STD) -> np.ndarray:
    """Undo normalisation: HxWx3 values on the 0..255 scale, rounded."""
    chw = out.double().numpy() * np.array(std)[:, None, None] + np.array(mean)[:, None, None]
    return np.round(chw.transpose(1, 2, 0), 3)


def test_eval_transform_exact_on_constant_image():
    colour = (200, 100, 30)
    image = np.empty((37, 53, 3), dtype=np.uint8)
    image[:] = colour
    out = build_eval_transform(SIZE, MEAN, STD)(image)
    assert out.shape == (3, *SIZE) and out.dtype == torch.float32
    for c in range(3):
        expected = (colour[c] - MEAN[c]) / STD[c]
        assert torch.allclose(out[c], torch.full(SIZE, expected), atol=1e-6), c


def test_train_all_ops_on_keeps_shape_dtype_finite():
    aug = AugmentationConfig(random_resized_crop_scale=(0.3, 1.0), hflip=0.5, vflip=0.5, rotate_limit=30,
                             rotate_p=1.0, color_jitter=0.4, color_jitter_p=1.0, posterize_p=1.0, equalize_p=1.0,
                             noise_p=1.0, blur_p=1.0, blur_limit=7, cutout_p=1.0, cutout_holes=3, cutout_size=0.3,
                             augmix=True)
    pipeline = build_train_transform(SIZE, MEAN, STD, aug)
    rng = np.random.default_rng(1)
    seed_all(1)
    for _ in range(20):
        h, w = rng.integers(8, 90, size=2)
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        out = pipeline(image)
        assert out.shape == (3, *SIZE) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_train_with_everything_off_equals_eval():
    for image in (textured(30, 40), textured(37, 29, seed=3)):   # aspect ratios within RandomResizedCrop's range
        expected = build_eval_transform(SIZE, MEAN, STD)(image)
        assert torch.equal(train(image=image), expected)


def test_defaults_add_only_the_existing_ops():
    pipeline = build_train_transform(SIZE, MEAN, STD, AugmentationConfig())
    names = [type(t).__name__ for t in pipeline.compose.transforms]
    assert names == ["RandomResizedCrop", "HorizontalFlip", "Normalize"]


def test_posterize_keeps_top_bits():
    base, out = train(), train(posterize_p=1.0, posterize_bits=3)
    assert not torch.equal(out, base)
    values = pixels(out)
    assert np.all(values == np.round(values)) and np.all(values % 32 == 0)


def test_equalize_stretches_a_low_contrast_image():
    base, out = train(), train(equalize_p=1.0)
    assert not torch.equal(out, base)
    before, after = pixels(base), pixels(out)
    assert before.max() - before.min() < 160
    for c in range(3):
        assert after[..., c].min() <= 10 and after[..., c].max() == 255


def test_noise_has_the_configured_std():
    image = np.full((60, 80, 3), 128, dtype=np.uint8)
    base, out = train(image=image, size=(60, 80)), train(image=image, size=(60, 80), noise_p=1.0, noise_std=0.04)
    diff = pixels(out) - pixels(base)
    assert abs(diff.mean()) < 1.0
    assert 0.8 * 0.04 * 255 < diff.std() < 1.2 * 0.04 * 255


def test_blur_smooths():
    base, out = train(), train(blur_p=1.0, blur_limit=5)
    assert not torch.equal(out, base)
    def variation(t: torch.Tensor) -> float:
        return float(t.diff(dim=1).abs().mean() + t.diff(dim=2).abs().mean())
    assert variation(out) < 0.8 * variation(base)


def test_cutout_fills_holes_with_the_mean():
    base, out = train(), train(cutout_p=1.0, cutout_holes=1, cutout_size=0.25)
    assert not torch.equal(out, base)
    fill = np.array([round(m) for m in MEAN], dtype=float)
    filled = np.all(pixels(out) == fill, axis=-1)
    hole = round(0.25 * SIZE[0]) * round(0.25 * SIZE[1])
    assert filled.sum() == hole
    ys, xs = np.nonzero(filled)
    assert (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1) == hole       # one rectangle
    assert np.abs(out.numpy()[:, filled]).max() < 0.01                          # ~0 after normalisation
    assert torch.equal(out[:, ~torch.from_numpy(filled)], base[:, ~torch.from_numpy(filled)])


@pytest.mark.parametrize("fields", [dict(rotate_limit=30, rotate_p=1.0), dict(color_jitter=0.4, color_jitter_p=1.0),
                                    dict(hflip=1.0), dict(vflip=1.0), dict(random_resized_crop_scale=(0.3, 0.5))])
def test_existing_ops_change_the_image(fields):
    assert not torch.equal(train(**fields), train())


def test_augmix_changes_image_and_is_reproducible():
    base = train()
    out = train(augmix=True)
    assert out.shape == (3, *SIZE) and out.dtype == torch.float32
    assert not torch.equal(out, base)
    assert torch.equal(train(augmix=True), out)                          # same seeds, fresh pipeline
    assert not torch.equal(train(seed=1, augmix=True), out)
    outs = [train(seed=s, augmix=True, augmix_width=1, augmix_depth=1, augmix_severity=10) for s in range(4)]
    assert all(o.shape == (3, *SIZE) for o in outs)


def test_bgr_reverses_channels():
    image = textured()
    rgb = build_eval_transform(SIZE, MEAN, STD)(image)
    bgr = build_eval_transform(SIZE, MEAN[::-1], STD[::-1], bgr=True)(image)    # mean/std in network order
    assert torch.equal(bgr, rgb.flip(0))
    # Colour ops see RGB whatever the network order, so an augmented BGR sample is the RGB one reversed.
    fields = dict(color_jitter=0.4, color_jitter_p=1.0, augmix=True, cutout_p=1.0, noise_p=1.0)
    out_rgb = train(seed=3, **fields)
    out_bgr = train(seed=3, bgr=True, mean=MEAN[::-1], std=STD[::-1], **fields)
    assert torch.allclose(out_bgr, out_rgb.flip(0), atol=1e-6)


def test_pipeline_pickles_and_follows_global_seeds():
    aug = AugmentationConfig(rotate_limit=20, rotate_p=0.5, color_jitter=0.3, color_jitter_p=0.5, posterize_p=0.3,
                             noise_p=0.5, blur_p=0.3, cutout_p=0.5, augmix=True)
    pipeline = build_train_transform(SIZE, MEAN, STD, aug)
    copy = pickle.loads(pickle.dumps(pipeline))
    image = textured()
    seed_all(7)
    first = [pipeline(image) for _ in range(3)]
    seed_all(7)
    again = [copy(image) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # A separately built pipeline (its own albumentations generators) follows the same seeds too.
    other = build_train_transform(SIZE, MEAN, STD, aug)
    seed_all(7)
    assert torch.equal(other(image), first[0])
    assert not torch.equal(first[0], first[1])


class Repeated(Dataset):
    def __init__(self, image: np.ndarray, transform, n: int):
        self.image, self.transform, self.n = image, transform, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.image)


def test_dataloader_workers_differ_and_repeat_with_the_seed():
    aug = AugmentationConfig(random_resized_crop_scale=(0.3, 1.0), rotate_limit=30, rotate_p=1.0, noise_p=1.0)
    dataset = Repeated(textured(), build_train_transform((16, 16), MEAN, STD, aug), n=8)

    def epoch(seed: int) -> torch.Tensor:
        loader = DataLoader(dataset, batch_size=2, num_workers=2, generator=torch.Generator().manual_seed(seed))
        return torch.cat(list(loader))

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Workers 0 and 1 take alternate batches; their augmentation streams must not repeat each other.
    assert not torch.equal(a[0:2], a[2:4])
    assert len({tuple(x.flatten()[:50].tolist()) for x in a}) == len(a)


def test_default_config_is_valid_and_builds_a_pipeline_that_keeps_the_input_size():
    config = AugmentationConfig()
    assert config.validate() is None
    image = np.random.default_rng(0).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    out = build_train_transform((32, 32), [0.0] * 3, [255.0] * 3, config)(image)
    assert tuple(out.shape) == (3, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("field, value", [
    ("hflip", 1.5), ("vflip", -0.1), ("rotate_p", 2), ("color_jitter_p", float("nan")), ("posterize_p", -0.1),
    ("equalize_p", 1.01), ("noise_p", 3.0), ("blur_p", -1.0), ("cutout_p", 2.0), ("augmix_severity", 0),
    ("augmix_severity", 11), ("augmix_width", 0), ("augmix_depth", 0), ("augmix_depth", -2), ("augmix_alpha", 0.0),
    ("augmix", "yes"), ("posterize_bits", 8), ("posterize_bits", 0), ("noise_std", 0.0), ("noise_std", 1.5),
    ("blur_limit", 4), ("blur_limit", 1), ("cutout_holes", 0), ("cutout_size", 0.0), ("cutout_size", 1.5),
    ("random_resized_crop_scale", (0.8, 0.5)), ("random_resized_crop_scale", (0.0, 1.0)),
    ("rotate_limit", -5.0), ("color_jitter", -0.1), ("augmix_severity", 5.0),
])
def test_invalid_config_names_the_field(field, value):
    aug = dataclasses.replace(AugmentationConfig(), **{field: value})
    with pytest.raises(UserError, match=field):
        build_train_transform(SIZE, MEAN, STD, aug)


def _pil_reference(index: int, image: np.ndarray, m: float) -> np.ndarray:
    """torchvision's AugMix op `index` (its _AUGMIX_OPS order) done with PIL: what ours must reproduce."""
    from PIL import Image, ImageEnhance, ImageOps
    pil = Image.fromarray(image)
    w, h = pil.size

    def affine(matrix):
        return pil.transform(pil.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.NEAREST)
    ops = [lambda: affine((1, m, -m * h / 2, 0, 1, 0)), lambda: affine((1, 0, 0, m, 1, -m * w / 2)),
           lambda: affine((1, 0, m * w, 0, 1, 0)), lambda: affine((1, 0, 0, 0, 1, m * h)),
           lambda: pil.rotate(m, resample=Image.Resampling.NEAREST),
           lambda: ImageEnhance.Brightness(pil).enhance(1 + m), lambda: ImageEnhance.Color(pil).enhance(1 + m),
           lambda: ImageEnhance.Contrast(pil).enhance(1 + m), lambda: ImageEnhance.Sharpness(pil).enhance(1 + m),
           lambda: ImageOps.posterize(pil, int(m)), lambda: ImageOps.solarize(pil, m),
           lambda: ImageOps.autocontrast(pil), lambda: ImageOps.equalize(pil)]
    return np.asarray(ops[index]())


def _assert_off_by_one_pixel(ours: np.ndarray, reference: np.ndarray, what) -> None:
    """Every pixel of `ours` is the reference's pixel there or at a neighbour (a tie rounded the other way),
    or black where the other is black (the image's edge moved by one pixel); the outermost pixels, whose
    neighbour may lie outside, are left out."""
    padded = np.pad(reference, ((1, 1), (1, 1), (0, 0)))
    h, w = ours.shape[:2]
    near = (reference == 0).all(axis=2) | (ours == 0).all(axis=2)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            near |= (padded[dy:dy + h, dx:dx + w] == ours).all(axis=2)
    assert near[1:-1, 1:-1].all(), what


@pytest.mark.parametrize("shape", [(32, 32, 3), (21, 38, 3)])
def test_augmix_ops_reproduce_pil(shape):
    from clsengine.data.transforms import _AUGMIX_OPS
    rng = np.random.default_rng(1)
    images = [textured(*shape[:2]), (rng.random(shape) * 255).astype(np.uint8)]
    flat = np.zeros(shape, dtype=np.uint8)
    flat[..., 0], flat[..., 1], flat[:1, :1, 2] = 77, 200, 9       # one-valued channels, a nearly flat one
    images.append(flat)
    assert len(_AUGMIX_OPS) == 13
    for index, (op, magnitudes, signed) in enumerate(_AUGMIX_OPS):
        for m in ([0.0] if magnitudes is None else [float(v) for v in magnitudes[::3]]):
            for value in ([m, -m] if signed else [m]):
                for image in images:
                    ours, pil = op(image, value), _pil_reference(index, image, value)
                    assert ours.shape == image.shape and ours.dtype == np.uint8
                    if index <= 4:   # warps: equal but where a source coordinate falls exactly on a pixel edge
                        assert (ours == pil).all(axis=2).mean() > 0.85, (index, value)
                        _assert_off_by_one_pixel(ours, pil, (index, value))
                    else:            # per-value tables and blends: PIL's exact numbers
                        assert np.array_equal(ours, pil), (index, value)


def test_augmix_blends_the_image_with_its_chains(monkeypatch):
    from clsengine.data import transforms
    # With one op (inversion), every chain is 255 - image, so out = skip * image + (1 - skip) * (255 - image)
    # for one skip weight per call: the chain weights must sum to 1 and skip lie in [0, 1].
    monkeypatch.setattr(transforms, "_AUGMIX_OPS", ((lambda a, m: 255 - a, None, False),))
    image = textured(32, 32)
    augmix = transforms.AugMix(severity=3, width=3, depth=-1)
    augmix.set_random_seed(0)
    skips = []
    for _ in range(8):
        out = augmix.apply(image).astype(np.float64)
        spread = 255.0 - 2 * image.astype(np.float64)          # out - image = (1 - skip) * spread
        far = np.abs(spread) > 50
        skip = 1 - np.median((out - image)[far] / spread[far])
        assert 0 <= skip <= 1
        expected = skip * image + (1 - skip) * (255.0 - image)
        assert np.abs(out - expected).max() <= 1.5              # truncation to uint8, float32 sums
        skips.append(skip)
    assert np.ptp(skips) > 0.1                                  # skip is drawn afresh on every call


# ------------------------------------------------------------------------------------- MixUp / CutMix
def test_batch_mix_off_by_default_and_soft_targets_when_on():
    import torch

    from clsengine.data import build_batch_mix

    assert build_batch_mix(AugmentationConfig(), 4) is None
    assert build_batch_mix(AugmentationConfig(mixup_alpha=0.2, mix_p=0.0), 4) is None
    torch.manual_seed(0)
    images, labels = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    for aug in (AugmentationConfig(mixup_alpha=0.4), AugmentationConfig(cutmix_alpha=1.0),
                AugmentationConfig(mixup_alpha=0.2, cutmix_alpha=1.0, mix_p=0.5)):
        mixed, soft = build_batch_mix(aug, 4)(images, labels)
        assert mixed.shape == images.shape and soft.shape == (6, 4)
        assert torch.allclose(soft.sum(1), torch.ones(6))
    # MixUp: each image is a convex blend of itself and another of the batch, with the targets' weights.
    torch.manual_seed(1)
    mixed, soft = build_batch_mix(AugmentationConfig(mixup_alpha=0.4), 4)(images, labels)
    lam = float(soft[0, labels[0]])      # image 0 (class 0) is paired with the previous one, image 5 (class 1)
    assert 0 < lam < 1 and float(soft[0, labels[5]]) == pytest.approx(1 - lam)
    assert torch.allclose(mixed[0], lam * images[0] + (1 - lam) * images[5], atol=1e-5)
    # Reproducible from the seed (resumed runs mix the same way).
    torch.manual_seed(3)
    first = build_batch_mix(AugmentationConfig(cutmix_alpha=1.0), 4)(images, labels)
    torch.manual_seed(3)
    second = build_batch_mix(AugmentationConfig(cutmix_alpha=1.0), 4)(images, labels)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_batch_mix_alpha_validated():
    with pytest.raises(UserError, match="mixup_alpha must be >= 0"):
        AugmentationConfig(mixup_alpha=-1.0).validate()
    with pytest.raises(UserError, match="mix_p must be a probability"):
        AugmentationConfig(mix_p=2.0).validate()
