"""The training engine: one Trainer drives model, optimizer, scheduler, AMP, checkpoints and logs.

The hot loop does no host sync except the anomaly guard's one boolean per step (free on CPU,
where every op is already synchronous; switch it off with anomaly_guard: false). Losses and
gradient norms stay on the device and are read back in one batch every log_every steps.
"""

import collections
import contextlib
import csv
import gc
import io
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch
import yaml
from torch import nn

from .. import nn as fnn
from ..data import FashionMNIST, augment
from ..monitor import AnomalyError, AnomalyGuard, Monitor, total_grad_norm
from .checkpoint import (CheckpointError, atomic_save, atomic_write_json, atomic_write_text, load_checkpoint,
                         remove_stale_temp_files, rng_state, set_rng_state, interrupts_deferred)
from .config import RESUME_MAY_CHANGE, ConfigError, TrainConfig, check_resume_overrides
from .profiling import StepProfiler
from .tensorboard import TensorBoardLog, require_tensorboard

__all__ = ["Trainer", "build_model", "build_optimizer", "build_scheduler", "resolve_device", "new_run_dir",
           "optim_module", "load_data", "open_run", "apply_deterministic", "min_batch", "completed_summary",
           "complete_message", "cycles_momentum", "early_stop", "training_over", "CheckpointError"]

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
# Every file a run writes through checkpoint._atomic (temp file, then rename).
ATOMIC_FILES = (CHECKPOINT, BEST, "config.yaml", "metrics.jsonl", "metrics.csv", "summary.json")


def apply_deterministic(cfg):
    """--deterministic: deterministic kernels only (process-wide)."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def resolve_device(spec):
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {spec}: no CUDA device is visible to torch; use --device cpu or auto")
    return dev


def optim_module(impl):
    """torch.optim or fastmlp.optim (the fused multi-tensor drop-ins with the same signatures)."""
    if impl == "torch":
        return torch.optim
    from .. import optim  # noqa: PLC0415  (imported here: fastmlp.train loads before the package finishes)

    return optim


def load_data(cfg, device):
    with warnings.catch_warnings():
        # A --val-split that holds out every image leaves an empty training split, whose std() torch
        # warns about; check_data then says what is wrong in terms of the option.
        warnings.filterwarnings("ignore", message=r"std\(\): degrees of freedom", category=UserWarning)
        data = FashionMNIST.load(cfg.data_dir, device=device, val_split=cfg.val_split, train_subset=cfg.train_subset)
    check_data(cfg, data)
    return data


def check_data(cfg, data):
    """The config errors that only the data can show (the size of the training split)."""
    n = len(data.train)
    if n == 0:
        if data.val is not None:
            raise ConfigError(f"config option 'val_split' ({cfg.val_split:g}) holds out all {len(data.val)} training "
                              "images for validation, leaving none to train on; use a smaller --val-split (e.g. 0.1)")
        raise ConfigError("the training split is empty: the dataset holds no training images")
    if cfg.train_subset and n < cfg.train_subset:
        held = f" once --val-split {cfg.val_split:g} holds out {len(data.val)}" if data.val is not None else ""
        raise ConfigError(f"config option 'train_subset' ({cfg.train_subset}) is larger than the training split, "
                          f"which has {n} images{held}; use at most {n}, or 0 for all of them")
    if cfg.norm == "batch" and n < 2:
        raise ConfigError(f"norm batch needs at least 2 training samples (BatchNorm normalises with batch "
                          f"statistics), but the training split has {n}")


def check_given_data(cfg, data):
    """Trainer(data=...) and run_sweep(data=...) train on the data as given: refuse data that the
    config's data options contradict (config.yaml would misreport the run), then check_data."""
    if cfg.train_subset and len(data.train) != cfg.train_subset:
        raise ConfigError(f"config option 'train_subset' ({cfg.train_subset}) does not match the given data, whose "
                          f"training split holds {len(data.train)} images (data is used as given): load it with "
                          f"FashionMNIST.load(train_subset={cfg.train_subset}, val_split=...) or set train_subset to 0")
    if cfg.val_split and data.val is None:   # (data with a validation split of its own is validated on)
        raise ConfigError(f"config option 'val_split' ({cfg.val_split:g}) asks for a validation split, which the given "
                          f"data does not have (data is used as given): load it with "
                          f"FashionMNIST.load(val_split={cfg.val_split:g}) or set val_split to 0")
    check_data(cfg, data)


def min_batch(cfg):
    """The smallest training (micro-)batch the model can take: BatchNorm cannot train on one sample."""
    return 2 if cfg.norm == "batch" else 1


# --amp as the dtype autocast runs in (None: off).
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
EVAL_BATCH = 4096


def make_mlp(cfg, device, impl=None):
    """The configured MLP (in cfg.impl, or impl) on device, with torch's default init; an error that
    says what to do when fastmlp layers are asked for on CUDA in a build without CUDA kernels."""
    impl = cfg.impl if impl is None else impl
    if impl == "fastmlp" and device.type == "cuda":
        import fastmlp  # noqa: PLC0415

        if not fastmlp.WITH_CUDA:
            raise RuntimeError(f"--device {device}: this fastmlp build has no CUDA kernels for fastmlp layers; "
                               "use --device cpu or --impl torch (impl='torch' in load_model), or rebuild with "
                               "FASTMLP_CUDA=1")
    return fnn.MLP(cfg.widths, activation=cfg.activation, dropout=cfg.dropout,
                   norm=None if cfg.norm == "none" else cfg.norm, impl=impl).to(device)


