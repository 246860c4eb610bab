"""Saliency sanity checks (clsengine.saliency_checks, explain.py --check): the statistics against scipy and
scikit-image, deletion on a scorer whose evidence is known, a map that ignores the model failing both checks,
Recipro-CAM passing both on a model trained to find a coloured square anywhere in the image, and explain.py
--check end to end: its table, YAML, exit status 4 and one-line errors."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from clsengine import data as datasets
from clsengine import saliency_checks as sc
from clsengine.checkpoint import load_checkpoint, save_checkpoint
from clsengine.export import DeployModel, export_onnx
from conftest import assert_clean_error, instantiate, one_torch_thread, run_captured, run_in_process, train_on_shapes
from workbench import factories
from workbench.classifier import Classifier, load_classifier

SIZE, SQUARE = 32, 10
COLOURS = {"blue": (40, 60, 230), "green": (40, 200, 40), "red": (230, 40, 40)}   # sorted: class order


def make_square_images(root: Path, per_class: int, seed: int) -> None:
    """<root>/<colour>/<j>.png: grey noise with a square of the class colour anywhere in the image (the only
    evidence of the class) and a white square, the same in every class, elsewhere (not overlapping it)."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            image = rng.integers(80, 160, (SIZE, SIZE, 3)).astype(np.float64)
            while True:
                (y0, x0), (y1, x1) = rng.integers(0, SIZE - SQUARE + 1, (2, 2))
                if abs(int(y0) - int(y1)) >= SQUARE or abs(int(x0) - int(x1)) >= SQUARE:
                    break
            image[y1:y1 + SQUARE, x1:x1 + SQUARE] = 245
            image[y0:y0 + SQUARE, x0:x0 + SQUARE] = colour
            image += rng.normal(0, 12, image.shape)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / name / f"{j}.png")


@pytest.fixture(scope="module")
def squares(module_dir) -> dict:
    """convnet_small (an 8x8 last feature map at 32 px) trained from scratch by train.py on the squares."""
    root = module_dir
    make_square_images(root / "train", per_class=30, seed=1)
    make_square_images(root / "val", per_class=12, seed=2)
    wd = root / "wd"
    assert instantiate("convnet_small", wd, "--do-not-load-snapshot").returncode == 0
    start = time.monotonic()
    # One thread, as conftest's per-test fixture sets (this module fixture is set up before it).
    with one_torch_thread(), pytest.MonkeyPatch.context() as mp:
        assert train_on_shapes(wd, root, 4, SIZE, mp) == 0
    return {"wd": wd, "val": root / "val", "root": root, "train_s": time.monotonic() - start}


def _classifier(squares: dict) -> Classifier:
    wd = squares["wd"]
    return load_classifier(wd / "outputs" / "best.pth", template_path=str(wd / "template.yaml"), overrides={},
                           classes=None, classes_source="")


def _val_images(model: Classifier, val: Path) -> torch.Tensor:
    files, _ = datasets.list_images(val)
    transform = model.transform()
    return torch.stack([transform(datasets.read_image(f)) for f in files])


def _randomised(model: Classifier, images: torch.Tensor) -> DeployModel:
    t = model.template
    fresh = sc.reinitialised(lambda: factories.build_model(t, len(model.classes)))
    return sc.estimate_batchnorm(DeployModel(fresh, t.input.mean, t.input.std, input_order=model.input_order,
                                             train_order=t.input.channel_order, explain=True), images)


