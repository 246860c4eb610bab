"""Data layer: image decoding (modes, bit depths, EXIF), folder scanning, class checks, and script-level data errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from clsengine.data import check_same_classes, read_image, scan_folder
from clsengine.data.image import UnreadableImageError
from clsengine.errors import DataError
from conftest import assert_clean_error, instantiate, make_image_folder, run_captured, run_script

FAST = ("--epochs", "1", "--batch-size", "4", "input.size=[32,32]")


def assert_rgb(array: np.ndarray, height: int, width: int) -> None:
    assert isinstance(array, np.ndarray)
    assert array.dtype == np.uint8, array.dtype
    assert array.shape == (height, width, 3), array.shape


# --------------------------------------------------------------------------- read_image


def test_read_rgb_png_roundtrip(tmp_path: Path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    out = read_image(tmp_path / "rgb.png")
    assert_rgb(out, 5, 7)
    np.testing.assert_array_equal(out, pixels)


def test_read_grayscale(tmp_path: Path):
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5) * 12
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    assert Image.open(tmp_path / "gray.png").mode == "L"
    out = read_image(tmp_path / "gray.png")
    assert_rgb(out, 4, 5)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray)


def _palette_image() -> Image.Image:
    index = np.zeros((4, 6), dtype=np.uint8)
    index[0, 0] = 1  # green
    index[3, 5] = 2  # blue; everything else is palette entry 0 (red)
    img = Image.fromarray(index, mode="P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    return img


def test_read_palette_without_transparency(tmp_path: Path):
    _palette_image().save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = read_image(tmp_path / "p.png")
    assert_rgb(out, 4, 6)
    assert out[0, 0].tolist() == [0, 255, 0]
    assert out[3, 5].tolist() == [0, 0, 255]
    assert out[1, 1].tolist() == [255, 0, 0]


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_read_palette_with_transparency(tmp_path: Path, suffix: str):
    path = tmp_path / f"pt{suffix}"
    _palette_image().save(path, transparency=0)  # palette entry 0 (red) is transparent
    with Image.open(path) as img:
        assert img.mode == "P" and "transparency" in img.info
    out = read_image(path)
    assert_rgb(out, 4, 6)
    assert out[1, 1].tolist() == [255, 255, 255]  # transparent -> white, not red
    assert out[0, 0].tolist() == [0, 255, 0]  # opaque entries keep their colour
    assert out[3, 5].tolist() == [0, 0, 255]


def test_read_rgba_transparent_becomes_white(tmp_path: Path):
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[...] = (10, 20, 30, 0)  # fully transparent (dark colour underneath)
    rgba[0, 0] = (200, 100, 50, 255)  # opaque
    rgba[2, 3] = (0, 0, 0, 128)  # half transparent black over white -> mid grey
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    out = read_image(tmp_path / "rgba.png")
    assert_rgb(out, 3, 4)
    assert out[1, 1].tolist() == [255, 255, 255]
    assert out[0, 0].tolist() == [200, 100, 50]
    assert all(abs(int(v) - 127) <= 2 for v in out[2, 3]), out[2, 3]


def test_read_grayscale_with_alpha(tmp_path: Path):
    la = Image.new("LA", (3, 2), (40, 0))
    la.putpixel((0, 0), (40, 255))
    la.save(tmp_path / "la.png")
    out = read_image(tmp_path / "la.png")
    assert_rgb(out, 2, 3)
    assert out[0, 0].tolist() == [40, 40, 40]
    assert out[1, 2].tolist() == [255, 255, 255]


def test_read_16bit_png_is_rescaled_not_clipped(tmp_path: Path):
    # Values far above 255: clipping would make almost everything 255; a cast would wrap around.
    values = np.linspace(1000, 60000, 24).astype(np.uint16).reshape(4, 6)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = read_image(tmp_path / "deep.png")
    assert_rgb(out, 4, 6)
    gray = out[..., 0].astype(int)
    assert (out[..., 1] == out[..., 0]).all() and (out[..., 2] == out[..., 0]).all()
    assert gray.min() == 0 and gray.max() == 255  # full range used
    assert (np.diff(gray.ravel()) > 0).all()  # order preserved: strictly increasing, no clipping plateau
    expected = (values.astype(np.float64) - 1000) / (60000 - 1000) * 255
    assert np.abs(gray - expected).max() <= 1


@pytest.mark.parametrize("high", [257, 1456, 1747, 4095, 65535])
def test_read_16bit_brightest_pixel_is_255(tmp_path: Path, high: int):
    values = np.zeros((2, 3), dtype=np.uint16)
    values[1, 2] = high
    values[0, 1] = high // 2
    Image.fromarray(values).save(tmp_path / "deep.png")
    out = read_image(tmp_path / "deep.png")
    assert_rgb(out, 2, 3)
    assert out[1, 2].tolist() == [255, 255, 255]
    assert out[0, 0].tolist() == [0, 0, 0]
    assert abs(int(out[0, 1, 0]) - 127) <= 1


def test_read_16bit_constant_image(tmp_path: Path):
    Image.fromarray(np.full((3, 3), 5000, dtype=np.uint16)).save(tmp_path / "flat.png")
    out = read_image(tmp_path / "flat.png")
    assert_rgb(out, 3, 3)  # no division by zero


def test_read_cmyk_jpeg(tmp_path: Path):
    Image.new("CMYK", (10, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # pure red in CMYK
    with Image.open(tmp_path / "cmyk.jpg") as img:
        assert img.mode == "CMYK"
    out = read_image(tmp_path / "cmyk.jpg")
    assert_rgb(out, 8, 10)
    r, g, b = (int(v) for v in out[4, 5])
    assert r > 220 and g < 40 and b < 40, (r, g, b)


def _oriented_jpeg(path: Path, orientation: int) -> None:
    """A 40 wide x 24 high JPEG, blue with a red 12x12 block in the stored top-left corner."""
    pixels = np.zeros((24, 40, 3), dtype=np.uint8)
    pixels[...] = (0, 0, 255)
    pixels[:12, :12] = (255, 0, 0)
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, quality=95)
    with Image.open(path) as check:
        assert check.getexif().get(0x0112) == orientation
        assert check.size == (40, 24)


def _is_red(pixel: np.ndarray) -> bool:
    return int(pixel[0]) > 200 and int(pixel[2]) < 60


def _is_blue(pixel: np.ndarray) -> bool:
    return int(pixel[2]) > 200 and int(pixel[0]) < 60


@pytest.mark.parametrize("orientation, red_corner", [
    (1, "top_left"),      # no rotation
    (6, "top_right"),     # stored image is shown rotated 90 degrees clockwise
    (8, "bottom_left"),   # stored image is shown rotated 90 degrees counter-clockwise
    (3, "bottom_right"),  # 180 degrees
])
def test_read_exif_orientation(tmp_path: Path, orientation: int, red_corner: str):
    _oriented_jpeg(tmp_path / "photo.jpg", orientation)
    out = read_image(tmp_path / "photo.jpg")
    if orientation in (6, 8):
        assert_rgb(out, 40, 24)  # height and width swapped
    else:
        assert_rgb(out, 24, 40)
    corners = {"top_left": out[3, 3], "top_right": out[3, -4],
               "bottom_left": out[-4, 3], "bottom_right": out[-4, -4]}
    for name, pixel in corners.items():
        if name == red_corner:
            assert _is_red(pixel), (name, pixel)
        else:
            assert _is_blue(pixel), (name, pixel)


def test_read_garbage_raises_with_path(tmp_path: Path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg at all" * 10)
    with pytest.raises(UnreadableImageError) as info:
        read_image(bad)
    assert info.value.path == str(bad)
    assert str(bad) in str(info.value)


# --------------------------------------------------------------------------- scan_folder


def test_scan_class_indices_follow_sorted_names(tmp_path: Path):
    root = tmp_path / "data"
    for name in ("zebra", "Apple", "mango", "banana"):  # created out of order
        make_image_folder(root / "tmp", classes=1, per_class=2)
        (root / "tmp" / "class_0").rename(root / name)
    shutil.rmtree(root / "tmp")
    scan = scan_folder(root)
    assert scan.classes == sorted(["zebra", "Apple", "mango", "banana"]) == ["Apple", "banana", "mango", "zebra"]
    assert len(scan.samples) == 8
    for path, label in scan.samples:
        assert Path(path).parent.name == scan.classes[label]
    assert scan.counts() == [2, 2, 2, 2]
    assert scan.skipped == []


def test_scan_skips_unreadable_and_ignores_non_images(tmp_path: Path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=3)
    bad = root / "class_1" / "bad.jpg"
    bad.write_bytes(b"\x00\x01garbage bytes, not an image" * 20)
    (root / "class_0" / "notes.txt").write_text("not an image, wrong extension")
    (root / "README.md").write_text("loose file in the root")
    scan = scan_folder(root)
    assert scan.classes == ["class_0", "class_1"]
    assert scan.counts() == [3, 3]
    paths = [p for p, _ in scan.samples]
    assert str(bad) not in paths
    assert not any(p.endswith("notes.txt") for p in paths)
    assert [p for p, _ in scan.skipped] == [str(bad)]
    assert scan.skipped[0][1]  # a reason is given
    assert not any("notes.txt" in p for p, _ in scan.skipped)  # ignored, not "skipped"


def test_scan_images_in_nested_subfolders(tmp_path: Path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    make_image_folder(root / "class_1" / "extra", classes=1, per_class=2)  # class_1/extra/class_0/*.png
    scan = scan_folder(root)
    assert scan.classes == ["class_0", "class_1"]
    assert scan.counts() == [2, 4]


def test_scan_missing_root(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as info:
        scan_folder(missing)
    assert str(missing) in str(info.value)


def test_scan_root_is_a_file(tmp_path: Path):
    file_root = tmp_path / "data.zip"
    file_root.write_bytes(b"PK")
    with pytest.raises(DataError, match="not a directory") as info:
        scan_folder(file_root)
    assert str(file_root) in str(info.value)


def test_scan_root_without_class_folders(tmp_path: Path):
    root = tmp_path / "flat"
    make_image_folder(tmp_path / "src", classes=1, per_class=3)
    (tmp_path / "src" / "class_0").rename(root)  # images directly in the root
    with pytest.raises(DataError, match="no class sub-folders") as info:
        scan_folder(root)
    message = str(info.value)
    assert str(root) in message
    assert "sub-folder per class" in message  # the hint that images sit directly in the root


def test_scan_empty_root(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders") as info:
        scan_folder(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)


def test_scan_empty_class_folder_names_the_class(tmp_path: Path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    (root / "forgotten_class").mkdir()
    (root / "forgotten_class" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError) as info:
        scan_folder(root)
    message = str(info.value)
    assert "forgotten_class" in message
    assert "class_0" not in message and "class_1" not in message
    assert str(root) in message


def test_scan_class_with_only_unreadable_files_is_empty(tmp_path: Path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    (root / "broken").mkdir()
    (root / "broken" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as info:
        scan_folder(root)
    assert "broken" in str(info.value)


def test_scan_only_unreadable_files(tmp_path: Path):
    root = tmp_path / "data"
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        (root / name / "a.jpg").write_bytes(b"garbage")
        (root / name / "b.png").write_bytes(b"more garbage")
    with pytest.raises(DataError, match="no readable images") as info:
        scan_folder(root)
    message = str(info.value)
    assert str(root) in message
    assert "4 unreadable" in message
    assert str(root / "cats" / "a.jpg") in message  # an example path


def test_scan_no_root_given():
    for root in (None, ""):
        with pytest.raises(DataError, match="no data root"):
            scan_folder(root)


# --------------------------------------------------------------------------- check_same_classes


def test_check_same_classes_equal_passes_and_order_matters():
    assert check_same_classes(["a", "b", "c"], ["a", "b", "c"], "train", "val") is None
    with pytest.raises(DataError, match="same names in a different order"):  # class indices would differ
        check_same_classes(["a", "b", "c"], ["b", "a", "c"], "train", "val")


def test_check_same_classes_names_missing_and_extra():
    with pytest.raises(DataError) as info:
        check_same_classes(["cat", "dog", "fox"], ["cat", "dog", "owl"], "train data /t", "val data /v")
    message = str(info.value)
    assert "missing in val data /v: fox" in message
    assert "not in train data /t: owl" in message
    assert "cat" not in message.split("(", 1)[1]  # shared classes are not listed as differences


def test_check_same_classes_only_missing():
    with pytest.raises(DataError) as info:
        check_same_classes(["a", "b", "c"], ["a", "c"], "train", "val")
    assert "missing in val: b" in str(info.value)
    assert "not in train" not in str(info.value)


def test_check_same_classes_different_order():
    with pytest.raises(DataError, match="different order"):
        check_same_classes(["a", "b"], ["b", "a"], "checkpoint", "test data")


# --------------------------------------------------------------------------- scripts
# Each script run costs several seconds (imports torch), and so does instantiating a work dir, so the
# script tests share one work dir (built like conftest's `work_dir` fixture does) and write their outputs
# to their own tmp_path.


@pytest.fixture(scope="module")
def shared_work_dir(module_dir) -> Path:
    path = module_dir / "wd_mobilenet_v3_small"
    result = instantiate("mobilenet_v3_small", path, "--do-not-load-snapshot")
    assert result.returncode == 0, result.stderr
    return path


def test_train_val_classes_differ(shared_work_dir: Path, tiny_dataset: Path, tmp_path: Path, monkeypatch, capsys):
    wd = shared_work_dir
    (tiny_dataset / "val" / "class_2").rename(tiny_dataset / "val" / "class_owl")
    result = run_captured(wd, "train.py", "--train-data-roots", str(tiny_dataset / "train"),
                          "--val-data-roots", str(tiny_dataset / "val"), "--save-checkpoints-to",
                          str(tmp_path / "outputs"), *FAST, monkeypatch=monkeypatch, capsys=capsys)
    assert_clean_error(result, "class_2", "class_owl")


@pytest.mark.parametrize("case", ["empty_class", "no_images", "no_root"])
def test_train_data_errors(shared_work_dir: Path, tiny_dataset: Path, tmp_path: Path, case: str, monkeypatch,
                           capsys):
    """In process (cli.run is what turns the errors into one line, as in a real run)."""
    wd = shared_work_dir

    def train(*args: str):
        return run_captured(wd, "train.py", *args, monkeypatch=monkeypatch, capsys=capsys)

    val = str(tiny_dataset / "val")
    out = ("--save-checkpoints-to", str(tmp_path / "outputs"))
    if case == "empty_class":  # the message names the empty class folder
        (tiny_dataset / "train" / "class_empty").mkdir()
        result = train("--train-data-roots", str(tiny_dataset / "train"), "--val-data-roots", val, *out, *FAST)
        assert_clean_error(result, "class_empty")
    elif case == "no_images":  # class folders, but not one image in them
        no_images = tmp_path / "no_images"
        (no_images / "a").mkdir(parents=True)
        (no_images / "b").mkdir()
        (no_images / "a" / "readme.txt").write_text("text only")
        result = train("--train-data-roots", str(no_images), "--val-data-roots", val, *out, *FAST)
        assert_clean_error(result, str(no_images))
    else:  # no --train-data-roots and no $TRAIN_DATA_ROOT (run_captured strips it from the environment)
        result = train("--val-data-roots", val, *out, *FAST)
        assert_clean_error(result, "TRAIN_DATA_ROOT")


def test_train_with_corrupt_image_then_eval_from_env(shared_work_dir: Path, tiny_dataset: Path, tmp_path: Path):
    wd = shared_work_dir
    corrupt = tiny_dataset / "train" / "class_1" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated garbage, not a jpeg" * 4)
    out = tmp_path / "outputs"
    result = run_script(wd, "train.py", "--train-data-roots", str(tiny_dataset / "train"),
                        "--val-data-roots", str(tiny_dataset / "val"), "--save-checkpoints-to", str(out), *FAST)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    skipped_file = out / "skipped_images.txt"
    assert skipped_file.is_file()
    assert str(corrupt) in skipped_file.read_text(encoding="utf-8")
    assert str(corrupt) in result.stdout + result.stderr  # the user sees it without opening the file
    assert "skipped 1 unreadable" in result.stdout + result.stderr
    assert (out / "latest.pth").is_file()

    # eval with the data root only in $TEST_DATA_ROOT
    metrics = tmp_path / "metrics" / "metrics.yaml"
    result = run_script(wd, "eval.py", "--load-weights", str(out / "latest.pth"), "--save-metrics-to", str(metrics),
                        "--batch-size", "4", env={"TEST_DATA_ROOT": str(tiny_dataset / "val")})
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert metrics.is_file()
    data = yaml.safe_load(metrics.read_text(encoding="utf-8"))
    assert isinstance(data["metrics"], list) and data["metrics"]
    keys = {m["key"] for m in data["metrics"]}
    assert "accuracy" in keys
    assert data["dataset"]["source"] == f"class folders under {tiny_dataset / 'val'}"
    assert data["dataset"]["num_images"] == 6  # 3 classes x 2 val images
    assert data["classes"] == ["class_0", "class_1", "class_2"]
