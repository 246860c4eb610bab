"""Optimizers and learning-rate schedules."""
from .factory import OPTIMIZERS, create_optimizer, param_groups
from .scheduler import SCHEDULERS, WarmupScheduler, create_scheduler

__all__ = ["OPTIMIZERS", "create_optimizer", "param_groups", "SCHEDULERS", "WarmupScheduler", "create_scheduler"]
