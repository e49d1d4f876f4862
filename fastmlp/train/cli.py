"""fastmlp command line: train, check-overfit, lr-find.

    python -m fastmlp train [--config FILE] [--<option> VALUE ...] [--compare] [--resume RUN_DIR]
    python -m fastmlp check-overfit [--<option> VALUE ...]
    python -m fastmlp lr-find [--<option> VALUE ...]

Every TrainConfig option is a flag (--batch-size 128, --widths 784 256 10, --no-plots).
"""

import argparse
import dataclasses
import math
import sys

import torch

from .config import DEFAULT_YAML, ConfigError, TrainConfig, load_yaml

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
            g.add_argument(flag, nargs="+", type=type(default[0]), metavar="N", **kw)
        elif isinstance(default, float):
            g.add_argument(flag, type=float, metavar="X", **kw)
        elif isinstance(default, int):
            g.add_argument(flag, type=int, metavar="N", **kw)
        else:
            g.add_argument(flag, type=str, metavar="S", **kw)


def build_parser():
    p = argparse.ArgumentParser(prog="fastmlp", description="Train MLPs on Fashion-MNIST with fastmlp's fused kernels.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,check-overfit,lr-find}")
    t = sub.add_parser("train", help="train a model (the default recipe reaches ~0.91 test accuracy)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint, as if never stopped")
    t.add_argument("--compare", action="store_true", help="run with --impl torch and --impl fastmlp, print both")
    _add_config_flags(t)
    c = sub.add_parser("check-overfit", help="sanity check: overfit one small batch to near-zero loss")
    c.add_argument("--samples", type=int, default=64, help="batch size to overfit")
    c.add_argument("--max-steps", type=int, default=500)
    c.add_argument("--target-loss", type=float, default=0.01)
    _add_config_flags(c)
    lf = sub.add_parser("lr-find", help="learning-rate range test with a plot and a suggested lr")
    lf.add_argument("--start-lr", type=float, default=1e-7)
    lf.add_argument("--end-lr", type=float, default=10.0)
    lf.add_argument("--num-steps", type=int, default=100)
    _add_config_flags(lf)
    return p


def resolve_config(args):
    """Recipe, then --config, then flags. Returns (TrainConfig, dict of the flags given)."""
    base = load_yaml(DEFAULT_YAML)
    if getattr(args, "config", None):
        base.update(load_yaml(args.config))
    flags = {k: v for k, v in vars(args).items() if k in _FIELDS}
    base.update(flags)
    src = f"--config {args.config}" if getattr(args, "config", None) else "config"
    return TrainConfig.from_dict(base, source=src), flags


def _train(args):
    from .engine import Trainer  # noqa: PLC0415

    if args.resume:
        _, flags = resolve_config(args)
        allowed = {"device", "progress", "plots"}
        bad = sorted(set(flags) - allowed) + (["config"] if args.config else [])
        if bad:
            raise ConfigError(f"--resume continues a run with its saved config; drop {', '.join('--' + b.replace('_', '-') for b in bad)} "
                              f"(only {', '.join('--' + a for a in sorted(allowed))} may change)")
        if args.compare:
            raise ConfigError("--resume and --compare cannot be combined")
        Trainer.resume(args.resume, overrides=flags).fit()
        return 0
    cfg, _ = resolve_config(args)
    if not args.compare:
        s = Trainer(cfg).fit()
        print(f"done: test acc {s['final_test_acc']:.4f}, {s['seconds_per_epoch']:.2f} s/epoch, run folder {s['run_dir']}")
        return 0
    results = {}
    for impl in ("torch", "fastmlp"):
        c = dataclasses.replace(cfg, impl=impl, name=f"{cfg.name}-{impl}")
        print(f"--- impl {impl} ---")
        results[impl] = Trainer(c).fit()
    print_compare(results)
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
    from .engine import build_model, build_optimizer, load_data, resolve_device  # noqa: PLC0415

    out = out or sys.stdout
    cfg = dataclasses.replace(cfg, dropout=0.0, label_smoothing=0.0, weight_decay=0.0).validate()
    device = resolve_device(cfg.device)
    data = load_data(cfg, device)
    if not 1 <= samples <= len(data.train):
        raise ConfigError(f"--samples must be in [1, {len(data.train)}], got {samples}")
    model = build_model(cfg, device, data)
    opt = build_optimizer(cfg, model)
    x, y = data.train.x[:samples], data.train.y[:samples]
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    loss_v = math.inf
    for step in range(1, max_steps + 1):
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == max_steps:
            loss_v = loss.item()
            if not math.isfinite(loss_v) or loss_v < target_loss:
                break
    passed = math.isfinite(loss_v) and loss_v < target_loss
    if passed:
        print(f"check-overfit PASSED: loss {loss_v:.4g} < {target_loss} after {step} steps on {samples} samples "
              f"(impl {cfg.impl}, {cfg.optimizer} lr {cfg.lr:g})", file=out)
    else:
        print(f"check-overfit FAILED: loss is still {loss_v:.4g} (target {target_loss}) after {step} steps on one batch "
              f"of {samples}. The model cannot memorise a tiny batch: check the learning rate (--lr), the "
              "initialisation (--init), that labels match their images, and the loss.", file=out)
    return passed, loss_v, step


