"""TrainConfig: every training option, loadable from YAML and overridable from the command line.

Precedence, lowest first: the packaged recipe (fastmlp/configs/default.yaml, which equals the
dataclass defaults), a --config YAML file, then command-line flags.
"""

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["TrainConfig", "ConfigError", "load_yaml", "DEFAULT_YAML", "RESUME_MAY_CHANGE", "check_resume_overrides"]

DEFAULT_YAML = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"

CHOICES = {
    "activation": ("relu", "gelu", "gelu_tanh", "silu"),
    "norm": ("none", "batch", "layer"),
    "init": ("default", "xavier", "he", "kaiming", "lsuv"),
    "impl": ("fastmlp", "torch"),
    "optimizer": ("sgd", "adam", "adamw"),
    "scheduler": ("none", "step", "cosine", "onecycle", "warmup_cosine"),
    "amp": ("off", "bf16", "fp16"),
}


class ConfigError(ValueError):
    """A config value is out of range or of the wrong type; the message names the option."""


# Options that may differ on --resume: they cannot change the trained weights or the metrics, so the
# resumed run stays identical to one never stopped. log_every only sets when metrics.jsonl is
# flushed; checkpoint_every only when extra checkpoints are saved (saving reads state, draws no
# random numbers); the anomaly guard only reads a flag per step; data_dir is where this machine
# keeps the same dataset (the checkpoint records its size, mean and fingerprint, checked on resume).
# monitor_every may change unless the run uses --compile: monitored steps run eagerly, the others
# compiled, so their numerics differ.
RESUME_MAY_CHANGE = {"device", "progress", "plots", "data_dir", "log_every", "checkpoint_every", "anomaly_guard",
                     "tensorboard", "profile_steps"}


def check_resume_overrides(overrides, saved, allow_monitor_every=True, name=str):
    """ConfigError unless every option in overrides may change on resume (RESUME_MAY_CHANGE, and
    monitor_every where allow_monitor_every and the saved config does not use --compile). name
    spells an option in the message (the CLI's as its flag)."""
    allowed = set(RESUME_MAY_CHANGE)
    if allow_monitor_every and not saved.get("compile"):
        allowed.add("monitor_every")
    bad = sorted(set(overrides or {}) - allowed)
    if bad:
        why = " (the run uses --compile: monitored steps run eagerly, the others compiled)" if (
            bad == ["monitor_every"] and allow_monitor_every) else ""
        raise ConfigError(f"resume: {', '.join(map(name, bad))} cannot change on resume{why}; a resumed run keeps its "
                          f"saved config, and only {', '.join(map(name, sorted(allowed)))} may change, as they cannot "
                          "change the results")


