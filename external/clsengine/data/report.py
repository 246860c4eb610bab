"""Dataset insight printed before training: images per class, imbalance, what was left out, and the
accuracy of always predicting the most common class (the floor any model has to beat)."""
from __future__ import annotations

from typing import Any

from .folder import DatasetScan

_NAME_WIDTH = 28  # longer class names are cut in the table


def _split_report(scan: DatasetScan) -> dict[str, Any]:
    counts = scan.counts()
    return {
        "source": scan.source,
        "images": len(scan.samples),
        "per_class": {name: int(n) for name, n in zip(scan.classes, counts)},
        "unlabeled": len(scan.unlabeled),
        "failed_to_load": len(scan.skipped),
        "imbalance_ratio": float(max(counts) / min(counts)) if counts and min(counts) > 0 else None,
        "empty_classes": [name for name, n in zip(scan.classes, counts) if n == 0],
    }


def _label_set(label: int | tuple[int, ...]) -> set[int]:
    return {int(i) for i in label} if isinstance(label, (tuple, list)) else {int(label)}


def _majority_accuracy(scan: DatasetScan, name: str | None) -> float:
    """% of samples whose label (set) is exactly {name}."""
    if name is None or name not in scan.classes or not scan.samples:
        return 0.0
    target = {scan.classes.index(name)}
    return 100.0 * sum(_label_set(label) == target for _, label in scan.samples) / len(scan.samples)


def dataset_report(train: DatasetScan, val: DatasetScan | None = None) -> dict[str, Any]:
    """Per-split class counts and the majority-class baseline (on val, or train without val), as plain
    Python types. For multi-label data the baseline is the exact-match rate of predicting only that class."""
    counts = train.counts()
    majority = train.classes[counts.index(max(counts))] if counts else None
    baseline_split = val if val is not None else train
    return {
        "classes": list(train.classes),
        "multilabel": bool(train.multilabel or (val is not None and val.multilabel)),
        "train": _split_report(train),
        "val": _split_report(val) if val is not None else None,
        "majority_class": majority,
        "majority_baseline": {"split": "val" if val is not None else "train",
                              "accuracy": _majority_accuracy(baseline_split, majority)},
    }


def _cell(name: str, width: int) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."


def format_dataset_report(report: dict[str, Any], max_rows: int = 40) -> str:
    """The report as text: a class table, then images, imbalance, left-out images and the baseline.

    With more than `max_rows` classes the table shows the most and the least common half each.
    """
    train, val = report["train"], report["val"]
    names = list(report["classes"])
    width = max(5, min(_NAME_WIDTH, max((len(n) for n in names), default=5)))
    kind = "multi-label" if report["multilabel"] else "single-label"
    lines = [f"Dataset: {len(names)} classes, {kind}"]
    header = f"  {'class':<{width}}  {'train':>7}"
    if val is not None:
        header += f"  {'val':>7}"
    header += f"  {'train %':>7}"
    lines += [header, "  " + "-" * (len(header) - 2)]

    def row(name: str) -> str:
        n = train["per_class"].get(name, 0)
        share = 100.0 * n / train["images"] if train["images"] else 0.0
        text = f"  {_cell(name, width):<{width}}  {n:>7}"
        if val is not None:
            text += f"  {val['per_class'].get(name, 0):>7}"
        return text + f"  {share:>6.1f}%"

    half = max(1, max_rows // 2)
    if len(names) > 2 * half:
        ordered = sorted(names, key=lambda n: -train["per_class"].get(n, 0))  # stable: ties keep class order
        lines += [row(n) for n in ordered[:half]]
        lines.append(f"  ... {len(names) - 2 * half} more classes ...")
        lines += [row(n) for n in ordered[-half:]]
    else:
        lines += [row(n) for n in names]

    images = f"Images: train {train['images']} ({train['source']})"
    if val is not None:
        images += f", val {val['images']} ({val['source']})"
    if report["multilabel"]:
        images += " (a multi-label image counts once per label in the table; % is of train images)"
    lines.append(images)
    for split_name, split in (("train", train), ("val", val)):
        if split is None:
            continue
        if split["empty_classes"]:
            empty = split["empty_classes"]
            shown = ", ".join(empty[:10]) + (f", ... ({len(empty)} in all)" if len(empty) > 10 else "")
            lines.append(f"Classes without images in {split_name}: {shown}")
        elif split_name == "train":
            lines.append(f"Imbalance ratio (train, most / least common class): {split['imbalance_ratio']:.1f}")
    left_out = [("Unlabeled (not used)", "unlabeled"), ("Failed to load (skipped)", "failed_to_load")]
    for title, key in left_out:
        text = f"{title}: train {train[key]}"
        if val is not None:
            text += f", val {val[key]}"
        lines.append(text)
    baseline = report["majority_baseline"]
    measure = "exact-match accuracy" if report["multilabel"] else "accuracy"
    lines.append(f"Majority baseline: always '{report['majority_class']}' gives {baseline['accuracy']:.1f}% "
                 f"{measure} on {baseline['split']}")
    return "\n".join(lines)


__all__ = ["dataset_report", "format_dataset_report"]
