"""`fastmlp sweep`: every combination of a grid trains as `train` would, ranked from the trials' own files."""

import dataclasses
import json
import statistics
from pathlib import Path

import pytest

from fastmlp.train import ConfigError, Trainer, TrainConfig, resume_sweep, run_sweep, sweep_results
from fastmlp.train.cli import main
from fastmlp.train.sweep import (SweepStopped, check_grid, format_results, parse_grid, plan_trials, sample_combos,
                                  train_command)
from test_data import real_data_dir
from test_train import cfg_small, two_way_split


def base(tmp_path, **kw):
    return cfg_small(tmp_path, val_split=0.25, **kw)


def fields(summary):
    return {k: summary[k] for k in ("final_test_acc", "best_val_acc", "best_epoch", "epochs", "steps")}


def trial_summary(sweep_dir, folder):
    return json.loads((Path(sweep_dir) / folder / "summary.json").read_text())


def test_grid_values_are_read_as_the_config_file_reads_them():
    grid = parse_grid(["lr=1e-3,2e-3", "activation=relu,gelu", "widths=[784,16,10],[784,32,10]",
                       "augment-flip=true,false", "--epochs=1,2.0"])
    assert grid == {"lr": [1e-3, 2e-3], "activation": ["relu", "gelu"], "widths": [[784, 16, 10], [784, 32, 10]],
                    "augment_flip": [True, False], "epochs": [1, 2]}
    assert all(type(v) is float for v in grid["lr"]) and all(type(v) is int for v in grid["epochs"])
    for spec, match in [("lr", "expected OPTION=VALUE,VALUE,..., e.g. --grid lr=1e-3,2e-3"),
                        ("lr=", "expected OPTION=VALUE"),
                        ("lrr=1", "--grid lrr: unknown option 'lrr'; did you mean 'lr'?"),
                        ("out_dir=a,b", "--grid out_dir: out_dir cannot be swept: it sets where or how a run logs"),
                        ("lr=1e-3,0.001", "--grid lr: the value 0.001 is given twice"),
                        ("widths=784,16,10", r"--grid widths: widths takes a list per value; write each in brackets, "
                                             r"e.g. --grid 'widths=\[784,512,512,10\],\[...\]'"),
                        ("lr=abc", "--grid lr: option 'lr' must be a number, got 'abc'"),
                        ("lr=[1", "--grid lr: cannot read the values '\\[1'")]:
        with pytest.raises(ConfigError, match=match):
            parse_grid([spec])
    with pytest.raises(ConfigError, match="--grid lr: given twice; give all its values in one --grid lr=V1,V2"):
        parse_grid(["lr=1", "lr=2"])
    # A grid from Python is checked the same way; tuples become lists as in the saved config.
    assert check_grid({"widths": [(784, 8, 10)], "lr": [1]}) == {"widths": [[784, 8, 10]], "lr": [1.0]}
    for grid, match in [({"lr": 0.01}, "--grid lr: expected a list of one or more values, got 0.01"),
                        ({"lr": []}, "--grid lr: expected a list of one or more values"),
                        ({"plots": [True, False]}, "--grid plots: plots cannot be swept")]:
        with pytest.raises(ConfigError, match=match):
            check_grid(grid)
    # Each trial's whole config is checked before anything trains, naming the combination.
    with pytest.raises(ConfigError, match="--grid lr=0.01 dropout=1.5: config option 'dropout'"):
        plan_trials(TrainConfig().to_dict(), parse_grid(["lr=0.01", "dropout=0.1,1.5"]))


