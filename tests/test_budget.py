"""A time budget instead of epochs (clsengine.budget, clsengine.auto.epochs_for_budget, workbench.auto's
plan_time_budget, the loop's deadline, train.py --time-budget)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from clsengine import auto as A
from clsengine.auto import RunFacts
from clsengine.budget import parse_duration, per_image_cost, probe_steps, seconds_per_image
from clsengine.data import EpochLoader
from clsengine.errors import UserError
from clsengine.loop import FitConfig, fit
from clsengine.optim import LRSchedule, create_optimizer
from clsengine.runlog import get_logger
from clsengine.utils import seed_everything
from conftest import TEMPLATES_DIR, assert_clean_error, make_image_folder, run_captured
from workbench import auto, time_budget
from workbench.template import TemplateError, load_template


@pytest.mark.parametrize("text,seconds", [("180", 180), ("180s", 180), ("3m", 180), ("1.5h", 5400), (90, 90),
                                          (" 2m ", 120), (".5m", 30)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["3x", "abc", "-1", "0", "m", ""])
def test_bad_durations_are_user_errors(text):
    with pytest.raises(UserError, match="duration"):
        parse_duration(text)


def test_epochs_for_budget_is_the_arithmetic_of_the_measured_costs():
    facts = RunFacts(train_images=1000, num_classes=10, input_size=(32, 32), epochs=200)
    # 62 steps x 16 images x 10 ms = 9.92 s; validation 200 images x 2 models x 0.25 x 10 ms = 1 s; + 0.5 s
    choice = A.epochs_for_budget(facts, 16, 1, 0.01, 200, 2, budget_s=120, spent_s=5)
    assert choice.value == int(115 // (9.92 + 1.0 + A.EPOCH_OVERHEAD_S)) == 10
    assert choice.key == "hyper_parameters.basic.epochs" and "time budget 120 s" in choice.reason
    assert A.epochs_for_budget(facts, 16, 2, 0.01, 200, 2, 120, 5).value == 5           # SAM: twice the passes
    capped = RunFacts(**{**facts.__dict__, "epochs": 4})
    assert A.epochs_for_budget(capped, 16, 1, 0.01, 200, 2, 120, 5).value == 4          # the epochs given are the most
    assert "capped" in A.epochs_for_budget(capped, 16, 1, 0.01, 200, 2, 120, 5).reason
    assert A.epochs_for_budget(facts, 16, 1, 0.01, 200, 2, 120, 200).value == 1         # spent already: one epoch


def _template(**overrides):
    return load_template(TEMPLATES_DIR / "mobilenet_v3_small" / "template.yaml", overrides)


def test_plan_finds_the_most_epochs_whose_own_recipe_fits():
    """50,000 images: 200 epochs would be a long run (SAM and an auxiliary model: 4 passes a step) fitting 17
    epochs of the hour; 17 epochs make a short run (1 pass) fitting 67, which would be long again. The answer is
    the longest run that is still short: 25 epochs of 390 steps (26 would pass the 10,000 steps of a long run)."""
    t = _template()
    facts = auto.run_facts(t, 50_000, 10, "cpu")
    calls: list[int] = []

    def measure(resolved) -> float:  # a step: 21.3 ms + 0.67 ms per image
        calls.append(resolved.hyper_parameters.basic.batch_size)
        return {16: 0.002, 64: 0.001}[resolved.hyper_parameters.basic.batch_size]

    resolved, choices = time_budget.plan_time_budget(t, facts, budget_s=3600, spent_s=lambda: 0.0, seconds_per_image=measure,
                                              val_images=5000)
    epochs, batch = resolved.hyper_parameters.basic.epochs, resolved.hyper_parameters.basic.batch_size
    assert choices[0].key == "hyper_parameters.basic.epochs" and choices[0].value == epochs
    assert calls == [A.MIN_BATCH["cpu"], 4 * A.MIN_BATCH["cpu"]]   # the two probes
    assert batch == 128 and A.steps_per_epoch(facts, batch) == 390
    assert epochs == A.LONG_RUN_STEPS // 390 == 25
    assert resolved.training.optimizer.sam.enabled is False and resolved.training.mutual_learning.enabled is False
    cost = per_image_cost({16: 0.002, 64: 0.001})(128)
    assert cost == pytest.approx(0.064 / 48 / 2 + (0.032 - 16 * 0.064 / 48 / 2) / 128)
    per_epoch = 390 * 128 * cost + 5000 * 2 * A.EVAL_COST * cost + A.EPOCH_OVERHEAD_S
    assert epochs * per_epoch <= 3600


def test_a_binding_budget_doubles_the_batch_where_that_fits_more_epochs():
    """7000 digits, 168 s, a CPU whose step has a large fixed part (batch 16: 7.1 ms an image, 64: 3.0 ms).
    The step rule alone would give 3 epochs at batch 16 (1311 steps); doubling fits more epochs each time
    while the run keeps >= 500 steps: 64 fits 7 epochs (763 steps); 128 would fit 9 of only 486 steps."""
    t = _template()
    facts = auto.run_facts(t, 7000, 10, "cpu")
    costs = {16: 0.0071, 64: 0.003}

    def measure(resolved) -> float:
        return costs[resolved.hyper_parameters.basic.batch_size]

    resolved, choices = time_budget.plan_time_budget(t, facts, budget_s=168, spent_s=lambda: 0.0, seconds_per_image=measure,
                                              val_images=1500)
    basic = resolved.hyper_parameters.basic
    assert (basic.batch_size, basic.epochs) == (64, 7)
    batch_choice = next(c for c in choices if c.key == "hyper_parameters.basic.batch_size")
    assert batch_choice.value == 64 and "fits 7 epochs" in batch_choice.reason and "fits 3" in batch_choice.reason
    assert basic.base_learning_rate == pytest.approx(A.ADAMW_LR * (64 / A.ADAMW_BATCH) ** 0.5)  # the LR follows
    cost = per_image_cost(costs)
    assert cost(32) / cost(64) >= time_budget.LARGER_BATCH_SAVING and cost(64) / cost(128) >= time_budget.LARGER_BATCH_SAVING

    # Where a doubled batch saves little per image (a flat cost), the step rule's batch stays.
    flat, flat_choices = time_budget.plan_time_budget(t, facts, budget_s=168, spent_s=lambda: 0.0,
                                               seconds_per_image=lambda r: 0.0071, val_images=1500)
    assert flat.hyper_parameters.basic.batch_size == 16 and flat.hyper_parameters.basic.epochs == 3
    assert "step rule" not in next(c for c in flat_choices if c.key == "hyper_parameters.basic.batch_size").reason


def test_plan_keeps_the_template_epochs_and_the_long_recipe_when_they_fit():
    t = _template()
    resolved, choices = time_budget.plan_time_budget(t, auto.run_facts(t, 50_000, 10, "cpu"), budget_s=1e9,
                                              spent_s=lambda: 0.0, seconds_per_image=lambda r: 1e-6, val_images=5000)
    assert resolved.hyper_parameters.basic.epochs == 200 and "capped" in choices[0].reason
    assert resolved.training.optimizer.sam.enabled is True


def test_per_image_cost_falls_with_the_batch_as_a_fixed_cost_per_step_is_shared():
    cost = per_image_cost({16: 0.005, 64: 0.002})  # steps of 80 ms and 128 ms: 64 ms + 1 ms per image
    assert cost(16) == pytest.approx(0.005) and cost(64) == pytest.approx(0.002)
    assert cost(32) == pytest.approx(0.001 + 0.064 / 32) and cost(128) == pytest.approx(0.0015)
    assert per_image_cost({32: 0.003})(128) == 0.003                     # one measurement: flat
    noisy = per_image_cost({16: 0.001, 64: 0.0002})                      # a step time that fell with the batch
    assert noisy(16) == 0.001 and noisy(128) == 0.0002
    rising = per_image_cost({16: 0.0093, 64: 0.0154})                    # a cost per image that rose with the batch
    assert rising(16) == pytest.approx(0.0093) and rising(8) == pytest.approx(0.0093)
    assert rising(40) == pytest.approx((0.0093 + 0.0154) / 2) and rising(128) == pytest.approx(0.0154)
    assert probe_steps(16) == (3, 6) and probe_steps(64) == (2, 5) and probe_steps(8) == (3, 6)


def test_plan_with_a_pinned_batch_measures_that_batch_only():
    t = _template(**{"hyper_parameters.basic.batch_size": 32})
    calls: list[int] = []

    def measure(resolved) -> float:
        calls.append(resolved.hyper_parameters.basic.batch_size)
        return 0.001

    resolved, _ = time_budget.plan_time_budget(t, auto.run_facts(t, 1000, 10, "cpu"), budget_s=60, spent_s=lambda: 0.0,
                                        seconds_per_image=measure, val_images=200)
    assert calls == [32] and resolved.hyper_parameters.basic.batch_size == 32


def test_bad_time_budget_in_a_template_names_the_key():
    with pytest.raises(TemplateError, match="hyper_parameters.basic.time_budget.*duration"):
        _template(**{"hyper_parameters.basic.time_budget": "soon"})


def test_measuring_changes_neither_the_model_nor_the_random_state():
    seed_everything(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))) for _ in range(3)]
    torch.manual_seed(7)
    seconds = seconds_per_image(model, data, nn.CrossEntropyLoss(), torch.device("cpu"))
    after_measure = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after_measure, torch.rand(3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert 0 < seconds < 1
    # In the run's layout and autocast dtype, the model still untouched.
    conv = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(16, 3))
    weight = conv[0].weight.clone()
    assert 0 < seconds_per_image(conv, data, nn.CrossEntropyLoss(), torch.device("cpu"), steps=2, warmup=1,
                                 memory_format=torch.channels_last, amp_dtype=torch.bfloat16) < 1
    assert torch.equal(conv[0].weight, weight) and conv[0].weight.is_contiguous()


class SlowLinear(nn.Linear):
    """A training step of at least 0.1 s, so that an epoch's length (which the loop measures itself, without
    what on_epoch_end does) does not depend on how fast the machine is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            time.sleep(0.1)
        return super().forward(x)


