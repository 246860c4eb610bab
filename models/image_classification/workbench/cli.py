"""Flags shared by the work-dir scripts, environment fallbacks, and one-line errors instead of tracebacks."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import yaml

from clsengine import data as datasets
from clsengine import distributed as dist
from clsengine.errors import UserError
from clsengine.fileio import WRITE_ERRNOS, write_error
from clsengine.inference import RUNTIMES
from clsengine.rundir import LOCK_FILE, RunLock, claim_run_folder, release_all

from .loaders import report_skipped
from .template import Template, TemplateError, parse_override

def add_template_args(parser: argparse.ArgumentParser, work_dir: Path) -> None:
    """--template (default: the work dir's) and KEY=VALUE overrides."""
    parser.add_argument("--template", default=str(work_dir / "template.yaml"),
                        help="template.yaml to read (default: the one in this work dir)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override any template setting, e.g. training.optimizer.name=adamw "
                             "model.dropout=0.3 (values are YAML)")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu-num", type=int, default=None,
                        help="GPUs to use (0: CPU; default: the template's gpu_num, CPU when no CUDA device)")
    parser.add_argument("--batch-size", type=int, default=None, help="override hyper_parameters.basic.batch_size")
    parser.add_argument("--workers", type=int, default=None, help="data-loading processes (training.workers)")


def add_exported_model_args(parser: argparse.ArgumentParser) -> None:
    """How an exported model (.xml / .onnx) is run: eval.py and predict.py share these."""
    parser.add_argument("--device", default="CPU",
                        help="device for .xml/.onnx models: CPU, GPU, NPU... (onnxruntime: CPU, or GPU through CUDA)")
    parser.add_argument("--runtime", choices=RUNTIMES, default=None,
                        help="runtime for an .onnx model (default: onnxruntime; an IR always runs in OpenVINO)")


def add_data_args(parser: argparse.ArgumentParser, split: str, env: str) -> None:
    parser.add_argument(f"--{split}-ann-files", default="",
                        help=f"{split} annotations: a list file of 'relative/path label' lines or a COCO JSON "
                             f"('' or left out: class folders)")
    parser.add_argument(f"--{split}-data-roots", default=None,
                        help=f"{split} images: a folder with one sub-folder per class, or the folder the "
                             f"annotation file's paths are relative to (default: ${env}; with an annotation "
                             f"file, its own folder)")


# The flags that stand for a template key, by argparse dest: one table for every work-dir script (a script maps
# the ones it has). A script whose flag of the same name means another key (compress.py's --epochs are QAT
# epochs) gives its own table to collect_overrides, which wins.
FLAG_KEYS = {"epochs": "hyper_parameters.basic.epochs", "time_budget": "hyper_parameters.basic.time_budget",
             "batch_size": "hyper_parameters.basic.batch_size",
             "base_learning_rate": "hyper_parameters.basic.base_learning_rate",
             "gpu_num": "gpu_num", "workers": "training.workers",
             "data_format": "data.format", "category_map": "data.category_map", "classes": "data.classes",
             "class_weights": "data.class_weights", "balanced_sampler": "data.balanced_sampler"}


def _name_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated class names, got {text!r}")
    return names


def _weights(text: str) -> str | list[float]:
    if text in ("none", "auto"):
        return text
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected none, auto or comma-separated numbers, got {text!r}") from None


def add_dataset_args(parser: argparse.ArgumentParser, training: bool = False) -> None:
    """How annotation files are read (template section `data`); `training` adds the balancing flags."""
    g = parser.add_argument_group("dataset format (template section data)")
    g.add_argument("--data-format", choices=datasets.FORMATS, default=None,
                   help="dataset layout (data.format; auto: class folders without an annotation file, COCO for "
                        "a .json one, a label list otherwise)")
    g.add_argument("--class-id-path", default=None,
                   help="class names of integer labels: text lines 'id name' or JSON (a list or {\"0\": name})")
    g.add_argument("--category-map", default=None, type=lambda p: str(Path(p).expanduser().resolve()),
                   help="COCO: JSON {category_id: logit} selecting and merging categories (data.category_map)")
    g.add_argument("--classes", type=_name_list, default=None, metavar="A,B,C",
                   help="use only these classes, in this order (data.classes)")
    if training:
        g.add_argument("--class-weights", type=_weights, default=None, metavar="auto|none|W1,W2,...",
                       help="loss weight per class: auto (inverse frequency) or one number per class "
                            "(data.class_weights)")
        g.add_argument("--balanced-sampler", action="store_const", const=True, default=None,
                       help="draw training images so that every class is seen equally often "
                            "(data.balanced_sampler)")


