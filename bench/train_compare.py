"""Whole training runs, torch against fastmlp: `fastmlp train --compare` for several seeds, gathered.

    python bench/train_compare.py [--seeds 0,1,2] [--out DIR] [--json PATH] [-- TRAIN OPTIONS...]

For each seed, one after the other, runs `python -m fastmlp train --compare --seed N` (the default
recipe unless train options follow `--`: --impl torch, then --impl fastmlp, same data, same
initial weights), then reads the two runs' summary.json and reports per seed and on average:
final test accuracy and seconds per epoch (mean over epochs), with the speedup (torch's s/epoch
over fastmlp's), and the same from each run's median epoch (the runs are not interleaved: one
slow epoch, from the machine's other work, moves a mean). The run folders stay under --out (a temporary folder by default). Fashion-MNIST is
read as `fastmlp train` reads it ($FASTMLP_DATA first).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import machine_name, portable_arg, write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seed_list(s):
    try:
        seeds = [int(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of whole numbers, got {s!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {s!r}")
    return seeds


def run_seed(seed, out_dir, train_args):
    """One `fastmlp train --compare` for this seed: {impl: its summary.json} (run folders in out_dir)."""
    os.makedirs(out_dir, exist_ok=True)
    before = set(os.listdir(out_dir))
    cmd = [sys.executable, "-m", "fastmlp", "train", "--compare", "--seed", str(seed), "--out-dir", out_dir,
           *train_args]
    print(f"=== seed {seed}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    found = {}
    for name in sorted(set(os.listdir(out_dir)) - before):
        path = os.path.join(out_dir, name, "summary.json")
        if os.path.isfile(path):
            with open(path) as f:
                summary = json.load(f)
            found[summary["impl"]] = dict(summary, run_folder=name)
    missing = {"torch", "fastmlp"} - set(found)
    if missing:
        raise RuntimeError(f"seed {seed}: no summary.json from the {', '.join(sorted(missing))} run in {out_dir}")
    return found


def gather(per_seed):
    """The results file's runs and summary from {seed: {impl: summary}}."""
    keys = ("epochs", "status", "final_test_acc", "seconds_per_epoch", "seconds_per_epoch_median", "samples_per_s",
            "total_train_seconds", "run_folder")
    runs = []
    for seed, by_impl in per_seed.items():
        for impl in ("torch", "fastmlp"):
            s = by_impl[impl]
            runs.append({"impl": impl, "seed": seed, **{k: s.get(k) for k in keys},
                         "test_acc_per_epoch": [h.get("test_acc") for h in s.get("history", [])]})
    mean = {impl: statistics.mean(r["seconds_per_epoch"] for r in runs if r["impl"] == impl)
            for impl in ("torch", "fastmlp")}
    medians = {impl: statistics.median(r["seconds_per_epoch_median"] for r in runs if r["impl"] == impl)
               for impl in ("torch", "fastmlp")}
    summary = {
        "per_seed_speedup": {str(seed): by["torch"]["seconds_per_epoch"] / by["fastmlp"]["seconds_per_epoch"]
                             for seed, by in per_seed.items()},
        # The runs are one after the other, not interleaved: one slow epoch (the VM's other tenants)
        # moves a mean, so the ratio of the runs' median epochs is given beside it.
        "per_seed_speedup_of_median_epochs": {
            str(seed): by["torch"]["seconds_per_epoch_median"] / by["fastmlp"]["seconds_per_epoch_median"]
            for seed, by in per_seed.items()},
        "median_seconds_per_epoch": medians,
        "speedup_of_medians": medians["torch"] / medians["fastmlp"],
        "mean_seconds_per_epoch": mean,
        "mean_test_acc": {impl: statistics.mean(r["final_test_acc"] for r in runs if r["impl"] == impl)
                          for impl in ("torch", "fastmlp")},
        "speedup_of_means": mean["torch"] / mean["fastmlp"],
    }
    return runs, summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    train_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=seed_list, default=[0, 1, 2])
    ap.add_argument("--out", default=None, help="where the run folders go (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    out_dir = args.out or tempfile.mkdtemp(prefix="fastmlp-train-compare-")
    per_seed = {seed: run_seed(seed, out_dir, train_args) for seed in args.seeds}
    runs, summary = gather(per_seed)
    print(f"\n{'seed':>6} | {'torch acc':>9} {'fastmlp acc':>11} | {'torch s/ep':>10} {'fastmlp s/ep':>12} | speedup")
    for seed, by in per_seed.items():
        t, f = by["torch"], by["fastmlp"]
        print(f"{seed:>6} | {t['final_test_acc']:9.4f} {f['final_test_acc']:11.4f} | {t['seconds_per_epoch']:10.2f} "
              f"{f['seconds_per_epoch']:12.2f} | {summary['per_seed_speedup'][str(seed)]:.2f}x")
    print(f"  mean | {summary['mean_test_acc']['torch']:9.4f} {summary['mean_test_acc']['fastmlp']:11.4f} | "
          f"{summary['mean_seconds_per_epoch']['torch']:10.2f} {summary['mean_seconds_per_epoch']['fastmlp']:12.2f} | "
          f"{summary['speedup_of_means']:.2f}x (run folders: {out_dir})")
    print(f"median epoch | {'':21} | {summary['median_seconds_per_epoch']['torch']:10.2f} "
          f"{summary['median_seconds_per_epoch']['fastmlp']:12.2f} | {summary['speedup_of_medians']:.2f}x "
          "(the median of each run's median epoch: one slow epoch moves a mean)")
    if args.json:
        device = next(iter(per_seed.values()))["fastmlp"].get("device") or "cpu"
        payload = {"what": "fastmlp train --compare per seed, one after the other",
                   "machine": machine_name("cuda" if device.startswith("cuda") else "cpu"),
                   "train_args": [portable_arg(a) for a in train_args], "summary": summary, "runs": runs}
        write_json(args.json, payload, __file__, argv + (["--", *train_args] if train_args else []))
    return summary


if __name__ == "__main__":
    main()
