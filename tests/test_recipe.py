"""The training recipe inside the loop: mutual learning, SAM's two passes, EMA in fit, plateau early stopping,
resuming with auxiliary models and EMA, bf16 autocast, and the template/builder side of the recipe."""
from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from torch.utils.data import TensorDataset

import clsengine.auto as A
import clsengine.loop as loop
import clsengine.plots as plots
from clsengine.checkpoint import load_checkpoint
from clsengine.data.loader import EpochLoader
from clsengine.ema import ModelEma, create_ema
from clsengine.errors import UserError
from clsengine.loop import FitConfig, fit, train_one_epoch
from clsengine.recipe import Recipe
from clsengine.losses import AMSoftmaxLoss
from clsengine.losses.mutual import mutual_losses
from clsengine.models import CosineLinear, am_softmax_scale, classifier
from clsengine.optim import LRSchedule, create_optimizer
from clsengine.runlog import get_logger
from clsengine.utils import seed_everything

from conftest import TEMPLATES_DIR
from workbench import device_policy, factories
from workbench.template import TemplateError, load_template, template_from_dict

CPU = torch.device("cpu")
LOGGER = get_logger(name="clsengine.test_recipe")


@pytest.fixture
def no_plots(monkeypatch):
    """Many-epoch fits: skip the matplotlib curves (not under test here) to keep the file fast."""
    monkeypatch.setattr(plots, "plot_training_curves", lambda history, path: None)  # runlog imports it per drawing


# ------------------------------------------------------------------------------------------------ helpers
def mlp(seed: int, in_features: int = 8, classes: int = 3, bn: bool = False, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(in_features, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16, momentum=0.1))
    layers.append(nn.ReLU())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(16, classes))
    return nn.Sequential(*layers)


