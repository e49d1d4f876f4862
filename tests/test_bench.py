"""The benchmark scripts run end to end on tiny settings and report what they claim to.

Nothing here asserts a speed (timings on a shared machine are not test material); the tests check
that every candidate ran, produced a positive time, and that the derived columns are computed from
those times, so a benchmark cannot rot silently between the runs that produce the README numbers.
"""

import argparse
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import bench_linear_act  # noqa: E402
import bench_mlp  # noqa: E402


def test_bench_mlp_runs_every_eager_candidate(tmp_path):
    out = tmp_path / "mlp.json"
    rows = bench_mlp.main(["--widths", "24,16,16,5", "--batch", "8", "--repeats", "20",
                           "--candidates", "torch eager,torch eager fused,fastmlp,gemm floor", "--json", str(out)])
    by = {r["candidate"]: r for r in rows}
    assert set(by) == {"torch eager", "torch eager fused", "fastmlp", "gemm floor"}
    for r in rows:
        assert r["ms_per_step"] > 0 and math.isfinite(r["ms_per_step"])
        assert r["samples_per_s"] == pytest.approx(8 / (r["ms_per_step"] / 1e3))
        assert r["floor_share"] == pytest.approx(by["gemm floor"]["ms_per_step"] / r["ms_per_step"])
    assert by["torch eager"]["fastmlp_speedup"] == pytest.approx(
        by["torch eager"]["ms_per_step"] / by["fastmlp"]["ms_per_step"])
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and "threads" in saved["machine"]


def test_bench_mlp_step_trains_the_candidates():
    """The timed step is a real training step: each candidate's loss goes down on its batch."""
    args = argparse.Namespace(device="cpu", widths=[12, 16, 3], batch=32, activation="relu", dropout=0.0,
                              amp="off", candidates=["torch eager", "torch eager fused", "fastmlp"])
    for name, step in bench_mlp.build(args).items():
        def loss():
            with torch.no_grad():
                return torch.nn.functional.cross_entropy(step.model(step.x), step.y).item()
        before = loss()
        for _ in range(100):
            step()
        assert loss() < 0.7 * before, name


def test_bench_mlp_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench_mlp.main(["--candidates", "torch eager,bogus"])
    assert "unknown 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_mlp.main(["--repeats", "5"])
    assert "at least 20" in capsys.readouterr().err


def test_bench_linear_act_tiny_grid(tmp_path):
    out = tmp_path / "la.json"
    bench_linear_act.main(["--batches", "4", "--widths", "8->6", "--activations", "relu", "--dtypes", "float32",
                           "--modes", "fwd,fwdbwd", "--repeats", "20", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert [r["mode"] for r in saved["rows"]] == ["fwd", "fwdbwd"]
    for r in saved["rows"]:
        for k in ("native_ms", "compiled_ms", "fastmlp_ms", "floor_ms"):
            assert r[k] > 0
        assert r["speedup_vs_native"] == pytest.approx(r["native_ms"] / r["fastmlp_ms"])
        assert r["pct_of_floor"] == pytest.approx(100 * r["floor_ms"] / r["fastmlp_ms"])
    fwdbwd = saved["rows"][1]
    assert fwdbwd["kernels_ms"] > 0 and "kernels_ms" not in saved["rows"][0]
    assert fwdbwd["kernels_pct_of_floor"] == pytest.approx(100 * fwdbwd["floor_ms"] / fwdbwd["kernels_ms"])
    assert saved["summary"]["fwd"]["geomean_kernels_over_floor"] is None
    assert saved["summary"]["fwdbwd"]["geomean_kernels_over_floor"] == pytest.approx(
        fwdbwd["kernels_ms"] / fwdbwd["floor_ms"])
    assert fwdbwd["autograd_floor_ms"] > 0 and "autograd_floor_ms" not in saved["rows"][0]
    assert fwdbwd["pct_of_autograd_floor"] == pytest.approx(100 * fwdbwd["autograd_floor_ms"] / fwdbwd["fastmlp_ms"])
    assert saved["summary"]["fwdbwd"]["geomean_fastmlp_over_autograd_floor"] == pytest.approx(
        fwdbwd["fastmlp_ms"] / fwdbwd["autograd_floor_ms"])
    assert saved["summary"]["fwd"]["geomean_autograd_floor_over_floor"] is None