def _h(text, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    """Every option of a training run: the fields are the CLI's flags (`--batch-size` is batch_size)
    and the YAML keys of a config file; defaults are the recipe (fastmlp/configs/default.yaml).
    validate() checks types and ranges, naming the option; from_dict() builds and validates one."""
    # Run
    name: str = _h("run name; the run folder is <out_dir>/<timestamp>-<name>", default="fmnist-mlp")
    out_dir: str = _h("folder that holds the run folders", default="runs")
    data_dir: str | None = _h("dataset root holding FashionMNIST/raw/ (default: $FASTMLP_DATA, else the cache)", default=None)
    device: str = _h("auto (CUDA when present), cpu, cuda, cuda:N", default="auto")
    seed: int = _h("seed for init, dropout and the shuffle", default=0)
    deterministic: bool = _h("use only deterministic kernels", default=False)
    # Data
    val_split: float = _h("fraction of the training set held out for validation", default=0.0)
    train_subset: int = _h("train on the first N training images only (0 = all)", default=0)
    augment_shift: int = _h("shift each training image by up to N pixels in x and y, at random per image and "
                            "epoch (0 = off)", default=0)
    augment_flip: bool = _h("mirror each training image left-right with probability 1/2", default=False)
    # Model
    widths: list[int] = _h("layer widths, input first", default_factory=lambda: [784, 512, 512, 10])
    activation: str = _h("relu | gelu | gelu_tanh | silu", default="gelu")
    dropout: float = _h("dropout after each hidden layer", default=0.2)
    norm: str = _h("none | batch | layer (after each hidden activation)", default="none")
    init: str = _h("default (torch's nn.Linear init) | xavier | he | kaiming | lsuv", default="default")
    impl: str = _h("fastmlp (fused modules and optimizers) | torch (nn.Linear, torch.optim)", default="fastmlp")
    compile: bool = _h("torch.compile the model for the training steps (monitored steps, the anomaly "
                       "guard's replay and evaluation run it eagerly)", default=False)
    # Optimisation
    optimizer: str = _h("sgd | adam | adamw", default="adamw")
    lr: float = _h("learning rate (the peak for onecycle and warmup_cosine)", default=2e-3)
    momentum: float = _h("SGD momentum", default=0.9)
    nesterov: bool = _h("SGD Nesterov momentum", default=False)
    betas: list[float] = _h("Adam/AdamW betas", default_factory=lambda: [0.9, 0.999])
    weight_decay: float = _h("weight decay (decoupled for adamw, L2 for sgd/adam)", default=0.05)
    scheduler: str = _h("none | step | cosine | onecycle | warmup_cosine (stepped every optimizer step)", default="onecycle")
    step_size: float = _h("step scheduler: epochs between decays", default=3.0)
    gamma: float = _h("step scheduler: decay factor", default=0.1)
    warmup_epochs: float = _h("warmup_cosine: epochs of linear warmup", default=1.0)
    pct_start: float = _h("onecycle: fraction of steps spent increasing the lr", default=0.3)
    cycle_momentum: bool = _h("onecycle: cycle the momentum (sgd) or the first beta (adam, adamw) inversely to the "
                              "lr, 0.95 -> 0.85 -> 0.95 (torch's OneCycleLR), in place of --momentum or --betas' "
                              "first value; --no-cycle-momentum keeps those constant. Never for sgd with --momentum 0 "
                              "(no momentum was asked for)", default=True)
    min_lr: float = _h("cosine / warmup_cosine: final lr", default=0.0)
    epochs: int = _h("epochs", default=10)
    early_stopping: int = _h("stop once the validation accuracy has not improved for N epochs in a row (needs "
                             "--val-split; 0 = off); best.pt keeps the best epoch's weights", default=0)
    batch_size: int = _h("micro-batch size", default=256)
    accum_steps: int = _h("micro-batches per optimizer step (effective batch = batch_size x accum_steps). Dropout "
                          "masks are drawn per micro-batch and batch norm normalises with per-micro-batch "
                          "statistics (its num_batches_tracked counts micro-batches), so only runs without dropout "
                          "and batch norm match one big batch exactly", default=1)
    clip_grad_norm: float = _h("clip the global gradient norm to this (0 = off)", default=0.0)
    label_smoothing: float = _h("label smoothing for the cross-entropy", default=0.1)
    ema: float = _h("keep an exponential moving average of the weights with this decay per optimizer step "
                    "(e.g. 0.999; 0 = off; warmed up as min(decay, (1 + t) / (10 + t))): the validation and test "
                    "accuracy, best.pt, evaluate, predict and export then use the averaged weights", default=0.0)
    amp: str = _h("off | bf16 | fp16 (autocast; fp16 adds a GradScaler)", default="off")
    # Logging, checkpoints, safety
    log_every: int = _h("steps between metrics.jsonl flushes and progress-bar loss updates", default=50)
    monitor_every: int = _h("steps between per-layer monitor records: gradient norm (before clipping), "
                            "update/weight ratio, activation statistics (0 = off)", default=50)
    checkpoint_every: int = _h("also checkpoint every N optimizer steps (0 = at epoch ends only)", default=0)
    profile_steps: int = _h("profile N training steps with torch.profiler, after 5 warm-up steps: writes "
                            "profile/trace.json (open it in Perfetto or chrome://tracing) and profile/ops.txt (ops "
                            "by self time) into the run folder; training goes on unchanged (0 = off)", default=0)
    anomaly_guard: bool = _h("stop with the step and layer on a NaN/Inf loss or gradient", default=True)
    progress: str = _h("auto (a bar when stderr is a terminal) | on | off", default="auto")
    plots: bool = _h("write PNG plots into the run folder", default=True)
    tensorboard: bool = _h("also write the metrics as TensorBoard event files into <run folder>/tensorboard (view "
                           "them with: tensorboard --logdir runs); needs the tensorboard package", default=False)

    def __post_init__(self):
        self._tuples_to_lists()

    def _tuples_to_lists(self):
        # Lists and tuples alike (TrainConfig(widths=(784, 64, 10))), kept as lists so that the
        # config.yaml written into the run folder stays plain YAML.
        for k in ("widths", "betas"):
            if isinstance(getattr(self, k), tuple):
                setattr(self, k, list(getattr(self, k)))

    def validate(self):
        self._tuples_to_lists()

        def bad(opt, expected, got):
            raise ConfigError(f"config option '{opt}' must be {expected}, got {got!r}")

        for k, options in CHOICES.items():
            if getattr(self, k) not in options:
                bad(k, "one of " + ", ".join(options), getattr(self, k))
        if self.progress not in ("auto", "on", "off"):
            bad("progress", "auto, on or off", self.progress)
        if not isinstance(self.name, str) or not self.name or any(
                sep and sep in self.name for sep in ("/", os.sep, os.altsep)):
            bad("name", "a non-empty name without a path separator ('/'), as it names the run folder "
                "<out_dir>/<timestamp>-<name> (put folders in --out-dir)", self.name)
        if not isinstance(self.widths, list) or len(self.widths) < 2 or not all(
                isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in self.widths):
            bad("widths", "a list of at least two positive ints (input first)", self.widths)
        if self.widths[0] != 784 or self.widths[-1] != 10:
            bad("widths", "a list starting with 784 (28x28 pixels) and ending with 10 (classes) for Fashion-MNIST", self.widths)
        for k in ("epochs", "batch_size", "accum_steps", "log_every"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(k, "an int >= 1", v)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            bad("seed", "an int in [0, 2**32 - 1]", self.seed)   # the shuffle's generator seed is seed * 1000003 + epoch
        for k in ("train_subset", "monitor_every", "checkpoint_every", "early_stopping", "profile_steps"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(k, "an int >= 0", v)
        v = self.augment_shift
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 8:
            bad("augment_shift", "an int in [0, 8] (pixels of a 28 x 28 image)", v)

        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        # One range per option, so a second attempt never meets a different message (lr: -1, then 0).
        for k in ("lr", "step_size"):
            v = getattr(self, k)
            if not number(v) or v <= 0:
                bad(k, "a number > 0", v)
        for k in ("weight_decay", "momentum", "clip_grad_norm", "min_lr", "warmup_epochs", "gamma"):
            v = getattr(self, k)
            if not number(v) or v < 0:
                bad(k, "a number >= 0", v)
        for k, hi in (("dropout", 1.0), ("val_split", 1.0), ("label_smoothing", 1.0), ("pct_start", 1.0), ("ema", 1.0)):
            v = getattr(self, k)
            if not number(v) or not 0 <= v < hi:
                bad(k, f"a number in [0, {hi:g})", v)
        if not (isinstance(self.betas, list) and len(self.betas) == 2 and all(
                number(b) and 0 <= b < 1 for b in self.betas)):
            bad("betas", "two numbers in [0, 1)", self.betas)
        if self.min_lr > self.lr:
            raise ConfigError(f"config option 'min_lr' ({self.min_lr:g}) must not exceed 'lr' ({self.lr:g}): the "
                              "schedules anneal from lr down to min_lr; lower --min-lr or raise --lr")
        if self.scheduler == "warmup_cosine" and self.warmup_epochs >= self.epochs:
            raise ConfigError(f"config option 'warmup_epochs' ({self.warmup_epochs:g}) must be shorter than the run, "
                              f"'epochs' ({self.epochs}), with scheduler warmup_cosine: lower --warmup-epochs "
                              "or raise --epochs")
        if self.early_stopping and self.val_split == 0:
            raise ConfigError(f"config option 'early_stopping' ({self.early_stopping}) needs a validation split to "
                              "watch: add --val-split (e.g. 0.1), or set --early-stopping 0 (stopping on the test "
                              "accuracy would report an optimistic test accuracy)")
        if self.norm == "batch" and self.batch_size < 2:
            raise ConfigError(f"config option 'batch_size' must be >= 2 with norm batch (BatchNorm normalises with "
                              f"the statistics of the batch, which needs at least 2 samples), got {self.batch_size}")
        if self.norm == "batch" and self.train_subset == 1:
            raise ConfigError("config option 'train_subset' must not be 1 with norm batch (BatchNorm needs at least "
                              "2 samples per training batch), got 1")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            bad("nesterov", "false unless optimizer is sgd with momentum > 0", self.nesterov)
        if not (isinstance(self.device, str) and (self.device in ("auto", "cpu", "cuda")
                                                  or re.fullmatch(r"cuda:\d+", self.device))):
            bad("device", "auto, cpu, cuda or cuda:N", self.device)
        if self.amp == "fp16" and self.device == "cpu":
            pass  # CPU autocast supports fp16; slower than bf16 but valid
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, source="config"):
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping of option: value, got {type(d).__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; known options: {', '.join(names)}")
        kw = {}
        for k, v in d.items():
            kw[k] = _coerce(k, names[k], v, source)
        return cls(**kw).validate()


def _coerce(name, f, v, source):
    """YAML gives ints where floats are meant (lr: 1) and vice versa; accept the lossless cases only."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if v is None:
        if default is None:
            return None
        raise ConfigError(f"{source}: option '{name}' must not be null")
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise ConfigError(f"{source}: option '{name}' must be true or false, got {v!r}")
        return v
    if isinstance(default, list):
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{source}: option '{name}' must be a list, got {v!r}")
        return [_number(name, type(default[0]), x, source) for x in v]
    if isinstance(default, (int, float)):
        return _number(name, type(default), v, source)
    if not isinstance(v, str):
        raise ConfigError(f"{source}: option '{name}' must be a string, got {v!r}")
    return v


def _number(name, kind, v, source):
    """v as a float (kind float) or an int (kind int). YAML 1.1 reads 1e-3 (no dot) as a string, so
    numeric strings count as numbers; an int option takes a float or string only when it is whole."""
    what = "a number" if kind is float else "an int"
    x = v
    if isinstance(x, str):
        try:
            x = float(x.strip().replace("_", "")) if kind is float else _int_or_float(x.strip())
        except ValueError:
            raise ConfigError(f"{source}: option '{name}' must be {what}, got {v!r}") from None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ConfigError(f"{source}: option '{name}' must be {what}, got {v!r}")
    if kind is float:
        return float(x)
    if isinstance(x, float):
        if not x.is_integer():
            raise ConfigError(f"{source}: option '{name}' must be {what}, got {v!r}")
        x = int(x)
    return x


def _int_or_float(s):
    s = s.replace("_", "")
    try:
        return int(s)
    except ValueError:
        return float(s)


def load_yaml(path):
    """The mapping in a YAML config file, with errors that name the file."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise ConfigError(f"--config: no such file {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {p} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {p} must hold a mapping of option: value, got {type(data).__name__}")
    return data