def test_each_trial_is_the_run_train_gives_and_the_ranking_is_their_mean(tmp_path, capsys):
    data = two_way_split()
    cfg = base(tmp_path, epochs=2)
    res = run_sweep(cfg, {"lr": [0.002, 0.02], "seed": [0, 1]}, data=data)
    sweep_dir = Path(res["sweep_dir"])
    assert sweep_dir.parent == tmp_path / "runs" and sweep_dir.name.endswith("-fmnist-mlp-sweep")
    assert [t["folder"] for t in res["trials"]] == ["00-lr=0.002_seed=0", "01-lr=0.002_seed=1", "02-lr=0.02_seed=0",
                                                   "03-lr=0.02_seed=1"]
    alone = {}
    for t in res["trials"]:
        # The same options through train give the same run, to the last bit.
        s = Trainer(dataclasses.replace(cfg, **t["params"], name="alone"), data=data).fit()
        assert fields(trial_summary(sweep_dir, t["folder"])) == fields(s)
        assert t["status"] == "completed" and t["test_acc"] == pytest.approx(s["final_test_acc"])
        alone[(t["params"]["lr"], t["params"]["seed"])] = s
    assert res["metric"] == "val_acc" and res["aggregated_over_seed"]
    by_lr = {g["params"]["lr"]: g for g in res["ranking"]}
    assert set(by_lr) == {0.002, 0.02} and all("seed" not in g["params"] for g in res["ranking"])
    for lr, g in by_lr.items():
        vals = [alone[(lr, seed)]["best_val_acc"] for seed in (0, 1)]
        tests = [alone[(lr, seed)]["final_test_acc"] for seed in (0, 1)]
        assert g["val_acc"]["mean"] == pytest.approx(statistics.fmean(vals))
        assert g["val_acc"]["std"] == pytest.approx(statistics.stdev(vals))
        assert g["test_acc"]["mean"] == pytest.approx(statistics.fmean(tests)) and g["test_acc"]["n"] == 2
        assert (g["trials"], g["finished"], g["statuses"]) == (2, 2, {"completed": 2})
    means = [g["val_acc"]["mean"] for g in res["ranking"]]
    assert means == sorted(means, reverse=True)
    assert json.loads((sweep_dir / "results.json").read_text()) == json.loads(json.dumps(res))

    text = format_results(res).splitlines()
    assert text[0].split() == ["rank", "lr", "runs", "val", "acc", "(best", "epoch)", "test", "acc", "s/epoch", "status"]
    best = res["ranking"][0]
    assert text[1].split()[:3] == ["1", f"{best['params']['lr']:g}", "2/2"]
    assert f"{best['val_acc']['mean']:.4f} ± {best['val_acc']['std']:.4f}" in text[1]
    assert f"best: lr={best['params']['lr']:g} (val acc" in text[-2] and "over 2 seeds" in text[-2]
    assert text[-1] == "train it: " + train_command({**cfg.to_dict(), "lr": best["params"]["lr"]})
    assert f"--lr {best['params']['lr']:g}" in text[-1] and "--seed" not in text[-1] and "--out-dir" not in text[-1]


