"""Optimizers and learning-rate schedules."""
from .factory import OPTIMIZERS, create_optimizer, param_groups
from .sam import SAM
from .scheduler import SCHEDULERS, LRSchedule, create_scheduler

__all__ = ["SAM", "OPTIMIZERS", "create_optimizer", "param_groups", "SCHEDULERS", "LRSchedule", "create_scheduler"]
