"""`fastmlp sweep`: train every combination of a grid of options, one run folder each, and rank them.

    python -m fastmlp sweep --grid lr=1e-3,2e-3,4e-3 --grid dropout=0.1,0.2 --grid seed=0,1,2 --val-split 0.1
    python -m fastmlp sweep --resume runs/20261201-101500-fmnist-mlp-sweep

The sweep folder <out_dir>/<timestamp>-<name>-sweep holds sweep.json (the grid, the options shared
by every trial and the trials, written once at the start), one run folder per trial
(``03-lr=0.004_dropout=0.2``: an ordinary run folder, so evaluate, predict, export and
``fastmlp runs SWEEP_DIR`` take it), and results.json and sweep.png (the grid points ranked, every
trial's curves), rewritten after each trial. Trials run one after the other in one process. A trial
whose loss diverged (the anomaly guard stopped it) is a result, ranked last; a trial that failed
(an error) is reported and the sweep goes on. Ctrl-C stops the sweep at the running trial's
checkpoint, and ``--resume`` continues it there, skipping the trials that are over: the results
are those of a sweep never stopped.

With seed in the grid, the grid points are the combinations of the other options, each reported as
the mean and standard deviation over its seeds. They are ranked on the best validation accuracy of
each run (with --val-split) or else on the final test accuracy, which then says so: a winner
picked on the test set has an optimistic test number.
"""

import dataclasses
import difflib
import itertools
import json
import math
import random
import re
import statistics
import sys
from pathlib import Path

import yaml

from .checkpoint import atomic_write_json
from .config import ConfigError, TrainConfig, _coerce, _number, check_resume_overrides
from .runs import LOGGING_OPTIONS, plot_runs, read_run

__all__ = ["parse_grid", "check_grid", "check_metric", "plan_trials", "sample_combos", "run_sweep", "resume_sweep",
           "sweep_results", "format_results", "describe", "describe_grid", "train_command", "SweepStopped", "SWEEP_FILE"]

SWEEP_FILE = "sweep.json"
RESULTS_FILE = "results.json"
PLOT_FILE = "sweep.png"
METRICS = ("auto", "val_acc", "test_acc")
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_RECIPE = TrainConfig().to_dict()  # (read only)
# The statuses after which a trial is over: a completed run (early stopping included) and one the
# anomaly guard stopped (resuming it would repeat the same steps into the same NaN).
_OVER = ("completed", "stopped early", "anomaly")


class SweepStopped(Exception):
    """A sweep ended by Ctrl-C; the message says how to resume it."""


# ---- the grid ------------------------------------------------------------------------------------
def _fmt(v):
    """A grid value as it appears in folder names and tables."""
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "x".join(map(_fmt, v))
    return str(v)


def describe(params):
    """`lr=0.002 dropout=0.2` for a trial's (or a grid point's) options."""
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items()) or "(no options)"


def describe_grid(grid, samples=0):
    """`3 lr x 2 seed`, or for random search `4 draws of lr ~ loguniform(0.0001, 0.01), dropout in
    {0.1, 0.2}, each with 2 seeds`."""
    if not samples:
        return " x ".join(f"{len(v)} {k}" for k, v in grid.items())
    parts = [f"{k} ~ {v['dist']}({v['low']:g}, {v['high']:g})" if isinstance(v, dict)
             else f"{k} in {{{', '.join(map(_fmt, v))}}}" for k, v in grid.items() if k != "seed"]
    seeds = f", each with {len(grid['seed'])} seeds" if "seed" in grid else ""
    return f"{samples} draws of {', '.join(parts) or 'the options'}{seeds}"


def parse_grid(specs):
    """{option: [values]} from --grid KEY=V1,V2,... specs, in the order given. Values are read as YAML
    (`lr=1e-3,2e-3`, `activation=relu,gelu`, `augment_flip=true,false`, for the list options
    `widths=[784,256,10],[784,512,10]`) and checked as check_grid does. Raises ConfigError naming
    the spec."""
    grid = {}
    for spec in specs or []:
        key, eq, text = str(spec).partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not eq or not key or not text.strip():
            raise ConfigError(f"--grid {spec!r}: expected OPTION=VALUE,VALUE,..., e.g. --grid lr=1e-3,2e-3")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice; give all its values in one --grid {key}=V1,V2,...")
        dist = _RANGE.fullmatch(text.strip())
        if dist:
            grid[key] = {"dist": dist[1], "low": dist[2].strip(), "high": dist[3].strip()}
            continue
        try:
            grid[key] = yaml.safe_load(f"[{text}]")
        except yaml.YAMLError as e:
            raise ConfigError(f"--grid {key}: cannot read the values {text!r}: {e}") from None
    return check_grid(grid)


