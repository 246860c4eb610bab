"""Flags shared by the work-dir scripts, environment fallbacks, and one-line errors instead of tracebacks."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from clsengine.errors import UserError

from .template import TemplateError, parse_override

WORK_DIR = Path(sys.argv[0]).resolve().parent


def add_template_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--template", default=str(WORK_DIR / "template.yaml"),
                        help="template.yaml to read (default: the one in this work dir)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override any template setting, e.g. training.optimizer.name=adamw "
                             "model.dropout=0.3 (values are YAML)")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu-num", type=int, default=None,
                        help="GPUs to use (0: CPU; default: the template's gpu_num, CPU when no CUDA device)")
    parser.add_argument("--batch-size", type=int, default=None, help="override hyper_parameters.basic.batch_size")
    parser.add_argument("--workers", type=int, default=None, help="data-loading processes (training.workers)")


def add_data_args(parser: argparse.ArgumentParser, split: str, env: str) -> None:
    parser.add_argument(f"--{split}-ann-files", default="",
                        help=f"annotation file of the {split} data ('' for class folders)")
    parser.add_argument(f"--{split}-data-roots", default=None,
                        help=f"{split} images: a folder with one sub-folder per class (default: ${env})")


def data_root(args: argparse.Namespace, split: str, env: str) -> str:
    """The data root from the flag, else from the environment variable; annotation files are not read yet."""
    ann = getattr(args, f"{split}_ann_files")
    if ann:
        raise UserError(f"--{split}-ann-files {ann}: annotation files are not supported yet; "
                        f"pass '' and a class-folder root in --{split}-data-roots")
    root = getattr(args, f"{split}_data_roots") or os.environ.get(env, "")
    if not root:
        raise UserError(f"no {split} data: pass --{split}-data-roots or set {env}")
    return root


def collect_overrides(args: argparse.Namespace, flag_keys: dict[str, str]) -> dict[str, Any]:
    """Dotted overrides from KEY=VALUE arguments plus the dedicated flags (the flags win)."""
    overrides: dict[str, Any] = {}
    for text in args.overrides:
        key, value = parse_override(text)
        overrides[key] = value
    for attr, key in flag_keys.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides[key] = value
    return overrides


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
    sys.exit(code or 0)