def test_random_search_draws_reproducibly_within_the_ranges(tmp_path, capsys):
    grid = parse_grid(["lr=loguniform(1e-4, 1e-2)", "dropout=uniform(0,0.5)", "batch_size=loguniform(64,512)",
                       "activation=relu,gelu", "seed=0,1"])
    assert grid["lr"] == {"dist": "loguniform", "low": 1e-4, "high": 1e-2}
    assert grid["dropout"] == {"dist": "uniform", "low": 0.0, "high": 0.5}
    combos = sample_combos(grid, 50, sample_seed=3)
    assert combos == sample_combos(grid, 50, sample_seed=3) != sample_combos(grid, 50, sample_seed=4)
    assert len(combos) == 100 and [c[-1] for c in combos[:4]] == [0, 1, 0, 1]  # each draw with each seed
    draws = combos[::2]
    assert len({c[:-1] for c in draws}) == 50  # distinct configurations
    for lr, dropout, bs, act, _ in draws:
        assert 1e-4 <= lr <= 1e-2 and float(f"{lr:.3g}") == lr and 0 <= dropout <= 0.5
        assert type(bs) is int and 64 <= bs <= 512 and act in ("relu", "gelu")
    many = sample_combos({"lr": grid["lr"]}, 1000, sample_seed=0)
    below = sum(lr < 1e-3 for (lr,) in many) / len(many)
    assert 0.45 < below < 0.55  # log-uniform: as many draws in [1e-4, 1e-3) as in [1e-3, 1e-2]
    assert len(sample_combos({"activation": ["relu", "gelu"]}, 5)) == 2  # no more than the grid holds
    for specs, match in [(["activation=uniform(0,1)"], "activation is not a number; give its values as a list"),
                         (["lr=uniform(1,0.5)"], r"uniform\(1,0.5\) needs finite bounds with low < high"),
                         (["lr=loguniform(0,1)"], r"loguniform\(0,1\) needs bounds > 0")]:
        with pytest.raises(ConfigError, match=match):
            parse_grid(specs)
    with pytest.raises(ConfigError, match=r"--grid lr is a range \(loguniform\): give --samples N"):
        plan_trials(TrainConfig().to_dict(), grid)

    data = two_way_split()
    res = run_sweep(base(tmp_path, epochs=1), {"lr": grid["lr"], "seed": [0, 1]}, data=data, samples=2,
                    sample_seed=7)
    assert len(res["trials"]) == 4 and len(res["ranking"]) == 2
    assert [(t["params"]["lr"], t["params"]["seed"]) for t in res["trials"]] == sample_combos(res["grid"], 2, 7)
    lrs = [t["params"]["lr"] for t in res["trials"]]
    assert lrs[0] == lrs[1] != lrs[2] == lrs[3] and all(1e-4 <= v <= 1e-2 for v in lrs)
    assert "2 draws of lr ~ loguniform(0.0001, 0.01), each with 2 seeds" in capsys.readouterr().out
    again = resume_sweep(res["sweep_dir"], data=data)  # the same draws planned again: every trial kept
    assert [t["folder"] for t in again["trials"]] == [t["folder"] for t in res["trials"]]
    assert "--- trial 4/4: " in capsys.readouterr().out


def test_seeds_alone_give_one_row_with_their_mean_and_spread(tmp_path, capsys):
    data = two_way_split()
    res = run_sweep(base(tmp_path, epochs=1), {"seed": [0, 1, 2]}, data=data)
    assert len(res["trials"]) == 3 and len(res["ranking"]) == 1 and res["ranking"][0]["params"] == {}
    vals = [t["best_val_acc"] for t in res["trials"]]
    assert res["ranking"][0]["val_acc"] == {"mean": pytest.approx(statistics.fmean(vals)),
                                            "std": pytest.approx(statistics.stdev(vals)), "n": 3}
    text = format_results(res).splitlines()
    assert text[0].split()[:2] == ["rank", "runs"] and text[1].split()[:2] == ["1", "3/3"]
    assert text[-2].startswith("the options: val acc ") and text[-2].endswith(" over 3 seeds")
    assert text[-1].startswith("train it: python -m fastmlp train ") and "--seed" not in text[-1]


def test_train_command_gives_the_config_back():
    from fastmlp.train.cli import build_parser, resolve_config

    config = {**TrainConfig().to_dict(), "widths": [784, 64, 10], "lr": 0.0023456789, "augment_flip": True,
              "cycle_momentum": False, "name": "x y", "activation": "silu", "weight_decay": 0.012345678,
              "betas": [0.912345678, 0.999]}   # values past 6 digits come back exactly
    cmd = train_command(config).split()
    assert cmd[:4] == ["python", "-m", "fastmlp", "train"] and "--name" not in cmd
    cfg, _ = resolve_config(build_parser().parse_args(cmd[3:]))
    assert {**cfg.to_dict(), "name": "x y"} == config


