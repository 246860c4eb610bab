"""The optuna search: parameters from the space, pruning of weak trials, the time budget, shared storage."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from clsengine.errors import UserError
from clsengine.hpo import Budget, SearchSpace, create_study, search

LOGGER = logging.getLogger("test_hpo")
SPACE = SearchSpace(learning_rate=(1e-3, 1e-1), weight_decay=(1e-5, 1e-3), batch_size=[16, 32])


def ticking() -> Budget:
    """A budget of 1000 normal runs on a clock that advances 1 s per reading: never spent in these tests."""
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0
        return now[0]
    return Budget(ratio=1000.0, normal_epochs=3, clock=clock)


def storage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


def test_search_prunes_weak_trials_and_finds_the_best(tmp_path: Path):
    seen: list[dict] = []

    def train_trial(params: dict, report) -> float:
        seen.append(params)
        score = 100.0 - 1000.0 * abs(params["learning_rate"] - 0.01)  # best near 0.01
        for epoch in range(1, 4):
            report(epoch, score * epoch / 3)
        return score

    study = create_study(storage(tmp_path), "s", seed=0)
    summary = search(study, train_trial, SPACE, ticking(), n_trials=12, logger=LOGGER)
    assert all(1e-3 <= p["learning_rate"] <= 1e-1 and 1e-5 <= p["weight_decay"] <= 1e-3 and p["batch_size"] in (16, 32)
               for p in seen)
    assert summary["complete_trials"] + summary["pruned_trials"] == 12
    assert summary["pruned_trials"] >= 1  # below-median trials stop after their first epochs
    best_lr = summary["params"]["learning_rate"]
    assert summary["score"] == pytest.approx(100.0 - 1000.0 * abs(best_lr - 0.01))
    assert summary["score"] >= max(100.0 - 1000.0 * abs(p["learning_rate"] - 0.01) for p in seen[:2])


def test_budget_stops_the_search(tmp_path: Path):
    now = [0.0]
    budget = Budget(ratio=2.0, normal_epochs=5, clock=lambda: now[0])  # 2 normal runs of 5 epochs

    def train_trial(params: dict, report) -> float:
        for epoch in range(1, 3):
            now[0] += 10.0            # each epoch takes 10 s: the budget is 2 x 5 x 10 = 100 s
            report(epoch, 50.0)
        return 50.0

    study = create_study(storage(tmp_path), "budget", seed=0)
    summary = search(study, train_trial, SPACE, budget, n_trials=50, logger=LOGGER)
    assert summary["budget_s"] == 100.0
    assert len(study.trials) == 5 and summary["elapsed_s"] == 100.0  # 5 trials x 2 epochs x 10 s


def test_workers_share_a_study(tmp_path: Path):
    def train_trial(params: dict, report) -> float:
        report(1, params["learning_rate"] * 100)
        return params["learning_rate"] * 100

    for worker in range(2):  # two workers, one after the other, on the same storage and name
        study = create_study(storage(tmp_path), "shared", seed=worker)
        summary = search(study, train_trial, SPACE, ticking(), n_trials=2, logger=LOGGER)
    assert summary["complete_trials"] + summary["pruned_trials"] == 4


def test_bad_space_storage_and_nothing_completed(tmp_path: Path):
    with pytest.raises(UserError, match="hpo.learning_rate"):
        SearchSpace(learning_rate=(0.1, 0.01), weight_decay=(1e-5, 1e-3)).check()
    with pytest.raises(UserError, match="optuna storage"):
        create_study("nosuchdb://x", "s")
    now = [0.0]
    budget = Budget(ratio=0.1, normal_epochs=1, clock=lambda: now[0])

    def slow_trial(params: dict, report) -> float:
        now[0] += 10.0
        report(1, 1.0)  # the budget (0.1 x 10 s) is spent during the first epoch
        return 1.0

    with pytest.raises(UserError, match="no trial completed"):
        search(create_study(storage(tmp_path), "slow"), slow_trial, SPACE, budget, n_trials=3, logger=LOGGER)


def test_optimize_py_writes_best_params_that_train_py_uses(tmp_path: Path, tiny_dataset: Path, monkeypatch, capsys):
    import yaml

    from conftest import instantiate, run_in_process

    wd = tmp_path / "wd"
    assert instantiate("resnet18", wd, "--do-not-load-snapshot").returncode == 0
    data = ["--train-data-roots", str(tiny_dataset / "train"), "--val-data-roots", str(tiny_dataset / "val"),
            "--workers", "0", "input.size=[32,32]"]
    assert run_in_process(wd, "optimize.py", *data, "--n-trials", "3", "--epochs-per-trial", "2",
                          "--search-budget", "1000", "hpo.batch_size=[2,4]", "hyper_parameters.basic.base_learning_rate=0.01",
                          monkeypatch=monkeypatch) == 0
    best = yaml.safe_load((wd / "hpo_best.yaml").read_text())
    params = best["params"]
    assert set(params) == {"hyper_parameters.basic.base_learning_rate", "training.optimizer.weight_decay",
                           "hyper_parameters.basic.batch_size"}
    assert 0.001 <= params["hyper_parameters.basic.base_learning_rate"] <= 0.1 and params[
        "hyper_parameters.basic.batch_size"] in (2, 4)
    assert best["complete_trials"] + best["pruned_trials"] == 3 and 0 <= best["score"] <= 100
    assert (wd / "hpo" / "study.db").is_file() and not list((wd / "hpo").glob("tmp*"))  # trial folders removed

    # A rerun continues the work dir's study (nothing of the earlier trials is lost); --overwrite starts anew.
    common = [*data, "--n-trials", "1", "--epochs-per-trial", "1", "--search-budget", "1000", "hpo.batch_size=[2,4]",
              "hyper_parameters.basic.base_learning_rate=0.01"]
    capsys.readouterr()
    assert run_in_process(wd, "optimize.py", *common, monkeypatch=monkeypatch) == 0
    assert "Continuing study" in capsys.readouterr().out
    again = yaml.safe_load((wd / "hpo_best.yaml").read_text())
    assert again["complete_trials"] + again["pruned_trials"] == 4 and again["score"] >= best["score"]
    assert run_in_process(wd, "optimize.py", *common, "--overwrite", monkeypatch=monkeypatch) == 0
    fresh = yaml.safe_load((wd / "hpo_best.yaml").read_text())
    assert fresh["complete_trials"] + fresh["pruned_trials"] == 1

    # The next train.py run takes them; a flag given on its command line still wins.
    assert run_in_process(wd, "train.py", *data, "--epochs", "1", "--batch-size", "3", monkeypatch=monkeypatch) == 0
    config = yaml.safe_load((wd / "outputs" / "config.yaml").read_text())["template"]
    assert config["hyper_parameters"]["basic"]["base_learning_rate"] == params["hyper_parameters.basic.base_learning_rate"]
    assert config["training"]["optimizer"]["weight_decay"] == params["training.optimizer.weight_decay"]
    assert config["hyper_parameters"]["basic"]["batch_size"] == 3
    settings = next(line for line in capsys.readouterr().out.splitlines() if "Settings given: " in line)
    lr_key = "hyper_parameters.basic.base_learning_rate"
    assert f"{lr_key}={params[lr_key]!r} (hpo_best.yaml)" in settings  # each value with its source, once
    assert "hyper_parameters.basic.batch_size=3 (--batch-size)" in settings and settings.count("batch_size=") == 1

    (wd / "hpo_best.yaml").write_text("params: [1, 2]\n")
    assert run_in_process(wd, "train.py", *data, "--epochs", "1", monkeypatch=monkeypatch) == 2
    assert "hpo_best.yaml" in capsys.readouterr().err


def test_a_study_storage_that_cannot_be_written_is_one_error(tmp_path: Path, monkeypatch):
    import sqlalchemy.exc

    study = create_study(f"sqlite:///{tmp_path / 'study.db'}", "full")

    def full_disk(*args, **kwargs):
        raise sqlalchemy.exc.OperationalError("INSERT INTO trials ...", {}, Exception("database or disk is full"))

    monkeypatch.setattr(study, "optimize", full_disk)
    with pytest.raises(UserError) as info:
        search(study, lambda params, report: 1.0, SearchSpace((0.001, 0.1), (1e-5, 1e-3)), Budget(1.0, 1), 1,
               logging.getLogger("test"))
    assert "no space left" in str(info.value) and str(tmp_path / "study.db") in str(info.value)


def test_optimize_takes_its_old_time_budget_spelling_with_a_note(work_dir, monkeypatch, capsys):
    """optimize.py's ratio is --search-budget (train.py's --time-budget is a duration); a script written for
    the old spelling keeps working and is told."""
    import importlib.util
    import sys

    wd = work_dir()
    spec = importlib.util.spec_from_file_location("optimize_under_test", wd / "optimize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["optimize.py", "--time-budget", "0.25"])
    args = module.parse_args()
    assert args.search_budget == 0.25
    assert "optimize.py --time-budget is now --search-budget" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["optimize.py", "--search-budget", "0.5"])
    assert module.parse_args().search_budget == 0.5 and capsys.readouterr().err == ""
    from workbench import cli

    assert cli.collect_overrides(module.parse_args(), module.FLAG_KEYS)["hpo.time_budget"] == 0.5
