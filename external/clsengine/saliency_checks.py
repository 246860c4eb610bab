"""Sanity checks for saliency maps: does a map depend on what the model learned, and does it point at what the
model uses?

A saliency map can look convincing and explain nothing: an edge detector, a centre prior or the image's bright
spots look like "where the model saw the class" on most photos (OpenVINO's successor dropped its maps for
producing "misleading output"). Two standard checks catch such maps; both judge any map function, so a
method is measured rather than trusted:

* Model randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps"): the same architecture with its
  weights re-initialised (built afresh with a fixed seed, the architecture's own initialisation, every layer
  at once rather than cascading from the head) must give clearly different maps of the explained class. Its
  BatchNorm statistics are estimated on the checked images (estimate_batchnorm): with the initial ones a
  random network's logits are constant, its maps flat, and the check would pass whatever the method. The
  value is the mean over the images of the Spearman rank correlation between the two maps (upsampled to the
  image, as the overlays show them); it passes below MAX_RANK_CORRELATION. SSIM is reported beside it.
* Deletion (Petsiuk et al. 2018, RISE): setting the most salient pixels first to a neutral value (the image's
  mean colour) must lower the probability of the explained class faster than random orders. The random
  orders come from the same map with its cells shuffled (RANDOM_ORDERS shuffles per image): regions of the
  same size and smoothness at random places, so the comparison is about where the map points, not about
  deleting blobs versus scattered pixels, which push a network off its training distribution at their own
  rate (for a map at pixel resolution it is a random pixel order). The value is the mean area under the
  saliency order's curve over that of the random orders; it passes below MAX_DELETION_RATIO.

Deletion alone is weak against a centre prior: objects lying inside the frame cover its centre more often than
its border, so a fixed centre blob beats random orders somewhat (ratio 0.83-0.88 on tests/test_saliency_checks.py's
squares); randomisation catches it at once (the same map for any weights: correlation 1).

An Explainer maps images to (logits, maps), the shape of clsengine.export.DeployModel(explain=True), so a test
can plug in a map that ignores the model and see both checks fail.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# images (N, 3, H, W) -> (logits (N, K), maps (N, K, h, w); larger is more salient, any resolution)
Explainer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Scorer = Callable[[torch.Tensor], torch.Tensor]   # images -> logits (N, K)

# Adebayo et al. read a rank correlation near 0 as "the map depends on the weights" and near 1 as "it does
# not"; 0.5 leaves room for what any convolutional network shares (it responds to contrast before training).
MAX_RANK_CORRELATION = 0.5
# The saliency order must take away at least a fifth more of the class probability's area than random orders.
MAX_DELETION_RATIO = 0.8
DELETION_STEPS = 16     # curve points 0, 1/16, ..., 1 of the pixels deleted
RANDOM_ORDERS = 3
REINIT_SEED = 0


@dataclass(frozen=True)
class CheckResult:
    """One check's verdict: `value` against `threshold` by `rule`, and the numbers behind it."""
    name: str
    value: float
    threshold: float
    passed: bool
    rule: str
    details: dict[str, float | int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"value": round(self.value, 4), "threshold": self.threshold, "passed": self.passed, "rule": self.rule,
                **{k: round(v, 4) if isinstance(v, float) else v for k, v in self.details.items()}}


def reinitialised(build: Callable[[], nn.Module], seed: int = REINIT_SEED) -> nn.Module:
    """A model from `build` with the architecture's own initialisation under `seed` (in eval mode), without
    moving the caller's random state: the randomisation check's reference is the same on every run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def estimate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 16) -> nn.Module:
    """Set the BatchNorm running statistics of `model` (fed `images` as it is, e.g. a DeployModel) to the average
    of their batch statistics on `images`, then eval mode. A re-initialised network evaluated with BatchNorm's
    initial statistics (mean 0, variance 1) shrinks its activations layer by layer until its logits are
    constant (clsengine.models.batchnorm): its maps would be flat, unlike any trained model's. With the
    statistics of real images it computes what the random network computes at the first step of training.
    The heads here hold no BatchNorm, so a forward through Recipro-CAM's masked head passes is safe."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None   # a cumulative average of the batches
        bn.train()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    return model.eval()


