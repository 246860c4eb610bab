"""Decode any image file PIL understands into an 8-bit RGB array, honouring EXIF orientation."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


class UnreadableImageError(Exception):
    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def is_image_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: rescale the value range to 0..255 rather than clipping.
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        # Round, not truncate: float32 error would otherwise turn the brightest value into 254.
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels become white, as most viewers show them.
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Return an HxWx3 uint8 RGB array; raise UnreadableImageError with the path on failure."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return np.asarray(_to_rgb(img), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UnreadableImageError(path, f"not a readable image ({exc.__class__.__name__}: {exc})") from None


def check_image(path: str | os.PathLike) -> str | None:
    """Cheap validity check used when scanning a dataset: None if PIL can parse the file, else the reason."""
    try:
        with Image.open(path) as img:
            img.verify()
        return None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"not a readable image ({exc.__class__.__name__}: {exc})"
