"""--tensorboard: the event files hold what metrics.jsonl and metrics.csv hold, each step once."""

import importlib.util
import json
from pathlib import Path

import pytest

# CI installs tensorboard (scripts/install.sh); a machine without it (the GPU check's, which collects
# every test file for its CUDA tests) skips this file instead of failing to collect it.
pytest.importorskip("tensorboard", reason="train --tensorboard needs the tensorboard package")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from fastmlp.train import ConfigError, Trainer  # noqa: E402
from test_train import _dying, cfg_small, synthetic, two_way_split  # noqa: E402


def scalars(run_dir):
    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def records(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def series(recs, key):
    return [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in recs if key in r]


def test_event_files_hold_the_runs_metrics_and_hparams(tmp_path):
    s = Trainer(cfg_small(tmp_path, epochs=2, val_split=0.25, tensorboard=True, lr=0.02), data=two_way_split()).fit()
    sc, acc = scalars(s["run_dir"])
    recs = records(s["run_dir"])
    assert len(recs) == s["steps"] == 16
    for key in ("loss", "lr", "grad_norm"):
        assert sc[f"train/{key}"] == series(recs, key)
    monitored = series(recs, "0.linear/grad_norm")
    assert monitored and sc["layers/0.linear/grad_norm"] == monitored  # every --monitor-every (4) steps
    assert sc["layers/0.act/dead_frac"] == series(recs, "0.act/dead_frac")
    for key in ("train_loss", "val_acc", "test_acc", "test_loss", "seconds"):
        assert sc[f"epoch/{key}"] == [(h["global_step"], pytest.approx(h[key], rel=1e-6)) for h in s["history"]]
    assert sc["hparam/final_test_acc"] == [(16, pytest.approx(s["final_test_acc"]))]
    assert sc["hparam/best_val_acc"] == [(16, pytest.approx(s["best_val_acc"]))]
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(acc.PluginTagToContent("hparams"))
    start = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    assert b"widths" in start and b"784,32,10" in start and b"out_dir" not in start  # options, not where it logs


def test_a_resumed_run_shows_each_step_once(tmp_path):
    data = synthetic()
    full = Trainer(cfg_small(tmp_path, epochs=3, name="full", tensorboard=True), data=data).fit()
    part = Trainer(cfg_small(tmp_path, epochs=3, name="part", tensorboard=True, checkpoint_every=5), data=data)
    _dying(part, 13)  # steps 11 and 12 were logged, then the run resumes from its step-10 checkpoint
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    stopped, _ = scalars(part.run_dir)
    assert [st for st, _ in stopped["train/loss"]][-1] == 12
    assert not any(tag.startswith("hparam/") for tag in stopped)  # written when the run completes
    s = Trainer.resume(part.run_dir, data=data).fit()
    got, _ = scalars(s["run_dir"])
    want, _ = scalars(full["run_dir"])
    assert [st for st, _ in got["train/loss"]] == list(range(1, 25))
    assert got["train/loss"] == want["train/loss"] and got["epoch/test_acc"] == want["epoch/test_acc"]
    assert got["hparam/final_test_acc"] == want["hparam/final_test_acc"]


def test_tensorboard_missing_is_a_config_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--tensorboard needs the tensorboard package: pip install tensorboard"):
        Trainer(cfg_small(tmp_path, tensorboard=True), data=synthetic())