def _interrupt_in(monkeypatch, folder_prefix, at_step, error=KeyboardInterrupt):
    """Make the trial whose folder starts with folder_prefix raise `error` at its global step at_step."""
    orig = Trainer.train_step

    def step(self, *a, **k):
        if self.run_dir.name.startswith(folder_prefix) and self.global_step + 1 == at_step:
            raise error("boom") if error is not KeyboardInterrupt else error
        return orig(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_step", step)


def test_a_stopped_sweep_resumes_to_the_results_of_one_never_stopped(tmp_path, monkeypatch, capsys):
    data = two_way_split()
    grid = {"lr": [0.002, 0.005, 0.02]}
    whole = run_sweep(base(tmp_path / "a", epochs=2, checkpoint_every=3), grid, data=data)

    cfg = base(tmp_path / "b", epochs=2, checkpoint_every=3)
    _interrupt_in(monkeypatch, "01-", at_step=11)  # epoch 2 of the second trial, after its step-9 checkpoint
    with pytest.raises(SweepStopped) as e:
        run_sweep(cfg, grid, data=data)
    sweep_dir = next((tmp_path / "b" / "runs").iterdir())
    assert str(e.value) == (f"interrupted in trial 2/3 ({sweep_dir / '01-lr=0.005'}); continue the sweep with: "
                            f"python -m fastmlp sweep --resume {sweep_dir}")
    partial = sweep_results(sweep_dir)
    assert [t["status"] for t in partial["trials"]] == ["completed", "interrupted", None]
    assert [g["finished"] for g in partial["ranking"]] == [1, 0, 0]
    first = (sweep_dir / "00-lr=0.002" / "summary.json").read_bytes()
    monkeypatch.undo()
    capsys.readouterr()

    res = resume_sweep(sweep_dir, data=data)
    out = capsys.readouterr().out
    assert f"--- trial 1/3: lr=0.002: completed, kept ({sweep_dir / '00-lr=0.002'})" in out
    assert f"resuming {sweep_dir / '01-lr=0.005'} from its checkpoint at epoch 2, step 9" in out
    assert (sweep_dir / "00-lr=0.002" / "summary.json").read_bytes() == first  # a finished trial is not touched
    for a, b in zip(whole["trials"], res["trials"]):
        assert fields(trial_summary(whole["sweep_dir"], a["folder"])) == fields(trial_summary(sweep_dir, b["folder"]))
    assert [g["params"] for g in res["ranking"]] == [g["params"] for g in whole["ranking"]]
    assert [g["val_acc"] for g in res["ranking"]] == [g["val_acc"] for g in whole["ranking"]]
    # Resuming a finished sweep keeps every trial and trains nothing.
    before = {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("*") if p.name != "results.json"}
    assert resume_sweep(sweep_dir, data=data)["ranking"] == res["ranking"]
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("*") if p.name != "results.json"} == before


def test_a_diverged_trial_ranks_last_and_a_failed_one_is_retried(tmp_path, monkeypatch, capsys):
    data = two_way_split()
    cfg = base(tmp_path, epochs=1, optimizer="sgd")
    _interrupt_in(monkeypatch, "02-", at_step=3, error=RuntimeError)
    res = run_sweep(cfg, {"lr": [1e30, 0.02, 0.05]}, data=data)
    out = capsys.readouterr().out
    assert "trial 1/3 stopped by the anomaly guard, ranked last:" in out
    assert "trial 3/3 failed: RuntimeError: boom" in out
    assert [t["status"] for t in res["trials"]] == ["anomaly", "completed", "failed"]
    assert [g["params"]["lr"] for g in res["ranking"]] == [0.02, 0.05, 1e30]  # no result yet, then diverged
    assert res["ranking"][2]["diverged"] == 1 and res["ranking"][2]["statuses"] == {"anomaly": 1}
    assert res["ranking"][1]["statuses"] == {"failed": 1} and res["ranking"][1]["test_acc"] is None
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="--resume: --lr is swept by this sweep's grid; its values come from the grid"):
        resume_sweep(res["sweep_dir"], overrides={"lr": 0.1}, data=data)
    res = resume_sweep(res["sweep_dir"], data=data)
    out = capsys.readouterr().out
    assert "--- trial 1/3: lr=1e+30: anomaly, kept" in out and "--- trial 3/3: lr=0.05 ---" in out
    assert [t["status"] for t in res["trials"]] == ["anomaly", "completed", "completed"]
    assert res["ranking"][-1]["params"]["lr"] == 1e30