def _fit(tmp_path: Path, deadline: float | None, epochs: int = 3, replan=None) -> dict:
    seed_everything(0)
    model = nn.Sequential(SlowLinear(8, 3))
    data = [(torch.randn(8), int(i % 3)) for i in range(24)]
    train = EpochLoader(data, batch_size=8, shuffle=True, workers=0, seed=0)
    val = EpochLoader(data, batch_size=8, shuffle=False, workers=0, seed=0)
    optimizer = create_optimizer(model, "sgd", lr=0.1, weight_decay=0.0, no_bias_decay=True)
    scheduler = LRSchedule(optimizer, "cosine", epochs=epochs, iters_per_epoch=len(train), warmup_epochs=0)
    cfg = FitConfig(epochs=epochs, output_dir=tmp_path, progress=False, checkpoints=False, deadline=deadline,
                    replan=replan)
    result = fit(model, train, val, nn.CrossEntropyLoss(), optimizer, scheduler, torch.device("cpu"), cfg,
                 get_logger(name="clsengine.test_budget"))
    return {**result, "schedule_epochs": scheduler.epochs, "last_lr": scheduler.lr}


def test_fit_stops_when_another_epoch_would_end_after_the_deadline(tmp_path: Path, caplog):
    result = _fit(tmp_path, deadline=time.monotonic() + 0.5)      # each epoch trains >= 0.3 s (3 slow steps)
    assert result["epochs_run"] == 1 and result["stopped_early"]
    assert _fit(tmp_path, deadline=None)["epochs_run"] == 3


