"""Datasets described by annotation files, scanned into the same `DatasetScan` as class folders.

Formats:
- class-id map: text lines `id name` (ids 0..N-1 each once, any order; the name is everything after the
  first whitespace), or JSON: a list of names, `{"0": name, ...}` or `{name: 0, ...}`;
- PaddleClas label list: one `relative/path label` line per image under an image root; the label is a class
  index or a class name, several labels separated by commas (`a.jpg 0,3`) make a multi-label dataset;
- COCO JSON (Abyss classification): image-level labels are annotations without positive-area geometry
  (no bbox or a zero-area one, and no segmentation or a zero-area polygon), or - legacy - an annotation
  whose `caption` holds comma-separated category names; several labels per image make it multi-label;
- category map JSON `{"category_id": logit_index}`: selects categories and may merge several into one logit.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

from ..errors import DataError
from ..fileio import load_json
from .folder import DatasetScan, format_names, scan_folder
from .image import check_image, is_image_file

PathLike = Union[str, os.PathLike]

# `path label`, `path a,b` or `path a, b`: the label group is the trailing run of comma-separated tokens,
# the path everything before it (so paths may contain spaces).
_LIST_LINE = re.compile(r"^(?P<path>.*?)\s+(?P<labels>[^\s,]+(?:\s*,\s*[^\s,]+)*)\s*$")
_INT = re.compile(r"^[+-]?\d+$")


# --------------------------------------------------------------------------- file reading


def _keep_if_readable(path: Path, indices: list[int], multilabel: bool, verify: bool,
                      samples: list[tuple[str, int | tuple[int, ...]]], skipped: list[tuple[str, str]]) -> None:
    """Add one labelled image to `samples`, or to `skipped` with the reason when `verify` finds it unreadable."""
    reason = check_image(path) if verify else None
    if reason is not None:
        skipped.append((str(path), reason))
    else:
        samples.append((str(path), tuple(indices) if multilabel else indices[0]))


def _read_lines(path: Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file (a BOM is tolerated); a DataError names the file (and line) otherwise."""
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"{what} {path}:{line}: not UTF-8 text ({exc.reason})") from None
    return text.splitlines()


def _is_json_file(path: Path) -> bool:
    if path.suffix.lower() == ".json":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8-sig", errors="ignore").lstrip()
    except OSError:
        return False
    return head[:1] in ("[", "{")


def _resolve_root(root: PathLike | None, ann_file: Path) -> Path:
    """The image root: `root`, or the annotation file's folder when none is given."""
    if root is None or str(root) == "":
        return ann_file.parent
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} " + ("is not a directory" if root.exists() else "does not exist"))
    return root


# --------------------------------------------------------------------------- class-id map


def _class_names_from_json(path: Path) -> list[str]:
    data = load_json(path, "class-id file")
    if isinstance(data, list) and data and all(isinstance(v, (str, int)) for v in data):
        return [str(v) for v in data]
    if isinstance(data, dict) and data:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
            by_id = {int(v): str(k) for k, v in data.items()}
        elif all(str(k).lstrip("-").isdigit() for k in data):
            by_id = {int(k): str(v) for k, v in data.items()}
        else:
            raise DataError(f"class-id file {path}: expected {{\"0\": name, ...}} or {{name: 0, ...}}")
        if sorted(by_id) != list(range(len(by_id))) or len(by_id) != len(data):
            raise DataError(f"class-id file {path}: class ids must be 0..{len(data) - 1}, each once; "
                            f"got {sorted(by_id)[:10]}")
        return [by_id[i] for i in range(len(by_id))]
    raise DataError(f"class-id file {path}: expected a non-empty JSON list of names or an id/name object")