def _centre_blob(model: Classifier, side: int = 8):
    """An explainer whose logits are the model's but whose maps are a fixed centre blob, whatever the model."""
    y = torch.linspace(-1, 1, side)
    blob = torch.exp(-(y[:, None] ** 2 + y[None, :] ** 2) / 0.3)

    def explain(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model.run(images)
        return logits, blob.expand(len(images), logits.shape[1], side, side)
    return explain


def test_rank_correlation_and_ssim_match_scipy_and_scikit_image():
    from scipy.stats import rankdata, spearmanr
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 6, (5, 40), generator=g).float()   # many ties
    b = torch.randint(0, 6, (5, 40), generator=g).float()
    np.testing.assert_allclose(sc.average_ranks(a).numpy() + 1, rankdata(a.numpy(), axis=1))
    expected = [spearmanr(x, y).statistic for x, y in zip(a.numpy(), b.numpy())]
    np.testing.assert_allclose(sc.rank_correlation(a, b).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert sc.rank_correlation(a, a).eq(1).all() and sc.rank_correlation(a, -a).sub(-1).abs().lt(1e-6).all()
    constant = torch.zeros(2, 40)
    assert sc.rank_correlation(constant, constant).tolist() == [1.0, 1.0]   # identical maps, even constant
    assert sc.rank_correlation(constant, a[:2]).tolist() == [0.0, 0.0]
    x, y = torch.rand(3, 32, 32, generator=g), torch.rand(3, 32, 32, generator=g)
    x[0] = y[0] * 0.5 + x[0] * 0.5
    ours = sc.ssim(x, y)
    for i in range(3):
        xi, yi = (v[i].numpy() for v in (x, y))
        xi, yi = (xi - xi.min()) / (xi.max() - xi.min()), (yi - yi.min()) / (yi.max() - yi.min())
        reference = structural_similarity(xi, yi, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                          data_range=1.0)
        assert abs(float(ours[i]) - reference) < 1e-4, (i, float(ours[i]), reference)
    assert torch.allclose(sc.ssim(x, x), torch.ones(3))


def test_deletion_positions_are_a_permutation_most_salient_first_ties_at_random():
    g = torch.Generator().manual_seed(0)
    saliency = torch.zeros(2, 8, 8)
    saliency[:, 2:4, 5:7] = 1.0                       # 4 salient pixels, 60 tied ones
    positions = sc.deletion_positions(saliency, g)
    assert positions.sort(dim=1).values.equal(torch.arange(64).expand(2, 64))
    first = positions.argsort(dim=1)[:, :4]
    assert set(first[0].tolist()) == {2 * 8 + 5, 2 * 8 + 6, 3 * 8 + 5, 3 * 8 + 6}
    ties = positions.argsort(dim=1)[:, 4:]
    assert not ties[0].equal(ties[1])                 # the tied pixels in a different order per image
    assert not ties[0].equal(ties[0].sort().values)   # not in raster order


def test_reinitialised_model_needs_batchnorm_statistics_of_real_images():
    """With BatchNorm's initial statistics a fresh network's logits are constant and its maps flat (the check
    would pass whatever the method); estimated on the images, both vary. The seed fixes the weights and leaves
    the caller's random state alone."""
    from clsengine.models import create_model
    from clsengine.models.factory import IMAGENET_MEAN, IMAGENET_STD

    images = torch.randint(0, 256, (12, 3, 64, 64), generator=torch.Generator().manual_seed(1)).float()
    state = torch.random.get_rng_state()
    build = lambda: create_model("mobilenet_v3_small", 3, small_input=True)   # noqa: E731
    fresh, again = sc.reinitialised(build), sc.reinitialised(build)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), again.state_dict().values()))
    explain = DeployModel(fresh, IMAGENET_MEAN, IMAGENET_STD, explain=True).eval()
    with torch.no_grad():
        logits, maps = explain(images)
        assert logits.std(dim=0).max() < 1e-6 and maps.amax(dim=(2, 3)).max() == 0
        logits, maps = sc.estimate_batchnorm(explain, images, batch_size=4)(images)
    assert not explain.training and logits.std(dim=0).min() > 1e-3
    assert (maps.amax(dim=(2, 3)) - maps.amin(dim=(2, 3))).min() > 0.5


