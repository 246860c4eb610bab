"""Folder datasets: `<root>/<class>/<images>`, class indices in sorted folder-name order."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from torch.utils.data import Dataset

from ..errors import DataError
from .image import IMAGE_EXTENSIONS, UnreadableImageError, check_image, is_image_file, read_image


@dataclass
class FolderScan:
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


def _image_files(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively and sorted, leaving out hidden files and folders."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def scan_folder(root: str | os.PathLike, verify: bool = True) -> FolderScan:
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
    return FolderScan(root=root, classes=classes, samples=samples, skipped=skipped)


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


class ImageDataset(Dataset):
    """(path, label) samples decoded to RGB arrays and passed through `transform`.

    A file that was readable at scan time but fails to decode later is skipped: the next sample
    is returned instead and the path is reported once as a warning.
    """

    def __init__(self, samples: list[tuple[str, int]], classes: list[str],
                 transform: Callable[[np.ndarray], object] | None = None):
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = read_image(path)
            except UnreadableImageError as exc:
                if path not in self._reported:
                    self._reported.add(path)
                    warnings.warn(f"skipping {exc}", stacklevel=2)
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, label
        raise DataError("none of the dataset's images can be decoded")
