"""Hyperparameter search with optuna: learning rate, batch size and weight decay, weak trials pruned
early, the whole search held to a time budget.

The study lives in optuna storage: a local SQLite file, or any database URL optuna accepts, so that
workers on several machines can share one study (each runs `search` with the same storage and name).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import UserError
from .loop import Diverged
from .fileio import write_error

Report = Callable[[int, float], None]                        # (epoch, score): called after every epoch
TrainTrial = Callable[[dict[str, Any], Report], float]       # params -> final score (higher is better)


@dataclass
class SearchSpace:
    learning_rate: tuple[float, float]        # log-uniform
    weight_decay: tuple[float, float]         # log-uniform
    batch_size: list[int] = field(default_factory=list)   # categorical; empty: not searched

    def check(self) -> None:
        for name, (low, high) in (("learning_rate", self.learning_rate), ("weight_decay", self.weight_decay)):
            if not 0 < low <= high:
                raise UserError(f"hpo.{name}: the range must be two positive numbers, low <= high; got "
                                f"[{low}, {high}]")
        if any(b < 1 for b in self.batch_size):
            raise UserError(f"hpo.batch_size: batch sizes must be at least 1, got {self.batch_size}")

    def suggest(self, trial) -> dict[str, Any]:
        params = {"learning_rate": trial.suggest_float("learning_rate", *self.learning_rate, log=True),
                  "weight_decay": trial.suggest_float("weight_decay", *self.weight_decay, log=True)}
        if self.batch_size:
            params["batch_size"] = trial.suggest_categorical("batch_size", list(self.batch_size))
        return params


class OutOfTime(Exception):
    """The search's time budget ran out during a trial."""


@dataclass
class Budget:
    """The search's time limit: `ratio` x the duration of one normal training run, estimated from the
    first epoch any trial completes (seconds per epoch x the normal run's epochs)."""
    ratio: float
    normal_epochs: int
    clock: Callable[[], float] = time.monotonic
    start: float = field(default=0.0)
    seconds: float | None = None              # known once an epoch has been timed

    def __post_init__(self) -> None:
        if self.ratio <= 0:
            raise UserError(f"time budget ratio must be positive, got {self.ratio}")
        self.start = self.clock()

    def epoch_timed(self, epoch_seconds: float) -> None:
        if self.seconds is None:
            self.seconds = self.ratio * epoch_seconds * self.normal_epochs

    def elapsed(self) -> float:
        return self.clock() - self.start

    def exhausted(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds


def create_study(storage: str, name: str, seed: int = 0, pruner_warmup_epochs: int = 1):
    """The named study in `storage` (created, or joined when another worker made it): maximise the score,
    TPE sampling, median pruning once `pruner_warmup_epochs` epochs of two trials are known."""
    import optuna

    try:
        return optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True,
                                   sampler=optuna.samplers.TPESampler(seed=seed),
                                   pruner=optuna.pruners.MedianPruner(n_startup_trials=2,
                                                                      n_warmup_steps=pruner_warmup_epochs))
    except (ValueError, ImportError, RuntimeError) as exc:
        raise UserError(f"optuna storage {storage!r}: {exc}") from None
    except Exception as exc:  # sqlalchemy errors: a bad URL, a database that cannot be reached
        raise UserError(f"optuna storage {storage!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


# SQLite's words (through sqlalchemy) for a database it cannot write: a full disk, a read-only file.
_STORAGE_FULL = ("database or disk is full", "disk i/o error")
_STORAGE_READ_ONLY = ("readonly database", "read-only", "unable to open database file")


def storage_write_error(study, exc: BaseException) -> UserError | None:
    """One error line for a study storage that cannot be written, or None when `exc` is something else.
    Completed trials stay in the storage: a rerun continues the study."""
    text = str(exc).lower()
    storage = getattr(study, "_storage", None)
    url = (getattr(storage, "url", None) or getattr(getattr(storage, "_backend", None), "url", None)
           or "the study's storage")
    if isinstance(exc, OSError):
        return write_error(url, exc)
    if any(words in text for words in _STORAGE_FULL):
        return UserError(f"cannot write the optuna study ({url}): no space left on the device; free some space "
                         f"and run optimize.py again (completed trials are kept)")
    if any(words in text for words in _STORAGE_READ_ONLY):
        return UserError(f"cannot write the optuna study ({url}): read-only or not writable; fix its permissions")
    return None


def search(study, train_trial: TrainTrial, space: SearchSpace, budget: Budget, n_trials: int,
           logger: logging.Logger) -> dict[str, Any]:
    """Run trials until `n_trials` have run here or the budget is spent; returns a summary of the study
    (best params and score over all workers' trials, counts of complete and pruned trials)."""
    import optuna

    space.check()
    if n_trials < 1:
        raise UserError(f"the number of trials must be at least 1, got {n_trials}")

    def objective(trial) -> float:
        params = space.suggest(trial)
        last = [budget.clock()]

        def report(epoch: int, score: float) -> None:
            now = budget.clock()
            budget.epoch_timed(now - last[0])
            last[0] = now
            trial.report(score, epoch)
            if trial.should_prune():
                logger.info(f"trial {trial.number}: pruned after epoch {epoch} (score {score:.2f})")
                raise optuna.TrialPruned()
            if budget.exhausted():
                raise OutOfTime()

        described = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())
        logger.info(f"trial {trial.number}: {described}")
        try:
            score = float(train_trial(params, report))
        except OutOfTime:
            logger.info(f"trial {trial.number}: stopped, the time budget ({budget.seconds:.0f} s) is spent")
            trial.study.stop()
            raise optuna.TrialPruned() from None
        except Diverged as exc:  # a learning rate the search should leave, not the end of the search
            logger.info(f"trial {trial.number}: pruned, {str(exc).split(';')[0]}")
            raise optuna.TrialPruned() from None
        logger.info(f"trial {trial.number}: score {score:.2f}")
        return score

    def stop_when_spent(study_, trial_) -> None:
        if budget.exhausted():
            study_.stop()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study.optimize(objective, n_trials=n_trials, callbacks=[stop_when_spent], catch=())
    except UserError:
        raise
    except Exception as exc:
        error = storage_write_error(study, exc)
        if error is None:
            raise
        raise error from None
    states = [t.state for t in study.trials]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise UserError("no trial completed within the time budget; raise it or lower the epochs per trial")
    best = study.best_trial
    return {"params": dict(best.params), "score": float(best.value), "trial": best.number,
            "complete_trials": len(complete), "pruned_trials": states.count(optuna.trial.TrialState.PRUNED),
            "elapsed_s": round(budget.elapsed(), 1),
            "budget_s": round(budget.seconds, 1) if budget.seconds is not None else None}


__all__ = ["SearchSpace", "Budget", "OutOfTime", "create_study", "search"]
