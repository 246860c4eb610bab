"""Scores a user can act on: temperature scaling, per-class thresholds and an "unknown" answer, fitted on the
validation set after training and carried by the checkpoint and the exported model.

- Temperature (Guo et al. 2017): one scalar T for a softmax model (minimising the validation NLL of
  softmax(logits / T)). Dividing logits by a positive T never changes the ranking of classes, so accuracy is
  untouched: only what a 0.9 means changes.
- Platt scaling per class for a multi-label model: sigmoid(logits / T_c + b_c), each class's binary NLL
  minimised. The bias matters there: an asymmetric loss (ASL) shifts every sigmoid, which no temperature
  alone undoes; it never changes the ranking within a class (so neither AP nor mAP).
- Per-class thresholds (multi-label): each class's threshold on its calibrated probability, chosen on the
  validation set for the best F1, or for the lowest threshold that reaches a target precision.
- Rejection (single-label): a score per image (the maximum calibrated probability, or the negative energy
  -T logsumexp(logits / T), Liu et al. 2020) and a threshold below which the answer is "unknown", chosen so
  that a stated share of the validation images the model gets right is kept.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

REJECTION_SCORES = ("max_prob", "energy")
ECE_BINS = 15
_T_RANGE = (0.05, 20.0)   # temperatures outside it mean a degenerate fit (all-correct or constant logits)


@dataclass
class Calibration:
    """What a checkpoint and an exported model carry: plain values (checkpoint- and metadata-safe)."""
    temperature: float | list[float] = 1.0     # a scalar (softmax) or one per class (multi-label sigmoids)
    bias: list[float] | None = None            # multi-label: per-class Platt offsets, added after / T
    thresholds: list[float] | None = None      # multi-label: per-class thresholds on calibrated probabilities
    rejection_score: str | None = None         # single-label: max_prob | energy; None: never "unknown"
    reject_below: float | None = None          # the score under which the answer is "unknown"
    keep: float | None = None                  # the share of correct validation predictions the threshold keeps
    fitted_on: dict[str, Any] = field(default_factory=dict)   # images, NLL/ECE before and after

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Calibration | None":
        if not data:
            return None
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        calibration = cls(**known)
        if calibration.rejection_score not in (None, *REJECTION_SCORES):
            raise UserError(f"calibration.rejection_score must be one of {', '.join(REJECTION_SCORES)}, got "
                            f"'{calibration.rejection_score}'")
        return calibration

    def temperatures(self, num_classes: int) -> torch.Tensor:
        t = torch.as_tensor(self.temperature, dtype=torch.float32)
        return t.expand(num_classes) if t.dim() == 0 else t

    def scaled(self, logits: torch.Tensor) -> torch.Tensor:
        """logits / T (+ b): what the softmax or the sigmoids take."""
        bias = torch.as_tensor(self.bias, dtype=torch.float32) if self.bias is not None else None
        return scale_logits(logits.float(), 1.0 / self.temperatures(logits.shape[1]), bias)

    def probabilities(self, logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
        scaled = self.scaled(logits)
        return torch.sigmoid(scaled) if multilabel else scaled.softmax(dim=1)

    def rejection(self, logits: torch.Tensor) -> torch.Tensor:
        """The per-image rejection score (higher: more confident)."""
        return rejection_scores(logits, float(self.temperature), self.rejection_score or "max_prob")

    def unknown(self, logits: torch.Tensor) -> torch.Tensor:
        """True where the answer is "unknown" (never, without a rejection threshold)."""
        if self.reject_below is None:
            return torch.zeros(logits.shape[0], dtype=torch.bool)
        return self.rejection(logits) < self.reject_below


# The maths on tensors only, so that the exported graph (export.DeployModel, its constants as buffers) traces
# the same functions that eval and predict apply from a checkpoint's Calibration.
def scale_logits(logits: torch.Tensor, inv_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """logits x 1/T (+ b), 1/T a scalar or one per class."""
    scaled = logits * inv_t
    return scaled + bias if bias is not None else scaled


def rejection_of_scaled(scaled: torch.Tensor, inv_t: torch.Tensor, kind: str) -> torch.Tensor:
    """max_prob: the top softmax probability of logits / T; energy: T logsumexp(logits / T) (both higher for
    images the model knows). `scaled` is logits / T."""
    if kind == "max_prob":
        return scaled.softmax(dim=1).max(dim=1).values
    if kind == "energy":
        return torch.logsumexp(scaled, dim=1) / inv_t.reshape(-1)[0]
    raise UserError(f"rejection score must be one of {', '.join(REJECTION_SCORES)}, got '{kind}'")


def rejection_scores(logits: torch.Tensor, temperature: float, kind: str) -> torch.Tensor:
    """The per-image rejection score (rejection_of_scaled) of raw logits at temperature T."""
    inv_t = torch.tensor(1.0 / temperature, dtype=torch.float32)
    return rejection_of_scaled(scale_logits(logits.float(), inv_t), inv_t, kind)


_LOG_T_BOUND = math.log(_T_RANGE[1])
_BIAS_BOUND = 10.0


def _log_t(u: torch.Tensor) -> torch.Tensor:
    """log T from an unbounded parameter, within +-log(20): a separable validation set (every answer right)
    would otherwise drive T to 0 and the optimiser to overflow."""
    return _LOG_T_BOUND * torch.tanh(u / _LOG_T_BOUND)


def _minimise(loss_of, params: list[torch.Tensor]) -> None:
    """L-BFGS (strong Wolfe line search) on `params` in place: the NLLs here are smooth and convex in practice.
    Parameters that end non-finite are reset to 0 (the identity calibration)."""
    optimizer = torch.optim.LBFGS(params, lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_of()
        loss.backward()
        return loss

    try:
        optimizer.step(closure)
    except RuntimeError:  # an overflowing line search on degenerate data
        pass
    with torch.no_grad():
        for p in params:
            if not torch.isfinite(p).all():
                p.zero_()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The scalar T minimising the NLL of softmax(logits / T) (single-label), fitted on log T."""
    logits, labels = logits.float(), labels.long()
    u = torch.zeros((), requires_grad=True)
    _minimise(lambda: F.cross_entropy(logits / _log_t(u).exp(), labels), [u])
    return float(_log_t(u.detach()).exp())