def toy_data(seed: int, n: int, in_features: int = 8) -> TensorDataset:
    """Three classes decided by the first two features (learnable by a small MLP)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


def loader(dataset: TensorDataset, batch_size: int = 8, shuffle: bool = False) -> EpochLoader:
    return EpochLoader(dataset, batch_size=batch_size, shuffle=shuffle, workers=0, seed=0)


def constant_scheduler(optimizer: torch.optim.Optimizer, iters: int = 1) -> LRSchedule:
    return LRSchedule(optimizer, "constant", epochs=1, iters_per_epoch=iters)


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


def assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def kl_hand(target_logits: torch.Tensor, own_logits: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    """KL(p_target || p_own) summed over classes, averaged over the batch, times t^2."""
    p = softmax(target_logits.double() / t)
    q = softmax(own_logits.double() / t)
    return (p * (torch.log(p) - torch.log(q))).sum(dim=1).mean() * t * t


def random_logits(seed: int, n: int = 5, classes: int = 4, scale: float = 2.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, classes, generator=g) * scale for _ in range(3)]


# ============================================================================================ mutual_losses
def test_mutual_losses_two_models_match_hand_kl():
    z0, z1, _ = random_logits(0)
    l0, l1 = mutual_losses([z0, z1])
    assert l0.shape == () and l1.shape == ()
    torch.testing.assert_close(l0.double(), kl_hand(z1, z0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l1.double(), kl_hand(z0, z1), rtol=1e-5, atol=1e-6)
    assert l0.item() > 1e-3 and abs(l0.item() - l1.item()) > 1e-4  # KL is not symmetric: the direction matters


def test_mutual_losses_zero_for_equal_logits():
    z0, _, _ = random_logits(1)
    losses = mutual_losses([z0, z0.clone()])
    assert [abs(x.item()) < 1e-6 for x in losses] == [True, True]


def test_mutual_losses_temperature():
    z0, z1, _ = random_logits(2)
    t = 3.0
    l0, l1 = mutual_losses([z0, z1], temperature=t)
    torch.testing.assert_close(l0.double(), kl_hand(z1, z0, t), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l1.double(), kl_hand(z0, z1, t), rtol=1e-5, atol=1e-6)
    # Logits divided by T, result scaled by T^2: scaling the logits by T undoes the division exactly.
    scaled = mutual_losses([z0 * t, z1 * t], temperature=t)
    plain = mutual_losses([z0, z1], temperature=1.0)
    for s, p in zip(scaled, plain):
        torch.testing.assert_close(s, p * t * t, rtol=1e-5, atol=1e-6)
    assert abs(l0.item() - plain[0].item()) > 1e-4  # the temperature really changes the value


def test_mutual_losses_three_models_average_the_others():
    zs = random_logits(3)
    losses = mutual_losses(zs, temperature=1.5)
    assert len(losses) == 3
    for i, loss in enumerate(losses):
        others = [kl_hand(zs[j], zs[i], 1.5) for j in range(3) if j != i]
        torch.testing.assert_close(loss.double(), (others[0] + others[1]) / 2, rtol=1e-5, atol=1e-6)
        assert abs(loss.item() - (others[0] + others[1]).item()) > 1e-4  # a mean, not a sum


def test_mutual_losses_gradient_only_reaches_own_logits():
    z0, z1, _ = (z.clone().requires_grad_(True) for z in random_logits(4))
    l0, _ = mutual_losses([z0, z1])
    g0, g1 = torch.autograd.grad(l0, [z0, z1], allow_unused=True)
    assert g1 is None or torch.count_nonzero(g1) == 0, "the target distribution must be detached"
    assert g0 is not None and g0.abs().max() > 1e-4
    # d KL(p1 || p0) / d z0 = (p0 - p1) / batch for batchmean reduction.
    expected = (softmax(z0.detach()) - softmax(z1.detach())) / z0.shape[0]
    torch.testing.assert_close(g0, expected, rtol=1e-4, atol=1e-6)


def test_mutual_losses_single_and_no_model():
    (loss,) = mutual_losses([torch.randn(4, 3)])
    assert loss.shape == () and loss.item() == 0.0
    assert mutual_losses([]) == []


# ========================================================================================= mutual_weight_at
def test_mutual_weight_at_uses_zero_based_epochs():
    """`epoch` is the 0-based index fit() passes (0 = first epoch). off_after_epoch=3 means: on for the first
    three epochs (indices 0, 1, 2; "epoch 1..3" in the logs), off from the fourth (index 3) on."""
    recipe = Recipe(aux_models=[nn.Linear(2, 2)], mutual_weight=0.7, mutual_off_after_epoch=3)
    assert [recipe.mutual_weight_at(e) for e in range(6)] == [0.7, 0.7, 0.7, 0.0, 0.0, 0.0]
    always = Recipe(aux_models=[nn.Linear(2, 2)], mutual_weight=0.7, mutual_off_after_epoch=None)
    assert [always.mutual_weight_at(e) for e in (0, 10, 1000)] == [0.7, 0.7, 0.7]
    alone = Recipe(aux_models=[], mutual_weight=0.7, mutual_off_after_epoch=None)
    assert [alone.mutual_weight_at(e) for e in (0, 5)] == [0.0, 0.0]


def test_fit_passes_zero_based_epoch(tmp_path: Path, monkeypatch, no_plots):
    seen: list[tuple[int, float]] = []
    real = loop.train_one_epoch

    def spy(*args, recipe=None, epoch=0, **kwargs):
        seen.append((epoch, recipe.mutual_weight_at(epoch)))
        return real(*args, recipe=recipe, epoch=epoch, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", spy)
    model, aux = mlp(0), mlp(1)
    recipe = Recipe(aux_models=[aux], aux_criteria=[nn.CrossEntropyLoss()], mutual_weight=0.5,
                    mutual_off_after_epoch=2)
    optimizer = create_optimizer([model, aux], "sgd", lr=0.05)
    train = loader(toy_data(1, 16))
    fit(model, train, loader(toy_data(2, 8)), nn.CrossEntropyLoss(), optimizer,
        constant_scheduler(optimizer, len(train)), CPU, FitConfig(epochs=3, output_dir=tmp_path, progress=False),
        LOGGER, recipe=recipe)
    assert seen == [(0, 0.5), (1, 0.5), (2, 0.0)]


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile needs a C++ compiler")
def test_fit_with_compile_trains_through_compiled_forwards(tmp_path: Path, no_plots):
    """recipe.compile: the training forwards of the model and its partner run as compiled graphs, to the
    weights plain training reaches; the checkpoint holds the plain modules' keys."""
    import torch._dynamo
    finals = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model, aux = mlp(0), mlp(1)
        recipe = Recipe(aux_models=[aux], aux_criteria=[nn.CrossEntropyLoss()], mutual_weight=0.5, compile=compiled)
        optimizer = create_optimizer([model, aux], "sgd", lr=0.05)
        train = loader(toy_data(1, 16))
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        fit(model, train, loader(toy_data(2, 8)), nn.CrossEntropyLoss(), optimizer,
            constant_scheduler(optimizer, len(train)), CPU,
            FitConfig(epochs=1, output_dir=tmp_path / str(compiled), progress=False), LOGGER, recipe=recipe)
        assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > frames) == compiled
        finals.append(torch.cat([flat(model), flat(aux)]))
        state = load_checkpoint(tmp_path / str(compiled) / "latest.pth")["model"]
        assert set(state) == set(model.state_dict())
    assert torch.allclose(finals[0], finals[1], atol=1e-5)


