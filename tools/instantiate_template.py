#!/usr/bin/env python3
"""Turn a model template into a work dir holding template.yaml and the domain's scripts.

  python tools/instantiate_template.py TEMPLATE WORK_DIR [--do-not-load-snapshot] [--overwrite]

The template is validated first. Its snapshot (initial weights with sha256 and size: a URL, a local path, or
package://MODULE/PATH, a file inside an installed Python package, which needs no network), when it declares
one, is copied into WORK_DIR/snapshot.pth and verified, unless --do-not-load-snapshot is given; offline, a URL
snapshot is skipped with a warning and the work dir trains from scratch.
"""
from __future__ import annotations

import argparse
import importlib
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"


def domain_dir(template_path: Path) -> Path:
    """The domain folder (models/<domain>) whose scripts serve this template, read from its 'domain' key."""
    import yaml

    try:
        data = yaml.safe_load(template_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SystemExit(f"error: {template_path}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    domain = data.get("domain") if isinstance(data, dict) else None
    known = sorted(p.name for p in MODELS_DIR.iterdir() if (p / "scripts").is_dir())
    if domain not in known:
        raise SystemExit(f"error: {template_path}: domain '{domain}' is not one of {', '.join(known)}")
    return MODELS_DIR / domain


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("template", type=Path, help="path to a template.yaml")
    parser.add_argument("work_dir", type=Path, help="folder to create")
    parser.add_argument("--do-not-load-snapshot", action="store_true", help="skip fetching the initial weights")
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty WORK_DIR (files are replaced)")
    args = parser.parse_args()

    template_path = args.template.resolve()
    if not template_path.is_file():
        print(f"error: template {args.template} does not exist", file=sys.stderr)
        return 2
    domain = domain_dir(template_path)  # its code is the installed `workbench` package (init_venv.sh)
    errors = importlib.import_module("clsengine.errors")
    template_module = importlib.import_module("workbench.template")
    hub = importlib.import_module("clsengine.hub")
    try:
        template = template_module.load_template(template_path)
    except errors.UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    work_dir = args.work_dir.resolve()
    if work_dir.exists() and not work_dir.is_dir():
        print(f"error: {work_dir} exists and is not a directory", file=sys.stderr)
        return 2
    if work_dir.is_dir() and any(work_dir.iterdir()) and not args.overwrite:
        print(f"error: {work_dir} is not empty; choose another folder or pass --overwrite", file=sys.stderr)
        return 2
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a path under a file, a read-only or full disk
        error = importlib.import_module("clsengine.fileio").write_error(work_dir, exc)
        print(f"error: {error or f'cannot create {work_dir}: {exc.strerror}'}", file=sys.stderr)
        return 2

    for item in template_path.parent.iterdir():  # the template and anything shipped beside it
        if item.is_file():
            shutil.copy2(item, work_dir / item.name)
    if template_path.name != "template.yaml":
        shutil.copy2(template_path, work_dir / "template.yaml")
    for script in sorted((domain / "scripts").glob("*.py")):
        shutil.copy2(script, work_dir / script.name)
    shutil.copytree(domain / "workbench", work_dir / "workbench", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

    if template.snapshot is not None and not args.do_not_load_snapshot:
        location = template.snapshot.location
        if not hub.is_url(location) and not hub.is_package(location) and not Path(location).is_absolute():
            location = str(template_path.parent / location)
        try:
            hub.fetch_snapshot(location, work_dir / "snapshot.pth", template.snapshot.sha256, template.snapshot.size,
                               package=template.snapshot.package)
            print(f"Snapshot {template.snapshot.location} verified and saved as {work_dir / 'snapshot.pth'}")
        except hub.OfflineError as exc:
            print(f"warning: {exc}; the work dir trains from scratch")
        except errors.UserError as exc:
            print(f"error: {exc}; the work dir was created without it and trains from scratch", file=sys.stderr)
            return 2
    scripts = ", ".join(p.name for p in sorted((domain / "scripts").glob("*.py")))
    print(f"Instantiated {template.name} in {work_dir} ({scripts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