_RANGE = re.compile(r"(uniform|loguniform)\(([^,()]+),([^,()]+)\)")


def _check_range(key, spec, src):
    """A range {"dist": "uniform"|"loguniform", "low", "high"} of a numeric option, bounds as numbers."""
    kind = type(_RECIPE[key])
    if kind not in (int, float):
        raise ConfigError(f"{src}: {key} is not a number; give its values as a list (--grid {key}=V1,V2,...)")
    if spec.get("dist") not in ("uniform", "loguniform") or set(spec) != {"dist", "low", "high"}:
        raise ConfigError(f"{src}: a range is {{'dist': 'uniform' or 'loguniform', 'low': L, 'high': H}}, got {spec!r}")
    low, high = (_number(key, float, spec[k], src) for k in ("low", "high"))
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ConfigError(f"{src}: {spec['dist']}({low:g},{high:g}) needs finite bounds with low < high")
    if spec["dist"] == "loguniform" and low <= 0:
        raise ConfigError(f"{src}: loguniform({low:g},{high:g}) needs bounds > 0 (it draws log(value) uniformly)")
    return {"dist": spec["dist"], "low": low, "high": high}


def check_grid(grid):
    """grid ({option: [values] or a range {"dist": "uniform"|"loguniform", "low", "high"}}) with each
    value as the config file would read it (YAML's 1e-3 string a float, a tuple a list). Raises
    ConfigError for an unknown option, one that cannot be swept (where and how a run logs), an empty
    or repeated value list, a value of the wrong type or a bad range; the whole config of each trial
    is checked by plan_trials."""
    if not isinstance(grid, dict):
        raise ConfigError(f"the grid must be a mapping of option: [values], got {type(grid).__name__}")
    out = {}
    for key, values in grid.items():
        src = f"--grid {key}"
        if key not in _FIELDS:
            close = difflib.get_close_matches(str(key), _FIELDS, n=1)
            raise ConfigError(f"{src}: unknown option {key!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                                   f"; known options: {', '.join(_FIELDS)}"))
        if key in LOGGING_OPTIONS:
            raise ConfigError(f"{src}: {key} cannot be swept: it sets where or how a run logs, not what it trains "
                              "(the sweep names its folders itself)")
        if isinstance(values, dict):
            if key == "seed":
                raise ConfigError(f"{src}: seeds are not drawn from a range: list them (--grid seed=0,1,2); a random "
                                  "search runs every draw with each listed seed")
            out[key] = _check_range(key, values, src)
            continue
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"{src}: expected a list of one or more values, got {values!r}")
        recipe = _RECIPE[key]
        if isinstance(recipe, list) and not all(isinstance(v, (list, tuple)) for v in values):
            raise ConfigError(f"{src}: {key} takes a list per value; write each in brackets, e.g. "
                              f"--grid '{key}=[{','.join(map(_fmt, recipe))}],[...]'")
        out[key] = []
        for v in (_coerce(key, _FIELDS[key], v, src) for v in values):
            if v in out[key]:
                raise ConfigError(f"{src}: the value {_fmt(v)} is given twice")
            out[key].append(v)
    return out


@dataclasses.dataclass
class Trial:
    index: int
    folder: str
    params: dict
    cfg: TrainConfig


def _folder(index, digits, params):
    name = "_".join(f"{k}={_fmt(v)}" for k, v in params.items())
    name = re.sub(r"[^A-Za-z0-9.=_+-]", "-", name)[:120]
    return f"{index:0{digits}d}-{name}" if name else f"{index:0{digits}d}"


def _draw(rng, spec, kind):
    if isinstance(spec, list):
        return rng.choice(spec)
    low, high = spec["low"], spec["high"]
    if spec["dist"] == "loguniform":
        v = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        v = rng.uniform(low, high)
    if kind is int:
        return min(max(int(round(v)), math.ceil(low)), math.floor(high))
    return float(f"{v:.3g}")  # 3 significant digits: readable folder names and tables