# ==================================================================================================== SAM
def _count_forwards(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda module, inputs, output: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("sam_rho, per_batch", [(0.05, 2), (None, 1)])
def test_forward_passes_per_batch(sam_rho, per_batch):
    model, aux = mlp(0), mlp(1)
    main_calls, aux_calls = _count_forwards(model), _count_forwards(aux)
    optimizer = create_optimizer([model, aux], "sgd", lr=0.05, sam_rho=sam_rho)
    assert hasattr(optimizer, "first_step") == (sam_rho is not None)
    train = loader(toy_data(1, 24))  # 3 batches
    recipe = Recipe(aux_models=[aux], aux_criteria=[nn.CrossEntropyLoss()])
    train_one_epoch(model, train, nn.CrossEntropyLoss(), optimizer, constant_scheduler(optimizer, 3), CPU,
                    progress=False, recipe=recipe)
    assert main_calls[0] == per_batch * 3
    assert aux_calls[0] == per_batch * 3


def _one_sam_step_vs_plain_forward(momentum: float | None) -> list[tuple[nn.Module, nn.Module]]:
    """(BatchNorm after one SAM step, BatchNorm after one plain train-mode forward) for main and aux model."""
    models = [mlp(0, bn=True), mlp(1, bn=True)]
    for m in models:
        m[1].momentum = momentum
    x, y = toy_data(3, 8)[:]
    references = [copy.deepcopy(m).train() for m in models]
    with torch.no_grad():
        for reference in references:
            reference(x)  # what a single forward pass in train mode does to the running statistics
    optimizer = create_optimizer(models, "sgd", lr=0.1, sam_rho=0.5)
    recipe = Recipe(aux_models=[models[1]], aux_criteria=[nn.CrossEntropyLoss()])
    train_one_epoch(models[0], [(x, y)], nn.CrossEntropyLoss(), optimizer, constant_scheduler(optimizer), CPU,
                    progress=False, recipe=recipe)
    return [(m[1], r[1]) for m, r in zip(models, references)]


def test_sam_second_pass_leaves_batchnorm_statistics_alone():
    for bn, ref in _one_sam_step_vs_plain_forward(0.1):
        assert ref.running_mean.abs().max() > 1e-3  # the statistics did move
        torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=0, atol=1e-7)
        torch.testing.assert_close(bn.running_var, ref.running_var, rtol=0, atol=1e-7)
        assert bn.momentum == 0.1, "the BatchNorm momentum must be restored after the second pass"


def test_sam_second_pass_leaves_cumulative_batchnorm_statistics_alone():
    for bn, ref in _one_sam_step_vs_plain_forward(None):
        torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=0, atol=1e-7)
        torch.testing.assert_close(bn.running_var, ref.running_var, rtol=0, atol=1e-7)


