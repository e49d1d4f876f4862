"""fastmlp command line: train, sweep, runs, evaluate, predict, export, check-overfit, lr-find.

    python -m fastmlp train [--config FILE] [--<option> VALUE ...] [--compare] [--resume RUN_DIR]
    python -m fastmlp sweep --grid OPTION=V1,V2,... [--grid ...] [--<option> VALUE ...] [--resume SWEEP_DIR]
    python -m fastmlp runs [OUT_DIR] [--sort start|test_acc|val_acc] [--json]
    python -m fastmlp evaluate RUN_DIR [--weights last|best] [--device D] [--data-dir D] [--no-plots]
    python -m fastmlp predict RUN_DIR IMAGE [IMAGE ...] [--weights last|best] [--top K] [--invert auto|yes|no]
    python -m fastmlp export RUN_DIR [--weights last|best] [--input float|pixels] [--format pt2|onnx] [--out FILE]
    python -m fastmlp check-overfit [--<option> VALUE ...]
    python -m fastmlp lr-find [--<option> VALUE ...]

Every TrainConfig option is a flag (--batch-size 128, --widths 784 256 10, --no-plots).
"""

import argparse
import contextlib
import dataclasses
import math
import signal
import sys
import threading

import torch

from .config import DEFAULT_YAML, RESUME_MAY_CHANGE, ConfigError, TrainConfig, check_resume_overrides, load_yaml
from .sweep import SweepStopped

__all__ = ["main", "build_parser", "resolve_config"]

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _add_config_flags(p):
    g = p.add_argument_group("training options (override the recipe and --config)")
    g.add_argument("--config", metavar="YAML", help=f"a YAML file of options (the recipe: {DEFAULT_YAML})")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata.get("help")}
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, list):
            g.add_argument(flag, nargs="+", type=type(default[0]), metavar="X" if isinstance(default[0], float) else "N", **kw)
        elif isinstance(default, float):
            g.add_argument(flag, type=float, metavar="X", **kw)
        elif isinstance(default, int):
            g.add_argument(flag, type=int, metavar="N", **kw)
        else:
            g.add_argument(flag, type=str, metavar="S", **kw)


def _add_run_args(p):
    """RUN_DIR and --weights, for the commands that use a trained run (evaluate, predict, export)."""
    p.add_argument("run", metavar="RUN_DIR", help="the run folder (or a checkpoint file in it)")
    p.add_argument("--weights", choices=["last", "best"], default="last",
                   help="last: checkpoint.pt, the latest weights (default); best: best.pt, the epoch with the best "
                        "validation accuracy (runs with --val-split)")


def _version():
    import fastmlp  # noqa: PLC0415

    return (f"fastmlp {fastmlp.__version__} (torch {torch.__version__}, CUDA kernels "
            f"{'built' if fastmlp.WITH_CUDA else 'not built'})")


