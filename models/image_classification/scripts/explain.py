#!/usr/bin/env python3
"""Saliency maps (where the model saw the class) for one image or a folder, from a checkpoint or an exported IR.

  python explain.py --load-weights outputs/best.pth --input photos/ --save-to saliency [--target-class NAME]
  python explain.py --load-weights export/model.xml --input photos/ --save-to saliency   # export.py --explain

Writes, per image, a PNG of the image with the Recipro-CAM map of the predicted class (multi-label: the
top-scoring label), or of --target-class, blended over it as a heat map (red: salient), mirroring the input
folder's tree (photo.jpg -> photo.jpg.png), plus summary.csv (image, class explained, its score, overlay).
The maps have the resolution of the network's last feature map (input / 32, or / 16 with model.small_input)
and are upsampled to the image. An exported IR or ONNX file must carry the saliency output that
export.py --explain adds; one without it is refused (explain its checkpoint instead). Int8 checkpoints are
refused too: the maps are computed on the float model.

  python explain.py --load-weights outputs/best.pth --input val/ --save-to saliency --check [--check-images 32]

--check judges the maps instead of drawing them (clsengine/saliency_checks.py), on --check-images images
spread evenly over --input, each explained for its predicted class (or --target-class):
  model randomisation (Adebayo et al. 2018): the maps of the same architecture re-initialised (built afresh,
    seed 0; BatchNorm statistics from the checked images) must differ from the trained model's: mean Spearman
    rank correlation below 0.5;
  deletion (Petsiuk et al. 2018): setting the most salient pixels to the image's mean colour first must lower
    the class probability faster than in random orders (the map's cells shuffled, 3 times): mean deletion AUC
    of the saliency order below 0.8 times that of the random orders.
It prints a table and writes <save-to>/saliency_checks.yaml. It needs a float training checkpoint (the
randomisation rebuilds the architecture): an IR, an ONNX file or an int8 checkpoint is refused.

Exit status: 0 done (every check passed); 2 an error you can fix (one "error:" line); 4 a check failed.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml
from tqdm import tqdm

from clsengine import data as datasets
from clsengine import predictions
from clsengine.data.image import UnreadableImageError
from clsengine.errors import UserError
from clsengine import saliency_checks
from clsengine.export import DeployModel
from clsengine.fileio import write_bytes, write_text
from clsengine.inference import is_exported_model
from clsengine.saliency import METHOD, overlay
from workbench import cli, factories
from workbench.classifier import Classifier, load_classifier

WORK_DIR = Path(__file__).resolve().parent  # the work dir this script was instantiated into

MAX_BATCH = 16   # images decoded at full size at once (for the overlays)
CHECK_FAILED = 4  # exit status when --check finds a check failed


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-weights", required=True,
                   help="model: training checkpoint (best.pth), or an OpenVINO IR (.xml) / ONNX file written by "
                        "export.py --explain")
    p.add_argument("--input", required=True, help="an image file or a folder of images (searched recursively)")
    p.add_argument("--save-to", default=str(WORK_DIR / "saliency"), help="output folder")
    p.add_argument("--target-class", default=None, metavar="NAME",
                   help="explain this class in every image (default: each image's predicted class)")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the heat map over the image (0..1)")
    p.add_argument("--class-id-path", default=None, help="class names of bare weights: JSON list or {\"0\": name}")
    p.add_argument("--check", action="store_true",
                   help="run the saliency sanity checks (model randomisation, deletion) instead of writing overlays; "
                        f"writes <save-to>/saliency_checks.yaml; exit status {CHECK_FAILED} when a check fails")
    p.add_argument("--check-images", type=int, default=32, metavar="N",
                   help="--check: images used, spread evenly over --input (default 32)")
    cli.add_exported_model_args(p)
    cli.add_runtime_args(p)
    cli.add_template_args(p, WORK_DIR)
    return p.parse_intermixed_args()


def why_no_saliency(model: Classifier, path: str) -> str:
    if model.kind == "int8 checkpoint":
        return (f"{path} is an int8 checkpoint; saliency maps are computed on the float model: explain the "
                f"checkpoint it was compressed from")
    return (f"{path} has no saliency output: export the checkpoint with export.py --explain, or explain the "
            f"checkpoint itself")


def target_index(model: Classifier, name: str | None, path: str) -> int | None:
    if name is None:
        return None
    if name not in model.classes:
        raise UserError(f"--target-class '{name}' is not a class of {path}; its classes: {', '.join(model.classes)}")
    return model.classes.index(name)


def check_model(args: argparse.Namespace, names: list[str] | None) -> Classifier:
    """The float checkpoint --check judges: the randomisation check rebuilds its architecture with fresh weights,
    which an exported file does not allow, and an int8 model has no float maps."""
    if is_exported_model(args.load_weights):
        raise UserError(f"--check needs a training checkpoint, not the exported {args.load_weights}: the model-"
                        f"randomisation check re-initialises the model's weights; check the checkpoint it was "
                        f"exported from")
    model = load_classifier(args.load_weights, template_path=args.template, overrides=cli.collect_overrides(args),
                            classes=names, classes_source=f"class-id file {args.class_id_path}")
    if model.kind != "checkpoint":
        raise UserError(f"--check needs a float checkpoint; {args.load_weights} is an {model.kind}: check the "
                        f"checkpoint it was compressed from")
    return model


def check_images(model: Classifier, files: list[str], count: int, source: str) -> tuple[torch.Tensor, list[str]]:
    """`count` images spread evenly over `files` (sorted), decoded and resized as the model sees them."""
    chosen = [files[i * len(files) // count] for i in range(count)] if len(files) > count else files
    transform, images, used = model.transform(), [], []
    for path in chosen:
        try:
            images.append(transform(datasets.read_image(path)))
            used.append(path)
        except UnreadableImageError as exc:
            print(f"warning: skipped {path}: {exc.reason}")
    if not images:
        raise UserError(f"--check: no readable image among the {len(chosen)} chosen from {source}")
    return torch.stack(images).to(model.device), used


def randomised_explainer(model: Classifier, images: torch.Tensor, batch_size: int) -> DeployModel:
    """Recipro-CAM of the model's architecture built afresh (its own initialisation, a fixed seed), fed exactly
    as the trained model is (same preprocessing inside the graph), BatchNorm statistics from `images`."""
    t = model.template
    fresh = saliency_checks.reinitialised(lambda: factories.build_model(t, len(model.classes)))
    randomised = DeployModel(fresh, t.input.mean, t.input.std, input_order=model.input_order,
                             train_order=t.input.channel_order, explain=True, multilabel=model.multilabel)
    return saliency_checks.estimate_batchnorm(randomised.to(model.device), images, batch_size)


def run_check(args: argparse.Namespace, names: list[str] | None) -> int:
    """--check: both sanity checks on the checkpoint's Recipro-CAM maps; the table, the YAML, the exit status."""
    if args.check_images < 1:
        raise UserError(f"--check-images must be at least 1, got {args.check_images}")
    model = check_model(args, names)
    target = target_index(model, args.target_class, args.load_weights)
    files, _ = datasets.list_images(args.input)
    images, used = check_images(model, files, args.check_images, args.input)
    batch = min(MAX_BATCH, factories.eval_batch_size(model.template))
    results = saliency_checks.run_checks(model.explain, randomised_explainer(model, images, batch), images,
                                         score=model.run, target=target, multilabel=model.multilabel,
                                         batch_size=batch, progress=True)
    summary = saliency_checks.report(results, model=str(args.load_weights), method=METHOD, input=str(args.input),
                                     images=len(used), explained_class=args.target_class or "predicted")
    out = Path(args.save_to)
    out.mkdir(parents=True, exist_ok=True)
    path = write_text(out / "saliency_checks.yaml", yaml.safe_dump(summary, sort_keys=False))
    print(f"Saliency sanity checks of {args.load_weights} (Recipro-CAM, {len(used)} images of {args.input}, "
          f"{'class ' + repr(args.target_class) if target is not None else 'predicted class'}):\n")
    print(saliency_checks.format_table(results))
    verdict = "All checks passed" if summary["passed"] else "A check FAILED: the maps may not show what the model uses"
    print(f"\n{verdict}; written to {path}")
    return 0 if summary["passed"] else CHECK_FAILED