# ======================================================================================== mutual learning
def test_mutual_learning_trains_both_models():
    model, aux = mlp(0), mlp(1)
    before_main, before_aux = flat(model), flat(aux)
    optimizer = create_optimizer([model, aux], "sgd", lr=0.1)
    train = loader(toy_data(1, 24))
    recipe = Recipe(aux_models=[aux], aux_criteria=[nn.CrossEntropyLoss()], mutual_weight=1.0)
    stats = train_one_epoch(model, train, nn.CrossEntropyLoss(), optimizer, constant_scheduler(optimizer, 3), CPU,
                            progress=False, recipe=recipe)
    assert math.isfinite(stats["loss"])
    assert not torch.equal(flat(model), before_main)
    assert not torch.equal(flat(aux), before_aux)


def test_mutual_term_in_loss_until_switched_off():
    """With lr=0 the weights stay fixed, so the returned loss is the main model's loss on the fixed batch:
    CE + weight * KL(p_aux || p_main) while the term is on, plain CE from mutual_off_after_epoch on."""
    model, aux = mlp(0), mlp(1)
    x, y = toy_data(5, 8)[:]
    optimizer = create_optimizer([model, aux], "sgd", lr=0.0)
    recipe = Recipe(aux_models=[aux], aux_criteria=[nn.CrossEntropyLoss()], mutual_weight=0.5,
                    mutual_temperature=2.0, mutual_off_after_epoch=1)
    with torch.no_grad():
        ce = nn.functional.cross_entropy(model(x), y).item()
        kl = kl_hand(aux(x), model(x), 2.0).item()
    assert kl > 1e-3
    losses = [train_one_epoch(model, [(x, y)], nn.CrossEntropyLoss(), optimizer, constant_scheduler(optimizer),
                              CPU, progress=False, recipe=recipe, epoch=epoch)["loss"] for epoch in (0, 1)]
    assert losses[0] == pytest.approx(ce + 0.5 * kl, rel=1e-5)
    assert losses[1] == pytest.approx(ce, rel=1e-6)


# ==================================================================================================== EMA
def _ema_fit(tmp_path: Path, monkeypatch, winner: str):
    model = mlp(0)
    recipe = Recipe(ema=create_ema(model, decay=0.9))
    calls: list[str] = []
    epoch = [0]

    def fake_validate(m, val_loader, criterion, device, progress=True, **run):
        if m is model:
            epoch[0] += 1
            calls.append("model")
        elif m is recipe.ema.module:
            calls.append("ema")
        else:
            raise AssertionError("validate called on an unexpected module")
        top1 = 10.0 * epoch[0] + (5.0 if calls[-1] == winner else 0.0)  # improves every epoch
        return {"loss": 1.0, "top1": top1, "top5": 100.0}

    monkeypatch.setattr(loop, "validate", fake_validate)
    train = loader(toy_data(1, 24))  # 3 steps per epoch
    optimizer = create_optimizer(model, "sgd", lr=0.1)
    n_averaged: list[int] = []
    out = tmp_path / winner
    result = fit(model, train, loader(toy_data(2, 8)), nn.CrossEntropyLoss(), optimizer,
                 constant_scheduler(optimizer, len(train)), CPU,
                 FitConfig(epochs=3, output_dir=out, progress=False), LOGGER,
                 on_epoch_end=lambda e, row: n_averaged.append(int(load_checkpoint(out / "latest.pth")["ema"]
                                                                   ["n_averaged"])),
                 recipe=recipe)
    assert calls == ["model", "ema"] * 3
    return model, recipe.ema, result, n_averaged, out


def test_fit_with_ema_best_holds_ema_weights(tmp_path: Path, monkeypatch, no_plots):
    model, ema, result, n_averaged, out = _ema_fit(tmp_path, monkeypatch, "ema")
    assert n_averaged == [1 + 3, 1 + 6, 1 + 9]  # the initial copy + one update per optimizer step
    latest = load_checkpoint(out / "latest.pth")
    assert latest["weights_from"] == "model"
    assert_same_state(latest["model"], model.state_dict())
    assert_same_state(latest["ema"], ema.state_dict())
    rows = result["history"]
    assert [r["ema_val_top1"] for r in rows] == [15.0, 25.0, 35.0]
    assert all(isinstance(r["ema_val_top1"], float) for r in rows)
    best = load_checkpoint(out / "best.pth")
    assert best["weights_from"] == "ema" and best["epoch"] == 3 and best["score"] == 35.0
    assert_same_state(best["model"], ema.module.state_dict())
    assert not torch.equal(ema.module[0].weight, model[0].weight)  # so the comparison is not vacuous
    assert result["best_score"] == 35.0


