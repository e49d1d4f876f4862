"""The training engine and CLI, built on fastmlp's public API (fastmlp.nn, fastmlp.optim) and torch."""

from .config import ConfigError, TrainConfig, load_yaml
from .engine import Trainer, build_model, build_optimizer, build_scheduler

__all__ = ["ConfigError", "TrainConfig", "Trainer", "build_model", "build_optimizer", "build_scheduler", "load_yaml"]