def sample_combos(grid, samples, sample_seed=0):
    """Random search: `samples` distinct configurations drawn from grid (ranges drawn as they say,
    value lists picked from uniformly) with Python's random.Random(sample_seed), so a sweep plans
    the same trials again on --resume; a `seed` list is not drawn from: every configuration runs
    with each of its seeds (seed varying fastest). Fewer than `samples` when the grid has fewer
    distinct configurations."""
    keys = [k for k in grid if k != "seed"]
    kinds = {k: type(_RECIPE[k]) for k in keys}
    rng, seen, keys_seen, combos, misses = random.Random(sample_seed), [], set(), [], 0
    # Until `samples` distinct draws, or 1000 draws in a row that were all seen before (the grid, at
    # 3 significant digits, holds fewer).
    while len(seen) < samples and misses < 1000:
        c = {k: _draw(rng, grid[k], kinds[k]) for k in keys}
        key = tuple(tuple(v) if isinstance(v, list) else v for v in c.values())
        if key in keys_seen:
            misses += 1
            continue
        misses = 0
        keys_seen.add(key)
        seen.append(c)
    for c in seen:
        for seed in grid.get("seed", [None]):
            combos.append(tuple(c[k] if k != "seed" else seed for k in grid))
    return combos


def plan_trials(base, grid, sweep_dir=".", samples=0, sample_seed=0):
    """The trials of a grid: every combination (the last option varying fastest), or with samples > 0
    the configurations sample_combos draws; each a Trial with its folder name and checked TrainConfig
    (base, a dict of options, with the combination's values; out_dir is the sweep folder, name the
    trial's folder). A value that makes any trial's config invalid raises ConfigError before anything
    trains; so does a range without samples."""
    keys = list(grid)
    ranges = [k for k in keys if isinstance(grid[k], dict)]
    if ranges and not samples:
        raise ConfigError(f"--grid {ranges[0]} is a range ({grid[ranges[0]]['dist']}): give --samples N to draw N "
                          "configurations from the grid (random search)")
    if samples:
        combos = sample_combos(grid, samples, sample_seed)
    else:
        combos = list(itertools.product(*(grid[k] for k in keys)))
    digits = max(2, len(str(len(combos) - 1)))
    trials = []
    for i, combo in enumerate(combos):
        params = dict(zip(keys, combo))
        folder = _folder(i, digits, params)
        d = {**base, **params, "out_dir": str(sweep_dir), "name": folder}
        src = f"--grid {describe(params)}"
        try:
            cfg = TrainConfig.from_dict(d, source=src)
        except ConfigError as e:  # validate()'s messages name the option, not where its value came from
            raise (e if str(e).startswith(src) else ConfigError(f"{src}: {e}")) from None
        trials.append(Trial(i, folder, params, cfg))
    return trials


def check_metric(metric, val_split):
    """The metric that ranks a sweep whose smallest --val-split is val_split ('auto' resolved)."""
    if metric not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if metric == "val_acc" and not val_split:
        raise ConfigError("--metric val_acc needs a validation split: give --val-split (e.g. 0.1)")
    if metric == "auto":
        return "val_acc" if val_split else "test_acc"
    return metric


# ---- running -------------------------------------------------------------------------------------
def run_sweep(cfg, grid, metric="auto", out=None, data=None, samples=0, sample_seed=0):
    """Train every trial of grid (see fastmlp.train.sweep.parse_grid) on top of cfg (a TrainConfig,
    or a dict of options) into a new sweep folder <cfg.out_dir>/<timestamp>-<cfg.name>-sweep; returns
    sweep_results of it. samples > 0: random search, `samples` configurations drawn from the grid
    (see fastmlp.train.sweep.sample_combos).
    data: a FashionMNIST to train every trial on (default: loaded per trial as train does)."""
    from .engine import check_given_data, new_run_dir  # noqa: PLC0415

    base = cfg.to_dict() if isinstance(cfg, TrainConfig) else dict(cfg)
    grid = check_grid(grid)
    if not grid:
        raise ConfigError("the grid is empty: give at least one --grid OPTION=VALUE,VALUE,...")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ConfigError(f"--samples must be an int >= 0 (0 = every combination of the grid), got {samples!r}")
    trials = plan_trials(base, grid, samples=samples, sample_seed=sample_seed)  # all checked before the folder exists
    if data is not None:
        for t in trials:   # data= is used as given: a grid of train_subset or val_split would contradict it
            check_given_data(t.cfg, data)
    val_splits = {t.cfg.val_split for t in trials}
    metric = check_metric(metric, min(val_splits))
    sweep_dir = new_run_dir(base.get("out_dir", "runs"), f"{base.get('name', 'fmnist-mlp')}-sweep")
    spec = {"grid": grid, "config": base, "metric": metric, "samples": samples, "sample_seed": sample_seed,
            "trials": [{"trial": t.index, "folder": t.folder, "params": t.params} for t in trials]}
    atomic_write_json(sweep_dir / SWEEP_FILE, spec)
    return _run(sweep_dir, spec, {}, out, data)