def test_fit_with_ema_best_holds_model_weights_when_model_wins(tmp_path: Path, monkeypatch, no_plots):
    model, ema, result, _, out = _ema_fit(tmp_path, monkeypatch, "model")
    best = load_checkpoint(out / "best.pth")
    assert best["weights_from"] == "model" and best["score"] == 35.0
    assert_same_state(best["model"], model.state_dict())
    assert not torch.equal(ema.module[0].weight, model[0].weight)
    assert [r["ema_val_top1"] for r in result["history"]] == [10.0, 20.0, 30.0]


# ============================================================================== early stopping and plateau
def _scored_fit(tmp_path: Path, monkeypatch, scheduler_name: str, scores: list[float], epochs: int,
                early_stopping_patience: int | None = None, **scheduler_kwargs):
    """fit() with validate() returning `scores[i]` as top-1 in epoch i + 1."""
    it = iter(scores)
    monkeypatch.setattr(loop, "validate",
                        lambda m, *args, **kwargs: {"loss": 1.0, "top1": float(next(it)), "top5": 100.0})
    model = mlp(0)
    train = loader(toy_data(1, 8))
    optimizer = create_optimizer(model, "sgd", lr=0.1)
    scheduler = LRSchedule(optimizer, scheduler_name, epochs=epochs, iters_per_epoch=len(train),
                                warmup_epochs=0, **scheduler_kwargs)
    result = fit(model, train, loader(toy_data(2, 8)), nn.CrossEntropyLoss(), optimizer, scheduler, CPU,
                 FitConfig(epochs=epochs, output_dir=tmp_path, progress=False,
                           early_stopping_patience=early_stopping_patience), LOGGER)
    return scheduler, result


def test_early_stopping_without_plateau_stops_after_patience(tmp_path: Path, monkeypatch, no_plots):
    """The baseline for the next test: with a constant score, patience 2 stops at epoch 3."""
    scheduler, result = _scored_fit(tmp_path, monkeypatch, "constant", [50.0] * 20, epochs=20,
                                    early_stopping_patience=2)
    assert result["stopped_early"] is True and result["epochs_run"] == 3 and result["best_epoch"] == 1


def test_early_stopping_waits_for_plateau_reduction(tmp_path: Path, monkeypatch, no_plots):
    """Constant score: best at epoch 1; the plateau scheduler (patience 3) reduces once bad_epochs > 3, at the
    end of epoch 5. Early stopping (patience 2) must not stop before that, and must stop soon after."""
    scheduler, result = _scored_fit(tmp_path, monkeypatch, "plateau", [50.0] * 20, epochs=20,
                                    early_stopping_patience=2, patience=3, factor=0.1)
    assert scheduler.num_reductions == 1
    assert result["stopped_early"] is True and result["best_epoch"] == 1
    assert 5 <= result["epochs_run"] <= 5 + 2, result["epochs_run"]
    assert [row["lr"] for row in result["history"][:5]] == [pytest.approx(0.1)] * 5


def test_early_stopping_waits_for_cosine_to_anneal_to_half(tmp_path: Path, monkeypatch, no_plots):
    """Constant score, best at epoch 1: a cosine schedule of 20 epochs reaches half its peak LR at the end of
    epoch 10; early stopping (patience 2) waits for that, then stops at once."""
    scheduler, result = _scored_fit(tmp_path, monkeypatch, "cosine", [50.0] * 20, epochs=20,
                                    early_stopping_patience=2)
    assert result["stopped_early"] is True and result["best_epoch"] == 1 and result["epochs_run"] == 10
    assert scheduler.lr <= 0.5 * 0.1 + 1e-12 and result["history"][8]["lr"] > 0.5 * 0.1


