"""`fastmlp runs`: the run folders under an --out-dir, one line each, to compare experiments.

Each line is read from files a run writes atomically, so a run still training (or killed) shows
what it has finished so far: metrics.csv (one row per finished epoch) for the numbers, config.yaml
for what the run changed from the recipe, summary.json for how it ended. lr-find folders show
their suggested learning rate, sweep folders how many trials are over and the best so far
(``fastmlp runs SWEEP_DIR`` lists the trials).
"""

import csv
import json
import math
from pathlib import Path

import yaml

from .config import TrainConfig

__all__ = ["list_runs", "format_runs", "plot_runs", "SORT_KEYS", "LOGGING_OPTIONS"]

# Options that say where and how a run logs, not what it trains: left out of "changes", not
# sweepable, not hyperparameters on TensorBoard's HParams tab.
LOGGING_OPTIONS = {"name", "out_dir", "data_dir", "progress", "plots", "log_every", "monitor_every",
                   "checkpoint_every", "anomaly_guard", "tensorboard", "profile_steps"}
SORT_KEYS = ("start", "test_acc", "val_acc")


def _read(path, parse):
    try:
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _float(v):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _changes(config):
    """`option=value` for each option of config that differs from the recipe (lists joined by commas)."""
    if not isinstance(config, dict):
        return None
    recipe = TrainConfig().to_dict()
    out = []
    for k, v in config.items():
        if k in LOGGING_OPTIONS or k not in recipe or v == recipe[k]:
            continue
        if isinstance(v, list):
            v = ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
        elif isinstance(v, bool):
            v = "on" if v else "off"
        elif isinstance(v, float):
            v = f"{v:g}"
        out.append(f"{k}={v}")
    return " ".join(out)


def _status(summary):
    if not isinstance(summary, dict):
        # No summary yet: still training, or killed (a kill leaves no summary; --resume continues it).
        return "unfinished"
    status = str(summary.get("status", "?"))
    if status == "completed" and summary.get("early_stopped"):
        return "stopped early"
    return status


def read_run(folder):
    """One row for a run folder (None if folder is not one): its name, status, epochs, accuracies,
    speed and changes from the recipe; numbers that are not there yet are None."""
    folder = Path(folder)
    if (folder / "sweep.json").is_file():
        from .sweep import sweep_note  # noqa: PLC0415  (sweep.py builds on this module)

        try:
            note = sweep_note(folder)
        except (ValueError, OSError) as e:  # a damaged sweep.json: the listing goes on
            note = f"sweep: {e}"
        return _row_without_epochs(folder, "sweep", note)
    lr_find = _read(folder / "lr_find.json", json.loads)
    if isinstance(lr_find, dict):
        return _row_without_epochs(folder, "lr-find", _changes(lr_find.get("config")),
                                   suggested_lr=_float(lr_find.get("suggested_lr")))
    config = _read(folder / "config.yaml", yaml.safe_load)
    if not isinstance(config, dict):
        return None
    rows = _epochs(folder)
    vals = [(v, int(e)) for r in rows if (v := _float(r.get("val_acc"))) is not None
            and (e := _float(r.get("epoch"))) is not None]
    best = max(vals, key=lambda t: (t[0], -t[1])) if vals else (None, None)  # the first of equals, as best.pt
    secs = [s for r in rows if (s := _float(r.get("seconds"))) is not None]
    return {"run": folder.name, "run_dir": str(folder),
            "status": _status(_read(folder / "summary.json", json.loads)),
            "epochs_done": len(rows), "epochs": config.get("epochs"),
            "test_acc": _float(rows[-1].get("test_acc")) if rows else None,
            "best_val_acc": best[0], "best_epoch": best[1],
            "seconds_per_epoch": sum(secs) / len(secs) if secs else None,
            "suggested_lr": None, "changes": _changes(config)}


def _row_without_epochs(folder, status, changes, suggested_lr=None):
    """The row of a folder that trained no epochs of its own (lr-find, a sweep's folder)."""
    return {"run": folder.name, "run_dir": str(folder), "status": status, "epochs_done": None, "epochs": None,
            "test_acc": None, "best_val_acc": None, "best_epoch": None, "seconds_per_epoch": None,
            "suggested_lr": suggested_lr, "changes": changes}


def _epochs(folder):
    return _read(Path(folder) / "metrics.csv", lambda text: list(csv.DictReader(text.splitlines()))) or []


def plot_runs(runs, path, label=None):
    """A PNG at path comparing the runs' curves per epoch (test and validation accuracy, train loss),
    each labelled with label(row), by default its folder name and changes; returns how many runs it
    shows (lr-find and sweep folders, and runs without a finished epoch, have no curve)."""
    curves = []
    for r in runs:
        rows = []
        for row in _epochs(r["run_dir"]):
            vals = {k: _float(row.get(k)) for k in ("epoch", "test_acc", "val_acc", "train_loss")}
            if None not in (vals["epoch"], vals["test_acc"], vals["train_loss"]):
                rows.append(vals)
        if rows and r["status"] not in ("lr-find", "sweep"):
            curves.append((label(r) if label else f"{r['run']}: {r['changes'] or 'the recipe'}", rows))
    if curves:
        from .plots import plot_runs as plot  # noqa: PLC0415  (matplotlib is slow to import)

        plot(path, curves)
    return len(curves)


def list_runs(out_dir="runs", sort="start"):
    """The rows of every run folder directly under out_dir, oldest first (folder names start with
    their timestamp), or best first for sort "test_acc" / "val_acc" (runs without one last)."""
    root = Path(out_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; give the folder that holds the run folders (train's "
                                "--out-dir, 'runs' by default)")
    if sort not in SORT_KEYS:
        raise ValueError(f"sort must be one of {', '.join(SORT_KEYS)}, got {sort!r}")
    runs = [r for d in sorted(root.iterdir()) if d.is_dir() and (r := read_run(d)) is not None]
    if sort != "start":
        key = "best_val_acc" if sort == "val_acc" else sort
        runs.sort(key=lambda r: (r[key] is None, -(r[key] or 0.0)))
    return runs


def format_runs(runs):
    """The rows as a text table."""
    def acc(x):
        return "-" if x is None else f"{x:.4f}"

    head = ("run", "status", "epochs", "test acc", "best val (epoch)", "s/epoch", "changes from the recipe")
    lines = []
    for r in runs:
        if r["status"] == "lr-find":
            epochs = best = secs = "-"
            test = "-"
            changes = f"suggested lr {r['suggested_lr']:.2e}" if r["suggested_lr"] is not None else "no suggestion"
            changes += f"; {r['changes']}" if r["changes"] else ""
        elif r["status"] == "sweep":
            epochs = best = secs = test = "-"
            changes = r["changes"]
        else:
            epochs = f"{r['epochs_done']}/{r['epochs'] if r['epochs'] is not None else '?'}"
            test = acc(r["test_acc"])
            best = "-" if r["best_val_acc"] is None else f"{r['best_val_acc']:.4f} ({r['best_epoch']})"
            secs = "-" if r["seconds_per_epoch"] is None else f"{r['seconds_per_epoch']:.2f}"
            changes = r["changes"] or "-"
        lines.append((r["run"], r["status"], epochs, test, best, secs, changes))
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    right = {2, 3, 4, 5}

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([fmt(head), *map(fmt, lines)])