def build_parser():
    p = argparse.ArgumentParser(prog="fastmlp", description="Train MLPs on Fashion-MNIST with fastmlp's fused kernels.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True,
                           metavar="{train,sweep,runs,evaluate,predict,export,check-overfit,lr-find}")
    t = sub.add_parser("train", help="train a model (the default recipe reaches ~0.91 test accuracy)",
                       description="Train into a new run folder <out_dir>/<timestamp>-<name>: config.yaml, "
                                   "metrics.jsonl (per step: the loss, the lr the step used, the gradient norm "
                                   "before clipping, and every --monitor-every steps the per-layer records), "
                                   "metrics.csv (per epoch; its lr column, like the epoch line's 'last lr', is the "
                                   "lr of the epoch's last step), summary.json, plots and checkpoint.pt. Options "
                                   "set away from the recipe that this configuration does not use get a warning.")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint, as if never stopped "
                   f"(the run folder, or the checkpoint.pt in it); only {_flag_list(RESUME_MAY_CHANGE | {'monitor_every'})} "
                   "may be given with it (--monitor-every not for a --compile run)")
    t.add_argument("--compare", action="store_true", help="run with --impl torch and --impl fastmlp, print both")
    _add_config_flags(t)
    sw = sub.add_parser("sweep", help="train every combination of a grid of options and rank them",
                        description="Train one run per combination of the --grid values (the other options as for "
                                    "train) into a sweep folder <out_dir>/<timestamp>-<name>-sweep, one after the "
                                    "other, and rank the combinations: on the best validation accuracy with "
                                    "--val-split, else on the final test accuracy; with seed in the grid, as the "
                                    "mean and standard deviation over the seeds. Writes sweep.json, one run folder "
                                    "per trial, results.json and sweep.png. A diverged trial ranks last; Ctrl-C stops "
                                    "at the running trial's checkpoint and --resume continues from there.")
    sw.add_argument("--grid", action="append", default=[], metavar="OPTION=V1,V2",
                    help="an option and the values to try, e.g. lr=1e-3,2e-3 or activation=relu,gelu or "
                         "'widths=[784,256,10],[784,512,10]' (repeat for more options; every combination is trained, "
                         "or with --samples N a random N of them)")
    sw.add_argument("--samples", type=int, default=0, metavar="N",
                    help="random search: draw N configurations from the grid instead of training every combination "
                         "(a --grid value may then be a range, lr=loguniform(1e-4,1e-2) or dropout=uniform(0,0.5); "
                         "a list is picked from; seed=0,1 runs every draw with each seed)")
    sw.add_argument("--sample-seed", type=int, default=0, metavar="N", help="seed of the draws (default: 0)")
    sw.add_argument("--metric", choices=["auto", "val_acc", "test_acc"], default="auto",
                    help="what ranks the trials: auto (default): val_acc with --val-split, else test_acc")
    sw.add_argument("--resume", metavar="SWEEP_DIR", help="continue a stopped sweep: finished trials are kept, a "
                    f"stopped one continues from its checkpoint (only {_flag_list(RESUME_MAY_CHANGE)} may be given)")
    sw.add_argument("--dry-run", action="store_true", help="print the trials and exit, writing nothing")
    _add_config_flags(sw)
    r = sub.add_parser("runs", help="list the run folders: status, epochs, accuracy, speed, what each changed",
                       description="One line per run folder under OUT_DIR: its status (completed, stopped early, "
                                   "interrupted, anomaly, failed, or unfinished: still training or killed), epochs "
                                   "done, last test accuracy, best validation accuracy and its epoch, seconds per "
                                   "epoch and the options it changed from the recipe; lr-find folders show their "
                                   "suggested lr. Read from each run's metrics.csv, config.yaml and summary.json.")
    r.add_argument("out_dir", nargs="?", default=TrainConfig().out_dir, metavar="OUT_DIR",
                   help="the folder that holds the run folders (train's --out-dir; default: %(default)s)")
    r.add_argument("--sort", choices=["start", "test_acc", "val_acc"], default="start",
                   help="start: oldest first (default); test_acc / val_acc: best first")
    r.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    r.add_argument("--plot", metavar="PNG", help="also write a figure comparing the runs' curves per epoch (test and "
                                                 "validation accuracy, train loss) to this file")
    e = sub.add_parser("evaluate", help="test accuracy, per-class accuracy and confusion matrix of a trained run",
                       description="Evaluate a run's weights on the Fashion-MNIST test set as the run did (its "
                                   "normalisation and --amp), with per-class accuracy and the confusion matrix; "
                                   "writes evaluation-<weights>.json and confusion-<weights>.png into the run "
                                   "folder. In Python: fastmlp.train.load_model(RUN_DIR) gives the model for "
                                   "predictions.")
    _add_run_args(e)
    e.add_argument("--device", default="auto", metavar="S", help="auto (CUDA when present, default), cpu, cuda, cuda:N")
    e.add_argument("--data-dir", metavar="S",
                   help="dataset root holding FashionMNIST/raw/ (default: $FASTMLP_DATA, else the cache)")
    e.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="write confusion-<weights>.png (default: on)")
    pr = sub.add_parser("predict", help="classify image files with a trained run",
                        description="Classify image files (PNG, JPEG, ...) with a run's weights: each is made grey, "
                                    "fitted into 28 x 28 and, if its background is light, inverted (Fashion-MNIST "
                                    "shows light objects on black); prints the most likely classes.")
    _add_run_args(pr)
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    pr.add_argument("--device", default="cpu", metavar="S", help="cpu (default), cuda, cuda:N or auto")
    pr.add_argument("--top", type=int, default=3, metavar="K", help="classes to print per image (default: 3)")
    pr.add_argument("--invert", choices=["auto", "yes", "no"], default="auto",
                    help="auto (default): invert images whose border is light; yes / no: always / never")
    ex = sub.add_parser("export", help="write a trained run as a torch.export program (or ONNX model) that needs "
                                       "torch alone",
                        description="Write a run's model, with its input normalisation, as a torch.export program "
                                    "(.pt2) in plain torch ops: torch.export.load(FILE).module()(images) gives the "
                                    "logits for a batch of any size, without fastmlp installed; or, with --format "
                                    "onnx, as an ONNX model for onnxruntime (input 'images', output 'logits').")
    _add_run_args(ex)
    ex.add_argument("--format", choices=["pt2", "onnx"], default="pt2",
                    help="pt2 (default): a torch.export program; onnx: an ONNX model (needs the onnx and onnxscript "
                         "packages)")
    ex.add_argument("--input", choices=["float", "pixels"], default="float",
                    help="float (default): float32 (N, 1, 28, 28) in [0, 1], as ToTensor() gives; pixels: uint8 "
                         "(N, 28, 28) as in the IDX files")
    ex.add_argument("--out", metavar="FILE", help="where to write it (default: RUN_DIR/model-<weights>.<format>)")
    c = sub.add_parser("check-overfit", help="sanity check: overfit one small batch to near-zero loss",
                       description="Overfit one batch of --samples training images (dropout, label smoothing and "
                                   "weight decay off, constant lr) until the loss is below --target-loss. "
                                   f"Options without effect here: {_flag_list(IGNORED['check-overfit'])}.")
    c.add_argument("--samples", type=int, default=64, metavar="N", help="batch size to overfit (default: 64)")
    c.add_argument("--max-steps", type=int, default=500, metavar="N",
                   help="optimizer steps before giving up: FAILED if the loss has not reached --target-loss (default: 500)")
    c.add_argument("--target-loss", type=float, default=0.01, metavar="X",
                   help="PASSED once the cross-entropy on the batch falls below this (default: 0.01)")
    _add_config_flags(c)
    lf = sub.add_parser("lr-find", help="learning-rate range test with a plot and a suggested lr",
                        description="Train with a learning rate rising exponentially from --start-lr to --end-lr, "
                                    "one batch per step, and suggest the lr of the steepest loss descent. "
                                    f"Options without effect here: {_flag_list(IGNORED['lr-find'])}.")
    lf.add_argument("--start-lr", type=float, default=1e-7, metavar="X", help="first learning rate (default: 1e-7)")
    lf.add_argument("--end-lr", type=float, default=10.0, metavar="X", help="last learning rate (default: 10)")
    lf.add_argument("--num-steps", type=int, default=100, metavar="N",
                    help="steps of the sweep, at most (it stops early once the loss diverges; default: 100)")
    _add_config_flags(lf)
    return p