def test_plateau_force_decay_at_half(tmp_path: Path, monkeypatch, no_plots):
    """Improving scores never trigger the patience rule; force_decay_at=0.5 of 10 epochs reduces once at the
    end of epoch 5, so the lr column (the LR the epoch trained with) drops from epoch 6 on."""
    scheduler, result = _scored_fit(tmp_path, monkeypatch, "plateau", [10.0 + e for e in range(10)], epochs=10,
                                    patience=3, factor=0.1, force_decay_at=0.5)
    assert scheduler.num_reductions == 1
    assert result["epochs_run"] == 10 and not result["stopped_early"]
    lrs = [row["lr"] for row in result["history"]]
    assert lrs == [pytest.approx(0.1)] * 5 + [pytest.approx(0.01)] * 5


# ================================================================================== resume with a recipe
def _recipe_run(output_dir: Path, epochs: int, resume: dict | None = None):
    """Main model (with dropout) + one auxiliary model + EMA, SAM over both models; planned for 3 epochs."""
    seed_everything(0)
    model, aux = mlp(0, dropout=0.2), mlp(1, bn=True)
    recipe = Recipe(aux_models=[aux], aux_criteria=[nn.CrossEntropyLoss()], mutual_weight=0.5,
                    mutual_temperature=2.0, ema=create_ema(model, decay=0.9))
    train = EpochLoader(toy_data(1, 24), batch_size=8, shuffle=True, workers=0, seed=0)
    val = EpochLoader(toy_data(2, 8), batch_size=8, shuffle=False, workers=0, seed=0)
    optimizer = create_optimizer([model, aux], "sgd", lr=0.1, weight_decay=1e-3, sam_rho=0.05)
    scheduler = LRSchedule(optimizer, "cosine", epochs=3, iters_per_epoch=len(train), warmup_epochs=1)
    result = fit(model, train, val, nn.CrossEntropyLoss(), optimizer, scheduler, CPU,
                 FitConfig(epochs=epochs, output_dir=output_dir, progress=False), LOGGER, resume=resume,
                 recipe=recipe)
    return model, aux, recipe.ema, result


def _timeless(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("epoch_time_s", "images_per_s")} for row in history]


def test_resume_with_aux_and_ema_matches_uninterrupted_run(tmp_path: Path, no_plots):
    _recipe_run(tmp_path / "run", epochs=2)
    latest = load_checkpoint(tmp_path / "run" / "latest.pth")
    assert latest["epoch"] == 2 and len(latest["aux_models"]) == 1 and "ema" in latest
    model, aux, ema, resumed = _recipe_run(tmp_path / "run", epochs=3, resume=latest)
    straight_model, straight_aux, straight_ema, straight = _recipe_run(tmp_path / "straight", epochs=3)

    assert [row["epoch"] for row in resumed["history"]] == [1, 2, 3]
    assert_same_state(model.state_dict(), straight_model.state_dict())
    assert_same_state(aux.state_dict(), straight_aux.state_dict())
    assert_same_state(ema.state_dict(), straight_ema.state_dict())
    assert ema.num_updates == 9
    assert _timeless(resumed["history"]) == _timeless(straight["history"])
    assert all(isinstance(row["ema_val_top1"], float) and 0.0 <= row["ema_val_top1"] <= 100.0
               for row in straight["history"])
    # The resumed epoch changed every part (the equalities above are not vacuous).
    assert not torch.equal(latest["model"]["0.weight"], model[0].weight)
    assert not torch.equal(latest["aux_models"][0]["0.weight"], aux[0].weight)
    assert not torch.equal(latest["ema"]["module.0.weight"], ema.module[0].weight)


# ========================================================================================== bf16 on CPU
def test_bf16_autocast_on_cpu_trains():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long()
    x[:, 0] += torch.where(y == 1, 1.0, -1.0)  # a clear margin: separable
    model = mlp(0, classes=2)
    dtypes: set[torch.dtype] = set()
    model[0].register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    optimizer = create_optimizer(model, "sgd", lr=0.2)
    train = loader(TensorDataset(x, y), batch_size=16, shuffle=True)
    scheduler = constant_scheduler(optimizer, len(train))
    recipe = Recipe(amp_dtype=torch.bfloat16)
    losses = []
    for epoch in range(6):
        train.set_epoch(epoch)
        losses.append(train_one_epoch(model, train, nn.CrossEntropyLoss(), optimizer, scheduler, CPU,
                                      progress=False, recipe=recipe, epoch=epoch)["loss"])
    assert dtypes == {torch.bfloat16}, "the forward pass must run under bf16 autocast"
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ============================================================================== template and builders
SMALL = TEMPLATES_DIR / "mobilenet_v3_small" / "template.yaml"