def _open(path):
    d = Path(path).expanduser()
    if d.is_file() and d.name == SWEEP_FILE:
        d = d.parent
    f = d / SWEEP_FILE
    if not f.is_file():
        hint = " It is a run folder: continue it with python -m fastmlp train --resume." \
            if (d / "config.yaml").is_file() else ""
        raise FileNotFoundError(f"{d} is not a sweep folder: it has no {SWEEP_FILE}.{hint}")
    try:
        spec = json.loads(f.read_text())
        if not isinstance(spec, dict) or not all(k in spec for k in ("grid", "config", "metric", "trials")):
            raise ValueError("grid, config, metric or trials missing")
    except ValueError as e:
        raise ConfigError(f"{f} is damaged ({e}); the trials' run folders beside it are intact") from None
    return d, spec


def _trials(sweep_dir, spec, overrides=None):
    trials = plan_trials({**spec["config"], **(overrides or {})}, spec["grid"], sweep_dir,
                         samples=spec.get("samples", 0), sample_seed=spec.get("sample_seed", 0))
    if [t.folder for t in trials] != [t["folder"] for t in spec["trials"]]:
        raise ConfigError(f"{Path(sweep_dir) / SWEEP_FILE}: its trials do not match its grid (edited by hand?)")
    return trials


def resume_sweep(path, overrides=None, out=None, data=None):
    """Continue the sweep in folder path: trials that are over are kept, a stopped trial continues from
    its checkpoint, the rest start. overrides: options that cannot change results (RESUME_MAY_CHANGE in
    fastmlp.train.config: device, progress, plots, data_dir, log_every, checkpoint_every, anomaly_guard,
    tensorboard, profile_steps); any other raises ConfigError. Returns sweep_results."""
    sweep_dir, spec = _open(path)
    swept = sorted(set(overrides or {}) & set(spec["grid"]))
    if swept:
        raise ConfigError(f"--resume: {', '.join('--' + k.replace('_', '-') for k in swept)} is swept by this sweep's "
                          "grid; its values come from the grid")
    check_resume_overrides(overrides, spec["config"], allow_monitor_every=False)
    return _run(sweep_dir, spec, overrides or {}, out, data)


def _status(folder):
    row = read_run(folder) if (Path(folder) / "config.yaml").is_file() else None
    return row["status"] if row else None


def _run(sweep_dir, spec, overrides, out, data):
    from .engine import load_data, resolve_device  # noqa: PLC0415

    out = out if out is not None else sys.stdout
    trials = _trials(sweep_dir, spec, overrides)
    n, loaded = len(trials), {}
    print(f"sweep {sweep_dir}: {n} trials ({describe_grid(spec['grid'], spec.get('samples', 0))}), one after "
          "the other", file=out)

    def data_for(cfg):
        if data is not None:
            return data
        key = (cfg.data_dir, cfg.device, cfg.val_split, cfg.train_subset)
        if key not in loaded:
            loaded.clear()  # one copy of the dataset at a time
            loaded[key] = load_data(cfg, resolve_device(cfg.device))
        return loaded[key]

    t, res = None, None
    try:
        for t in trials:
            # results.json and sweep.png after each trial that trained (not for those kept).
            res = _write_results(sweep_dir, spec, trials) if _trial(t, n, sweep_dir, overrides, data_for, out) else None
    except KeyboardInterrupt:
        where = f"in trial {t.index + 1}/{n} ({sweep_dir / t.folder})" if t is not None else "before the first trial"
        raise SweepStopped(f"interrupted {where}; continue the sweep with: python -m fastmlp sweep --resume "
                           f"{sweep_dir}") from None
    return res if res is not None else _write_results(sweep_dir, spec, trials)