# Options a subcommand does not use, with the reason; given on its command line, they get a warning.
# (Both honour the data, model and optimizer options, --amp, --clip-grad-norm, --seed, --deterministic
# and --device; lr-find also --batch-size, --label-smoothing, --name, --out-dir and --plots.)
def _why(reason, *names):
    return {n: reason for n in names}


_SCHEDULE = ("epochs", "early_stopping", "scheduler", "step_size", "gamma", "warmup_epochs", "pct_start", "cycle_momentum", "min_lr")
_LOGGING = ("log_every", "monitor_every", "checkpoint_every", "anomaly_guard", "progress", "tensorboard",
            "profile_steps")
IGNORED = {
    "check-overfit": {
        **_why("it trains one batch at a constant --lr for at most --max-steps steps", *_SCHEDULE),
        **_why("--samples sets its one batch", "batch_size", "accum_steps"),
        **_why("it runs the model eagerly", "compile"),
        **_why("it reads the loss of the trained weights, not of an average of them", "ema"),
        **_why("it switches dropout, label smoothing, weight decay and augmentation off to test memorisation alone",
               "dropout", "label_smoothing", "weight_decay", "augment_shift", "augment_flip"),
        **_why("it writes no run folder, log, checkpoint or plot, and stops on a non-finite loss by itself",
               "name", "out_dir", "plots", *_LOGGING),
    },
    "lr-find": {
        **_why("it sets the lr itself, rising from --start-lr to --end-lr over at most --num-steps steps",
               "lr", *_SCHEDULE),
        **_why("it takes one --batch-size batch per step", "accum_steps"),
        **_why("the range test trains on the images as they are", "augment_shift", "augment_flip"),
        **_why("it runs the model eagerly", "compile"),
        **_why("it reads the loss of the trained weights, not of an average of them", "ema"),
        **_why("it writes only lr_find.json and lr_find.png, and stops on a non-finite loss by itself", *_LOGGING),
    },
}


def _flag_list(names):
    return ", ".join("--" + n.replace("_", "-") for n in sorted(names))