def class_probabilities(logits: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """Softmax, or independent sigmoids for a multi-label model (what Recipro-CAM scores too)."""
    return logits.float().sigmoid() if multilabel else logits.float().softmax(dim=1)


def explained_classes(logits: torch.Tensor, target: int | None = None) -> torch.Tensor:
    """The class each image is explained for: `target`, or the top-scoring class."""
    if target is not None:
        return torch.full((logits.shape[0],), int(target), dtype=torch.long)
    return logits.argmax(dim=1)


def pick(maps: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(N, h, w): each image's map of its class, from (N, K, h, w)."""
    return maps[torch.arange(len(classes)), classes.to(maps.device)].float().cpu()


def to_image(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) maps upsampled bilinearly to `size` (H, W), as clsengine.saliency.upsample shows them."""
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks (0-based) along the last dimension, tied values sharing their mean rank (Spearman's convention:
    upsampled maps have flat regions, and ordinal ranks would order them by raster position)."""
    values, order = x.sort(dim=-1)
    ordinal = torch.arange(x.shape[-1], dtype=torch.float64).expand(x.shape).contiguous()
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[..., 1:] = values[..., 1:] != values[..., :-1]
    group = starts.long().cumsum(-1) - 1
    sums = torch.zeros_like(ordinal).scatter_add_(-1, group, ordinal)
    counts = torch.zeros_like(ordinal).scatter_add_(-1, group, torch.ones_like(ordinal))
    return torch.empty_like(ordinal).scatter_(-1, order, (sums / counts).gather(-1, group))


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of each row of a and b (N, P). A constant row has no ranking: it counts 1
    against an identical row (a map that ignores the model) and 0 otherwise."""
    ra, rb = average_ranks(a.flatten(1)), average_ranks(b.flatten(1))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    norm = ra.norm(dim=1) * rb.norm(dim=1)
    rho = (ra * rb).sum(1) / norm.clamp_min(1e-12)
    same = (a.flatten(1) == b.flatten(1)).all(dim=1).double()
    return torch.where(norm > 0, rho, same).float()


def _unit(maps: torch.Tensor) -> torch.Tensor:
    low = maps.amin(dim=(-2, -1), keepdim=True)
    return (maps - low) / (maps.amax(dim=(-2, -1), keepdim=True) - low).clamp_min(1e-12)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity (Wang et al. 2004; Gaussian window, C1, C2 for a range of 1) of each pair of
    (N, H, W) maps, each min-max scaled to [0, 1] first: 1 for identical maps."""
    window = min(window, a.shape[-2], a.shape[-1])
    coords = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]
    x, y = _unit(a.float())[:, None], _unit(b.float())[:, None]
    mu_x, mu_y = F.conv2d(x, kernel), F.conv2d(y, kernel)
    var_x = F.conv2d(x * x, kernel) - mu_x ** 2
    var_y = F.conv2d(y * y, kernel) - mu_y ** 2
    cov = F.conv2d(x * y, kernel) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3))


def randomisation_check(maps: torch.Tensor, random_maps: torch.Tensor, size: tuple[int, int],
                        threshold: float = MAX_RANK_CORRELATION) -> CheckResult:
    """Model randomisation from each image's map of its class, trained (N, h, w) and re-initialised, compared
    at image size `size`: passes when the mean rank correlation is below `threshold`."""
    a, b = to_image(maps, size), to_image(random_maps, size)
    rho = rank_correlation(a, b)
    value = float(rho.mean())
    return CheckResult("randomisation", value, threshold, value < threshold,
                       f"mean Spearman rank correlation, trained vs re-initialised maps < {threshold:g}",
                       {"rank_correlation_max": float(rho.max()), "ssim_mean": float(ssim(a, b).mean()),
                        "images": len(rho)})


