"""Folder datasets: `<root>/<class>/<images>`, class indices in sorted folder-name order."""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import DataError
from .image import IMAGE_EXTENSIONS, UnreadableImageError, check_image, is_image_file, read_image


@dataclass
class DatasetScan:
    """The images of a dataset and their labels, whatever the layout they were read from.

    `samples` holds (path, label) pairs: the label is a class index, or with `multilabel` a tuple of
    class indices. `unlabeled` lists images the annotations name without a label (not in `samples`);
    `source` says where the scan came from (e.g. "list file X under ROOT").
    """
    root: Path
    classes: list[str]
    samples: list[tuple[str, int | tuple[int, ...]]]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of unreadable files
    multilabel: bool = False
    unlabeled: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        if not self.source:
            self.source = f"class folders under {self.root}"

    def counts(self) -> list[int]:
        """Images per class; a multi-label image counts once for each of its labels."""
        counts = [0] * len(self.classes)
        for _, label in self.samples:
            for index in (label if isinstance(label, (tuple, list)) else (label,)):
                counts[index] += 1
        return counts


def _label_indices(label: int | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in label) if isinstance(label, (tuple, list)) else (int(label),)


def format_names(names: Sequence[str], limit: int = 10) -> str:
    """At most `limit` names for a message, with the total when there are more."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def select_classes(scan: DatasetScan, names: Sequence[str], what: str = "--classes") -> DatasetScan:
    """A new scan restricted to the classes `names`, in that order (labels remapped to it).

    Images of other classes are dropped; a multi-label image loses its other labels and is dropped
    only when none is left. `what` names the option the names came from, for the error messages.
    """
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise DataError(f"{what}: no class given")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"{what}: class '{name}' is given twice")
        seen.add(name)
    unknown = [name for name in names if name not in scan.classes]
    if unknown:
        raise DataError(f"{what}: unknown class{'es' if len(unknown) > 1 else ''} "
                        f"{', '.join(repr(n) for n in unknown)} in {scan.source} "
                        f"(its classes: {format_names(scan.classes)})")
    new_index = {scan.classes.index(name): i for i, name in enumerate(names)}
    samples: list[tuple[str, int | tuple[int, ...]]] = []
    for path, label in scan.samples:
        if scan.multilabel or isinstance(label, (tuple, list)):
            kept = sorted({new_index[old] for old in _label_indices(label) if old in new_index})
            if kept:
                samples.append((path, tuple(kept)))
        elif label in new_index:
            samples.append((path, new_index[label]))
    if not samples:
        raise DataError(f"{what}: no image of {format_names(names)} in {scan.source}")
    return DatasetScan(root=scan.root, classes=names, samples=samples, skipped=list(scan.skipped),
                      multilabel=scan.multilabel, unlabeled=list(scan.unlabeled),
                      source=f"{scan.source}; classes {format_names(names)}")


def _image_files(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively and sorted, leaving out hidden files and folders."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def scan_folder(root: str | os.PathLike, verify: bool = True) -> DatasetScan:
    """List the images of a class-folder dataset.

    Unreadable image files are skipped and reported in `skipped` (never fatal on their own);
    a missing root, a root without class folders, an empty class folder or a root without any
    readable image is a DataError that names the path.
    """
    if root is None or str(root) == "":
        raise DataError("no data root given")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data root {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data root {root} is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        loose = [p for p in root.iterdir() if p.is_file() and is_image_file(p)]
        hint = " (it holds images directly: put them into one sub-folder per class)" if loose else ""
        raise DataError(f"data root {root} has no class sub-folders{hint}")

    samples: list[tuple[str, int]] = []
    skipped: list[tuple[str, str]] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        files = _image_files(root / name)
        n_before = len(samples)
        for path in files:
            reason = check_image(path) if verify else None
            if reason is None:
                samples.append((str(path), label))
            else:
                skipped.append((str(path), reason))
        if len(samples) == n_before:
            empty.append(name)
    if len(empty) == len(classes):
        raise DataError(f"data root {root} holds no readable images"
                        + (f" ({len(skipped)} unreadable files, e.g. {skipped[0][0]})" if skipped else ""))
    if empty:
        raise DataError(f"data root {root}: class folder(s) with no readable images: {', '.join(empty)}")
    return DatasetScan(root=root, classes=classes, samples=samples, skipped=skipped)


def list_images(path: str | os.PathLike, verify: bool = True) -> tuple[list[str], list[tuple[str, str]]]:
    """One image file, or every image under a folder (recursively, sorted, hidden entries left out).

    Returns (readable paths, skipped (path, reason) pairs); nothing readable is a DataError naming `path`.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.is_file():
        if not is_image_file(path):
            raise DataError(f"{path} is not an image file (known extensions: {', '.join(IMAGE_EXTENSIONS)})")
        candidates = [path]
    else:
        candidates = _image_files(path)
    files, skipped = [], []
    for file in candidates:
        reason = check_image(file) if verify else None
        if reason is None:
            files.append(str(file))
        else:
            skipped.append((str(file), reason))
    if not files:
        raise DataError(f"{path}: no readable image" + (f" ({len(skipped)} unreadable, e.g. {skipped[0][0]}: "
                                                         f"{skipped[0][1]})" if skipped else ""))
    return files, skipped