def warn_ignored(command, flags, err=None):
    """Warn once about each command-line option that has no effect on this subcommand; returns them."""
    ignored = IGNORED.get(command, {})
    given = sorted(k for k in flags if k in ignored)
    _warn_no_effect(command, {k: ignored[k] for k in given}, _flag, err or sys.stderr)
    return given


def _warn_no_effect(command, reasons, flag, err):
    """One warning per reason in {option: reason}, naming its options as flag(option) gives them."""
    by_reason = {}
    for k in sorted(reasons):
        by_reason.setdefault(reasons[k], []).append(k)
    for reason, names in by_reason.items():
        print(f"fastmlp {command}: warning: {', '.join(map(flag, names))} {'has' if len(names) == 1 else 'have'} "
              f"no effect ({reason}); ignored", file=err)


def _flag(name, value=True):
    """The flag as given: --no-<name> for a boolean option set to false."""
    return ("--" if value is not False else "--no-") + name.replace("_", "-")


def unused_options(cfg):
    """{option: reason} for the options of cfg that differ from the recipe's defaults but have no effect
    in this configuration (another optimizer's or scheduler's settings)."""
    default, out = TrainConfig(), {}

    def unused(reason, *names):
        out.update({n: reason for n in names if getattr(cfg, n) != getattr(default, n)})

    if cfg.optimizer == "sgd":
        unused("only adam and adamw use it; --optimizer is sgd", "betas")
    else:
        unused(f"only sgd uses it; --optimizer is {cfg.optimizer}", "momentum", "nesterov")
    sched = f"--scheduler is {cfg.scheduler}"
    if cfg.scheduler not in ("cosine", "warmup_cosine"):
        unused(f"only the cosine and warmup_cosine schedules use it; {sched}", "min_lr")
    if cfg.scheduler != "warmup_cosine":
        unused(f"only the warmup_cosine schedule uses it; {sched}", "warmup_epochs")
    if cfg.scheduler != "step":
        unused(f"only the step schedule uses it; {sched}", "step_size", "gamma")
    if cfg.scheduler != "onecycle":
        unused(f"only the onecycle schedule uses it; {sched}", "pct_start", "cycle_momentum")
    return out


def warn_train_options(cfg, err=None):
    """train's warnings about cfg, each once: options without effect (set away from their defaults),
    and a --momentum or first --beta that the one-cycle schedule's momentum cycling overrides.
    Returns the options warned about."""
    from .engine import cycles_momentum  # noqa: PLC0415

    err = err or sys.stderr
    unused = unused_options(cfg)
    _warn_no_effect("train", unused, lambda n: _flag(n, getattr(cfg, n)), err)
    default = TrainConfig()
    overridden = []
    if cycles_momentum(cfg):
        if cfg.optimizer == "sgd" and cfg.momentum != default.momentum:
            overridden.append("momentum")
            what = f"--momentum {cfg.momentum:g}"
        elif cfg.optimizer != "sgd" and cfg.betas[0] != default.betas[0]:
            overridden.append("betas")
            what = f"the first of --betas ({cfg.betas[0]:g})"
        if overridden:
            print(f"fastmlp train: warning: {what} is overridden: the onecycle schedule cycles "
                  f"{'the momentum' if cfg.optimizer == 'sgd' else 'beta1'} 0.95 -> 0.85 -> 0.95 (--cycle-momentum, "
                  f"on by default); give --no-cycle-momentum to keep {what} constant", file=err)
    return sorted(unused) + overridden


def resolve_config(args):
    """Recipe, then --config, then flags. Returns (TrainConfig, dict of the flags given)."""
    base = load_yaml(DEFAULT_YAML)
    if getattr(args, "config", None):
        base.update(load_yaml(args.config))
    flags = {k: v for k, v in vars(args).items() if k in _FIELDS}
    base.update(flags)
    src = f"--config {args.config}" if getattr(args, "config", None) else "config"
    return TrainConfig.from_dict(base, source=src), flags


class _Stopped(Exception):
    """A run ended by Ctrl-C; the message says where it is and whether it can be resumed."""


class Terminated(KeyboardInterrupt):
    """A SIGTERM (a job scheduler's stop, `timeout`, `docker stop`), taken as a Ctrl-C: the run stops
    with its summary.json (status interrupted) and the message saying how to resume it."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises Terminated while the command runs, where Python's default would end the
    process at once (no summary, no message, metrics since the last flush lost). Main thread only,
    and only where SIGTERM has its default handling. Yields a list that gets an entry per SIGTERM."""
    received = []
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield received
        return

    def terminate(signum, frame):
        received.append(signum)
        raise Terminated("terminated (SIGTERM)")

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _fit(trainer):
    try:
        return trainer.fit()
    except KeyboardInterrupt as e:
        raise _Stopped(trainer.stop_message(str(e) if isinstance(e, Terminated) else "interrupted")) from None