def fit_platt(logits: torch.Tensor, targets: torch.Tensor, bias: bool = True) -> tuple[list[float], list[float] | None]:
    """Per class, T_c > 0 (and b_c) minimising the binary NLL of sigmoid(logits / T_c + b_c) (multi-label; the
    classes are independent, so one joint fit of the summed per-class NLLs is each class's own). The targets
    are Platt's (1999) smoothed ones, (n+ + 1) / (n+ + 2) and 1 / (n- + 2), which keep a class its validation
    images separate perfectly from an infinite slope."""
    logits, targets = logits.float(), targets.float()
    positives, negatives = targets.sum(0), (1 - targets).sum(0)
    smoothed = torch.where(targets > 0.5, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    u = torch.zeros(logits.shape[1], requires_grad=True)
    v = torch.zeros(logits.shape[1], requires_grad=bias)

    def loss() -> torch.Tensor:
        scaled = logits / _log_t(u).exp() + _BIAS_BOUND * torch.tanh(v / _BIAS_BOUND)
        return F.binary_cross_entropy_with_logits(scaled, smoothed, reduction="none").mean(0).sum()

    _minimise(loss, [u, v] if bias else [u])
    temperatures = [float(t) for t in _log_t(u.detach()).exp()]
    offsets = [float(b) for b in _BIAS_BOUND * torch.tanh(v.detach() / _BIAS_BOUND)]
    return temperatures, (offsets if bias else None)


def fit_class_temperatures(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """One T per class, no offset (fit_platt without the bias)."""
    return fit_platt(logits, targets, bias=False)[0]


def fit_thresholds(probs: torch.Tensor, targets: torch.Tensor, target_precision: float | None = None,
                   default: float = 0.5) -> list[float]:
    """Per class: the threshold with the best validation F1 (ties: the lowest), or with `target_precision` the
    lowest threshold whose precision reaches it (the highest-scoring one when none does). A class without
    positives in the validation set keeps `default`."""
    thresholds = []
    for c in range(probs.shape[1]):
        p, y = probs[:, c].double().numpy(), targets[:, c].numpy() > 0.5
        if not y.any():
            thresholds.append(default)
            continue
        order = np.argsort(-p, kind="stable")
        p_sorted, y_sorted = p[order], y[order]
        tp = np.cumsum(y_sorted)
        predicted = np.arange(1, len(p) + 1)
        distinct = np.r_[p_sorted[1:] != p_sorted[:-1], True]   # cut only between different scores
        precision, recall = tp / predicted, tp / y.sum()
        if target_precision is None:
            f1 = np.where(distinct, 2 * precision * recall / np.maximum(precision + recall, 1e-12), -1)
            best = int(np.argmax(f1))
        else:
            ok = np.flatnonzero(distinct & (precision >= target_precision))
            best = int(ok.max()) if ok.size else 0
        thresholds.append(float(p_sorted[best]))
    return thresholds


def fit_rejection(scores: torch.Tensor, correct: torch.Tensor, keep: float) -> float:
    """The threshold that keeps `keep` of the correctly answered validation images (those scoring at or above
    it): the (1 - keep) quantile of their scores."""
    if not 0 < keep <= 1:
        raise UserError(f"calibration.keep must be in (0, 1], got {keep}")
    right = scores[correct.bool()].double()
    if right.numel() == 0:
        return float(scores.min()) if scores.numel() else 0.0
    return float(torch.quantile(right, 1.0 - keep, interpolation="lower"))


def nll(probs: torch.Tensor, labels: torch.Tensor, multilabel: bool) -> float:
    eps = 1e-12
    if multilabel:
        y = labels.float()
        return float(-(y * (probs + eps).log() + (1 - y) * (1 - probs + eps).log()).mean())
    return float(-(probs[torch.arange(len(labels)), labels.long()] + eps).log().mean())


def brier(probs: torch.Tensor, labels: torch.Tensor, multilabel: bool) -> float:
    onehot = labels.float() if multilabel else F.one_hot(labels.long(), probs.shape[1]).float()
    return float(((probs - onehot) ** 2).sum(1).mean()) if not multilabel else float(((probs - onehot) ** 2).mean())


def reliability(probs: torch.Tensor, labels: torch.Tensor, multilabel: bool, bins: int = ECE_BINS
                ) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error (Guo et al.: |accuracy - confidence| per equal-width confidence bin, weighted
    by the bin's share) and the bins themselves (for the reliability diagram). Single-label: the top-1
    confidence and whether it is right; multi-label: every (image, class) probability and its label."""
    if multilabel:
        confidence, hit = probs.flatten().double(), labels.flatten().double()
    else:
        top, predicted = probs.max(dim=1)
        confidence, hit = top.double(), (predicted == labels.long()).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece, rows = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi) if lo > 0 else (confidence >= lo) & (confidence <= hi)
        n = int(inside.sum())
        if n == 0:
            rows.append({"low": float(lo), "high": float(hi), "count": 0, "confidence": math.nan, "accuracy": math.nan})
            continue
        conf, acc = float(confidence[inside].mean()), float(hit[inside].mean())
        ece += n / len(confidence) * abs(acc - conf)
        rows.append({"low": float(lo), "high": float(hi), "count": n, "confidence": conf, "accuracy": acc})
    return 100.0 * ece, rows


def quality(probs: torch.Tensor, labels: torch.Tensor, multilabel: bool) -> dict[str, float]:
    """NLL, Brier score and ECE (percent, 15 bins) of probabilities against labels."""
    return {"nll": round(nll(probs, labels, multilabel), 4), "brier": round(brier(probs, labels, multilabel), 4),
            "ece": round(reliability(probs, labels, multilabel)[0], 2)}


def calibrate(logits: torch.Tensor, labels: torch.Tensor, multilabel: bool, *, keep: float | None = 0.95,
              rejection_score: str = "max_prob", target_precision: float | None = None,
              default_threshold: float = 0.5) -> Calibration:
    """Everything fitted on one validation set: the temperature(s), then per-class thresholds (multi-label)
    or the rejection threshold (single-label, when `keep` is given), with the scores before and after."""
    logits = logits.float()
    raw = Calibration()
    if multilabel:
        temperatures, bias = fit_platt(logits, labels)
        calibration = Calibration(temperature=temperatures, bias=bias)
        calibration.thresholds = fit_thresholds(calibration.probabilities(logits, True), labels, target_precision,
                                                default_threshold)
    else:
        calibration = Calibration(temperature=fit_temperature(logits, labels))
        if keep is not None:
            calibration.rejection_score, calibration.keep = rejection_score, keep
            correct = logits.argmax(dim=1) == labels.long()
            calibration.reject_below = fit_rejection(calibration.rejection(logits), correct, keep)
    calibration.fitted_on = {"images": int(len(logits)),
                             "before": quality(raw.probabilities(logits, multilabel), labels, multilabel),
                             "after": quality(calibration.probabilities(logits, multilabel), labels, multilabel)}
    return calibration


def auroc(in_scores: Sequence[float] | torch.Tensor, out_scores: Sequence[float] | torch.Tensor) -> float:
    """Area under the ROC curve of a score separating known images (higher) from unknown ones (lower): the
    probability that a random known image scores above a random unknown one."""
    from sklearn.metrics import roc_auc_score

    a, b = np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise UserError("AUROC needs images of both the known classes and the unknown ones")
    return float(roc_auc_score(np.r_[np.ones(a.size), np.zeros(b.size)], np.r_[a, b]))


__all__ = ["Calibration", "ECE_BINS", "REJECTION_SCORES", "auroc", "brier", "calibrate", "fit_class_temperatures", "fit_platt",
           "fit_rejection", "fit_temperature", "fit_thresholds", "nll", "quality", "rejection_of_scaled", "rejection_scores",
           "reliability", "scale_logits"]