# mobilenet_v3_small's published recipe, pinned (its template leaves these to the run: `auto`).
PUBLISHED_RECIPE = {"training.optimizer.name": "sgd", "hyper_parameters.basic.base_learning_rate": 0.016,
                    "training.optimizer.weight_decay": 5e-4, "training.optimizer.sam.enabled": True,
                    "training.mutual_learning.enabled": True, "model.small_input": False,
                    "training.augmentation_level": "full"}


def _small_data() -> dict:
    return yaml.safe_load(SMALL.read_text(encoding="utf-8"))


def test_small_template_is_valid_as_shipped():
    t = template_from_dict(_small_data(), str(SMALL))
    assert t.training.optimizer.sam.enabled == "auto" and t.training.mutual_learning.enabled == "auto"


@pytest.mark.parametrize("overrides, fragment", [
    ({"training.loss.name": "am_softmax", "model.head": "linear"}, "cosine"),
    ({"training.amp": "fp32"}, "training.amp"),
    ({"training.channels_last": "yes"}, "training.channels_last"),
    ({"training.mutual_learning.enabled": True, "training.mutual_learning.aux_models": []}, "aux_models"),
    ({"training.lr_finder.min_lr": 0.5, "training.lr_finder.max_lr": 0.1}, "min_lr"),
])
def test_template_rejects(overrides, fragment):
    with pytest.raises(TemplateError, match=fragment):
        template_from_dict(_small_data(), str(SMALL), overrides=overrides)


def test_template_rejects_am_softmax_aux_with_linear_head():
    data = _small_data()
    data["training"]["mutual_learning"]["aux_models"][0]["model"]["head"] = "linear"
    with pytest.raises(TemplateError, match=r"aux_models\[0\].*cosine"):
        template_from_dict(data, str(SMALL))


def test_amp_dtype():
    def amp(value: str | None, sam: bool = True):
        """value None: the schema's default (auto: full precision on a CPU), whatever its spelling."""
        overrides = {"training.optimizer.sam.enabled": sam}
        if value is not None:
            overrides["training.amp"] = value
        return template_from_dict(_small_data(), str(SMALL), overrides=overrides)

    cuda = torch.device("cuda")  # amp_dtype only looks at device.type: no CUDA needed
    with pytest.raises(UserError, match="CUDA"):
        device_policy.amp_dtype(amp("fp16", sam=False), CPU)
    with pytest.raises(UserError, match="SAM"):
        device_policy.amp_dtype(amp("fp16", sam=True), cuda)
    assert device_policy.amp_dtype(amp("fp16", sam=False), cuda) == torch.float16
    assert device_policy.amp_dtype(amp("bf16"), CPU) == torch.bfloat16
    assert device_policy.amp_dtype(amp(None), CPU) is None
    assert device_policy.amp_dtype(amp("auto"), CPU) is None        # mobilenet_v3_small: depthwise, slower in bf16


def test_memory_format_policy(monkeypatch):
    def layout(value, size: int, device: str = "cpu"):
        t = template_from_dict(_small_data(), str(SMALL), overrides={"training.channels_last": value,
                                                                   "input.size": [size, size]})
        return device_policy.memory_format(t, torch.device(device))

    monkeypatch.setattr(A, "cpu_has_avx512", lambda: False)
    assert layout("auto", 32) == torch.contiguous_format                       # AVX2: measured no faster at 32
    assert layout("auto", device_policy.CHANNELS_LAST_MIN_SIDE_CPU) == torch.channels_last
    monkeypatch.setattr(A, "cpu_has_avx512", lambda: True)
    assert layout("auto", 32) == torch.channels_last                           # AVX-512: 1.0-2.0x at 32-224
    assert layout("auto", 32, "cuda") == torch.channels_last                   # only device.type is read
    assert layout(True, 32) == torch.channels_last and layout(False, 224) == torch.contiguous_format


