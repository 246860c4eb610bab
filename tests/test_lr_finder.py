"""LR range test and optuna LR search: suggestions, plots, and that the range test leaves no trace."""
from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from clsengine.data.loader import EpochLoader
from clsengine.errors import UserError
from clsengine.loop import train_one_epoch
from clsengine.lr_finder import LRFinderResult, range_test, search_lr
from clsengine.optim import SAM
from clsengine.optim.scheduler import LRSchedule


def make_problem(seed: int = 0, n: int = 256):
    """A linearly separable 2-class problem and a small MLP (BatchNorm: buffers change; Dropout: uses the RNG)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))
    return model, TensorDataset(x, y)


def snapshot(obj):
    """A deep copy, for exact comparison later."""
    import copy
    return copy.deepcopy(obj)


def assert_identical(a, b, where="state"):
    """Bit-identical nested state: same keys, same tensor dtypes and values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def steepest_by_hand(lrs, losses, num_iter):
    """The suggestion rule, written out independently: trim, gradient over the index, argmin."""
    skip_start, skip_end = min(10, num_iter // 10), min(5, num_iter // 20)
    window = np.array(losses[skip_start:len(losses) - skip_end])
    return lrs[skip_start + int(np.argmin(np.gradient(window)))]


def test_range_test_suggestion_plot_spacing_and_restore(tmp_path):
    model, data = make_problem()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = EpochLoader(data, batch_size=32, shuffle=True, workers=0, seed=0)
    criterion = nn.CrossEntropyLoss()
    for images, labels in loader:   # non-empty optimizer state (exp_avg, step) to restore
        optimizer.zero_grad()
        criterion(model(images), labels).backward()
        optimizer.step()
    scheduler = LRSchedule(optimizer, "cosine", epochs=5, iters_per_epoch=len(loader))  # sets initial_lr
    model.eval()   # the test trains; the caller's mode must come back
    model_before, optim_before = snapshot(model.state_dict()), snapshot(optimizer.state_dict())
    rng_before = torch.get_rng_state()

    result = range_test(model, optimizer, criterion, loader, torch.device("cpu"), min_lr=1e-5, max_lr=10.0,
                        num_iter=100, plot_path=tmp_path / "plots" / "lr.png")

    assert isinstance(result, LRFinderResult) and result.mode == "range_test"
    assert 1e-5 <= result.lr <= 10.0
    assert result.lr > 1e-5, result.note   # a real suggestion, not the fallback
    assert len(result.lrs) == len(result.losses) >= 50
    assert result.lrs[0] == pytest.approx(1e-5)
    ratios = np.diff(np.log(result.lrs))
    assert np.allclose(ratios, math.log(10.0 / 1e-5) / 99), "LRs are not exponentially spaced"
    assert result.lr == steepest_by_hand(result.lrs, result.losses, 100)
    with Image.open(result.plot_path) as image:
        assert image.format == "PNG" and image.size[0] > 100

    assert_identical(model.state_dict(), model_before, "model")
    assert_identical(optimizer.state_dict(), optim_before, "optimizer")
    assert "initial_lr" in optimizer.param_groups[0] and scheduler.lr == optim_before["param_groups"][0]["lr"]
    assert "step" not in optimizer.__dict__, "torch's scheduler patch on optimizer.step was left behind"
    assert not any(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng_before)
    train_one_epoch(model, loader, criterion, optimizer, scheduler, torch.device("cpu"), progress=False)


def test_suggestion_matches_torch_lr_finder_plot():
    """Our trimmed steepest-gradient pick is what torch-lr-finder's own plot(suggest_lr=True) marks."""
    import matplotlib.pyplot as plt
    from torch_lr_finder import LRFinder

    model, data = make_problem(seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    result = range_test(model, optimizer, nn.CrossEntropyLoss(), DataLoader(data, batch_size=16, shuffle=True),
                        "cpu", min_lr=1e-4, max_lr=30.0, num_iter=60, smooth_f=0.05)
    fake = types.SimpleNamespace(history={"lr": result.lrs, "loss": result.losses})
    fig, ax = plt.subplots()
    _, theirs = LRFinder.plot(fake, skip_start=min(10, 60 // 10), skip_end=min(5, 60 // 20), ax=ax)
    plt.close(fig)
    assert result.lr == theirs


def test_warmup_runs_then_everything_is_restored():
    model, data = make_problem(seed=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(data, batch_size=32, shuffle=True)
    criterion = nn.CrossEntropyLoss()
    model_before, optim_before = snapshot(model.state_dict()), snapshot(optimizer.state_dict())
    seen = {}

    def warmup():
        scheduler = LRSchedule(optimizer, "constant", epochs=1, iters_per_epoch=len(loader),
                                    warmup_epochs=1)   # like a real script: leaves initial_lr behind
        train_one_epoch(model, loader, criterion, optimizer, scheduler, torch.device("cpu"), progress=False)
        seen["weights"] = snapshot(model.state_dict())

    result = range_test(model, optimizer, criterion, loader, "cpu", min_lr=1e-4, max_lr=5.0, num_iter=40,
                        warmup_epochs=1, warmup_fn=warmup)

    assert "weights" in seen, "warmup_fn was not called"
    assert not torch.equal(seen["weights"]["0.weight"], model_before["0.weight"]), "warm-up did not train"
    assert "warm-up" in result.note
    assert 1e-4 <= result.lr <= 5.0
    assert_identical(model.state_dict(), model_before, "model")
    assert_identical(optimizer.state_dict(), optim_before, "optimizer")   # incl. no momentum buffers, no initial_lr


class ScriptedLoss(nn.Module):
    """Cross-entropy plus `extra(call_number)`: shapes the range-test curve on purpose."""

    def __init__(self, extra):
        super().__init__()
        self.extra, self.calls = extra, 0

    def forward(self, logits, labels):
        self.calls += 1
        return nn.functional.cross_entropy(logits, labels) + self.extra(self.calls)


def test_noisy_start_is_skipped():
    """A steep drop in the first batches (start-up noise) must not become the suggestion."""
    model, data = make_problem(seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion = ScriptedLoss(lambda call: 5.0 if call <= 2 else 0.0)
    result = range_test(model, optimizer, criterion, DataLoader(data, batch_size=32, shuffle=True), "cpu",
                        min_lr=1e-4, max_lr=3.0, num_iter=50, smooth_f=0.0)
    assert int(np.argmin(np.gradient(result.losses))) <= 2   # unskipped, the start-up drop would win
    assert result.lr >= result.lrs[5] and result.lr == steepest_by_hand(result.lrs, result.losses, 50)


def test_loss_that_never_decreases_falls_back_to_min_lr():
    model, data = make_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = ScriptedLoss(lambda call: 0.1 * call)
    result = range_test(model, optimizer, criterion, DataLoader(data, batch_size=32), "cpu", min_lr=1e-4,
                        max_lr=1e-2, num_iter=30, diverge_th=1e9)
    assert result.lr == 1e-4 and "never decreased" in result.note and len(result.lrs) == 30


def test_a_torch_scheduler_attached_before_is_left_alone():
    """torch schedulers add initial_lr (LRFinder refuses those optimizers) and patch optimizer.step."""
    model, data = make_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    patched_step = optimizer.__dict__["step"]
    range_test(model, optimizer, nn.CrossEntropyLoss(), DataLoader(data, batch_size=32), "cpu", min_lr=1e-4,
               max_lr=1.0, num_iter=10)
    assert optimizer.__dict__["step"] is patched_step and optimizer.param_groups[0]["initial_lr"] == 0.1
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_restored_even_when_the_test_fails():
    model, data = make_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model_before = snapshot(model.state_dict())

    def warmup():
        train_one_epoch(model, DataLoader(data, batch_size=32), nn.CrossEntropyLoss(), optimizer,
                        LRSchedule(optimizer, "constant", 1, 8), torch.device("cpu"), progress=False)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        range_test(model, optimizer, nn.CrossEntropyLoss(), DataLoader(data), "cpu", min_lr=1e-3, max_lr=1.0,
                   warmup_epochs=1, warmup_fn=warmup)
    assert_identical(model.state_dict(), model_before, "model")
    assert optimizer.state_dict()["state"] == {} and "initial_lr" not in optimizer.param_groups[0]


def test_short_or_nan_curve_falls_back_to_min_lr(tmp_path):
    model, data = make_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(data, batch_size=32)
    short = range_test(model, optimizer, nn.CrossEntropyLoss(), loader, "cpu", min_lr=1e-3, max_lr=1.0,
                       num_iter=4, plot_path=tmp_path / "short.png")
    assert short.lr == 1e-3 and "too short" in short.note and len(short.lrs) == 4
    assert (tmp_path / "short.png").is_file()

    class NaNLoss(nn.Module):
        def forward(self, logits, labels):
            return logits.sum() * float("nan")

    nan = range_test(model, optimizer, NaNLoss(), loader, "cpu", min_lr=1e-3, max_lr=1.0, num_iter=20)
    assert nan.lr == 1e-3 and "non-finite" in nan.note and nan.lrs == []


def test_range_test_rejects_bad_arguments():
    model, data = make_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(data)
    with pytest.raises(UserError):
        range_test(model, optimizer, nn.CrossEntropyLoss(), loader, "cpu", min_lr=1.0, max_lr=1e-3)
    with pytest.raises(UserError):
        range_test(model, optimizer, nn.CrossEntropyLoss(), loader, "cpu", min_lr=1e-3, max_lr=1.0,
                   warmup_epochs=1)

    with pytest.raises(UserError, match="SAM"):   # SAM's step() needs a closure
        range_test(model, SAM(model.parameters(), torch.optim.SGD, lr=0.1), nn.CrossEntropyLoss(), loader, "cpu",
                   min_lr=1e-3, max_lr=1.0)


def peaked(lr: float) -> float:
    """A fake validation score that peaks at lr = 0.01."""
    return 10.0 - abs(math.log10(lr) + 2)


@pytest.mark.parametrize("mode", ["tpe", "grid"])
def test_search_finds_the_peak(mode, tmp_path):
    calls = []

    def train_and_score(lr, report):
        calls.append(lr)
        for epoch in range(1, 4):
            report(epoch, peaked(lr) * epoch / 3)
        return peaked(lr)

    result = search_lr(train_and_score, min_lr=1e-5, max_lr=1.0, mode=mode, n_trials=15, seed=0,
                       plot_path=tmp_path / f"{mode}.png")
    assert result.mode == mode and len(result.trials) == 15 and len(calls) == 15
    assert 0.005 <= result.lr <= 0.02, result.trials
    assert all(1e-5 <= t["lr"] <= 1.0 for t in result.trials)
    with Image.open(result.plot_path) as image:
        assert image.format == "PNG"
    if mode == "grid":
        expected = np.geomspace(1e-5, 1.0, 15)
        assert np.allclose(sorted(t["lr"] for t in result.trials), expected)


def test_search_prunes_runs_that_start_badly():
    epochs = 4

    def train_and_score(lr, report):
        for epoch in range(1, epochs + 1):
            score = 0.0 if lr > 0.1 else peaked(lr) * epoch / epochs   # high LRs never learn
            report(epoch, score)
        return score

    result = search_lr(train_and_score, min_lr=1e-4, max_lr=10.0, mode="grid", n_trials=10, seed=0)
    pruned = [t for t in result.trials if t["state"] == "PRUNED"]
    assert len(pruned) > 0, result.trials
    assert all(t["epochs"] < epochs for t in pruned), "a pruned run trained all its epochs"
    assert any(t["lr"] > 0.1 for t in pruned)
    assert f"{len(pruned)} pruned" in result.note


def test_search_survives_diverging_runs_and_rejects_bad_modes():
    def train_and_score(lr, report):
        if lr > 0.5:
            raise UserError("the loss became nan")
        return peaked(lr)

    result = search_lr(train_and_score, min_lr=1e-4, max_lr=10.0, mode="grid", n_trials=6)
    assert sum(t["state"] == "FAIL" for t in result.trials) == 2 and result.lr <= 0.5
    with pytest.raises(UserError, match="no trial completed"):
        search_lr(lambda lr, report: train_and_score(10.0, report), min_lr=1e-4, max_lr=10.0, n_trials=2)
    with pytest.raises(UserError, match="unknown"):
        search_lr(train_and_score, min_lr=1e-4, max_lr=1.0, mode="random")