@torch.no_grad()
def evaluation_sums(model, batches, device, amp_dtype, predictions=False):
    """(correct, summed cross-entropy, predicted classes or []) of model over (x, y) batches, the
    first two as tensors on device (read back once by the caller). The one evaluation loop: the
    trainer's per-epoch numbers and `fastmlp evaluate`'s come from it, so they agree to the bit."""
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss = torch.zeros((), device=device)
    preds = []
    for xb, yb in batches:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(xb)
        p = out.argmax(1)
        correct += (p == yb).sum()
        loss += nn.functional.cross_entropy(out.float(), yb, reduction="sum")
        if predictions:
            preds.append(p)
    return correct, loss, preds


def build_model(cfg, device, data=None):
    """The configured MLP, seeded so that both impls start from the same weights."""
    torch.manual_seed(cfg.seed)
    model = make_mlp(cfg, device)
    batch = None
    if cfg.init == "lsuv":
        if data is None:
            raise ValueError("build_model: init 'lsuv' needs the training data")
        g = torch.Generator().manual_seed(cfg.seed)
        idx = torch.randperm(len(data.train), generator=g)[:1024].to(device)
        batch = data.train.x.index_select(0, idx)
    fnn.init_(model, cfg.init, batch)
    return model


def build_optimizer(cfg, model, lr=None):
    """The optimizer cfg asks for (--optimizer, --lr or lr, --momentum, --nesterov, --betas,
    --weight-decay) over model's parameters: fastmlp.optim's for --impl fastmlp, torch.optim's
    (default implementation) for --impl torch."""
    mod = optim_module(cfg.impl)
    lr = cfg.lr if lr is None else lr
    params = list(model.parameters())
    if cfg.optimizer == "sgd":
        return mod.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return mod.Adam(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return mod.AdamW(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def cycles_momentum(cfg):
    """Whether the schedule cycles the momentum (sgd) or beta1 (adam, adamw), overriding the configured
    value: onecycle with cycle_momentum, except for sgd without momentum (nothing to cycle was asked for)."""
    return cfg.scheduler == "onecycle" and cfg.cycle_momentum and not (cfg.optimizer == "sgd" and cfg.momentum == 0)


def build_scheduler(cfg, optimizer, steps_per_epoch):
    """A torch LR scheduler stepped once per optimizer step (None for "none")."""
    total = cfg.epochs * steps_per_epoch
    S = torch.optim.lr_scheduler
    if cfg.scheduler == "none":
        return None
    if cfg.scheduler == "step":
        return S.StepLR(optimizer, step_size=max(1, round(cfg.step_size * steps_per_epoch)), gamma=cfg.gamma)
    if cfg.scheduler == "cosine":
        return S.CosineAnnealingLR(optimizer, T_max=total, eta_min=cfg.min_lr)
    if cfg.scheduler == "onecycle":
        return S.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total, pct_start=cfg.pct_start,
                            cycle_momentum=cycles_momentum(cfg))
    # warmup_cosine: torch's SequentialLR([LinearLR(start_factor=0.01), CosineAnnealingLR]) in closed
    # form, which resumes from a state_dict without SequentialLR's milestone bookkeeping.
    # --warmup-epochs 0: no warmup, the cosine from the first step; a positive one at least one step.
    warm = max(1, round(cfg.warmup_epochs * steps_per_epoch)) if cfg.warmup_epochs > 0 else 0
    if warm >= total:  # TrainConfig.validate catches warmup_epochs >= epochs; this is the rounding of short runs
        raise ConfigError(f"config option 'warmup_epochs' ({cfg.warmup_epochs:g}) must be shorter than the run, "
                          f"'epochs' ({cfg.epochs}): with {steps_per_epoch} step(s) per epoch the warmup takes {warm} "
                          f"of the {total} steps; lower --warmup-epochs or raise --epochs")
    base, floor = cfg.lr, cfg.min_lr

    def factor(s):
        if s < warm:
            return 0.01 + 0.99 * s / warm
        t = min(s - warm, total - warm)
        return (floor + (base - floor) * (1 + math.cos(math.pi * t / (total - warm))) / 2) / base

    return S.LambdaLR(optimizer, factor)


def new_run_dir(out_dir, name):
    """A fresh <out_dir>/<timestamp>-<name>; never an existing folder."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"config option 'out_dir' ({out}) is a file, not a folder: give --out-dir a folder for the "
                          "run folders")
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        d = out / (f"{stamp}-{name}" if i == 0 else f"{stamp}-{name}-{i}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a new run folder in {out}")


def _machine():
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


class Trainer:
    """Train cfg on Fashion-MNIST into a run folder: ``Trainer(cfg).fit()`` or ``Trainer.resume(dir).fit()``.

    A run's results depend on its config alone, not on what the process did before: the model is
    built from cfg.seed, fit() starts a new run from the random state it was built with, and a
    resumed run from its checkpoint's (with --compile, bitwise as a fresh process compiles it).
    """

    def __init__(self, cfg: TrainConfig, run_dir=None, data=None, out=None, _checkpoint=None):
        if isinstance(cfg, dict):   # the options as a dict, as run_sweep takes them
            cfg = TrainConfig.from_dict(cfg)
        self.cfg = cfg.validate()
        self.out = out if out is not None else sys.stdout
        apply_deterministic(cfg)
        self.device = resolve_device(cfg.device)
        if data is None:
            data = load_data(cfg, self.device)  # checked there
        else:
            check_given_data(cfg, data)
        self.data = data
        self.model = build_model(cfg, self.device, self.data)
        # The compiled module shares the model's parameters; checkpoints, the monitor's hooks, the
        # anomaly replay and evaluation use the eager module (hooks added to a compiled module
        # would recompile it at every monitored step).
        # dynamic=False: the same kernels as a compile in a fresh process, whatever this process compiled
        # before (with automatic dynamic shapes a second Trainer's model got a dynamic batch size and
        # other kernels, so a run resumed in the same process, or a sweep's later trial, differed).
        self.compiled = torch.compile(self.model, dynamic=False) if cfg.compile else None
        self.optimizer = build_optimizer(cfg, self.model)
        self.eff_batch = cfg.batch_size * cfg.accum_steps
        self.min_batch = min_batch(cfg)
        self.steps_per_epoch = self.data.train.num_batches(self.eff_batch, self.min_batch)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.amp_dtype = AMP_DTYPES[cfg.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        # The moving average of the weights (--ema): what evaluation, best.pt and the saved model use.
        self.ema = optim_module("fastmlp").EMA(self.model, cfg.ema) if cfg.ema else None
        self.monitor = Monitor(self.model, cfg.monitor_every)
        if cfg.tensorboard:
            require_tensorboard()  # before anything trains
        self.tb = None  # the TensorBoardLog while fit() runs with --tensorboard
        self.profiler = None  # the StepProfiler while fit() runs with --profile-steps
        self.guard = AnomalyGuard(self.model) if cfg.anomaly_guard else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history, self.epoch_losses, self.epoch_time = [], [], 0.0
        # Training-batch predictions that were right this epoch (with dropout on, as Keras reports
        # train accuracy): counted on the device, read once per epoch.
        self.epoch_correct = torch.zeros((), dtype=torch.long, device=self.device)
        self.pending = []
        # The losses of the last steps flushed, for the anomaly guard to tell a diverging loss.
        self.recent_losses = collections.deque(maxlen=20)
        self.has_checkpoint = False
        self.last_checkpoint = None  # (epoch, step_in_epoch, global_step) of the checkpoint on disk
        if run_dir is None:
            self.run_dir = new_run_dir(cfg.out_dir, cfg.name)
        else:
            self.run_dir = Path(run_dir)
        self._start_rng = None
        if _checkpoint is not None:
            self._restore(_checkpoint)
        else:
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            atomic_write_text(self.run_dir / "metrics.jsonl", "")
            # The random state a new run trains from, set again when fit() starts: what runs between
            # (another Trainer built or trained, the caller's own draws) cannot change its dropout masks.
            self._start_rng = rng_state()

    # ---- resume ------------------------------------------------------------------------------
    @classmethod
    def resume(cls, run_dir, out=None, overrides=None, data=None, checkpoint=None):
        """The Trainer of a stopped run, at its checkpoint. run_dir: the run folder, or the checkpoint
        file in it. overrides: options that cannot change the results (RESUME_MAY_CHANGE, and
        monitor_every unless the run uses --compile); any other raises ConfigError. Nothing in the
        folder changes unless the checkpoint is valid for its config and data."""
        if checkpoint is None:
            run_dir, checkpoint = open_run(run_dir)
        run_dir, ck = Path(run_dir), checkpoint
        check_resume_overrides(overrides, ck["config"])
        cfg_dict = dict(ck["config"])
        cfg_dict.update(overrides or {})
        cfg = TrainConfig.from_dict(cfg_dict, source=f"{run_dir / CHECKPOINT}")
        return cls(cfg, run_dir=run_dir, out=out, data=data, _checkpoint=ck)

    def _restore(self, ck):
        path = self.run_dir / CHECKPOINT
        saved = ck.get("data")
        n_train = len(self.data.train)
        if saved and (saved.get("n_train") != n_train or not math.isclose(saved.get("mean", math.nan), self.data.mean,
                                                                        rel_tol=1e-6)):
            raise CheckpointError(
                f"--resume: {path} was trained on other data: {saved.get('n_train')} training images of mean "
                f"{saved.get('mean', math.nan):.6f}, but the data now loaded (--data-dir {self.cfg.data_dir or 'default'}) "
                f"gives {n_train} of mean {self.data.mean:.6f}; resume with the run's dataset")
        digest = saved.get("digest") if saved else None
        if digest and self.data.digest and digest != self.data.digest:
            # (Same size and mean, other contents: a relabelled or edited copy of the files.)
            raise CheckpointError(
                f"--resume: {path} was trained on other data: the Fashion-MNIST files now loaded (--data-dir "
                f"{self.cfg.data_dir or 'default'}) hold other images or labels than the run's (fingerprint "
                f"{self.data.digest}, the run's {digest}); resume with the run's dataset")
        try:
            self.model.load_state_dict(ck["model"])
        except (RuntimeError, KeyError, TypeError, ValueError) as e:
            detail = " ".join(str(e).split())
            raise CheckpointError(
                f"--resume: {path}: the weights do not match the model its config describes (widths {self.cfg.widths}, "
                f"norm {self.cfg.norm}, impl {self.cfg.impl}); the checkpoint was edited or is from another run. "
                f"{detail[:600]}") from e
        try:
            self.optimizer.load_state_dict(ck["optimizer"])
            if self.scheduler is not None and ck["scheduler"] is not None:
                self.scheduler.load_state_dict(ck["scheduler"])
            self.scaler.load_state_dict(ck["scaler"])
            epoch, step_in_epoch, global_step = (int(ck[k]) for k in ("epoch", "step_in_epoch", "global_step"))
            history, epoch_losses, epoch_time = list(ck["history"]), list(ck["epoch_losses"]), float(ck["epoch_time"])
            epoch_correct = int(ck.get("epoch_correct", 0))  # absent in checkpoints written before it existed
            if self.ema is not None:
                self.ema.load_state_dict(ck["ema"])
            set_rng_state(ck["rng"])
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as e:
            raise CheckpointError(f"--resume: {path}: the optimizer, scheduler, EMA or RNG state does not fit the run's "
                                  f"config ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from e
        if not (0 <= step_in_epoch < max(1, self.steps_per_epoch) and 0 <= epoch):
            raise CheckpointError(f"--resume: {path}: its position (epoch {epoch + 1}, batch {step_in_epoch}) is not "
                                  f"within an epoch of {self.steps_per_epoch} steps")
        self.epoch, self.step_in_epoch, self.global_step = epoch, step_in_epoch, global_step
        self.history, self.epoch_losses, self.epoch_time = history, epoch_losses, epoch_time
        self.epoch_correct.fill_(epoch_correct)
        self.has_checkpoint = True
        self.last_checkpoint = (epoch, step_in_epoch, global_step)
        # Temp files of writes a SIGKILL cut short: never renamed into place, never read again.
        remove_stale_temp_files(self.run_dir, ATOMIC_FILES)
        if self.finished():
            return  # nothing left to train: the folder is left as it is
        # Steps logged after the checkpoint (by the run that stopped) are about to be redone.
        path = self.run_dir / "metrics.jsonl"
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by the kill
                if rec.get("step", math.inf) <= self.global_step:
                    kept.append(line)
        atomic_write_text(path, "".join(l + "\n" for l in kept))

    def _save_checkpoint(self):
        self._flush()
        ck = {
            "version": 1, "config": self.cfg.to_dict(), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(), "rng": rng_state(),
            # With --ema the averaged weights, which the run evaluates; "model" keeps the trained ones.
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "history": self.history, "epoch_losses": self.epoch_losses, "epoch_time": self.epoch_time,
            "epoch_correct": int(self.epoch_correct),
            # What the data was, so a resume on another machine (--data-dir) can tell it has the same.
            "data": {"n_train": len(self.data.train), "mean": self.data.mean, "std": self.data.std,
                     "steps_per_epoch": self.steps_per_epoch, "digest": self.data.digest},
        }
        # A Ctrl-C during the write is held until the new checkpoint is on disk and recorded, so the
        # stop message names the checkpoint that is there.
        with interrupts_deferred():
            atomic_save(ck, self.run_dir / CHECKPOINT)
            self.has_checkpoint = True
            self.last_checkpoint = (self.epoch, self.step_in_epoch, self.global_step)

    def _save_best(self, row):
        """best.pt: the model weights of the epoch with the highest validation accuracy so far (only
        with a validation split: choosing on the test set would report an optimistic test accuracy);
        with --ema the averaged weights, which were evaluated."""
        atomic_save({"version": 1, "config": self.cfg.to_dict(), "model": self.evaluated_state_dict(),
                     "epoch": row["epoch"], "val_acc": row["val_acc"], "test_acc": row["test_acc"]},
                    self.run_dir / BEST)

    def evaluated_state_dict(self):
        """The weights the run evaluates: the moving average with --ema, else the trained ones."""
        return self.ema.averaged_state_dict() if self.ema is not None else self.model.state_dict()

    def checkpoint_description(self):
        """Where the checkpoint on disk stands, in words; None when none was written."""
        if self.last_checkpoint is None:
            return None
        epoch, step_in_epoch, step = self.last_checkpoint
        if step_in_epoch == 0:
            return f"the end of epoch {epoch} (step {step})" if epoch else f"the start (step {step})"
        return f"epoch {epoch + 1}, step {step} ({step_in_epoch} of {self.steps_per_epoch} batches into the epoch)"

    def stop_message(self, what="interrupted"):
        """What a stopped run left behind and how to continue it."""
        where = self.checkpoint_description()
        if where is None:
            first = "at the end of epoch 1" + (f" or at step {self.cfg.checkpoint_every}" if self.cfg.checkpoint_every else "")
            return (f"{what}; run folder {self.run_dir} has no checkpoint yet (the first is written {first}), so it "
                    "cannot be resumed: start the run again")
        return (f"{what}; run folder {self.run_dir} has a checkpoint from {where}. Continue it with: "
                f"python -m fastmlp train --resume {self.run_dir}")

    # ---- logging -----------------------------------------------------------------------------
    def _flush(self):
        if not self.pending:
            return
        losses = torch.stack([p[2] for p in self.pending]).float()
        norms = torch.stack([p[3] if p[3] is not None else torch.full((), float("nan"), device=losses.device)
                             for p in self.pending]).double()  # a diverging run's norm can pass fp32's range
        lv, nv = torch.stack([losses.double(), norms.to(losses.device)]).tolist()  # the one sync
        self.recent_losses.extend(lv)
        records = []
        for (step, epoch, _, _, lr, mon), loss, gn in zip(self.pending, lv, nv):
            rec = {"step": step, "epoch": epoch + 1, "loss": loss, "lr": lr}
            if not math.isnan(gn):
                rec["grad_norm"] = gn
            if mon:
                rec.update({k: v for k, v in mon.items() if k != "step"})
            records.append(rec)
            if epoch == self.epoch:
                self.epoch_losses.append(loss)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write("\n".join(map(json.dumps, records)) + "\n")
        if self.tb is not None:
            self.tb.steps(records)
        self.pending = []
        return lv[-1]

    def _write_csv(self):
        buf = io.StringIO()
        fields = ["epoch", "global_step", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr",
                  "seconds", "samples_per_s"]
        w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for row in self.history:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
        atomic_write_text(self.run_dir / "metrics.csv", buf.getvalue())

    def _print(self, msg, bar=None):
        if bar is not None and not bar.disable:
            bar.write(msg, file=self.out)
        else:
            print(msg, file=self.out, flush=True)

    # ---- the loop ----------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _forward_backward(self, xb, yb, eager=False):
        n = xb.shape[0]
        model = self.model
        if self.compiled is not None and not eager and not self.monitor.instrumenting:
            model = self.compiled
        total = None
        if self.cfg.accum_steps == 1:
            chunks = [(xb, yb)]
        else:
            sizes = self._micro(n)
            chunks = zip(xb.split(sizes), yb.split(sizes))
        for xm, ym in chunks:
            with self._autocast():
                out = model(xm)
                loss = self.criterion(out, ym)
            if not eager:  # (a replay of a step is not a new prediction)
                self.epoch_correct += (out.detach().argmax(-1) == ym).sum()
            if self.cfg.accum_steps > 1:
                # Weighted by micro-batch size, so a short last micro-batch still gives the big batch's mean.
                loss = loss * (xm.shape[0] / n)
            self.scaler.scale(loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total

    def _micro(self, n):
        """Micro-batch sizes for a batch of n: batch_size each, the remainder last; a remainder BatchNorm
        cannot train on (1 sample) joins the micro-batch before it."""
        bs = self.cfg.batch_size
        sizes = [bs] * (n // bs) + ([n % bs] if n % bs else [])
        if len(sizes) > 1 and sizes[-1] < self.min_batch:
            last = sizes.pop()
            sizes[-1] += last
        return sizes

    def train_step(self, xb, yb, context=""):
        """One optimizer step on the batch (split into accum_steps micro-batches)."""
        cfg = self.cfg
        # Dropout's RNG state, for replaying this very step if the guard fires (a host-side copy, no sync).
        rng = self._rng_state() if self.guard is not None else None
        self.monitor.begin(self.global_step)
        loss = self._forward_backward(xb, yb)
        fp16 = self.scaler.is_enabled()
        if fp16:
            self.scaler.unscale_(self.optimizer)
        # The per-layer norms before clipping, as the logged total grad_norm (clip_grad_norm_ returns it).
        self.monitor.after_backward()
        if cfg.clip_grad_norm > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad_norm)
        else:
            gnorm = total_grad_norm(self.params)
        # With fp16 an Inf gradient is the scaler's business (it skips the step and lowers the scale).
        if self.guard is not None and not self.guard.check(loss, None if fp16 else gnorm):
            self._anomaly(xb, yb, rng, context)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        mon = self.monitor.after_step()
        return loss, gnorm, lr, mon

    def _rng_state(self):
        if self.device.type == "cuda":
            return torch.get_rng_state(), torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state(), None

    def _set_rng_state(self, state):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    def _anomaly(self, xb, yb, rng, context):
        self.monitor.after_step()
        step = self.global_step + 1  # numbered from 1, as in metrics.jsonl

        def replay():
            self.optimizer.zero_grad(set_to_none=True)
            self._set_rng_state(rng)
            return self._forward_backward(xb, yb, eager=True)

        self._flush()
        ckpt = self.run_dir / CHECKPOINT if self.has_checkpoint else None
        err = self.guard.error(step, replay, context=context, checkpoint=ckpt, recent_losses=list(self.recent_losses))
        if ckpt is None:
            err.args = (err.args[0] + " No checkpoint had been written yet.",)
        else:
            # --resume takes the run's own options, so it would take the same steps to the same place.
            err.args = (err.args[0] + f" --resume would repeat the same steps (it refuses a changed --lr): start a "
                        "new run with the cause fixed (e.g. a lower --lr); the checkpoint's weights load with "
                        f"torch.load('{ckpt}', weights_only=False)['model'].",)
        raise err  # fit() writes summary.json (status "anomaly") and the plots of the steps before it

    @torch.no_grad()
    def evaluate(self, ds):
        """(accuracy, mean cross-entropy) of the model in eval mode on dataset ds (None, None for
        none), with the run's autocast; the model is left in training mode."""
        if ds is None:
            return None, None
        self.model.eval()
        correct, loss, _ = evaluation_sums(self.model, ds.batches(EVAL_BATCH), self.device, self.amp_dtype)
        self.model.train()
        c, l = torch.stack([correct.float(), loss]).tolist()
        return c / len(ds), l / len(ds)

    def _progress(self):
        if self.cfg.progress == "off":
            return False
        if self.cfg.progress == "on":
            return True
        return sys.stderr.isatty()

    def fit(self):
        """Train the remaining epochs and return the summary. A run that stops early (Ctrl-C, an
        anomaly, an error) still gets its summary.json (status interrupted / anomaly / failed) and
        plots; the exception then propagates unchanged, except that an error raised while handling a
        KeyboardInterrupt (torch.save's zip writer turns one into RuntimeError("unexpected pos"))
        counts as the interrupt and propagates as a KeyboardInterrupt caused by it."""
        cfg = self.cfg
        self.model.train()
        show = self._progress()
        n_train = len(self.data.train)
        over, stop = training_over(self.epoch, cfg.epochs, self.history, cfg.early_stopping)
        if over:
            done = completed_summary(self.run_dir)
            if done is not None:
                self._print(complete_message(self.run_dir, cfg.epochs, self.global_step, stop))
                return done
            what = f"{self.run_dir} stopped early after epoch {stop['epoch']}" if stop else \
                f"all {cfg.epochs} epochs of {self.run_dir} were trained"
            self._print(f"{what}; writing its summary")
            return self.finish()
        if self.epoch == 0 and self.step_in_epoch == 0:
            if self._start_rng is not None:
                set_rng_state(self._start_rng)
            self._print(f"run folder {self.run_dir}  |  impl {cfg.impl}  device {self.device}  "
                        f"params {sum(p.numel() for p in self.model.parameters()):,}  "
                        f"train {n_train}" + (f"  val {len(self.data.val)}" if self.data.val is not None else "")
                        + f"  test {len(self.data.test)}  steps/epoch {self.steps_per_epoch}")
        else:
            self._print(f"resuming {self.run_dir} from its checkpoint at {self.checkpoint_description()}")
            # The stopped run's summary.json (interrupted, failed ...) no longer says how the run stands:
            # until this one ends and writes its own, `fastmlp runs` shows it unfinished (still training).
            (self.run_dir / "summary.json").unlink(missing_ok=True)
        dropped = self.data.train.dropped(self.eff_batch, self.min_batch)
        if dropped:
            self._print(f"note: norm batch: the last batch of each epoch would hold {dropped} sample, which BatchNorm "
                        f"cannot train on; it is left out ({n_train - dropped} of {n_train} samples per epoch)")
        elif self.cfg.accum_steps > 1 and self._micro(n_train % self.eff_batch or self.eff_batch)[-1] > self.cfg.batch_size:
            self._print("note: norm batch: the last micro-batch of each epoch would hold 1 sample, which BatchNorm "
                        "cannot train on; it joins the micro-batch before it")
        # Every full collection of Python's cyclic GC walks every tracked object, and importing torch
        # leaves ~300k of them: 140 ms per collection here, ~7% of a CPU epoch. Freezing what exists
        # once the run is set up (gc.freeze) leaves collections only what training allocates. (No
        # gc.collect() first: it would cost such a collection; garbage frozen here is freed later.)
        if cfg.tensorboard:
            # A resumed run writes on from its checkpoint; TensorBoard drops the stopped run's later steps.
            self.tb = TensorBoardLog(self.run_dir, first_step=self.global_step + 1)
        if cfg.profile_steps:
            self.profiler = StepProfiler(self.run_dir, cfg.profile_steps, self.device, self.global_step)
        gc.freeze()
        try:
            self._fit_epochs(show, n_train)
            self._profile_written(self.profiler.finish() if self.profiler is not None else None)
        except BaseException as e:
            if self.profiler is not None:
                self.profiler.abandon()
            if isinstance(e, Exception) and isinstance(e.__context__, KeyboardInterrupt):
                stop = KeyboardInterrupt()
                self._stopped(stop)
                raise stop from e
            self._stopped(e)
            raise
        finally:
            gc.unfreeze()
        return self.finish()

    def _profile_written(self, files):
        if files:
            trace, ops = files
            self._print(f"profile: {self.profiler.profiled} steps in {trace} (open it in https://ui.perfetto.dev or "
                        f"chrome://tracing) and {ops} (ops by self time)")

    def finished(self):
        """Whether training is over: every epoch trained, or early stopping ended the run."""
        return training_over(self.epoch, self.cfg.epochs, self.history, self.cfg.early_stopping)[0]

    def _stopped(self, e):
        """summary.json and plots for a run that ended early; never replaces the exception e."""
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "anomaly" if isinstance(e, AnomalyError) else "failed"
        extra = {"error": str(e) or type(e).__name__, "checkpoint": None}
        if self.last_checkpoint is not None:
            extra["checkpoint"] = dict(zip(("epochs_done", "batches_into_epoch", "step"), self.last_checkpoint))
        if isinstance(e, AnomalyError):
            extra.update(step=e.step, layer=e.layer)
        try:
            self.finish(status=status, extra=extra)
        except BaseException as pe:  # noqa: BLE001  (a second Ctrl-C, a plotting or disk error)
            if self.tb is not None:  # (finish() closes it once the summary is written)
                tb, self.tb = self.tb, None
                tb.close()
            print(f"warning: could not write the summary and plots of the stopped run in {self.run_dir}: "
                  f"{type(pe).__name__}: {pe}", file=sys.stderr)
            try:
                atomic_write_json(self.run_dir / "summary.json", {"status": status, "run_dir": str(self.run_dir),
                                                                  "steps": self.global_step, **extra})
            except BaseException:  # noqa: BLE001
                pass

    def _fit_epochs(self, show, n_train):
        from tqdm.auto import tqdm  # noqa: PLC0415

        cfg = self.cfg
        while self.epoch < cfg.epochs:
            epoch = self.epoch
            order = self.data.train.permutation(cfg.seed, epoch)
            bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, disable=not show, leave=False,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", file=sys.stderr)
            bar_every = max(1, min(cfg.log_every, self.steps_per_epoch // 20))
            t0 = time.perf_counter()
            last_lr = None  # the lr of the epoch's last step (the scheduler has moved on to the next one's)
            for b, (xb, yb) in enumerate(self.data.train.batches(self.eff_batch, order, self.step_in_epoch, self.min_batch),
                                         start=self.step_in_epoch):
                if cfg.augment_shift or cfg.augment_flip:
                    xb = augment(xb, cfg.augment_shift, cfg.augment_flip, fill=-self.data.mean / self.data.std)
                if self.profiler is not None:
                    self.profiler.before_step(self.global_step)
                loss, gnorm, lr, mon = self.train_step(xb, yb, context=f" (epoch {epoch + 1}, batch {b + 1})")
                last_lr = lr
                self.global_step += 1
                if self.profiler is not None:
                    self._profile_written(self.profiler.after_step())
                self.step_in_epoch = b + 1
                self.pending.append((self.global_step, epoch, loss, gnorm, lr, mon))
                if self.global_step % cfg.log_every == 0:
                    last = self._flush()
                    if show:
                        bar.set_postfix(loss=f"{last:.4f}", refresh=False)
                elif show and self.global_step % bar_every == 0:
                    # The bar's loss at least ~20 times an epoch, even when log_every is longer than
                    # the epoch (one sync, and only while a bar is shown).
                    bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
                if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0 \
                        and self.step_in_epoch < self.steps_per_epoch:
                    self.epoch_time += time.perf_counter() - t0
                    self._save_checkpoint()
                    t0 = time.perf_counter()
                bar.update(1)
            self._flush()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.epoch_time += time.perf_counter() - t0
            bar.close()
            with self.ema.average_parameters() if self.ema is not None else contextlib.nullcontext():
                val_acc, val_loss = self.evaluate(self.data.val)
                test_acc, test_loss = self.evaluate(self.data.test)
            train_loss = sum(self.epoch_losses) / max(1, len(self.epoch_losses))
            n_seen = n_train - self.data.train.dropped(self.eff_batch, self.min_batch)
            train_acc = int(self.epoch_correct) / n_seen
            row = {"epoch": epoch + 1, "global_step": self.global_step, "train_loss": train_loss,
                   "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
                   "test_acc": test_acc, "test_loss": test_loss,
                   "lr": last_lr if last_lr is not None else self.optimizer.param_groups[0]["lr"],
                   "seconds": self.epoch_time, "samples_per_s": n_seen / self.epoch_time}
            best = max((r["val_acc"] for r in self.history if r.get("val_acc") is not None), default=None)
            self.history.append(row)
            if self.tb is not None:
                self.tb.epoch(row)
            val_s = f"{val_acc:.4f}" if val_acc is not None else "  -   "
            self._print(f"epoch {epoch + 1:3d}/{cfg.epochs}  train loss {train_loss:.4f}  acc {train_acc:.4f}  "
                        f"val acc {val_s}  test acc {test_acc:.4f}  last lr {row['lr']:.2e}  {self.epoch_time:6.2f} s  "
                        f"{row['samples_per_s']:8.0f} samples/s")
            self.epoch, self.step_in_epoch, self.epoch_losses, self.epoch_time = epoch + 1, 0, [], 0.0
            self.epoch_correct.zero_()
            # The epoch's files as one unit: a Ctrl-C here is held until its checkpoint is written too.
            with interrupts_deferred():
                self._write_csv()
                if val_acc is not None and (best is None or val_acc > best):
                    self._save_best(row)
                self._save_checkpoint()
            stop = early_stop(self.history, cfg.early_stopping)
            if stop is not None:
                self._print(f"early stopping: the validation accuracy has not improved for {stop['patience']} epochs "
                            f"(best {stop['best_val_acc']:.4f} at epoch {stop['best_epoch']}, whose weights are in "
                            f"{self.run_dir / BEST})")
                break

    def finish(self, status="completed", extra=None):
        """Write summary.json (and the plots) from the history and metrics.jsonl; returns the summary."""
        if status != "completed":
            self._flush()  # the steps since the last flush belong on the loss curve
        steps, monitor = [], []
        path = self.run_dir / "metrics.jsonl"
        for line in (path.read_text().splitlines() if path.exists() else []):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            steps.append(rec)
            if any(k.endswith("/grad_norm") for k in rec):
                monitor.append(rec)
        secs = [r["seconds"] for r in self.history]
        summary = {
            "status": status, **(extra or {}), "run_dir": str(self.run_dir), "impl": self.cfg.impl, "seed": self.cfg.seed,
            "epochs": len(self.history), "steps": self.global_step,
            "final_test_acc": self.history[-1]["test_acc"] if self.history else None,
            "final_val_acc": self.history[-1]["val_acc"] if self.history else None,
            **_best(self.history, self.run_dir),
            "early_stopped": early_stop(self.history, self.cfg.early_stopping),
            "final_train_loss": self.history[-1]["train_loss"] if self.history else None,
            "final_train_acc": self.history[-1].get("train_acc") if self.history else None,
            "seconds_per_epoch": sum(secs) / len(secs) if secs else None,
            "seconds_per_epoch_median": statistics.median(secs) if secs else None,
            "samples_per_s": (len(self.data.train) * len(secs) / sum(secs)) if secs else None,
            "total_train_seconds": sum(secs), "device": str(self.device), "machine": _machine(),
            "normalisation": {"mean": self.data.mean, "std": self.data.std},
            "history": self.history,
        }
        if self.cfg.plots:
            # The summary first, in case plotting fails or is interrupted (a Ctrl-C during the last
            # plots of a run that trained every epoch left it without one).
            atomic_write_json(self.run_dir / "summary.json", summary)
            from .plots import write_plots  # noqa: PLC0415  (matplotlib is slow to import)

            summary["plots"] = [str(p.name) for p in write_plots(self.run_dir, steps, self.history, monitor)]
        atomic_write_json(self.run_dir / "summary.json", summary)
        if self.tb is not None:
            tb, self.tb = self.tb, None
            tb.finish(self.cfg, summary)
        return summary


def _best(history, run_dir):
    rows = [r for r in history if r.get("val_acc") is not None]
    if not rows:
        return {"best_val_acc": None, "best_epoch": None, "best_epoch_test_acc": None, "best_checkpoint": None}
    top = max(rows, key=lambda r: r["val_acc"])  # the first of equals, as _save_best keeps it
    best = Path(run_dir) / BEST
    return {"best_val_acc": top["val_acc"], "best_epoch": top["epoch"], "best_epoch_test_acc": top["test_acc"],
            "best_checkpoint": str(best.resolve()) if best.is_file() else None}


def open_run(path):
    """(run folder, checkpoint dict) for ``--resume PATH``: PATH is a run folder, or the checkpoint
    file inside one. Raises FileNotFoundError / CheckpointError naming the path; writes nothing."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.name != CHECKPOINT:
            raise FileNotFoundError(f"--resume takes a run folder (the folder that holds {CHECKPOINT}); {p} is a file "
                                    f"of another name. Did you mean --resume {p.parent}?")
        p = p.parent
    elif not p.is_dir():
        raise FileNotFoundError(f"--resume: {p} does not exist; give the run folder (<out_dir>/<timestamp>-<name>)")
    ck_path = p / CHECKPOINT
    if not ck_path.is_file():
        hint = ""
        if (p / "config.yaml").is_file():
            hint = (" The run stopped before its first checkpoint (written at the end of epoch 1, or every "
                    "--checkpoint-every steps): start it again without --resume.")
        elif any(p.glob(f"*/{CHECKPOINT}")):
            hint = f" It holds run folders: give one of them, e.g. --resume {sorted(p.glob(f'*/{CHECKPOINT}'))[-1].parent}"
        raise FileNotFoundError(f"--resume: {p} is not a resumable run folder: it has no {CHECKPOINT}.{hint}")
    ck = load_checkpoint(ck_path)
    _check_own_checkpoint(p, ck)
    return p, ck


def _check_own_checkpoint(run_dir, ck):
    """CheckpointError if the checkpoint's config differs from the folder's config.yaml in an option
    a resume may not change: a checkpoint copied in from another run would train that run's model
    on in this folder, its loss curve appended to this one's."""
    path = run_dir / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return  # none, or unreadable: the checkpoint's own config is the run's (as before config.yaml existed)
    theirs = ck.get("config")
    if not isinstance(saved, dict) or not isinstance(theirs, dict):
        return
    same = lambda a, b: json.dumps(a, default=str) == json.dumps(b, default=str)  # noqa: E731 (tuples as lists)
    free = RESUME_MAY_CHANGE | {"monitor_every"}
    diff = [k for k in saved if k in theirs and k not in free and not same(saved[k], theirs[k])]
    if diff:
        shown = "; ".join(f"{k}: {theirs[k]!r} in the checkpoint, {saved[k]!r} in config.yaml" for k in diff[:4])
        raise CheckpointError(
            f"--resume: {run_dir / CHECKPOINT} is not this run's checkpoint: its config differs from {path} ({shown}"
            f"{'; ...' if len(diff) > 4 else ''}). It was copied in from another run, or config.yaml was edited: put "
            "the run's own checkpoint back, or resume the run the checkpoint comes from")


def early_stop(history, patience):
    """Where early stopping with this patience ends a run of this history: {"epoch", "best_epoch",
    "best_val_acc", "patience"} for the first epoch that ends `patience` epochs after the best
    validation accuracy so far (the first of equals, as best.pt keeps it); None if no epoch does, or
    for patience 0. A function of the history alone, so a resumed run stops where it would have."""
    if not patience:
        return None
    best = None
    for row in history:
        if row.get("val_acc") is None:
            continue
        if best is None or row["val_acc"] > best["val_acc"]:
            best = row
        elif row["epoch"] - best["epoch"] >= patience:
            return {"epoch": row["epoch"], "best_epoch": best["epoch"], "best_val_acc": best["val_acc"],
                    "patience": patience}
    return None


def training_over(epoch, epochs, history, patience):
    """(over, stop) for a run at this position: over when every epoch is trained or early stopping
    ended it; stop is early_stop's record (None when it did not stop early)."""
    stop = early_stop(history, patience)
    return epoch >= epochs or stop is not None, stop


def complete_message(run_dir, epochs, step, stop=None):
    what = f"stopped early after epoch {stop['epoch']}" if stop else f"all {epochs} epochs trained"
    return (f"run {run_dir} is already complete: {what} (step {step}); nothing to do. "
            "Start a new run to train longer.")


def completed_summary(run_dir):
    """The summary.json of a run that wrote it with status completed; else None. (Ask only for a
    run whose training is over: see training_over.)"""
    try:
        s = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) and s.get("status") == "completed" else None


__all__ += ["AnomalyError"]
