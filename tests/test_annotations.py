"""Annotation-file datasets: class-id maps, PaddleClas label lists, COCO image-level labels, auto-detection."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clsengine import predictions as P
from clsengine.data import (DatasetScan, read_category_map, read_class_names, scan_annotation_list, scan_coco,
                            scan_dataset)
from clsengine.errors import DataError, UserError
from conftest import make_image_folder


def png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """imgs/a.png, imgs/b.png, imgs/c.png, imgs/my pics/d e.png"""
    root = tmp_path / "imgs"
    for name in ("a.png", "b.png", "c.png", "my pics/d e.png"):
        png(root / name)
    return root


# --------------------------------------------------------------------------- class-id maps


def test_class_names_text_map_any_order_names_with_spaces(tmp_path: Path):
    path = write(tmp_path / "label_map.txt", "# PaddleClas class-id map\n2 golden retriever\n0 tench\n\n1  goldfish \n")
    assert read_class_names(path) == ["tench", "goldfish", "golden retriever"]
    assert P.read_class_names(path) == ["tench", "goldfish", "golden retriever"]  # still importable there


@pytest.mark.parametrize("content, fragment", [
    ("0 a\n1 b\n1 c\n", "ids.txt:3: class id 1 given twice (first on line 2)"),
    ("0 a\nb\n", "ids.txt:2: expected 'id name'"),
    ("0 a\nx b\n", "ids.txt:2: expected 'id name'"),
    ("0 a\n2 b\n", "ids.txt:2: class ids must be 0..1"),
    ("0 a\n1 a\n", "ids.txt:2: class name 'a' given twice"),
    ("\n# nothing\n", "no 'id name' line"),
])
def test_class_names_text_map_errors(tmp_path: Path, content: str, fragment: str):
    path = write(tmp_path / "ids.txt", content)
    with pytest.raises(DataError) as info:
        read_class_names(path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content, expected", [
    (["x", "y"], ["x", "y"]),
    ({"1": "y", "0": "x"}, ["x", "y"]),
    ({"y": 1, "x": 0}, ["x", "y"]),
])
def test_class_names_json_map(tmp_path: Path, content, expected):
    path = write(tmp_path / "ids.json", json.dumps(content))
    assert read_class_names(path) == expected


def test_class_names_missing_file_and_bad_json(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        read_class_names(tmp_path / "nope.txt")
    path = write(tmp_path / "ids.json", '[\n"a",\n')
    with pytest.raises(DataError, match=r"ids.json, line \d"):
        read_class_names(path)


# --------------------------------------------------------------------------- label lists


def test_list_with_indices(images: Path, tmp_path: Path):
    ann = write(tmp_path / "train_list.txt", "# comment\na.png 0\n\nb.png 3\nmy pics/d e.png 0\n")
    scan = scan_annotation_list(ann, images)
    assert isinstance(scan, DatasetScan)
    assert scan.classes == ["0", "1", "2", "3"]  # up to the largest index; 1 and 2 have no image
    assert scan.samples == [(str(images / "a.png"), 0), (str(images / "b.png"), 3),
                            (str(images / "my pics" / "d e.png"), 0)]
    assert scan.counts() == [2, 0, 0, 1]
    assert not scan.multilabel and scan.unlabeled == [] and scan.skipped == []
    assert scan.root == images
    assert str(ann) in scan.source and str(images) in scan.source


def test_list_with_names_sorted_classes(images: Path, tmp_path: Path):
    ann = write(tmp_path / "list.txt", "a.png dog\nb.png cat\nc.png dog\n")
    scan = scan_annotation_list(ann, images)
    assert scan.classes == ["cat", "dog"]
    assert [(Path(p).name, label) for p, label in scan.samples] == [("a.png", 1), ("b.png", 0), ("c.png", 1)]


def test_list_root_defaults_to_list_folder(images: Path):
    ann = write(images / "list.txt", "a.png 1\nb.png 0\n")
    scan = scan_annotation_list(ann, "")
    assert scan.root == images
    assert scan.samples == [(str(images / "a.png"), 1), (str(images / "b.png"), 0)]


@pytest.mark.parametrize("map_name, map_text", [
    ("label_map.txt", "1 golden retriever\n0 tench\n2 cat\n"),
    ("label_map.json", json.dumps({"tench": 0, "golden retriever": 1, "cat": 2})),
])
def test_list_with_class_id_map(images: Path, tmp_path: Path, map_name: str, map_text: str):
    classes = read_class_names(write(tmp_path / map_name, map_text))
    ann = write(tmp_path / "list.txt", "a.png 1\nb.png golden retriever\nmy pics/d e.png\ttench\n")
    scan = scan_annotation_list(ann, images, classes=classes)
    assert scan.classes == ["tench", "golden retriever", "cat"]
    assert [label for _, label in scan.samples] == [1, 1, 0]
    assert scan.samples[2][0] == str(images / "my pics" / "d e.png")
    assert scan.counts() == [1, 2, 0]


def test_multilabel_list(images: Path, tmp_path: Path):
    ann = write(tmp_path / "list.txt", "a.png cat,dog\nb.png dog\nmy pics/d e.png bird, cat\nc.png dog,dog\n")
    scan = scan_annotation_list(ann, images)
    assert scan.multilabel
    assert scan.classes == ["bird", "cat", "dog"]
    assert [(Path(p).name, label) for p, label in scan.samples] == [
        ("a.png", (1, 2)), ("b.png", (2,)), ("d e.png", (0, 1)), ("c.png", (2,))]
    assert scan.counts() == [1, 2, 3]


def test_multilabel_list_with_indices(images: Path, tmp_path: Path):
    ann = write(tmp_path / "list.txt", "a.png 0,3\nb.png 1\n")
    scan = scan_annotation_list(ann, images, classes=["w", "x", "y", "z"])
    assert scan.multilabel
    assert [label for _, label in scan.samples] == [(0, 3), (1,)]
    assert scan.counts() == [1, 1, 0, 1]


def test_list_missing_file_names_line(images: Path, tmp_path: Path):
    ann = write(tmp_path / "list.txt", "a.png 0\n# gone:\nmissing one.png 1\nmissing_two.png 1\n")
    with pytest.raises(DataError) as info:
        scan_annotation_list(ann, images)
    message = str(info.value)
    assert f"{ann}:3" in message and str(images / "missing one.png") in message
    assert "missing_two" not in message


def test_list_unknown_label_names_line_and_label(images: Path, tmp_path: Path):
    ann = write(tmp_path / "list.txt", "a.png cat\nb.png zebra\n")
    with pytest.raises(DataError) as info:
        scan_annotation_list(ann, images, classes=["cat", "dog"])
    assert f"{ann}:2" in str(info.value) and "'zebra'" in str(info.value)
    ann = write(tmp_path / "list2.txt", "a.png 0\nb.png 1\nc.png 2\n")
    with pytest.raises(DataError) as info:
        scan_annotation_list(ann, images, classes=["cat", "dog"])
    assert f"{ann}:3" in str(info.value) and "label 2" in str(info.value)


@pytest.mark.parametrize("line", ["just_a_path.png", "my pics/d e.png", "a.png 0,", "a.png 0,,1"])
def test_list_malformed_line(images: Path, tmp_path: Path, line: str):
    ann = write(tmp_path / "list.txt", f"a.png 0\n{line}\n")
    with pytest.raises(DataError) as info:
        scan_annotation_list(ann, images)
    assert f"{ann}:2" in str(info.value) and "expected 'relative/path label'" in str(info.value)


def test_list_unreadable_image_is_skipped_and_reported(images: Path, tmp_path: Path):
    bad = images / "bad.png"
    bad.write_bytes(b"\x00garbage, not a png" * 10)
    ann = write(tmp_path / "list.txt", "a.png 0\nbad.png 1\nb.png 1\n")
    scan = scan_annotation_list(ann, images)
    assert [p for p, _ in scan.samples] == [str(images / "a.png"), str(images / "b.png")]
    assert [p for p, _ in scan.skipped] == [str(bad)] and scan.skipped[0][1]
    assert scan.classes == ["0", "1"]
    assert len(scan_annotation_list(ann, images, verify=False).samples) == 3


def test_list_errors_missing_list_and_root(images: Path, tmp_path: Path):
    with pytest.raises(DataError, match="does not exist") as info:
        scan_annotation_list(tmp_path / "nope.txt", images)
    assert "nope.txt" in str(info.value)
    ann = write(tmp_path / "list.txt", "a.png 0\n")
    with pytest.raises(DataError, match="data root .*nowhere does not exist"):
        scan_annotation_list(ann, tmp_path / "nowhere")
    with pytest.raises(DataError, match="no 'relative/path label' line"):
        scan_annotation_list(write(tmp_path / "empty.txt", "# nothing\n"), images)


# --------------------------------------------------------------------------- COCO


def coco(tmp_path: Path, images: list[dict], annotations: list[dict], categories: list[dict] | None = None,
         name: str = "ann.json") -> Path:
    categories = categories if categories is not None else [
        {"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 5, "name": "bird"}]
    return write(tmp_path / name, json.dumps({"images": images, "annotations": annotations,
                                              "categories": categories}, indent=1))


def label(aid: int, image_id: int, category_id: int, **extra) -> dict:
    return {"id": aid, "image_id": image_id, "category_id": category_id, **extra}


IMAGES = [{"id": 10, "file_name": "a.png"}, {"id": 11, "file_name": "b.png"}, {"id": 12, "file_name": "c.png"}]


def test_coco_zero_area_bbox_labels_single_label(images: Path, tmp_path: Path):
    ann = coco(tmp_path, IMAGES, [
        label(1, 10, 2, bbox=[0, 0, 0, 0]),
        label(2, 11, 5),                                    # no bbox at all
        label(3, 12, 1, bbox=[]),
        label(4, 12, 2, bbox=[5, 5, 10, 10], area=100),     # an object box: not an image-level label
        label(5, 10, 2, bbox=[3, 4, 0, 7]),                 # the same label twice: still single-label
    ])
    scan = scan_coco(ann, images)
    assert scan.classes == ["cat", "dog", "bird"]          # category-id order 1, 2, 5
    assert not scan.multilabel
    assert scan.samples == [(str(images / "a.png"), 1), (str(images / "b.png"), 2), (str(images / "c.png"), 0)]
    assert scan.unlabeled == [] and scan.skipped == []
    assert "COCO file" in scan.source and str(ann) in scan.source


def test_coco_zero_area_polygon_and_multilabel(images: Path, tmp_path: Path):
    ann = coco(tmp_path, IMAGES, [
        label(1, 10, 1, segmentation=[[0, 0, 0, 0, 0, 0]]),
        label(2, 10, 2, segmentation=[]),
        label(3, 11, 5, segmentation=[[1, 1, 5, 5, 9, 9]], bbox=[0, 0, 0, 0]),   # collinear: zero area
        label(4, 12, 1, segmentation=[[0, 0, 10, 0, 10, 10]], bbox=[0, 0, 10, 10]),  # a real object: ignored
    ])
    scan = scan_coco(ann, images)
    assert scan.multilabel
    assert scan.samples == [(str(images / "a.png"), (0, 1)), (str(images / "b.png"), (2,))]
    assert scan.unlabeled == [str(images / "c.png")]
    assert scan.counts() == [1, 1, 1]


def test_coco_legacy_caption_labels(images: Path, tmp_path: Path):
    ann = coco(tmp_path, IMAGES, [
        {"id": 1, "image_id": 10, "caption": "cat, bird"},
        {"id": 2, "image_id": 11, "caption": "dog"},
        {"id": 3, "image_id": 12, "caption": ""},
    ])
    scan = scan_coco(ann, images)
    assert scan.multilabel
    assert scan.samples == [(str(images / "a.png"), (0, 2)), (str(images / "b.png"), (1,))]
    assert scan.unlabeled == [str(images / "c.png")]
    bad = coco(tmp_path, IMAGES, [{"id": 7, "image_id": 10, "caption": "cat,zebra"}], name="bad.json")
    with pytest.raises(DataError) as info:
        scan_coco(bad, images)
    assert "bad.json" in str(info.value) and "annotation 7" in str(info.value) and "'zebra'" in str(info.value)


def test_coco_absolute_path_field(images: Path, tmp_path: Path):
    elsewhere = png(tmp_path / "elsewhere" / "x.png")
    ann = coco(tmp_path, [{"id": 1, "file_name": "x.png", "path": str(elsewhere)},
                          {"id": 2, "file_name": "a.png"}],
               [label(1, 1, 1), label(2, 2, 2)])
    scan = scan_coco(ann, images)
    assert scan.samples == [(str(elsewhere), 0), (str(images / "a.png"), 1)]


def test_coco_category_map_merges_categories(images: Path, tmp_path: Path):
    ann = coco(tmp_path, IMAGES, [label(1, 10, 1), label(2, 11, 2), label(3, 12, 5), label(4, 12, 2)])
    mapping = write(tmp_path / "map.json", json.dumps({"2": 0, "1": 0, "5": 1}))
    assert read_category_map(mapping) == {2: 0, 1: 0, 5: 1}
    scan = scan_coco(ann, images, category_map=mapping)
    assert scan.classes == ["cat+dog", "bird"]   # 2 distinct logits; names in category-id order
    assert scan.multilabel                       # image 12 has dog (logit 0) and bird (logit 1)
    assert scan.samples == [(str(images / "a.png"), (0,)), (str(images / "b.png"), (0,)),
                            (str(images / "c.png"), (0, 1))]
    assert str(mapping) in scan.source
    # one image with cat and dog only: both merge into logit 0, so the scan stays single-label
    ann2 = coco(tmp_path, IMAGES[:2], [label(1, 10, 1), label(2, 10, 2), label(3, 11, 5)], name="two.json")
    scan = scan_coco(ann2, images, category_map={1: 0, 2: 0, 5: 1})
    assert not scan.multilabel
    assert scan.samples == [(str(images / "a.png"), 0), (str(images / "b.png"), 1)]


def test_coco_category_map_drops_a_category(images: Path, tmp_path: Path):
    ann = coco(tmp_path, IMAGES, [label(1, 10, 1), label(2, 11, 5), label(3, 12, 5), label(4, 12, 2)])
    scan = scan_coco(ann, images, category_map={"2": 1, "1": 0})   # bird (5) dropped
    assert scan.classes == ["cat", "dog"]
    assert not scan.multilabel
    assert scan.samples == [(str(images / "a.png"), 0), (str(images / "c.png"), 1)]  # c keeps its dog label
    assert scan.unlabeled == [str(images / "b.png")]                                  # b had only bird


@pytest.mark.parametrize("content, fragment", [
    ({"x": 0}, "key 'x'"),
    ({"1": -1}, "key '1'"),
    ({"1": "0"}, "key '1'"),
    ({"1": 0, "2": 2}, "without gaps"),
    ([1, 2], "non-empty JSON object"),
])
def test_category_map_errors(tmp_path: Path, content, fragment: str):
    path = write(tmp_path / "map.json", json.dumps(content))
    with pytest.raises(DataError) as info:
        read_category_map(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_coco_category_map_with_unknown_category(images: Path, tmp_path: Path):
    ann = coco(tmp_path, IMAGES, [label(1, 10, 1)])
    with pytest.raises(DataError, match="category id 9 is not a category"):
        scan_coco(ann, images, category_map={1: 0, 9: 1})


def test_coco_errors(images: Path, tmp_path: Path):
    ann = coco(tmp_path, IMAGES, [label(1, 10, 1), label(42, 99, 1)])
    with pytest.raises(DataError) as info:
        scan_coco(ann, images)
    assert "ann.json" in str(info.value) and "annotation 42" in str(info.value) and "99" in str(info.value)

    ann = coco(tmp_path, IMAGES + [{"id": 13, "file_name": "gone.png"}], [label(1, 10, 1)])
    with pytest.raises(DataError) as info:
        scan_coco(ann, images)
    assert "image 13" in str(info.value) and str(images / "gone.png") in str(info.value)

    ann = coco(tmp_path, IMAGES, [label(1, 10, 1), label(8, 11, 3)])
    with pytest.raises(DataError) as info:
        scan_coco(ann, images)
    assert "annotation 8" in str(info.value) and "unknown category_id 3" in str(info.value)

    broken = write(tmp_path / "broken.json", '{\n "images": [],\n "annotations": [,]\n}\n')
    with pytest.raises(DataError) as info:
        scan_coco(broken, images)
    assert "broken.json, line 3" in str(info.value)

    for key in ("images", "annotations", "categories"):
        data = {"images": [], "annotations": [], "categories": []}
        del data[key]
        missing = write(tmp_path / f"no_{key}.json", json.dumps(data))
        with pytest.raises(DataError, match=f"no '{key}' key") as info:
            scan_coco(missing, images)
        assert f"no_{key}.json" in str(info.value)


def test_coco_unreadable_and_all_unlabeled(images: Path, tmp_path: Path):
    (images / "c.png").write_bytes(b"not a png at all" * 5)
    ann = coco(tmp_path, IMAGES, [label(1, 10, 1), label(2, 12, 2)])
    scan = scan_coco(ann, images)
    assert scan.samples == [(str(images / "a.png"), 0)]
    assert [p for p, _ in scan.skipped] == [str(images / "c.png")]
    assert scan.unlabeled == [str(images / "b.png")]
    with pytest.raises(DataError, match="no readable image with a label"):
        scan_coco(coco(tmp_path, IMAGES, [], name="empty.json"), images)


# --------------------------------------------------------------------------- auto-detection


def test_scan_dataset_detects_the_three_layouts(images: Path, tmp_path: Path):
    folders = make_image_folder(tmp_path / "folders", classes=2, per_class=2)
    scan = scan_dataset(folders)
    assert scan.classes == ["class_0", "class_1"] and scan.counts() == [2, 2]
    assert "class folders" in scan.source

    reordered = scan_dataset(folders, "", classes=["class_1", "class_0", "class_2"])
    assert reordered.classes == ["class_1", "class_0", "class_2"]
    assert all(Path(p).parent.name == reordered.classes[lab] for p, lab in reordered.samples)
    assert reordered.counts() == [2, 2, 0]
    with pytest.raises(DataError, match="class_1"):
        scan_dataset(folders, classes=["class_0"])

    ann = write(tmp_path / "list.txt", "a.png 1\nb.png 0\n")
    scan = scan_dataset(images, ann)
    assert scan.classes == ["0", "1"] and scan.samples[0] == (str(images / "a.png"), 1)
    assert "list file" in scan.source

    ann = coco(tmp_path, IMAGES, [label(1, 10, 2)])
    scan = scan_dataset(images, ann, category_map={2: 0})
    assert scan.classes == ["dog"] and scan.samples == [(str(images / "a.png"), 0)]
    assert scan.unlabeled == [str(images / "b.png"), str(images / "c.png")]

    with pytest.raises(DataError) as info:
        scan_dataset(images, tmp_path / "missing_list.txt")
    assert "missing_list.txt" in str(info.value) and "does not exist" in str(info.value)
    with pytest.raises(DataError, match="COCO"):
        scan_dataset(images, write(tmp_path / "l.txt", "a.png 0\n"), category_map={1: 0})


def test_dataset_format_is_decided_once_and_contradictions_are_errors(images: Path, tmp_path: Path):
    """The engine decides the layout (train.py, eval.py and optimize.py ask it): an annotation file's suffix
    under auto, a pinned format otherwise, and a format that contradicts the files given is one error."""
    from clsengine.data import dataset_format

    assert dataset_format("") == dataset_format(None) == "folders"
    assert dataset_format("train.json") == "coco" and dataset_format("TRAIN.JSON") == "coco"
    assert dataset_format("train.txt") == "list"
    assert dataset_format("labels.json", "list") == "list"  # pinned: a list file may end in .json
    with pytest.raises(DataError, match="annotation file a.txt given, but the dataset format is class folders"):
        dataset_format("a.txt", "folders")
    with pytest.raises(DataError, match="the dataset format is coco, which needs an annotation file"):
        dataset_format("", "coco")
    with pytest.raises(DataError, match="unknown dataset format 'csv'"):
        dataset_format("a.csv", "csv")
    listed = write(tmp_path / "as_list.json", "a.png 0\nb.png 1\n")
    scan = scan_dataset(images, listed, fmt="list")  # read as a label list although it ends in .json
    assert scan.classes == ["0", "1"] and len(scan.samples) == 2