def png_bytes(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))[1].tobytes()   # OpenCV writes BGR


def main() -> int:
    args = parse_args()
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha must be between 0 and 1, got {args.alpha}")
    names = predictions.read_class_names(args.class_id_path) if args.class_id_path else None
    if args.check:
        return run_check(args, names)
    model = load_classifier(args.load_weights, template_path=args.template,
                            overrides=cli.collect_overrides(args), classes=names,
                            classes_source=f"class-id file {args.class_id_path}", device=args.device,
                            runtime=args.runtime)
    if model.explain is None:
        raise UserError(why_no_saliency(model, args.load_weights))
    target = target_index(model, args.target_class, args.load_weights)
    files, skipped = datasets.list_images(args.input)
    out, base = Path(args.save_to), predictions.mirror_base(files, args.input)
    out.mkdir(parents=True, exist_ok=True)
    transform, batch = model.transform(), min(MAX_BATCH, factories.eval_batch_size(model.template))
    rows = []
    bar = tqdm(total=len(files), desc=f"explain ({model.kind})", unit="image", leave=False, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    for start in range(0, len(files), batch):
        images = {}
        for path in files[start:start + batch]:
            try:
                images[path] = datasets.read_image(path)
            except UnreadableImageError as exc:   # passed the scan, failed to decode
                skipped.append((path, exc.reason))
        if images:
            with torch.no_grad():
                logits, maps = model.explain(torch.stack([transform(i) for i in images.values()]).to(model.device))
            probs = model.probabilities(logits.float().cpu()).numpy()
            for (path, image), p, m in zip(images.items(), probs, maps.float().cpu().numpy()):
                c = int(p.argmax()) if target is None else target
                dest = predictions.prediction_file(out, path, base, ".png")
                dest.parent.mkdir(parents=True, exist_ok=True)
                write_bytes(dest, png_bytes(overlay(image, m[c], args.alpha)))
                rows.append([path, model.classes[c], f"{p[c]:.6f}", str(dest)])
        bar.update(len(files[start:start + batch]))
    bar.close()
    text = io.StringIO()
    csv.writer(text).writerows([["img_path", "class", "score", "overlay"], *rows])
    summary = write_text(out / "summary.csv", text.getvalue())
    for path, reason in skipped:
        print(f"warning: skipped {path}: {reason}")
    what = f"class '{args.target_class}'" if target is not None else "the predicted class"
    print(f"Explained {len(rows)} image(s) with the {model.kind} {args.load_weights} (Recipro-CAM of {what}); "
          f"overlays in {out}, summary in {summary}")
    return 0


if __name__ == "__main__":
    cli.run(main)