def _trial(t, n, sweep_dir, overrides, data_for, out):
    """Train trial t, unless it is over (then False); a diverged or failed trial is reported and the
    sweep goes on."""
    from ..data import DataError  # noqa: PLC0415
    from ..monitor import AnomalyError  # noqa: PLC0415
    from .engine import CHECKPOINT, Trainer  # noqa: PLC0415

    d = sweep_dir / t.folder
    head = f"--- trial {t.index + 1}/{n}: {describe(t.params)}"
    status = _status(d)
    if status in _OVER:
        print(f"{head}: {status}, kept ({d})", file=out)
        return False
    print(head + " ---", file=out)
    if t.cfg.compile:
        import torch  # noqa: PLC0415

        # Each trial compiles afresh, as in a process of its own: the earlier trials' graphs would
        # count against dynamo's recompile limit (past it, a trial would run eagerly).
        torch.compiler.reset()
    try:
        if (d / CHECKPOINT).is_file():
            trainer = Trainer.resume(d, out=out, overrides=overrides, data=data_for(t.cfg))
        else:
            d.mkdir(exist_ok=True)
            (d / "summary.json").unlink(missing_ok=True)  # of an attempt stopped before its first checkpoint
            trainer = Trainer(t.cfg, run_dir=d, out=out, data=data_for(t.cfg))
        trainer.fit()
    except (ConfigError, DataError):
        raise  # the setup is wrong for every trial: say so once
    except AnomalyError as e:
        print(f"trial {t.index + 1}/{n} stopped by the anomaly guard, ranked last: {e}", file=out)
    except Exception as e:  # noqa: BLE001  (reported in the results; the sweep goes on)
        print(f"trial {t.index + 1}/{n} failed: {type(e).__name__}: {e}", file=out)
    return True


# ---- results -------------------------------------------------------------------------------------
def _mean_std(values):
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def sweep_results(path):
    """The sweep in folder path as the trials' own files say: {"sweep_dir", "metric", "grid",
    "aggregated_over_seed", "trials": [one row per trial: trial, folder, params, and fastmlp runs'
    row of its folder: status (None before it starts), epochs_done, test_acc, best_val_acc, ...],
    "ranking": [one row per grid point, best first: params, trials, finished, statuses, val_acc and
    test_acc as {mean, std, n} over its finished trials, seconds_per_epoch, folders]}. A trial counts
    once its training is over (completed or stopped early); one the anomaly guard stopped counts as
    diverged and ranks its grid point last."""
    sweep_dir, spec = _open(path)
    rows = []
    for t in spec["trials"]:
        folder = sweep_dir / t["folder"]
        run = read_run(folder) if folder.is_dir() else None
        run = run or {"status": None, "epochs_done": 0, "test_acc": None, "best_val_acc": None, "best_epoch": None,
                      "seconds_per_epoch": None}
        rows.append({"trial": t["trial"], "folder": t["folder"], "params": t["params"],
                     **{k: run.get(k) for k in ("status", "epochs_done", "epochs", "test_acc", "best_val_acc",
                                                "best_epoch", "seconds_per_epoch")}})
    over_seed = "seed" in spec["grid"]  # (alone in the grid: one row, the options' mean over the seeds)
    groups = {}
    for r in rows:
        params = {k: v for k, v in r["params"].items() if not (over_seed and k == "seed")}
        groups.setdefault(json.dumps(params, sort_keys=True), (params, []))[1].append(r)
    ranking = []
    for params, members in groups.values():
        done = [m for m in members if m["status"] in ("completed", "stopped early")]
        statuses = {}
        for m in members:
            statuses[m["status"] or "not started"] = statuses.get(m["status"] or "not started", 0) + 1
        secs = [m["seconds_per_epoch"] for m in done if m["seconds_per_epoch"] is not None]
        ranking.append({
            "params": params, "trials": len(members), "finished": len(done), "statuses": statuses,
            "val_acc": _mean_std([m["best_val_acc"] for m in done if m["best_val_acc"] is not None]),
            "test_acc": _mean_std([m["test_acc"] for m in done if m["test_acc"] is not None]),
            "seconds_per_epoch": statistics.fmean(secs) if secs else None,
            "diverged": statuses.get("anomaly", 0), "folders": [m["folder"] for m in members]})
    metric = spec["metric"]
    # Best first; grid points without a result yet after those with one, and any with a diverged trial last.
    ranking.sort(key=lambda g: (g["diverged"] > 0, g[metric] is None, -(g[metric]["mean"] if g[metric] else 0.0)))
    return {"sweep_dir": str(sweep_dir), "metric": metric, "grid": spec["grid"], "aggregated_over_seed": over_seed,
            "config": spec["config"], "trials": rows, "ranking": ranking}