def test_train_py_time_budget_chooses_logs_and_saves_the_epochs(tmp_path: Path, work_dir, monkeypatch, capsys):
    train = make_image_folder(tmp_path / "train", per_class=8, seed=1)
    val = make_image_folder(tmp_path / "val", per_class=3, seed=2)
    wd = work_dir("mobilenet_v3_small")
    out = tmp_path / "out"
    result = run_captured(wd, "train.py", "--train-data-roots", str(train), "--val-data-roots", str(val),
                          "--time-budget", "30s", "--epochs", "3", "--save-checkpoints-to", str(out),
                          "input.size=[32,32]", monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr
    log = (out / "train.log").read_text()
    line = next(line for line in log.splitlines() if "auto hyper_parameters.basic.epochs = " in line)
    assert "time budget 30 s" in line and "per epoch measured" in line
    config = yaml.safe_load((out / "config.yaml").read_text())["template"]
    epochs = config["hyper_parameters"]["basic"]["epochs"]
    assert 1 <= epochs <= 3 and f"auto hyper_parameters.basic.epochs = {epochs}:" in line
    assert config["hyper_parameters"]["basic"]["time_budget"] == "30s"
    # Re-planned after each epoch: the saved epochs are those trained (a resumed run continues to them).
    assert len((out / "history.csv").read_text().strip().splitlines()) - 1 == epochs
    bad = run_captured(wd, "train.py", "--train-data-roots", str(train), "--val-data-roots", str(val),
                       "--time-budget", "soon", "--save-checkpoints-to", str(tmp_path / "bad"),
                       monkeypatch=monkeypatch, capsys=capsys)
    assert_clean_error(bad, "hyper_parameters.basic.time_budget")


def test_fit_follows_a_replanned_number_of_epochs(tmp_path: Path):
    """After each epoch the budget is re-planned from the real epoch time: the loop and the schedule's horizon
    follow (longer: the cosine reaches 0 at the new end; shorter: at the earlier one)."""
    calls: list[tuple[int, float]] = []

    def longer(done: int, seconds: float) -> int:
        calls.append((done, seconds))
        return 5

    result = _fit(tmp_path, deadline=time.monotonic() + 60, epochs=3, replan=longer)
    assert result["epochs_run"] == 5 and result["schedule_epochs"] == 5 and result["last_lr"] == pytest.approx(0)
    # The mean epoch so far (3 training steps of >= 0.1 s each), not one epoch's duration.
    assert [done for done, _ in calls] == [1, 2, 3, 4] and all(s >= 0.3 for _, s in calls)
    shorter = _fit(tmp_path, deadline=time.monotonic() + 60, epochs=4, replan=lambda done, s: 2)
    assert shorter["epochs_run"] == 2 and shorter["schedule_epochs"] == 2 and shorter["last_lr"] == pytest.approx(0)