def check_same_classes(reference: list[str], other: list[str], reference_name: str, other_name: str) -> None:
    """Raise a DataError naming the classes that differ between two datasets (or a dataset and a checkpoint)."""
    if list(reference) == list(other):
        return
    missing = sorted(set(reference) - set(other))
    extra = sorted(set(other) - set(reference))
    parts = []
    if missing:
        parts.append(f"missing in {other_name}: {', '.join(missing)}")
    if extra:
        parts.append(f"not in {reference_name}: {', '.join(extra)}")
    if not parts:
        parts.append("same names in a different order")
    raise DataError(f"classes of {other_name} do not match {reference_name} ({'; '.join(parts)})")


def decoded_bytes(paths: Iterable[str]) -> int:
    """Memory the images would take decoded to RGB (from their headers; an unreadable file counts as 0)."""
    total = 0
    for path in paths:
        try:
            with Image.open(path) as img:
                width, height = img.size
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            continue
        total += width * height * 3
    return total


def decode_all(paths: list[str]) -> list[np.ndarray | None]:
    """Every image decoded (None where decoding fails), in threads: PIL releases the GIL while decoding."""
    def decode(path: str) -> np.ndarray | None:
        try:
            return read_image(path)
        except UnreadableImageError:
            return None
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(decode, paths))


class ImageDataset(Dataset):
    """(path, label) samples decoded to RGB arrays and passed through `transform`.

    With `multilabel` the label comes out as a float32 multi-hot vector of len(classes) (from a class
    index or a tuple of them), so batches collate to (N, C) targets.

    A file that was readable at scan time but fails to decode later is skipped: the next sample
    is returned instead and the path is reported once as a warning.

    `cache_bytes`: when every image decoded fits in this many bytes, they are all decoded once, here (in
    threads), and kept in memory; loader worker processes forked later share them, so no epoch decodes
    a file again. Small datasets then cost only their augmentation per epoch.
    """

    def __init__(self, samples: list[tuple[str, int | tuple[int, ...]]], classes: list[str],
                 transform: Callable[[np.ndarray], object] | None = None, multilabel: bool = False,
                 cache_bytes: int = 0):
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform
        self.multilabel = multilabel
        self._reported: set[str] = set()
        self._cache: list[np.ndarray | None] | None = None
        if cache_bytes > 0 and self.samples and decoded_bytes(p for p, _ in self.samples) <= cache_bytes:
            self._cache = decode_all([p for p, _ in self.samples])
        if multilabel:
            for path, label in self.samples:
                bad = [i for i in _label_indices(label) if not 0 <= i < len(self.classes)]
                if bad:
                    raise DataError(f"{path}: label {bad[0]} is out of range for {len(self.classes)} classes")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int | tuple[int, ...]]:
        return [label for _, label in self.samples]

    def _target(self, label: int | tuple[int, ...]):
        if not self.multilabel:
            return label
        hot = torch.zeros(len(self.classes), dtype=torch.float32)
        hot[list(_label_indices(label))] = 1.0
        return hot

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            path, label = self.samples[i]
            try:
                image = self._cache[i] if self._cache is not None else read_image(path)
                if image is None:
                    image = read_image(path)  # failed when cached: raises again, with the reason
            except UnreadableImageError as exc:
                if path not in self._reported:
                    self._reported.add(path)
                    warnings.warn(f"skipping {exc}", stacklevel=2)
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, self._target(label)
        raise DataError("none of the dataset's images can be decoded")