def _write_results(sweep_dir, spec, trials):
    res = sweep_results(sweep_dir)
    atomic_write_json(Path(sweep_dir) / RESULTS_FILE, res)
    if trials and trials[0].cfg.plots:
        runs = [{**r, "run": r["folder"], "run_dir": str(Path(sweep_dir) / r["folder"])}
                for r in res["trials"] if r["status"] is not None]
        plot_runs(runs, Path(sweep_dir) / PLOT_FILE, label=lambda r: f"{r['trial']:02d}: {describe(r['params'])}")
    return res


def train_command(config, leave_out=()):
    """`python -m fastmlp train ...` with the flags that give config (a dict of options) from the
    recipe: the options it changes, without those that only say where and how a run logs."""
    import shlex  # noqa: PLC0415

    def exact(v):  # the very value (repr), not _fmt's 6 significant digits, so the command reproduces it
        return repr(v) if isinstance(v, float) else _fmt(v)

    recipe, flags = _RECIPE, []
    for k, v in config.items():
        if k in LOGGING_OPTIONS or k in leave_out or k not in recipe or v == recipe[k]:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags.append(flag if v else "--no-" + k.replace("_", "-"))
        elif isinstance(v, list):
            flags.append(f"{flag} {' '.join(map(exact, v))}")
        else:
            flags.append(f"{flag} {shlex.quote(exact(v))}")
    return " ".join(["python -m fastmlp train", *flags])


def _acc(s):
    if s is None:
        return "-"
    return f"{s['mean']:.4f}" + (f" ± {s['std']:.4f}" if s["std"] is not None else "")


def format_results(res):
    """The ranking as a table, then the best grid point and the command that trains it."""
    keys = [k for k in res["grid"] if not (res["aggregated_over_seed"] and k == "seed")]
    head = ["rank", *keys, "runs" if res["aggregated_over_seed"] else "done", "val acc (best epoch)", "test acc",
            "s/epoch", "status"]
    lines = []
    for i, g in enumerate(res["ranking"]):
        status = ", ".join(f"{n} {s}" if g["trials"] > 1 else s for s, n in g["statuses"].items())
        secs = "-" if g["seconds_per_epoch"] is None else f"{g['seconds_per_epoch']:.2f}"
        lines.append([str(i + 1), *(_fmt(g["params"][k]) for k in keys), f"{g['finished']}/{g['trials']}",
                      _acc(g["val_acc"]), _acc(g["test_acc"]), secs, status])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [head, *lines]]
    metric = res["metric"]
    if metric == "test_acc":
        out.append("ranked on the final test accuracy (no --val-split): the winner's test number is optimistic, "
                   "as it was picked on the test set; give --val-split 0.1 to rank on held-out training images")
    else:
        out.append("ranked on the best validation accuracy of each run (held-out training images)")
    best = res["ranking"][0] if res["ranking"] and res["ranking"][0][metric] else None
    if best is None:
        out.append("no trial has finished yet")
        return "\n".join(out)
    s = best[metric]
    over = f" over {s['n']} seeds" if res["aggregated_over_seed"] else ""
    what = f"{'val' if metric == 'val_acc' else 'test'} acc {_acc(s)}{over}"
    out.append(f"best: {describe(best['params'])} ({what})" if best["params"] else f"the options: {what}")
    config = {**res["config"], **best["params"]}
    out.append("train it: " + train_command(config, leave_out=("seed",) if res["aggregated_over_seed"] else ()))
    return "\n".join(out)


def sweep_note(folder):
    """fastmlp runs' text for a sweep folder: how many trials are over and the best so far."""
    res = sweep_results(folder)
    over = sum(r["status"] in _OVER for r in res["trials"])
    best = res["ranking"][0] if res["ranking"] and res["ranking"][0][res["metric"]] else None
    note = f"sweep: {over}/{len(res['trials'])} trials over"
    if best:
        note += f"; best {describe(best['params'])}: {res['metric'].replace('_', ' ')} {best[res['metric']]['mean']:.4f}"
    return note + f"; its trials: fastmlp runs {folder}"