def _done(s):
    spe = f"{s['seconds_per_epoch']:.2f} s/epoch" if s.get("seconds_per_epoch") is not None else "no epochs timed"
    acc = f"{s['final_test_acc']:.4f}" if s.get("final_test_acc") is not None else "-"
    print(f"done: test acc {acc}, {spe}, run folder {s['run_dir']}")
    if s.get("status", "completed") == "completed":
        best = " --weights best" if s.get("best_checkpoint") else ""
        print(f"next: fastmlp evaluate {s['run_dir']}{best}  (per class; also: predict RUN_DIR IMAGE..., export RUN_DIR)")


def _resume(args):
    from .engine import Trainer, complete_message, completed_summary, open_run, training_over  # noqa: PLC0415

    _, flags = resolve_config(args)
    if args.compare:
        raise ConfigError("--resume and --compare cannot be combined")

    def refuse(bad, allowed):
        if bad:
            raise ConfigError(f"--resume continues a run with its saved config; drop {_flag_list(bad)} "
                              f"(only {_flag_list(allowed)} may change, as they cannot change the results)")

    allowed = RESUME_MAY_CHANGE | {"monitor_every"}
    refuse(sorted(set(flags) - allowed) + (["config"] if args.config else []), allowed)
    run_dir, ck = open_run(args.resume)
    check_resume_overrides(flags, ck["config"], name=lambda n: _flag_list([n]))  # (--monitor-every under --compile)
    epochs, patience = ck["config"].get("epochs"), ck["config"].get("early_stopping", 0)
    if isinstance(epochs, int) and isinstance(patience, int):
        over, stop = training_over(ck["epoch"], epochs, ck.get("history", []), patience)
        if over and completed_summary(run_dir) is not None:
            print(complete_message(run_dir, epochs, ck["global_step"], stop))
            return 0
    _done(_fit(Trainer.resume(run_dir, overrides=flags, checkpoint=ck)))
    return 0


def _train(args):
    from .engine import Trainer  # noqa: PLC0415

    if args.resume:
        return _resume(args)
    cfg, _ = resolve_config(args)
    warn_train_options(cfg)
    if not args.compare:
        _done(_fit(Trainer(cfg)))
        return 0
    results = {}
    for impl in ("torch", "fastmlp"):
        c = dataclasses.replace(cfg, impl=impl, name=f"{cfg.name}-{impl}")
        print(f"--- impl {impl} ---")
        results[impl] = _fit(Trainer(c))
    print_compare(results)
    return 0


def _sweep(args):
    from .sweep import (check_metric, describe, format_results, parse_grid, plan_trials,  # noqa: PLC0415
                        resume_sweep, run_sweep)

    cfg, flags = resolve_config(args)
    if args.resume:
        bad = sorted(set(flags) - RESUME_MAY_CHANGE) + [f for f, given in (("config", args.config), ("grid", args.grid),
                                                         ("metric", args.metric != "auto"), ("dry_run", args.dry_run),
                                                         ("samples", args.samples), ("sample_seed", args.sample_seed))
                                                         if given]
        if bad:
            raise ConfigError(f"--resume continues a sweep with its saved grid and options; drop {_flag_list(bad)} "
                              f"(only {_flag_list(RESUME_MAY_CHANGE)} may change, as they cannot change the results)")
        res = resume_sweep(args.resume, overrides=flags)
    else:
        grid = parse_grid(args.grid)
        if not grid:
            raise ConfigError("give the options to sweep: --grid OPTION=VALUE,VALUE,... (e.g. --grid lr=1e-3,2e-3,4e-3)")
        both = sorted(set(grid) & set(flags))
        if both:
            raise ConfigError(f"{_flag_list(both)} given both as an option and in --grid; keep one")
        if args.samples < 0:
            raise ConfigError(f"--samples must be >= 0 (0 = every combination of the grid), got {args.samples}")
        trials = plan_trials(cfg.to_dict(), grid, samples=args.samples, sample_seed=args.sample_seed)
        check_metric(args.metric, min(t.cfg.val_split for t in trials))
        warn_train_options(cfg)
        # An option swept where no trial uses it (--grid momentum=... with adamw) would train the same run again.
        # (unused_options names only values away from the recipe's, so the trials with one decide.)
        recipe = TrainConfig().to_dict()
        for k in grid:
            reasons = {unused_options(t.cfg).get(k) for t in trials if t.params[k] != recipe[k]}
            if reasons and None not in reasons:
                print(f"fastmlp sweep: warning: --grid {k} has no effect ({reasons.pop()}): its trials train the "
                      "same model", file=sys.stderr)
        if args.dry_run:
            print(f"{len(trials)} trials, {sum(t.cfg.epochs for t in trials)} epochs in all, into a new folder "
                  f"{cfg.out_dir}/<timestamp>-{cfg.name}-sweep (dry run: nothing written):")
            for t in trials:
                print(f"  {t.folder}: {describe(t.params)}")
            return 0
        res = run_sweep(cfg, grid, metric=args.metric, samples=args.samples, sample_seed=args.sample_seed)
    print(format_results(res))
    failed = [r["folder"] for r in res["trials"] if r["status"] == "failed"]
    if failed:
        print(f"fastmlp sweep: {len(failed)} trial(s) failed: {', '.join(failed)}; --resume retries them",
              file=sys.stderr)
    return 1 if failed else 0


