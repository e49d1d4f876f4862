"""`fastmlp runs`: the table of run folders agrees with what each run wrote."""

import json
from pathlib import Path

import pytest

from fastmlp.train import Trainer, TrainConfig
from fastmlp.train.cli import lr_find, main
from fastmlp.train.runs import format_runs, list_runs, plot_runs
from test_data import real_data_dir
from test_train import cfg_small, synthetic, two_way_split


def by_name(runs):
    return {Path(r["run_dir"]).name: r for r in runs}


def test_rows_match_the_runs_summaries(tmp_path, capsys):
    data = two_way_split()
    out = tmp_path / "runs"
    done = Trainer(cfg_small(tmp_path, name="done", epochs=3, val_split=0.25, lr=0.02), data=data).fit()
    stopped = Trainer(cfg_small(tmp_path, name="plateau", epochs=10, val_split=0.25, early_stopping=1, optimizer="sgd",
                                momentum=0.0, lr=1e-30, dropout=0.0, weight_decay=0.0), data=data).fit()
    killed = Trainer(cfg_small(tmp_path, name="killed", epochs=2, amp="bf16"), data=synthetic()).fit()
    (Path(killed["run_dir"]) / "summary.json").unlink()  # as a kill (or a run still training) leaves it
    (out / "not-a-run").mkdir()
    capsys.readouterr()

    rows = by_name(list_runs(out))
    assert set(rows) == {Path(s["run_dir"]).name for s in (done, stopped, killed)}  # not-a-run is left out
    r = rows[Path(done["run_dir"]).name]
    assert (r["status"], r["epochs_done"], r["epochs"]) == ("completed", 3, 3)
    assert (r["test_acc"], r["best_val_acc"], r["best_epoch"]) == pytest.approx(
        (done["final_test_acc"], done["best_val_acc"], done["best_epoch"]))
    assert r["seconds_per_epoch"] == pytest.approx(done["seconds_per_epoch"])
    # What the run changed from the recipe, without where and how it logged (out_dir, progress, ...).
    assert r["changes"].split() == ["device=cpu", "val_split=0.25", "widths=784,32,10", "impl=torch", "lr=0.02",
                                    "scheduler=none", "epochs=3", "batch_size=64"]
    s = rows[Path(stopped["run_dir"]).name]
    assert (s["status"], s["epochs_done"], s["epochs"], s["best_epoch"]) == ("stopped early", 2, 10, 1)
    k = rows[Path(killed["run_dir"]).name]
    assert (k["status"], k["epochs_done"], k["best_val_acc"]) == ("unfinished", 2, None)
    assert "amp=bf16" in k["changes"].split()

    best_first = list_runs(out, sort="test_acc")
    accs = [x["test_acc"] for x in best_first]
    assert accs == sorted(accs, reverse=True)
    assert [x["best_val_acc"] is None for x in list_runs(out, sort="val_acc")] == [False, False, True]
    with pytest.raises(ValueError, match="sort must be one of start, test_acc, val_acc"):
        list_runs(out, sort="loss")

    table = format_runs(list_runs(out)).splitlines()
    assert table[0].split()[:4] == ["run", "status", "epochs", "test"]
    line = next(l for l in table if Path(done["run_dir"]).name in l)
    assert f"{done['final_test_acc']:.4f}" in line and f"{done['best_val_acc']:.4f} ({done['best_epoch']})" in line
    assert "stopped early" in next(l for l in table if "plateau" in l)


def test_a_damaged_run_folder_does_not_stop_the_listing(tmp_path):
    data = two_way_split()
    s = Trainer(cfg_small(tmp_path, name="ok", epochs=1, val_split=0.25), data=data).fit()
    bad = tmp_path / "runs" / "20260101-000000-bad"
    bad.mkdir()
    (bad / "config.yaml").write_text("epochs: 4\n")
    (bad / "metrics.csv").write_text("epoch,test_acc,val_acc,seconds\n1,0.5,,x\n?,0.6,0.7\n3,nan")  # edited by hand
    (bad / "summary.json").write_text("{not json")
    bad_sweep = tmp_path / "runs" / "20260101-000000-x-sweep"
    bad_sweep.mkdir()
    (bad_sweep / "sweep.json").write_text("{cut short")
    rows = by_name(list_runs(tmp_path / "runs"))
    assert rows[bad_sweep.name]["status"] == "sweep" and "sweep.json is damaged" in rows[bad_sweep.name]["changes"]
    assert rows[bad.name]["status"] == "unfinished" and rows[bad.name]["epochs_done"] == 3
    assert rows[bad.name]["test_acc"] is None and rows[bad.name]["seconds_per_epoch"] is None
    assert rows[Path(s["run_dir"]).name]["status"] == "completed"
    assert bad.name in format_runs(list(rows.values()))


def test_cli_lists_runs_and_lr_find_folders(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["runs", str(out)]) == 2
    assert f"{out} is not a folder; give the folder that holds the run folders" in capsys.readouterr().err
    out.mkdir()
    assert main(["runs", str(out)]) == 0
    assert f"no run folders in {out}" in capsys.readouterr().out
    s = Trainer(cfg_small(tmp_path, name="tiny", epochs=1), data=synthetic()).fit()
    r = lr_find(TrainConfig(impl="torch", widths=[784, 16, 10], data_dir=real_data_dir(), device="cpu",
                            out_dir=str(out), train_subset=512, plots=False), num_steps=30)
    capsys.readouterr()
    assert main(["runs", str(out)]) == 0
    text = capsys.readouterr().out
    assert Path(s["run_dir"]).name in text and Path(r["run_dir"]).name in text
    lr_line = next(l for l in text.splitlines() if Path(r["run_dir"]).name in l)
    assert "lr-find" in lr_line and (f"suggested lr {r['suggested_lr']:.2e}" in lr_line
                                     if r["suggested_lr"] is not None else "no suggestion" in lr_line)
    assert main(["runs", str(out), "--json", "--sort", "test_acc"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [x["status"] for x in rows] == ["completed", "lr-find"]
    assert rows[0]["test_acc"] == pytest.approx(s["final_test_acc"])

    # --plot draws the runs with finished epochs (not the lr-find folder).
    png = tmp_path / "cmp.png"
    assert main(["runs", str(out), "--plot", str(png)]) == 0
    assert f"wrote {png}: 1 run(s)" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000
    assert plot_runs([x for x in list_runs(out) if x["status"] == "lr-find"], tmp_path / "none.png") == 0
    assert not (tmp_path / "none.png").exists()
