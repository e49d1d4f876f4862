"""--profile-steps: a profiler record of the steps asked for, and a run that trains exactly as without it."""

import json
from pathlib import Path

from fastmlp.train import Trainer
from test_train import cfg_small, synthetic

KEYS = ("train_loss", "train_acc", "test_loss", "test_acc")


def test_profile_writes_trace_and_ops_and_changes_nothing(tmp_path, capsys):
    data = synthetic()
    plain = Trainer(cfg_small(tmp_path, epochs=2, impl="fastmlp", name="plain"), data=data).fit()
    s = Trainer(cfg_small(tmp_path, epochs=2, impl="fastmlp", name="prof", profile_steps=3), data=data).fit()
    assert [[h[k] for k in KEYS] for h in s["history"]] == [[h[k] for k in KEYS] for h in plain["history"]]
    prof = Path(s["run_dir"]) / "profile"
    assert sorted(p.name for p in prof.iterdir()) == ["ops.txt", "trace.json"]  # no temp file left
    ops = (prof / "ops.txt").read_text()
    assert ops.startswith("3 training steps, ops by self cpu time total")
    assert "fastmlp::linear_act_forward" in ops and "fastmlp::linear_act_backward" in ops
    names = {e.get("name") for e in json.loads((prof / "trace.json").read_text())["traceEvents"]}
    assert "fastmlp::linear_act_forward" in names and "Optimizer.step#AdamW.step" in names
    assert f"profile: 3 steps in {prof / 'trace.json'}" in capsys.readouterr().out


def test_a_window_longer_than_the_run_is_written_when_training_ends(tmp_path, capsys):
    # 8 steps: 5 of warm-up, then the 3 that are left of a window of 10.
    s = Trainer(cfg_small(tmp_path, epochs=1, impl="fastmlp", profile_steps=10), data=synthetic()).fit()
    assert (Path(s["run_dir"]) / "profile" / "ops.txt").read_text().startswith("3 training steps")
    assert "profile: 3 steps in" in capsys.readouterr().out