def test_channels_last_trains_like_contiguous():
    """The layout changes speed, not results: models, EMA and batches go channels_last and two SAM steps of
    the template's recipe (auxiliary model, EMA) end at the same weights as in the default layout."""
    results = []
    for value in (False, True):
        t = template_from_dict(_small_data(), str(SMALL), overrides={
            "training.channels_last": value, "input.size": [32, 32], "hyper_parameters.basic.batch_size": 8,
            **PUBLISHED_RECIPE})
        torch.manual_seed(0)
        model = factories.build_model(t, 3)
        recipe = factories.build_recipe(t, model, 3, CPU)
        layout = torch.channels_last if value else torch.contiguous_format
        assert recipe.memory_format == layout
        for m in (model, recipe.aux_models[0], recipe.ema.module):
            assert m.features[0][0].weight.is_contiguous(memory_format=layout)
        seen = []
        model.features[0].register_forward_pre_hook(
            lambda module, inputs: seen.append(inputs[0].is_contiguous(memory_format=layout)))
        optimizer = factories.build_optimizer(t, [model, *recipe.aux_models])
        g = torch.Generator().manual_seed(1)
        data = loader(TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(3, (16,), generator=g)),
                      batch_size=8, shuffle=False)
        train_one_epoch(model, data, factories.build_loss(t, 3), optimizer, constant_scheduler(optimizer, len(data)),
                        CPU, progress=False, recipe=recipe)
        assert seen and all(seen)
        results.append([p.detach().contiguous() for p in (*model.parameters(), *recipe.ema.module.parameters())])
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(*results))
    assert "channels_last" in factories.describe_recipe(t, recipe)


def test_compile_without_a_compiler_is_one_clear_error(monkeypatch):
    t = template_from_dict(_small_data(), str(SMALL), overrides={"training.compile": True})
    monkeypatch.setattr(device_policy.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="training.compile.*C\\+\\+ compiler"):
        factories.build_recipe(t, factories.build_model(t, 3), 3, CPU)
    monkeypatch.setattr(device_policy.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert factories.build_recipe(t, factories.build_model(t, 3), 3, CPU).compile


def test_build_recipe_mobilenet_v3_large_1():
    t = load_template(TEMPLATES_DIR / "mobilenet_v3_large_1" / "template.yaml")
    model = factories.build_model(t, 3)
    recipe = factories.build_recipe(t, model, 3, CPU)
    assert len(recipe.aux_models) == 1 and len(recipe.aux_criteria) == 1
    head = list(recipe.aux_models[0].modules())[-1]
    assert isinstance(head, CosineLinear) and head.out_features == 3
    criterion = recipe.aux_criteria[0]
    assert isinstance(criterion, AMSoftmaxLoss)
    assert criterion.scale == pytest.approx(float(head.scale))
    assert not isinstance(list(model.modules())[-1], CosineLinear)  # the main model keeps its linear head
    assert isinstance(recipe.ema, ModelEma) and recipe.ema.decay == pytest.approx(t.training.ema.decay)
    assert recipe.mutual_weight == t.training.mutual_learning.weight
    assert recipe.amp_dtype is None and recipe.grad_scaler is None


@pytest.mark.parametrize("num_classes, scale", [(3, None), (40, None), (3, 7.5)])
def test_efficientnet_b0_cosine_head_and_am_softmax_share_scale(num_classes, scale):
    """40 classes: the default scale is above its floor of 3, so a class-count mix-up would show."""
    path = TEMPLATES_DIR / "efficientnet_b0" / "template.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    t = template_from_dict(data, str(path), overrides={"training.loss.scale": scale})
    head = list(classifier(factories.build_model(t, num_classes)).modules())[-1]
    loss = factories.build_loss(t, num_classes)
    assert isinstance(head, CosineLinear) and isinstance(loss, AMSoftmaxLoss)
    assert head.out_features == num_classes
    assert loss.scale == pytest.approx(float(head.scale))
    expected = scale if scale is not None else am_softmax_scale(num_classes)
    assert float(head.scale) == pytest.approx(expected)