def _output_file(flag, path):
    """Refuse, before any work, an output file whose folder does not exist (naming the option)."""
    from pathlib import Path  # noqa: PLC0415

    if path is not None and not Path(path).parent.is_dir():
        raise ConfigError(f"{flag} {path}: the folder {Path(path).parent} does not exist")


def _runs(args):
    _output_file("--plot", args.plot)
    import json  # noqa: PLC0415

    from .runs import format_runs, list_runs, plot_runs  # noqa: PLC0415

    runs = list_runs(args.out_dir, args.sort)
    if args.json:
        print(json.dumps(runs, indent=1))
    elif not runs:
        print(f"no run folders in {args.out_dir} (start one with: python -m fastmlp train --out-dir {args.out_dir})")
    else:
        print(format_runs(runs))
    if args.plot:
        shown = plot_runs(runs, args.plot)
        print(f"wrote {args.plot}: {shown} run(s)" if shown else "--plot: no run has a finished epoch to plot; "
              "nothing written", file=sys.stderr if args.json or not shown else sys.stdout)
    return 0


def print_compare(results):
    t, f = results["torch"], results["fastmlp"]
    rows = [("final test acc", f"{t['final_test_acc']:.4f}", f"{f['final_test_acc']:.4f}"),
            ("s / epoch (mean)", f"{t['seconds_per_epoch']:.3f}", f"{f['seconds_per_epoch']:.3f}"),
            ("s / epoch (median)", f"{t['seconds_per_epoch_median']:.3f}", f"{f['seconds_per_epoch_median']:.3f}"),
            ("samples / s", f"{t['samples_per_s']:.0f}", f"{f['samples_per_s']:.0f}")]
    print(f"\n{'':20s} {'torch':>10s} {'fastmlp':>10s}")
    for name, a, b in rows:
        print(f"{name:20s} {a:>10s} {b:>10s}")
    print(f"run folders: {t['run_dir']}  {f['run_dir']}")
    print(f"speedup (torch s/epoch / fastmlp s/epoch): {t['seconds_per_epoch'] / f['seconds_per_epoch']:.2f}x "
          f"(median {t['seconds_per_epoch_median'] / f['seconds_per_epoch_median']:.2f}x)")