def _class_names_from_text(path: Path) -> list[str]:
    by_id: dict[int, tuple[str, int]] = {}   # id -> (name, line)
    by_name: dict[str, int] = {}             # name -> line
    for number, raw in enumerate(_read_lines(path, "class-id file"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or not _INT.match(parts[0]):
            raise DataError(f"class-id file {path}:{number}: expected 'id name', got {line!r}")
        index, name = int(parts[0]), parts[1].strip()
        if index < 0:
            raise DataError(f"class-id file {path}:{number}: class id {index} is negative")
        if index in by_id:
            raise DataError(f"class-id file {path}:{number}: class id {index} given twice "
                            f"(first on line {by_id[index][1]})")
        if name in by_name:
            raise DataError(f"class-id file {path}:{number}: class name {name!r} given twice "
                            f"(first on line {by_name[name]})")
        by_id[index] = (name, number)
        by_name[name] = number
    if not by_id:
        raise DataError(f"class-id file {path}: no 'id name' line")
    missing = sorted(set(range(len(by_id))) - set(by_id))
    if missing:
        beyond = max(by_id)
        raise DataError(f"class-id file {path}:{by_id[beyond][1]}: class ids must be 0..{len(by_id) - 1}, each "
                        f"once; id {beyond} given but {', '.join(map(str, missing[:10]))} missing")
    return [by_id[i][0] for i in range(len(by_id))]


def read_class_names(path: PathLike) -> list[str]:
    """Class names in index order from a class-id map.

    Text: `id name` lines (ids 0..N-1 each once, any order; blank lines and `#` comments skipped; the name is
    everything after the first whitespace). JSON (a `.json` file, or one starting with `[`/`{`): a list of
    names, `{"0": name, ...}` or `{name: 0, ...}`. Errors are DataErrors naming the file (and line).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"class-id file {path} does not exist")
    return _class_names_from_json(path) if _is_json_file(path) else _class_names_from_text(path)


# --------------------------------------------------------------------------- PaddleClas label list


def scan_annotation_list(ann_file: PathLike, root: PathLike | None, classes: list[str] | None = None,
                         verify: bool = True) -> DatasetScan:
    """Scan a PaddleClas-style list: one `relative/path label` line per image under `root`.

    The label is the text after the last whitespace (paths may contain spaces; a name from `classes` that
    contains spaces is also recognised whole at the end of a line); blank lines and `#`
    comments are skipped; `root` defaults to the list file's folder. A label is a class index or a class
    name; labels separated by commas (`a.jpg 0,3`, `a.jpg cat, dog`) make the whole scan multi-label (labels
    become sorted tuples of distinct indices). Classes: `classes` when given (e.g. from `read_class_names`;
    an integer label is an index into it, else it is looked up by name), else `["0", ..., "MAX"]` when
    every label is an integer (an index no line uses is a class with zero images), else the sorted set of
    label names. Duplicate lines are kept as given.

    A missing image file, an unknown label or a line without a label is a DataError naming `ann_file:LINE`;
    files that exist but cannot be decoded are skipped and listed in `skipped` (as `scan_folder` does).
    """
    ann_file = Path(ann_file).expanduser()
    lines = _read_lines(ann_file, "annotation list")
    root = _resolve_root(root, ann_file)

    # Class names with spaces (from a class-id map) are recognised as a whole at the end of a line.
    spaced = sorted((str(c) for c in classes or () if len(str(c).split()) > 1), key=len, reverse=True)
    entries: list[tuple[int, str, list[str]]] = []   # (line number, relative path, label tokens)
    multilabel = False
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name = next((c for c in spaced if line.endswith(c) and line[:-len(c)][-1:].isspace()
                     and line[:-len(c)].strip()), None)
        if name is not None:
            entries.append((number, line[:-len(name)].strip(), [name]))
            continue
        match = _LIST_LINE.match(line)
        if match is None or is_image_file(match["labels"].split(",")[-1].strip()):
            raise DataError(f"{ann_file}:{number}: expected 'relative/path label', got {line!r}")
        tokens = [t.strip() for t in match["labels"].split(",")]
        multilabel = multilabel or "," in match["labels"]
        entries.append((number, match["path"], tokens))
    if not entries:
        raise DataError(f"{ann_file}: no 'relative/path label' line")

    all_tokens = [t for _, _, tokens in entries for t in tokens]
    by_index = True   # integer tokens are indices into `classes` (else labels are names only)
    if classes is not None:
        classes = [str(c) for c in classes]
        if not classes:
            raise DataError(f"{ann_file}: the class list given is empty")
    elif all(t.isascii() and t.isdigit() for t in all_tokens):
        classes = [str(i) for i in range(max(int(t) for t in all_tokens) + 1)]
    else:
        classes = sorted(set(all_tokens))
        by_index = False
    names: dict[str, int] = {}
    for i, name in enumerate(classes):
        names.setdefault(name, i)

    def index_of(token: str, number: int) -> int:
        if by_index and token.isascii() and token.isdigit() and int(token) < len(classes):
            return int(token)
        if token in names:
            return names[token]
        if by_index and _INT.match(token):
            raise DataError(f"{ann_file}:{number}: label {token} is not a class index "
                            f"(0..{len(classes) - 1}) nor a class name")
        raise DataError(f"{ann_file}:{number}: unknown label {token!r} (classes: {format_names(classes)})")

    samples: list[tuple[str, int | tuple[int, ...]]] = []
    skipped: list[tuple[str, str]] = []
    for number, relative, tokens in entries:
        indices = sorted({index_of(t, number) for t in tokens})
        path = root / relative
        if not path.is_file():
            raise DataError(f"{ann_file}:{number}: image file {path} does not exist")
        _keep_if_readable(path, indices, multilabel, verify, samples, skipped)
    if not samples:
        raise DataError(f"{ann_file}: none of its {len(entries)} images is readable "
                        f"(e.g. {skipped[0][0]}: {skipped[0][1]})")
    return DatasetScan(root=root, classes=classes, samples=samples, skipped=skipped, multilabel=multilabel,
                      source=f"list file {ann_file} under {root}")


# --------------------------------------------------------------------------- COCO


def _check_category_map(mapping: Mapping, where: str) -> dict[int, int]:
    """{category id: logit} with int-like keys, int values >= 0 and logits 0..K-1 without gaps."""
    if not isinstance(mapping, Mapping) or not mapping:
        raise DataError(f"{where}: expected a non-empty JSON object {{\"category_id\": logit_index, ...}}")
    result: dict[int, int] = {}
    for key, value in mapping.items():
        if isinstance(key, bool) or not (isinstance(key, int) or _INT.match(str(key).strip())):
            raise DataError(f"{where}: key {key!r} is not a category id (an integer)")
        category = int(str(key).strip()) if not isinstance(key, int) else key
        if category in result:
            raise DataError(f"{where}: key {key!r}: category id {category} given twice")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DataError(f"{where}: key {key!r}: logit index must be an integer >= 0, got {value!r}")
        result[category] = value
    logits = sorted(set(result.values()))
    if logits != list(range(len(logits))):
        missing = sorted(set(range(max(logits) + 1)) - set(logits))
        raise DataError(f"{where}: logit indices must be 0..K-1 without gaps ({len(logits)} distinct values, "
                        f"max {max(logits)}); missing {', '.join(map(str, missing[:10]))}")
    return result


def read_category_map(path: PathLike) -> dict[int, int]:
    """{category_id: logit_index} from a JSON object `{"category_id": logit_index, ...}`.

    Keys must be integers (as strings), values integers >= 0 forming 0..K-1 (several categories may share
    one logit). Errors are DataErrors naming the file and the offending key.
    """
    path = Path(path).expanduser()
    return _check_category_map(load_json(path, "category map"), f"category map {path}")


def _bbox_is_empty(bbox: Any, where: str) -> bool:
    if bbox is None or (isinstance(bbox, (list, tuple)) and len(bbox) == 0):
        return True
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        raise DataError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
    return float(bbox[2]) * float(bbox[3]) == 0


def _polygon_area(coords: list) -> float:
    xs, ys = coords[0::2], coords[1::2]
    n = min(len(xs), len(ys))
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2 if n >= 3 else 0.0


def _segmentation_is_empty(segmentation: Any, where: str) -> bool:
    if segmentation is None or segmentation == []:
        return True
    if isinstance(segmentation, dict):  # RLE mask
        return not segmentation.get("counts")
    if not isinstance(segmentation, list):
        raise DataError(f"{where}: segmentation must be a list of polygons or an RLE object")
    polygons = [segmentation] if all(isinstance(v, (int, float)) for v in segmentation) else segmentation
    for polygon in polygons:
        if (not isinstance(polygon, list)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon)):
            raise DataError(f"{where}: segmentation polygons must be lists of numbers, got {polygon!r}")
    return all(_polygon_area(polygon) == 0 for polygon in polygons)


def scan_coco(ann_file: PathLike, root: PathLike | None, category_map: Mapping | PathLike | None = None,
              verify: bool = True) -> DatasetScan:
    """Scan a COCO JSON whose image-level labels are zero-area annotations (Abyss classification format).

    An annotation is an image-level label when it has no positive-area geometry: its bbox is missing,
    empty or of zero area (w*h == 0) and its segmentation is missing, empty or zero-area (all-zero or
    degenerate polygons); annotations with a real box or mask are objects and are ignored. Legacy: an
    annotation with a `caption` holds comma-separated category names. Image path: an absolute `path`
    field when present, else `file_name` joined to `root` (default: the JSON's folder).

    `category_map` ({category id: logit}, or the path of such a JSON) selects and merges categories: the
    classes are the distinct logits 0..K-1, named by their categories' names joined with "+" in id order;
    categories not in the map are ignored. Without a map every category is a class, in category-id order.
    An image with several distinct labels makes the scan multi-label (labels become sorted tuples); images
    without any label are listed in `unlabeled`. Every image file must exist (labeled ones are also
    checked with PIL: undecodable ones go to `skipped`).
    """
    ann_file = Path(ann_file).expanduser()
    data = load_json(ann_file, "COCO file")
    root = _resolve_root(root, ann_file)
    if not isinstance(data, dict):
        raise DataError(f"COCO file {ann_file}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(f"COCO file {ann_file}: no '{key}' key")
        if not isinstance(data[key], list):
            raise DataError(f"COCO file {ann_file}: '{key}' must be a list")
    categories = _coco_categories(data["categories"], ann_file)
    logit_of, map_text = _coco_logits(categories, category_map, ann_file)
    classes = ["+".join(categories[cid] for cid in sorted(logit_of) if logit_of[cid] == k)
               for k in range(len(set(logit_of.values())))]
    images = _coco_images(data["images"], root, ann_file)
    labels = _coco_labels(data["annotations"], images, categories, logit_of, ann_file)
    for iid, path in images.items():
        if not path.is_file():
            raise DataError(f"COCO file {ann_file}: image {iid!r}: file {path} does not exist")
    multilabel = any(len(found) > 1 for found in labels.values())
    samples: list[tuple[str, int | tuple[int, ...]]] = []
    skipped: list[tuple[str, str]] = []
    unlabeled: list[str] = []
    for iid, path in images.items():
        found = sorted(labels[iid])
        if not found:
            unlabeled.append(str(path))
            continue
        _keep_if_readable(path, found, multilabel, verify, samples, skipped)
    if not samples:
        detail = f"{len(unlabeled)} unlabeled" + (f", {len(skipped)} unreadable (e.g. {skipped[0][0]})"
                                                   if skipped else "")
        raise DataError(f"COCO file {ann_file}{map_text}: no readable image with a label ({detail})")
    return DatasetScan(root=root, classes=classes, samples=samples, skipped=skipped, multilabel=multilabel,
                      unlabeled=unlabeled, source=f"COCO file {ann_file}{map_text} under {root}")


def _coco_categories(entries: list, ann_file: Path) -> dict[int, str]:
    """{category id: name}; ids must be unique integers."""
    categories: dict[int, str] = {}
    for i, category in enumerate(entries):
        cid = category.get("id") if isinstance(category, dict) else None
        if isinstance(cid, bool) or not isinstance(cid, int):
            raise DataError(f"COCO file {ann_file}: category #{i} has no integer id")
        if cid in categories:
            raise DataError(f"COCO file {ann_file}: category id {cid} appears twice")
        categories[cid] = str(category.get("name", cid))
    if not categories:
        raise DataError(f"COCO file {ann_file}: no categories")
    return categories


def _coco_logits(categories: dict[int, str], category_map: Mapping | PathLike | None,
                 ann_file: Path) -> tuple[dict[int, int], str]:
    """{category id: logit} (every category, in id order, without a map) and the map's words for messages."""
    if category_map is None:
        return {cid: i for i, cid in enumerate(sorted(categories))}, ""
    if isinstance(category_map, Mapping):
        map_where = "category map"
        logit_of = _check_category_map(category_map, map_where)
    else:
        map_where = f"category map {Path(category_map).expanduser()}"
        logit_of = read_category_map(category_map)
    unknown = [cid for cid in logit_of if cid not in categories]
    if unknown:
        raise DataError(f"{map_where}: category id {unknown[0]} is not a category of COCO file {ann_file}")
    return logit_of, f" with {map_where}"


def _coco_images(entries: list, root: Path, ann_file: Path) -> dict[Any, Path]:
    """{image id: file}: an absolute `path`, else `file_name` (or a relative `path`) under `root`."""
    images: dict[Any, Path] = {}
    for i, image in enumerate(entries):
        iid = image.get("id") if isinstance(image, dict) else None
        if iid is None or isinstance(iid, (bool, list, dict, float)):
            raise DataError(f"COCO file {ann_file}: image #{i} has no id")
        if iid in images:
            raise DataError(f"COCO file {ann_file}: image id {iid!r} appears twice")
        path, file_name = image.get("path"), image.get("file_name")
        if isinstance(path, str) and path and os.path.isabs(path):
            images[iid] = Path(path)
        elif isinstance(file_name, str) and file_name:
            images[iid] = root / file_name
        elif isinstance(path, str) and path:
            images[iid] = root / path
        else:
            raise DataError(f"COCO file {ann_file}: image {iid!r} has neither file_name nor path")
    return images


def _coco_labels(annotations: list, images: dict[Any, Path], categories: dict[int, str], logit_of: dict[int, int],
                 ann_file: Path) -> dict[Any, set[int]]:
    """{image id: its logits}, from image-level annotations (no positive-area geometry) and legacy captions."""
    by_name: dict[str, int] = {}
    for cid in sorted(categories):
        by_name.setdefault(categories[cid], cid)
    labels: dict[Any, set[int]] = {iid: set() for iid in images}
    for i, annotation in enumerate(annotations):
        if not isinstance(annotation, dict):
            raise DataError(f"COCO file {ann_file}: annotation #{i} is not an object")
        where = f"COCO file {ann_file}: annotation {annotation.get('id', f'#{i}')!r}"
        iid = annotation.get("image_id")
        if isinstance(iid, (list, dict)) or iid not in images:
            raise DataError(f"{where}: image_id {iid!r} is not an image id")
        caption = annotation.get("caption")
        if isinstance(caption, str):
            cids = []
            for name in (n.strip() for n in caption.split(",")):
                if name and name not in by_name:
                    raise DataError(f"{where}: caption names unknown category {name!r} "
                                    f"(categories: {format_names(list(by_name))})")
                if name:
                    cids.append(by_name[name])
        elif "category_id" in annotation:
            cid = annotation["category_id"]
            if isinstance(cid, (bool, list, dict)) or cid not in categories:
                raise DataError(f"{where}: unknown category_id {cid!r}")
            image_level = (_bbox_is_empty(annotation.get("bbox"), where)
                           and _segmentation_is_empty(annotation.get("segmentation"), where))
            cids = [cid] if image_level else []
        else:
            raise DataError(f"{where}: neither category_id nor caption")
        labels[iid].update(logit_of[cid] for cid in cids if cid in logit_of)
    return labels


# --------------------------------------------------------------------------- auto-detection


FORMATS = ("auto", "folders", "list", "coco")


def dataset_format(ann_file: PathLike | None, fmt: str = "auto") -> str:
    """The layout a dataset is read as: `fmt` when given, else class folders without an annotation file, COCO
    for a .json one and a label list for any other. An annotation file with `folders`, or none with `list`
    or `coco`, is a DataError."""
    has_file = ann_file is not None and str(ann_file) != ""
    if fmt not in FORMATS:
        raise DataError(f"unknown dataset format '{fmt}'; known: {', '.join(FORMATS)}")
    if fmt == "folders" and has_file:
        raise DataError(f"annotation file {ann_file} given, but the dataset format is class folders")
    if fmt in ("list", "coco") and not has_file:
        raise DataError(f"the dataset format is {fmt}, which needs an annotation file")
    if fmt != "auto":
        return fmt
    if not has_file:
        return "folders"
    return "coco" if str(ann_file).lower().endswith(".json") else "list"


def scan_dataset(root: PathLike | None, ann_file: PathLike | None = "", *, fmt: str = "auto",
                 classes: list[str] | None = None, category_map: Mapping | PathLike | None = None,
                 verify: bool = True) -> DatasetScan:
    """Scan a dataset in whichever layout it comes (dataset_format: class folders, a COCO JSON or a label
    list; `fmt` pins it).

    `classes` fixes the class order: for a list file see `scan_annotation_list`; for class folders, labels
    are renumbered to follow it (every folder must be one of them; a class without a folder has zero
    images). `category_map` applies to COCO only; `classes` cannot be combined with COCO (its classes
    come from the categories and the map). A missing `ann_file` is a DataError naming it.
    """
    fmt = dataset_format(ann_file, fmt)
    if fmt == "folders":
        if category_map is not None:
            raise DataError(f"a category map applies to COCO annotation files only, not to class folders under "
                            f"{root}")
        scan = scan_folder(root, verify=verify)
        if classes is None or list(classes) == scan.classes:
            return scan
        wanted = {name: i for i, name in reversed(list(enumerate(str(c) for c in classes)))}
        extra = [name for name in scan.classes if name not in wanted]
        if extra:
            raise DataError(f"data root {scan.root}: class folder(s) not in the class list given: "
                            f"{', '.join(extra)}")
        scan.samples = [(path, wanted[scan.classes[label]]) for path, label in scan.samples]
        scan.classes = [str(c) for c in classes]
        return scan
    ann_file = Path(ann_file).expanduser()
    if not ann_file.is_file():
        raise DataError(f"annotation file {ann_file} " + ("is not a file" if ann_file.exists() else "does not exist"))
    if fmt == "coco":
        if classes is not None:
            raise DataError(f"COCO file {ann_file}: classes come from its categories (and a category map), "
                            f"not from a class list")
        return scan_coco(ann_file, root, category_map=category_map, verify=verify)
    if category_map is not None:
        raise DataError(f"a category map applies to COCO annotation files only, not to list file {ann_file}")
    return scan_annotation_list(ann_file, root, classes=classes, verify=verify)


__all__ = ["FORMATS", "dataset_format", "read_class_names", "scan_annotation_list", "read_category_map", "scan_coco",
           "scan_dataset"]
