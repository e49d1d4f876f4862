"""The training engine and CLI, built on fastmlp's public API (fastmlp.nn, fastmlp.optim) and torch."""

from .config import ConfigError, TrainConfig, load_yaml
from .engine import Trainer, build_model, build_optimizer, build_scheduler
from .evaluate import TrainedModel, evaluate_run, export_model, load_images, load_model, predict_files
from .runs import list_runs
from .sweep import resume_sweep, run_sweep, sweep_results

__all__ = ["ConfigError", "TrainConfig", "TrainedModel", "Trainer", "build_model", "build_optimizer", "build_scheduler",
           "evaluate_run", "export_model", "list_runs", "load_images", "load_model", "load_yaml", "predict_files",
           "resume_sweep", "run_sweep", "sweep_results"]