def check_overfit(cfg, samples=64, max_steps=500, target_loss=0.01, out=None):
    """Overfit one batch with dropout, label smoothing, weight decay and the schedule switched off.
    Returns (passed, final loss, steps)."""
    from .engine import apply_deterministic, build_model, build_optimizer, load_data, min_batch, resolve_device  # noqa: PLC0415

    out = out or sys.stdout
    cfg = dataclasses.replace(cfg, dropout=0.0, label_smoothing=0.0, weight_decay=0.0).validate()
    if max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {max_steps}")
    if not (math.isfinite(target_loss) and target_loss > 0):
        raise ConfigError(f"--target-loss must be a number > 0, got {target_loss}")
    if samples < min_batch(cfg):
        why = (" with --norm batch (BatchNorm normalises with the statistics of the batch, which needs at least 2 "
               "samples)") if cfg.norm == "batch" else ""
        raise ConfigError(f"--samples must be >= {min_batch(cfg)}{why}, got {samples}")
    apply_deterministic(cfg)
    device = resolve_device(cfg.device)
    data = load_data(cfg, device)
    if not 1 <= samples <= len(data.train):
        raise ConfigError(f"--samples must be in [{min_batch(cfg)}, {len(data.train)}], got {samples}")
    model = build_model(cfg, device, data)
    opt = build_optimizer(cfg, model)
    x, y = data.train.x[:samples], data.train.y[:samples]
    step_fn = _step_fn(cfg, device, model, opt, torch.nn.CrossEntropyLoss())
    model.train()
    loss_v = math.inf
    for step in range(1, max_steps + 1):
        loss = step_fn(x, y)
        if step % 10 == 0 or step == max_steps:
            loss_v = loss.item()
            if not math.isfinite(loss_v) or loss_v < target_loss:
                break
    passed = math.isfinite(loss_v) and loss_v < target_loss
    if passed:
        amp = f", amp {cfg.amp}" if cfg.amp != "off" else ""
        print(f"check-overfit PASSED: loss {loss_v:.4g} < {target_loss} after {step} steps on {samples} samples "
              f"(impl {cfg.impl}, {cfg.optimizer} lr {cfg.lr:g}{amp})", file=out)
    else:
        print(f"check-overfit FAILED: loss is still {loss_v:.4g} (target {target_loss}) after {step} steps on one batch "
              f"of {samples}. The model cannot memorise a tiny batch: check the learning rate (--lr), the "
              "initialisation (--init), that labels match their images, and the loss.", file=out)
    return passed, loss_v, step


def _step_fn(cfg, device, model, opt, loss_fn):
    """One optimizer step as the Trainer takes it (autocast and, for fp16, a GradScaler; gradient
    clipping), for check-overfit and lr-find. Returns step(x, y) -> the loss tensor."""
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x, y):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad_norm > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
        scaler.step(opt)
        scaler.update()
        return loss.detach().float()

    return step


_LR_FIND_MIN_POINTS = 10


def lr_find(cfg, start_lr=1e-7, end_lr=10.0, num_steps=100, out=None):
    """Exponentially increasing lr, one batch per step; stops when the smoothed loss passes 4x its
    best. Suggests the lr of the steepest descent of the smoothed loss. Returns a dict."""
    from .engine import (apply_deterministic, build_model, build_optimizer, load_data, min_batch,  # noqa: PLC0415
                         new_run_dir, resolve_device)
    from .checkpoint import atomic_write_json  # noqa: PLC0415

    out = out or sys.stdout
    if not 0 < start_lr < end_lr:
        raise ConfigError(f"--start-lr and --end-lr must satisfy 0 < start < end, got {start_lr}, {end_lr}")
    if num_steps < _LR_FIND_MIN_POINTS + 1:
        raise ConfigError(f"--num-steps must be >= {_LR_FIND_MIN_POINTS + 1} (a suggestion reads the slope of more than "
                          f"{_LR_FIND_MIN_POINTS} points of the loss curve), got {num_steps}")
    apply_deterministic(cfg)
    device = resolve_device(cfg.device)
    data = load_data(cfg, device)
    model = build_model(cfg, device, data)
    opt = build_optimizer(cfg, model, lr=start_lr)
    step_fn = _step_fn(cfg, device, model, opt, torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing))
    mult = (end_lr / start_lr) ** (1 / (num_steps - 1))
    order = data.train.permutation(cfg.seed, 0)
    mb = min_batch(cfg)
    batches = data.train.batches(cfg.batch_size, order, min_size=mb)
    lrs, losses, smoothed = [], [], []
    # An averaging window of ~5% of the sweep: long enough to steady the curve, short enough that
    # it still rises before an adaptive optimizer (which recovers from the spike) pulls the loss back.
    avg, best, beta = 0.0, math.inf, 1 - 1 / max(5, num_steps // 20)
    model.train()
    for i in range(num_steps):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = data.train.batches(cfg.batch_size, data.train.permutation(cfg.seed, i), min_size=mb)
            x, y = next(batches)
        lr = start_lr * mult ** i
        for g in opt.param_groups:
            g["lr"] = lr
        v = step_fn(x, y).item()
        if not math.isfinite(v):
            break
        avg = beta * avg + (1 - beta) * v
        sm = avg / (1 - beta ** (i + 1))
        lrs.append(lr), losses.append(v), smoothed.append(sm)
        best = min(best, sm)
        if (sm > 4 * best or v > 10 * best) and i > 10:
            break
    suggestion = None
    if len(smoothed) > _LR_FIND_MIN_POINTS:
        lo = min(range(len(smoothed)), key=smoothed.__getitem__)
        logs = [math.log10(l) for l in lrs]
        slopes = [(smoothed[j + 1] - smoothed[j - 1]) / (logs[j + 1] - logs[j - 1]) for j in range(1, max(2, lo))]
        if slopes:
            suggestion = lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]
    run_dir = new_run_dir(cfg.out_dir, f"{cfg.name}-lr-find")
    plot = run_dir / "lr_find.png"
    if cfg.plots:
        from .plots import plot_lr_find  # noqa: PLC0415  (matplotlib is slow to import)

        plot_lr_find(plot, lrs, losses, smoothed, suggestion)
    where = f"see {plot}" if cfg.plots else f"see {run_dir / 'lr_find.json'}"
    result = {"suggested_lr": suggestion, "lrs": lrs, "losses": losses, "smoothed": smoothed,
              "min_loss_lr": lrs[min(range(len(smoothed)), key=smoothed.__getitem__)] if smoothed else None,
              "run_dir": str(run_dir), "config": cfg.to_dict()}
    atomic_write_json(run_dir / "lr_find.json", result)
    if suggestion is None and len(smoothed) <= _LR_FIND_MIN_POINTS:
        print(f"lr-find: the loss was not finite after {len(lrs)} step(s), too few to suggest an lr (lower "
              f"--start-lr or --end-lr); {where}", file=out)
    elif suggestion is None:
        print(f"lr-find: no clear descent in {len(lrs)} steps; {where}", file=out)
    else:
        print(f"lr-find: suggested lr {suggestion:.2e} (steepest descent; the loss was lowest at "
              f"{result['min_loss_lr']:.2e}); {where}", file=out)
    return result