def shuffled_cells(maps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(N, h, w) maps with their cells permuted at random, image by image: the deletion check's random orders."""
    flat = maps.flatten(1)
    perm = torch.rand(flat.shape, generator=generator).argsort(dim=1)
    return flat.gather(1, perm).view_as(maps)


def deletion_positions(saliency: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(N, H*W): the step at which each pixel of (N, H, W) is deleted, most salient first (0), ties in random
    order (upsampled maps have flat regions; raster order would favour the image's top rows)."""
    flat = saliency.flatten(1)
    tie_break = torch.rand(flat.shape, generator=generator).argsort(dim=1)
    order = tie_break.gather(1, flat.gather(1, tie_break).argsort(dim=1, descending=True, stable=True))
    positions = torch.empty_like(order)
    positions.scatter_(1, order, torch.arange(flat.shape[1]).expand_as(order).contiguous())
    return positions


def _redraw_seconds() -> float:
    """Progress bars redraw often on a terminal, rarely into a log file (as clsengine.loop's)."""
    return 0.5 if sys.stderr.isatty() else 30.0


def _scores(score: Scorer, images: torch.Tensor, classes: torch.Tensor, multilabel: bool, batch_size: int
            ) -> torch.Tensor:
    """Probability of each image's class, in batches (on the images' device, returned on the CPU)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            probs = class_probabilities(score(images[start:start + batch_size]), multilabel).cpu()
            out.append(probs[torch.arange(len(probs)), classes[start:start + batch_size]])
    return torch.cat(out)


def deletion_curves(score: Scorer, images: torch.Tensor, classes: torch.Tensor, positions: torch.Tensor,
                    steps: int = DELETION_STEPS, multilabel: bool = False, batch_size: int = 16,
                    progress: bool = False) -> torch.Tensor:
    """(O, N, steps + 1): the class probability with the first k/steps of the pixels deleted (set to the image's
    mean colour) in each of O orders `positions` (O, N, H*W). The intact and the fully deleted images are the
    same in every order: scored once."""
    n, _, h, w = images.shape
    fill = images.mean(dim=(2, 3), keepdim=True)
    counts = [round(s * h * w / steps) for s in range(steps + 1)]
    ends = [_scores(score, x, classes, multilabel, batch_size) for x in (images, fill.expand_as(images))]
    curves = torch.empty(positions.shape[0], n, steps + 1)
    curves[:, :, 0], curves[:, :, -1] = ends
    bar = tqdm(total=(steps - 1) * positions.shape[0], desc="deletion", unit="curve point", leave=False,
               dynamic_ncols=True, disable=not progress, mininterval=_redraw_seconds())
    for o, pos in enumerate(positions.to(images.device)):
        for s, k in enumerate(counts[1:-1], start=1):
            deleted = torch.where((pos < k).view(n, 1, h, w), fill, images)
            curves[o, :, s] = _scores(score, deleted, classes, multilabel, batch_size)
            bar.update()
    bar.close()
    return curves


def deletion_check(score: Scorer, images: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor, *,
                   steps: int = DELETION_STEPS, random_orders: int = RANDOM_ORDERS,
                   threshold: float = MAX_DELETION_RATIO, multilabel: bool = False, seed: int = 0,
                   batch_size: int = 16, progress: bool = False) -> CheckResult:
    """Deletion AUC of each image's map of its class (N, h, w) against `random_orders` shuffles of its cells;
    passes when mean AUC (saliency) / mean AUC (random) is below `threshold`."""
    g = torch.Generator().manual_seed(seed)
    size = tuple(images.shape[-2:])
    candidates = [maps] + [shuffled_cells(maps, g) for _ in range(random_orders)]
    positions = torch.stack([deletion_positions(to_image(m, size), g) for m in candidates])
    curves = deletion_curves(score, images, classes, positions, steps, multilabel, batch_size, progress)
    auc = torch.trapezoid(curves, dx=1.0 / steps, dim=2)          # (1 + random_orders, N)
    own, rand = auc[0], auc[1:].mean(dim=0)
    value = float(own.mean() / rand.mean().clamp_min(1e-12))
    return CheckResult("deletion", value, threshold, value < threshold,
                       f"mean deletion AUC, saliency order / random orders < {threshold:g}",
                       {"auc_saliency": float(own.mean()), "auc_random": float(rand.mean()),
                        "images_saliency_below_random": float((own < rand).float().mean()),
                        "score_intact": float(curves[0, :, 0].mean()), "score_deleted": float(curves[0, :, -1].mean()),
                        "steps": steps, "random_orders": random_orders})


def explain_batches(explainer: Explainer, images: torch.Tensor, batch_size: int = 16, desc: str = "maps",
                    progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """An explainer's logits and maps for all `images`, in batches, on the CPU."""
    logits, maps = [], []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False,
                          dynamic_ncols=True, disable=not progress, mininterval=_redraw_seconds()):
            lg, mp = explainer(images[start:start + batch_size])
            logits.append(lg.float().cpu())
            maps.append(mp.float().cpu())
    return torch.cat(logits), torch.cat(maps)


def run_checks(explainer: Explainer, randomised: Explainer, images: torch.Tensor, *, score: Scorer | None = None,
               target: int | None = None, multilabel: bool = False, batch_size: int = 16, seed: int = 0,
               steps: int = DELETION_STEPS, random_orders: int = RANDOM_ORDERS,
               max_rank_correlation: float = MAX_RANK_CORRELATION, max_deletion_ratio: float = MAX_DELETION_RATIO,
               progress: bool = False) -> list[CheckResult]:
    """Both checks for one map method: `explainer` on the trained model, `randomised` on the same architecture
    re-initialised (see reinitialised), `score` the trained model's logits (default: the explainer's). Each
    image is explained for `target` or for the class the trained model predicts."""
    logits, maps = explain_batches(explainer, images, batch_size, "maps (trained)", progress)
    classes = explained_classes(logits, target)
    _, random_maps = explain_batches(randomised, images, batch_size, "maps (re-initialised)", progress)
    own = pick(maps, classes)
    return [randomisation_check(own, pick(random_maps, classes), tuple(images.shape[-2:]), max_rank_correlation),
            deletion_check(score or (lambda x: explainer(x)[0]), images, own, classes, steps=steps,
                           random_orders=random_orders, threshold=max_deletion_ratio, multilabel=multilabel,
                           seed=seed, batch_size=batch_size, progress=progress)]


def report(results: list[CheckResult], **context: Any) -> dict[str, Any]:
    """The checks as one YAML-ready dict: `context` (model, input, images...), how the reference model was made,
    each check's numbers and the verdict (every check passed)."""
    return {**context, "randomised_model": f"the architecture re-initialised (seed {REINIT_SEED}), BatchNorm "
                                           f"statistics from the checked images",
            "checks": {r.name: r.as_dict() for r in results}, "passed": all(r.passed for r in results)}


def format_table(results: list[CheckResult]) -> str:
    """A markdown table: check, value, threshold, result (and the AUCs behind the deletion ratio)."""
    lines = ["| check | value | threshold | result |", "|---|---:|---:|---|"]
    for r in results:
        if r.name == "randomisation":
            what = f"model randomisation: rank correlation (SSIM {r.details['ssim_mean']:.2f})"
        else:
            what = (f"deletion: AUC saliency / random ({r.details['auc_saliency']:.3f} / "
                    f"{r.details['auc_random']:.3f})")
        lines.append(f"| {what} | {r.value:.3f} | < {r.threshold:g} | {'pass' if r.passed else 'FAIL'} |")
    return "\n".join(lines)


__all__ = ["CheckResult", "DELETION_STEPS", "Explainer", "MAX_DELETION_RATIO", "MAX_RANK_CORRELATION",
           "RANDOM_ORDERS", "REINIT_SEED", "Scorer", "average_ranks", "class_probabilities", "deletion_check",
           "deletion_curves", "deletion_positions", "estimate_batchnorm", "explain_batches", "explained_classes",
           "format_table", "pick", "randomisation_check", "rank_correlation", "reinitialised", "report", "run_checks",
           "shuffled_cells", "ssim", "to_image"]
