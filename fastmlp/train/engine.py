"""The training engine: one Trainer drives model, optimizer, scheduler, AMP, checkpoints and logs.

The hot loop does no host sync except the anomaly guard's one boolean per step (free on CPU,
where every op is already synchronous; switch it off with anomaly_guard: false). Losses and
gradient norms stay on the device and are read back in one batch every log_every steps.
"""

import csv
import gc
import io
import json
import math
import os
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import yaml
from torch import nn

from .. import nn as fnn
from ..data import FashionMNIST
from ..monitor import AnomalyError, AnomalyGuard, Monitor, total_grad_norm
from .checkpoint import atomic_save, atomic_write_json, atomic_write_text, load_checkpoint, rng_state, set_rng_state
from .config import TrainConfig

__all__ = ["Trainer", "build_model", "build_optimizer", "build_scheduler", "resolve_device", "new_run_dir",
           "optim_module", "load_data"]

CHECKPOINT = "checkpoint.pt"


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
    return FashionMNIST.load(cfg.data_dir, device=device, val_split=cfg.val_split, train_subset=cfg.train_subset)


def build_model(cfg, device, data=None):
    """The configured MLP, seeded so that both impls start from the same weights."""
    if cfg.impl == "fastmlp" and device.type == "cuda":
        import fastmlp  # noqa: PLC0415

        if not fastmlp.WITH_CUDA:
            raise RuntimeError("--impl fastmlp on CUDA: this fastmlp build has no CUDA kernels; "
                               "rebuild with FASTMLP_CUDA=1, or use --impl torch or --device cpu")
    torch.manual_seed(cfg.seed)
    model = fnn.MLP(cfg.widths, activation=cfg.activation, dropout=cfg.dropout,
                    norm=None if cfg.norm == "none" else cfg.norm, impl=cfg.impl).to(device)
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
    mod = optim_module(cfg.impl)
    lr = cfg.lr if lr is None else lr
    params = list(model.parameters())
    if cfg.optimizer == "sgd":
        return mod.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return mod.Adam(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return mod.AdamW(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


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
        return S.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total, pct_start=cfg.pct_start)
    # warmup_cosine: torch's SequentialLR([LinearLR(start_factor=0.01), CosineAnnealingLR]) in closed
    # form, which resumes from a state_dict without SequentialLR's milestone bookkeeping.
    warm = max(1, round(cfg.warmup_epochs * steps_per_epoch))
    if warm >= total:
        raise ValueError(f"config option 'warmup_epochs' ({cfg.warmup_epochs}) must be shorter than the run "
                         f"({cfg.epochs} epochs)")
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
    """Train cfg on Fashion-MNIST into a run folder: ``Trainer(cfg).fit()`` or ``Trainer.resume(dir).fit()``."""

    def __init__(self, cfg: TrainConfig, run_dir=None, data=None, out=None, _checkpoint=None):
        self.cfg = cfg.validate()
        self.out = out if out is not None else sys.stdout
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        self.device = resolve_device(cfg.device)
        self.data = data if data is not None else load_data(cfg, self.device)
        self.model = build_model(cfg, self.device, self.data)
        # The compiled module shares the model's parameters; checkpoints, the monitor's hooks, the
        # anomaly replay and evaluation use the eager module (hooks added to a compiled module
        # would recompile it at every monitored step).
        self.compiled = torch.compile(self.model) if cfg.compile else None
        self.optimizer = build_optimizer(cfg, self.model)
        self.eff_batch = cfg.batch_size * cfg.accum_steps
        self.steps_per_epoch = self.data.train.num_batches(self.eff_batch)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.monitor = Monitor(self.model, cfg.monitor_every)
        self.guard = AnomalyGuard(self.model) if cfg.anomaly_guard else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history, self.epoch_losses, self.epoch_time = [], [], 0.0
        self.pending = []
        self.has_checkpoint = False
        if run_dir is None:
            self.run_dir = new_run_dir(cfg.out_dir, cfg.name)
        else:
            self.run_dir = Path(run_dir)
        if _checkpoint is not None:
            self._restore(_checkpoint)
        else:
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            atomic_write_text(self.run_dir / "metrics.jsonl", "")

    # ---- resume ------------------------------------------------------------------------------
    @classmethod
    def resume(cls, run_dir, out=None, overrides=None, data=None):
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"--resume: {run_dir} is not a run folder")
        ck = load_checkpoint(run_dir / CHECKPOINT)
        cfg_dict = dict(ck["config"])
        cfg_dict.update(overrides or {})
        cfg = TrainConfig.from_dict(cfg_dict, source=f"{run_dir / CHECKPOINT}")
        return cls(cfg, run_dir=run_dir, out=out, data=data, _checkpoint=ck)

    def _restore(self, ck):
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.scheduler is not None and ck["scheduler"] is not None:
            self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.step_in_epoch, self.global_step = ck["epoch"], ck["step_in_epoch"], ck["global_step"]
        self.history, self.epoch_losses, self.epoch_time = ck["history"], ck["epoch_losses"], ck["epoch_time"]
        set_rng_state(ck["rng"])
        self.has_checkpoint = True
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
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "history": self.history, "epoch_losses": self.epoch_losses, "epoch_time": self.epoch_time,
        }
        atomic_save(ck, self.run_dir / CHECKPOINT)
        self.has_checkpoint = True

    # ---- logging -----------------------------------------------------------------------------
    def _flush(self):
        if not self.pending:
            return
        losses = torch.stack([p[2] for p in self.pending]).float()
        norms = torch.stack([p[3] if p[3] is not None else torch.full((), float("nan"), device=losses.device)
                             for p in self.pending]).float()
        lv, nv = torch.stack([losses, norms.to(losses.device)]).tolist()  # the one sync
        lines = []
        for (step, epoch, _, _, lr, mon), loss, gn in zip(self.pending, lv, nv):
            rec = {"step": step, "epoch": epoch + 1, "loss": loss, "lr": lr}
            if not math.isnan(gn):
                rec["grad_norm"] = gn
            if mon:
                rec.update({k: v for k, v in mon.items() if k != "step"})
            lines.append(json.dumps(rec))
            if epoch == self.epoch:
                self.epoch_losses.append(loss)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write("\n".join(lines) + "\n")
        self.pending = []
        return lv[-1]

    def _write_csv(self):
        buf = io.StringIO()
        fields = ["epoch", "global_step", "train_loss", "val_acc", "test_acc", "test_loss", "lr", "seconds", "samples_per_s"]
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
        chunks = [(xb, yb)] if self.cfg.accum_steps == 1 else zip(xb.split(self.cfg.batch_size), yb.split(self.cfg.batch_size))
        for xm, ym in chunks:
            with self._autocast():
                loss = self.criterion(model(xm), ym)
            if self.cfg.accum_steps > 1:
                # Weighted by micro-batch size, so a short last micro-batch still gives the big batch's mean.
                loss = loss * (xm.shape[0] / n)
            self.scaler.scale(loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total

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
        if cfg.clip_grad_norm > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad_norm)
        else:
            gnorm = total_grad_norm(self.params)
        self.monitor.after_backward()
        # With fp16 an Inf gradient is the scaler's business (it skips the step and lowers the scale).
        if self.guard is not None and not self.guard.check(loss, None if fp16 else gnorm):
            self._anomaly(xb, yb, rng, context)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()
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
        err = self.guard.error(step, replay, context=context, checkpoint=ckpt)
        if ckpt is None:
            err.args = (err.args[0] + " No checkpoint had been written yet.",)
        atomic_write_json(self.run_dir / "summary.json", {"status": "anomaly", "error": str(err), "step": step,
                                                          "layer": err.layer, "run_dir": str(self.run_dir)})
        raise err

    @torch.no_grad()
    def evaluate(self, ds):
        if ds is None:
            return None, None
        self.model.eval()
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        loss = torch.zeros((), device=self.device)
        for xb, yb in ds.batches(4096):
            with self._autocast():
                out = self.model(xb)
            correct += (out.argmax(1) == yb).sum()
            loss += nn.functional.cross_entropy(out.float(), yb, reduction="sum")
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
        cfg = self.cfg
        self.model.train()
        show = self._progress()
        n_train = len(self.data.train)
        if self.epoch == 0 and self.step_in_epoch == 0:
            self._print(f"run folder {self.run_dir}  |  impl {cfg.impl}  device {self.device}  "
                        f"params {sum(p.numel() for p in self.model.parameters()):,}  "
                        f"train {n_train}  steps/epoch {self.steps_per_epoch}")
        else:
            self._print(f"resuming {self.run_dir} at epoch {self.epoch + 1}, step {self.global_step}")
        # Every full collection of Python's cyclic GC walks every tracked object, and importing torch
        # leaves ~300k of them: 140 ms per collection here, ~7% of a CPU epoch. Freezing what exists
        # once the run is set up (gc.freeze) leaves collections only what training allocates. (No
        # gc.collect() first: it would cost such a collection; garbage frozen here is freed later.)
        gc.freeze()
        try:
            self._fit_epochs(show, n_train)
        finally:
            gc.unfreeze()
        return self.finish()

    def _fit_epochs(self, show, n_train):
        from tqdm.auto import tqdm  # noqa: PLC0415

        cfg = self.cfg
        while self.epoch < cfg.epochs:
            epoch = self.epoch
            order = self.data.train.permutation(cfg.seed, epoch)
            bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, disable=not show, leave=False,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", file=sys.stderr)
            t0 = time.perf_counter()
            for b, (xb, yb) in enumerate(self.data.train.batches(self.eff_batch, order, self.step_in_epoch),
                                         start=self.step_in_epoch):
                loss, gnorm, lr, mon = self.train_step(xb, yb, context=f" (epoch {epoch + 1}, batch {b + 1})")
                self.global_step += 1
                self.step_in_epoch = b + 1
                self.pending.append((self.global_step, epoch, loss, gnorm, lr, mon))
                if self.global_step % cfg.log_every == 0:
                    last = self._flush()
                    if show:
                        bar.set_postfix(loss=f"{last:.4f}", refresh=False)
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
            val_acc, _ = self.evaluate(self.data.val)
            test_acc, test_loss = self.evaluate(self.data.test)
            train_loss = sum(self.epoch_losses) / max(1, len(self.epoch_losses))
            row = {"epoch": epoch + 1, "global_step": self.global_step, "train_loss": train_loss, "val_acc": val_acc,
                   "test_acc": test_acc, "test_loss": test_loss, "lr": self.optimizer.param_groups[0]["lr"],
                   "seconds": self.epoch_time, "samples_per_s": n_train / self.epoch_time}
            self.history.append(row)
            val_s = f"{val_acc:.4f}" if val_acc is not None else "  -   "
            self._print(f"epoch {epoch + 1:3d}/{cfg.epochs}  train loss {train_loss:.4f}  val acc {val_s}  "
                        f"test acc {test_acc:.4f}  lr {row['lr']:.2e}  {self.epoch_time:6.2f} s  "
                        f"{row['samples_per_s']:8.0f} samples/s")
            self.epoch, self.step_in_epoch, self.epoch_losses, self.epoch_time = epoch + 1, 0, [], 0.0
            self._write_csv()
            self._save_checkpoint()

    def finish(self):
        steps, monitor = [], []
        for line in (self.run_dir / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            steps.append(rec)
            if any(k.endswith("/grad_norm") for k in rec):
                monitor.append(rec)
        secs = [r["seconds"] for r in self.history]
        summary = {
            "status": "completed", "run_dir": str(self.run_dir), "impl": self.cfg.impl, "seed": self.cfg.seed,
            "epochs": len(self.history), "steps": self.global_step,
            "final_test_acc": self.history[-1]["test_acc"] if self.history else None,
            "final_val_acc": self.history[-1]["val_acc"] if self.history else None,
            "best_val_acc": max((r["val_acc"] for r in self.history if r["val_acc"] is not None), default=None),
            "final_train_loss": self.history[-1]["train_loss"] if self.history else None,
            "seconds_per_epoch": sum(secs) / len(secs) if secs else None,
            "seconds_per_epoch_median": sorted(secs)[len(secs) // 2] if secs else None,
            "samples_per_s": (len(self.data.train) * len(secs) / sum(secs)) if secs else None,
            "total_train_seconds": sum(secs), "device": str(self.device), "machine": _machine(),
            "normalisation": {"mean": self.data.mean, "std": self.data.std},
            "history": self.history,
        }
        if self.cfg.plots:
            from .plots import write_plots  # noqa: PLC0415  (matplotlib is slow to import)

            summary["plots"] = [str(p.name) for p in write_plots(self.run_dir, steps, self.history, monitor)]
        atomic_write_json(self.run_dir / "summary.json", summary)
        return summary


__all__ += ["AnomalyError"]