def main(argv=None):
    args = build_parser().parse_args(argv)
    with _sigterm_as_interrupt() as terminated:
        status = _main(args)
    return 128 + signal.SIGTERM if terminated and status == 130 else status  # 143, as the shell reports it


def _main(args):
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "runs":
            return _runs(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "evaluate":
            from .evaluate import evaluate_run  # noqa: PLC0415

            evaluate_run(args.run, args.weights, args.device, args.data_dir, args.plots, out=sys.stdout)
            return 0
        if args.command == "export":
            from .evaluate import EXPORT_INPUTS, export_model  # noqa: PLC0415

            _output_file("--out", args.out)
            path = export_model(args.run, args.out, args.weights, args.input, args.format)
            if args.format == "onnx":
                print(f"wrote {path}: takes {EXPORT_INPUTS[args.input]} as 'images'; run it with onnxruntime:\n"
                      f"    onnxruntime.InferenceSession({str(path)!r}).run(None, {{'images': images}})[0]"
                      "  # logits (N, 10)")
            else:
                print(f"wrote {path}: takes {EXPORT_INPUTS[args.input]}; run it with torch alone:\n"
                      f"    torch.export.load({str(path)!r}).module()(images)  # logits (N, 10)")
            return 0
        if args.command == "predict":
            from .evaluate import predict_files  # noqa: PLC0415

            predict_files(args.run, args.images, args.weights, args.device, args.invert, args.top, out=sys.stdout)
            return 0
        cfg, flags = resolve_config(args)
        warn_ignored(args.command, flags)
        if args.command == "check-overfit":
            passed, _, _ = check_overfit(cfg, args.samples, args.max_steps, args.target_loss)
            return 0 if passed else 1
        lr_find(cfg, args.start_lr, args.end_lr, args.num_steps)
        return 0
    except (ConfigError, FileNotFoundError) as e:
        print(f"fastmlp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable --out-dir, a full disk: say which path, no traceback
        print(f"fastmlp {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (_Stopped, SweepStopped) as e:
        print(f"fastmlp {args.command}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt as e:
        stopped = str(e) if isinstance(e, Terminated) else "interrupted"
        if args.command != "train":
            what = "; nothing was written"
        elif getattr(args, "resume", None):
            what = f"before training resumed; {args.resume} is as it was"
        else:
            what = "before training started; there is nothing to resume"
        print(f"fastmlp {args.command}: {stopped} {what}".replace(" ;", ";"), file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        from ..data import DataError  # noqa: PLC0415
        from ..monitor import AnomalyError  # noqa: PLC0415
        from .checkpoint import CheckpointError  # noqa: PLC0415

        if isinstance(e, (DataError, AnomalyError, CheckpointError)) or (
                isinstance(e, (RuntimeError, ValueError)) and str(e).startswith("--")):
            print(f"fastmlp {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