def test_cli_sweep_dry_run_errors_and_listing(tmp_path, capsys):
    out = tmp_path / "runs"
    common = ["--data-dir", real_data_dir(), "--out-dir", str(out), "--device", "cpu", "--train-subset", "256",
              "--epochs", "1", "--widths", "784", "16", "10", "--batch-size", "128", "--progress", "off"]
    assert main(["sweep", "--grid", "lr=1e-3,3e-3", "--grid", "momentum=0.8,0.9", "--dry-run", *common]) == 0
    cap = capsys.readouterr()
    assert "4 trials, 4 epochs in all" in cap.out and "00-lr=0.001_momentum=0.8: lr=0.001 momentum=0.8" in cap.out
    at = common.index("--epochs")
    assert main(["sweep", "--grid", "epochs=1,2", "--dry-run", *common[:at], *common[at + 2:]]) == 0
    assert "2 trials, 3 epochs in all" in capsys.readouterr().out   # each trial's own epochs
    assert ("--grid momentum has no effect (only sgd uses it; --optimizer is adamw): its trials train the same model"
            in cap.err)
    assert not out.exists()  # a dry run writes nothing
    for argv, msg in [([*common], "give the options to sweep: --grid OPTION=VALUE,VALUE,..."),
                      (["--grid", "lr=1e-3,3e-3", "--lr", "0.1", *common], "--lr given both as an option and in --grid"),
                      (["--grid", "seed=0,1", "--metric", "val_acc", *common], "--metric val_acc needs a validation split"),
                      (["--grid", "seed=uniform(0,10)", "--samples", "2", *common],
                       "--grid seed: seeds are not drawn from a range: list them (--grid seed=0,1,2)"),
                      (["--resume", str(tmp_path), "--lr", "0.1"], "--resume continues a sweep with its saved grid and "
                                                                    "options; drop --lr (only --anomaly-guard,"),
                      (["--resume", str(tmp_path), "--progress", "off"],
                       f"{tmp_path} is not a sweep folder: it has no sweep.json")]:
        assert main(["sweep", *argv]) == 2, argv
        assert msg in capsys.readouterr().err
    assert not out.exists()

    assert main(["sweep", "--grid", "lr=1e-3,3e-3", *common]) == 0
    text = capsys.readouterr().out
    sweep_dir = next(out.iterdir())
    assert "ranked on the final test accuracy (no --val-split): the winner's test number is optimistic" in text
    assert {p.name for p in sweep_dir.iterdir()} == {"sweep.json", "results.json", "sweep.png", "00-lr=0.001",
                                                      "01-lr=0.003"}
    assert (sweep_dir / "sweep.png").stat().st_size > 1000
    res = sweep_results(sweep_dir)
    assert text.splitlines()[-1] == "train it: " + train_command({**res["config"], **res["ranking"][0]["params"]})
    assert main(["runs", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert line.split()[:2] == [sweep_dir.name, "sweep"]
    assert (f"sweep: 2/2 trials over; best lr={res['ranking'][0]['params']['lr']:g}: test acc "
            f"{res['ranking'][0]['test_acc']['mean']:.4f}; its trials: fastmlp runs {sweep_dir}") in line
    assert main(["runs", str(sweep_dir)]) == 0
    assert [l.split()[0] for l in capsys.readouterr().out.splitlines()[1:]] == ["00-lr=0.001", "01-lr=0.003"]
    assert main(["sweep", "--resume", str(sweep_dir), "--progress", "off"]) == 0
    assert "--- trial 2/2: lr=0.003: completed, kept" in capsys.readouterr().out