def test_deletion_check_on_a_scorer_whose_evidence_is_known():
    """The class score is the share of a 3x3-cell region (of an 8x8 grid) still bright: a map of that region
    passes, its inverse and a constant map (ties: random order) do not."""
    images = torch.zeros(4, 3, 32, 32)
    images[:, :, 8:20, 12:24] = 255.0                 # cells (2..4, 3..5) of 4 px
    region = images[:, :1] > 0

    def score(x: torch.Tensor) -> torch.Tensor:
        intact = ((x[:, :1] > 200) & region).flatten(1).sum(1) / region.flatten(1).sum(1)
        return torch.stack([8 * intact, torch.full_like(intact, 4.0)], dim=1)

    classes = torch.zeros(4, dtype=torch.long)
    truth = torch.zeros(4, 8, 8)
    truth[:, 2:5, 3:6] = 1.0
    good = sc.deletion_check(score, images, truth, classes)
    inverse = sc.deletion_check(score, images, 1 - truth, classes)
    constant = sc.deletion_check(score, images, torch.zeros(4, 8, 8), classes)
    assert good.passed and good.value < 0.5 and good.details["images_saliency_below_random"] == 1.0
    assert not inverse.passed and inverse.value > 1.2
    assert not constant.passed and abs(constant.value - 1.0) < 0.1
    assert good.details["score_intact"] > 0.98 and good.details["score_deleted"] < 0.02


def test_a_map_that_ignores_the_model_fails_both_checks(squares):
    model = _classifier(squares)
    images = _val_images(model, squares["val"])
    blob = _centre_blob(model)
    randomisation, deletion = sc.run_checks(blob, blob, images, score=model.run)
    print(f"centre blob: rank correlation {randomisation.value:.3f}; deletion AUC "
          f"{deletion.details['auc_saliency']:.3f} vs random {deletion.details['auc_random']:.3f} "
          f"(ratio {deletion.value:.3f})")
    assert randomisation.value == 1.0 and not randomisation.passed   # the same map, trained or not
    assert deletion.value > sc.MAX_DELETION_RATIO and not deletion.passed


