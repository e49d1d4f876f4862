"""--tensorboard: a run's metrics as TensorBoard event files in RUN_DIR/tensorboard/.

    python -m fastmlp train --tensorboard
    tensorboard --logdir runs        # every run (or a sweep folder: its trials, with the HParams tab)

What is written, on TensorBoard's step axis (the optimizer step, as in metrics.jsonl):
- train/loss, train/lr, train/grad_norm for every step, written when metrics.jsonl is (every
  --log-every steps); layers/<layer>/<grad_norm|update_ratio|act_mean|act_std|dead_frac> for the
  monitored steps;
- epoch/<train_loss|train_acc|val_loss|val_acc|test_loss|test_acc|seconds|samples_per_s> at each
  epoch's last step;
- when the run completes, its options and final numbers for the HParams dashboard.
A resumed run writes on from its checkpoint's step and has TensorBoard drop what the stopped run
logged after that step (SummaryWriter's purge_step), so the curves show each step once.
"""

import importlib.util
import math

from .config import ConfigError
from .runs import LOGGING_OPTIONS

__all__ = ["TensorBoardLog", "require_tensorboard", "LOG_FOLDER"]

LOG_FOLDER = "tensorboard"
_EPOCH_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "seconds", "samples_per_s")


def require_tensorboard():
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard (or install fastmlp "
                          "with the [tensorboard] extra)")


def _scalar(v):
    return v is not None and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class TensorBoardLog:
    """The event-file writer of one run; first_step is the step training continues at (1 for a new run)."""

    def __init__(self, run_dir, first_step=1):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415  (imports tensorboard: slow)

        self.writer = SummaryWriter(log_dir=str(run_dir / LOG_FOLDER), purge_step=first_step if first_step > 1 else None)

    def steps(self, records):
        """metrics.jsonl records: {"step", "loss", "lr", "grad_norm"?, "<layer>/<metric>"...}."""
        add = self.writer.add_scalar
        for rec in records:
            s = rec["step"]
            for key in ("loss", "lr", "grad_norm"):
                if _scalar(rec.get(key)):
                    add(f"train/{key}", rec[key], s)
            for key, v in rec.items():
                if "/" in key and _scalar(v):
                    add(f"layers/{key}", v, s)

    def epoch(self, row):
        """One metrics.csv row, at its epoch's last step."""
        for key in _EPOCH_KEYS:
            if _scalar(row.get(key)):
                self.writer.add_scalar(f"epoch/{key}", row[key], row["global_step"])
        self.writer.flush()

    def finish(self, cfg, summary):
        """For a completed run its options and final numbers for the HParams dashboard (a stopped
        run gets them when its resume completes); closes the files."""
        if summary.get("status") != "completed":
            self.close()
            return
        hparams = {}
        for k, v in cfg.to_dict().items():
            if k in LOGGING_OPTIONS:  # where and how the run logs: not a hyperparameter
                continue
            hparams[k] = ",".join(map(str, v)) if isinstance(v, list) else ("none" if v is None else v)
        metrics = {f"hparam/{k}": summary[k] for k in ("final_test_acc", "final_val_acc", "best_val_acc",
                                                        "final_train_loss", "seconds_per_epoch")
                   if _scalar(summary.get(k))}
        if metrics:
            self.writer.add_hparams(hparams, metrics, run_name=".", global_step=summary.get("steps"))
        self.close()

    def close(self):
        self.writer.close()