def scan_split(args: argparse.Namespace, split: str, env: str, t: Template,
               classes: list[str] | None = None) -> datasets.DatasetScan:
    """The images and labels of one split, read as the template's data section (and the flags) say.

    `classes` fixes class order and the names of integer labels (e.g. the training classes for the
    validation split); else they come from --class-id-path, the class folders or the annotations.
    data.classes then restricts the scan to a subset.
    """
    ann = getattr(args, f"{split}_ann_files", "") or ""
    root = getattr(args, f"{split}_data_roots", None) or os.environ.get(env, "")
    if not ann and not root:
        raise UserError(f"no {split} data: pass --{split}-data-roots (and --{split}-ann-files) or set {env}")
    try:
        fmt = datasets.dataset_format(ann, t.data.format)
    except UserError as exc:
        raise UserError(f"{split} data (--{split}-ann-files, data.format / --data-format): {exc}") from None
    class_id_path = getattr(args, "class_id_path", None)
    if fmt != "list":  # class folders name their classes (a reference list would only renumber them), COCO
        classes = None  # files take theirs from the categories
    if classes is None and class_id_path and fmt != "coco":
        classes = datasets.read_class_names(class_id_path)
    # A relative path is read from the template's folder (the work dir, for its own template.yaml).
    template_dir = Path(getattr(args, "template", ".")).resolve().parent
    category_map = t.data.category_map and template_dir / Path(t.data.category_map).expanduser()
    if category_map and fmt != "coco":
        raise UserError(f"data.category_map {t.data.category_map} applies to COCO annotation files only")
    scan = datasets.scan_dataset(root or None, ann, fmt=fmt, classes=classes, category_map=category_map or None)
    if t.data.classes:
        scan = datasets.select_classes(scan, t.data.classes, what="data.classes (--classes)")
    if scan.multilabel and t.task.type != "multilabel":
        raise UserError(f"{split} data ({scan.source}) has images with several labels, but task.type is "
                        f"multiclass; use a multi-label template or task.type=multilabel")
    return scan


def scan_train_val(args: argparse.Namespace, t: Template, logger: logging.Logger, out: Path,
                   classes: list[str] | None = None) -> tuple[datasets.DatasetScan, datasets.DatasetScan]:
    """Training and validation splits with the same classes (`classes`: a checkpoint's, else the training
    data's); unreadable files are logged and listed in out/skipped_images.txt."""
    train = scan_split(args, "train", "TRAIN_DATA_ROOT", t, None if t.data.classes else classes)
    reference = classes or train.classes
    val = scan_split(args, "val", "VAL_DATA_ROOT", t, None if t.data.classes else reference)
    for name, scan in (("train", train), ("val", val)):
        if classes is not None:
            datasets.check_same_classes(classes, scan.classes, "the checkpoint", f"{name} data ({scan.source})")
        report_skipped(scan, logger, out / "skipped_images.txt" if dist.info().is_main else None)  # rank 0 writes
    datasets.check_same_classes(train.classes, val.classes, f"train data ({train.source})", f"val data ({val.source})")
    return train, val


HPO_BEST = "hpo_best.yaml"   # written by optimize.py into the work dir, applied by train.py


def hpo_overrides(path: Path) -> dict[str, Any]:
    """The template keys optimize.py chose ({} when there is no such file); a damaged file is an error."""
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML ({getattr(exc, 'problem', exc)}); delete it or rerun optimize.py")
    params = data.get("params") if isinstance(data, dict) else None
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise UserError(f"{path}: expected a 'params' mapping of template keys; delete it or rerun optimize.py")
    return dict(params)


def collect_overrides(args: argparse.Namespace, own_flag_keys: dict[str, str] | None = None) -> dict[str, Any]:
    """Dotted overrides from KEY=VALUE arguments plus the dedicated flags (the flags win): FLAG_KEYS, with the
    script's own table over it."""
    return {key: value for key, (value, _) in override_sources(args, own_flag_keys).items()}


def override_sources(args: argparse.Namespace, own_flag_keys: dict[str, str] | None = None
                     ) -> dict[str, tuple[Any, str]]:
    """{dotted key: (value, where it came from: "KEY=VALUE" or the flag)}, in the order collect_overrides
    applies them."""
    found: dict[str, tuple[Any, str]] = {}
    for text in args.overrides:
        key, value = parse_override(text)
        found[key] = (value, "KEY=VALUE")
    for attr, key in {**FLAG_KEYS, **(own_flag_keys or {})}.items():
        value = getattr(args, attr, None)
        if value is not None:
            found[key] = (value, "--" + attr.replace("_", "-"))
    return found


def describe_sources(sources: dict[str, tuple[Any, str]], hpo: dict[str, Any], hpo_file: Path) -> str | None:
    """One log line: each template value the run sets and where it came from (None when there is none)."""
    items = {key: (value, hpo_file.name) for key, value in hpo.items()} | sources
    if not items:
        return None
    return "Settings given: " + ", ".join(f"{key}={value!r} ({source})" for key, (value, source) in items.items())


def run(main: Callable[[], int | None]) -> None:
    """Run a script's main: user errors become one 'error:' line and exit status 2."""
    warnings.filterwarnings("ignore", category=UserWarning, module="albumentations")
    try:
        code = main()
    except (UserError, TemplateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:  # a write outside the project's own file helpers: a full disk, a read-only folder,
        # an output path under a file
        error = write_error(exc.filename or "a file", exc) if exc.errno in WRITE_ERRNOS else None
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        release_all()  # the run folders' locks (a main run in-process by a test or a tool returns here)
    sys.exit(code or 0)


def add_overwrite_arg(parser: argparse.ArgumentParser, folder_flag: str) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"start afresh where {folder_flag} holds an earlier run: its checkpoints, logs and "
                             f"curves are removed first (without the flag such a folder is refused)")


def claim_output(out: Path, what: str, run_names: tuple[str, ...], clear_names: tuple[str, ...],
                 resume_from: str | None, overwrite: bool) -> RunLock:
    """Lock `out` for this script (rank 0 only; the other ranks write nothing) and refuse to start a fresh run
    over an earlier one's `run_names`; resuming is continuing the run whose checkpoint lies in `out`."""
    if not dist.info().is_main:
        return RunLock(out / LOCK_FILE, -1)
    resuming = resume_from is not None and Path(resume_from).resolve().parent == out.resolve()
    return claim_run_folder(out, what, run_names=run_names, resuming=resuming, overwrite=overwrite,
                            resume_hint=f"--resume-from {out / 'latest.pth'}", clear_names=clear_names)