def test_recipro_cam_passes_both_checks_on_a_trained_model(squares):
    model = _classifier(squares)
    images = _val_images(model, squares["val"])
    logits = model.run(images)
    labels = torch.tensor([i // 12 for i in range(36)])
    top1 = float((logits.argmax(1) == labels).float().mean())
    randomisation, deletion = sc.run_checks(model.explain, _randomised(model, images), images, score=model.run)
    print(f"trained in {squares['train_s']:.1f} s, val top-1 {100 * top1:.1f}%; Recipro-CAM: rank correlation "
          f"{randomisation.value:.3f} (SSIM {randomisation.details['ssim_mean']:.3f}); deletion AUC "
          f"{deletion.details['auc_saliency']:.3f} vs random {deletion.details['auc_random']:.3f} "
          f"(ratio {deletion.value:.3f})")
    assert top1 >= 0.9
    assert randomisation.passed and randomisation.value < 0.3
    assert deletion.passed and deletion.value < 0.7 and deletion.details["images_saliency_below_random"] >= 0.9


def test_explain_check_writes_the_table_and_yaml(squares, monkeypatch, capsys):
    wd, val = squares["wd"], squares["val"]
    result = run_captured(wd, "explain.py", "--load-weights", "outputs/best.pth", "--input", str(val), "--save-to",
                          "checks", "--check", "--check-images", "24", monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr
    report = yaml.safe_load((wd / "checks" / "saliency_checks.yaml").read_text())
    assert report["passed"] is True and report["images"] == 24 and report["method"] == "recipro_cam"
    randomisation, deletion = report["checks"]["randomisation"], report["checks"]["deletion"]
    assert randomisation["passed"] and randomisation["value"] < randomisation["threshold"] == sc.MAX_RANK_CORRELATION
    assert deletion["passed"] and deletion["value"] < deletion["threshold"] == sc.MAX_DELETION_RATIO
    assert deletion["auc_saliency"] < deletion["auc_random"]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "check" not in line]
    assert len(rows) == 2 and all(row.endswith("| pass |") for row in rows), result.stdout
    assert f"{randomisation['value']:.3f}" in rows[0] and f"{deletion['value']:.3f}" in rows[1]
    assert not list((wd / "checks").glob("*.png"))   # the checks draw no overlays
    assert run_in_process(wd, "explain.py", "--help", monkeypatch=monkeypatch) == 0
    help_text = capsys.readouterr().out
    assert "--check-images" in help_text and "4 a check failed" in help_text
    assert f"below {sc.MAX_RANK_CORRELATION:g}" in help_text and f"below {sc.MAX_DELETION_RATIO:g} times" in help_text


def test_explain_check_exits_4_when_a_check_fails(squares, monkeypatch, capsys):
    """A checkpoint whose classifier weights are zero predicts from its biases alone: no pixel matters, so no
    deletion order beats another (ratio 1) and its flat maps cannot pass."""
    wd = squares["wd"]
    checkpoint = load_checkpoint(wd / "outputs" / "best.pth")
    head = _classifier(squares).explain.model.head_name
    zeroed = [k for k in checkpoint["model"] if k.startswith(f"{head}.") and k.endswith("weight")]
    assert zeroed
    for key in zeroed:
        checkpoint["model"][key] = torch.zeros_like(checkpoint["model"][key])
    save_checkpoint(checkpoint, wd / "blind.pth")
    result = run_captured(wd, "explain.py", "--load-weights", "blind.pth", "--input", str(squares["val"]),
                          "--save-to", "blind_checks", "--check", monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 4, (result.stdout, result.stderr)
    assert "| FAIL |" in result.stdout and "A check FAILED" in result.stdout and "Traceback" not in result.stderr
    report = yaml.safe_load((wd / "blind_checks" / "saliency_checks.yaml").read_text())
    deletion = report["checks"]["deletion"]
    assert report["passed"] is False and report["images"] == 32
    assert deletion["passed"] is False and abs(deletion["value"] - 1.0) < 1e-3
    assert deletion["auc_saliency"] == deletion["auc_random"]


def test_explain_check_errors_are_one_line(squares, monkeypatch, capsys):
    import copy

    from clsengine.compression import quantization_state, quantize

    wd, val = squares["wd"], squares["val"]
    model = _classifier(squares)

    def check(*args: str):
        return run_captured(wd, "explain.py", "--input", str(val), "--check", *args, monkeypatch=monkeypatch,
                            capsys=capsys)

    net = model.explain.model
    export_onnx(net, wd / "exported" / "model.onnx", **factories.export_kwargs(model.template, model.classes))
    assert_clean_error(check("--load-weights", "exported/model.onnx"), "needs a training checkpoint",
                       "re-initialises the model's weights")
    checkpoint = load_checkpoint(wd / "outputs" / "best.pth")
    # Calibrated on noise: only the refusal is tested.
    quantized = quantize(copy.deepcopy(net), [(torch.randn(1, 3, SIZE, SIZE), 0) for _ in range(4)], subset_size=4)
    save_checkpoint({**checkpoint, "model": quantized.state_dict(),
                     "quantization": {"nncf": quantization_state(quantized)}}, wd / "int8.pth")
    assert_clean_error(check("--load-weights", "int8.pth"), "int8 checkpoint", "needs a float checkpoint")
    (wd / "empty").mkdir()
    assert_clean_error(run_captured(wd, "explain.py", "--load-weights", "outputs/best.pth", "--input",
                                    str(wd / "empty"), "--check", monkeypatch=monkeypatch, capsys=capsys),
                       "empty", "no readable image")
    assert_clean_error(check("--load-weights", "outputs/best.pth", "--check-images", "0"), "--check-images")
    assert_clean_error(check("--load-weights", "outputs/best.pth", "--target-class", "pink"), "'pink'")