def lr_find(cfg, start_lr=1e-7, end_lr=10.0, num_steps=100, out=None):
    """Exponentially increasing lr, one batch per step; stops when the smoothed loss passes 4x its
    best. Suggests the lr of the steepest descent of the smoothed loss. Returns a dict."""
    from .engine import build_model, build_optimizer, load_data, new_run_dir, resolve_device  # noqa: PLC0415
    from .checkpoint import atomic_write_json  # noqa: PLC0415
    from .plots import plot_lr_find  # noqa: PLC0415

    out = out or sys.stdout
    if not 0 < start_lr < end_lr:
        raise ConfigError(f"--start-lr and --end-lr must satisfy 0 < start < end, got {start_lr}, {end_lr}")
    if num_steps < 5:
        raise ConfigError(f"--num-steps must be >= 5, got {num_steps}")
    device = resolve_device(cfg.device)
    data = load_data(cfg, device)
    model = build_model(cfg, device, data)
    opt = build_optimizer(cfg, model, lr=start_lr)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    mult = (end_lr / start_lr) ** (1 / (num_steps - 1))
    order = data.train.permutation(cfg.seed, 0)
    batches = data.train.batches(cfg.batch_size, order)
    lrs, losses, smoothed = [], [], []
    # An averaging window of ~5% of the sweep: long enough to steady the curve, short enough that
    # it still rises before an adaptive optimizer (which recovers from the spike) pulls the loss back.
    avg, best, beta = 0.0, math.inf, 1 - 1 / max(5, num_steps // 20)
    model.train()
    for i in range(num_steps):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = data.train.batches(cfg.batch_size, data.train.permutation(cfg.seed, i))
            x, y = next(batches)
        lr = start_lr * mult ** i
        for g in opt.param_groups:
            g["lr"] = lr
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        v = loss.item()
        if not math.isfinite(v):
            break
        avg = beta * avg + (1 - beta) * v
        sm = avg / (1 - beta ** (i + 1))
        lrs.append(lr), losses.append(v), smoothed.append(sm)
        best = min(best, sm)
        if (sm > 4 * best or v > 10 * best) and i > 10:
            break
    suggestion = None
    if len(smoothed) > 10:
        lo = min(range(len(smoothed)), key=smoothed.__getitem__)
        logs = [math.log10(l) for l in lrs]
        slopes = [(smoothed[j + 1] - smoothed[j - 1]) / (logs[j + 1] - logs[j - 1]) for j in range(1, max(2, lo))]
        if slopes:
            suggestion = lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]
    run_dir = new_run_dir(cfg.out_dir, f"{cfg.name}-lr-find")
    plot_lr_find(run_dir / "lr_find.png", lrs, losses, smoothed, suggestion)
    result = {"suggested_lr": suggestion, "lrs": lrs, "losses": losses, "smoothed": smoothed,
              "min_loss_lr": lrs[min(range(len(smoothed)), key=smoothed.__getitem__)] if smoothed else None,
              "run_dir": str(run_dir), "config": cfg.to_dict()}
    atomic_write_json(run_dir / "lr_find.json", result)
    if suggestion is None:
        print(f"lr-find: no clear descent in {len(lrs)} steps; see {run_dir / 'lr_find.png'}", file=out)
    else:
        print(f"lr-find: suggested lr {suggestion:.2e} (steepest descent; the loss was lowest at "
              f"{result['min_loss_lr']:.2e}). Plot: {run_dir / 'lr_find.png'}", file=out)
    return result


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        cfg, _ = resolve_config(args)
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
    except KeyboardInterrupt:
        print("interrupted; resume with --resume RUN_DIR if a checkpoint was written", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        from ..data import DataError  # noqa: PLC0415
        from ..monitor import AnomalyError  # noqa: PLC0415

        if isinstance(e, (DataError, AnomalyError)) or (isinstance(e, (RuntimeError, ValueError)) and str(e).startswith("--")):
            print(f"fastmlp {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
