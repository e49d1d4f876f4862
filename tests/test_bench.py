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
import types

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import bench_linear_act  # noqa: E402
import bench_mlp  # noqa: E402
import gpu_profile  # noqa: E402


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


def _event(name, start, end):
    return types.SimpleNamespace(name=name, time_range=types.SimpleNamespace(start=start, end=end))


def test_gpu_profile_per_call_counts_and_times_device_events():
    # Two calls of: gemm, epilogue, gemm (the second call's events interleaved as a profiler lists them).
    events = [_event("gemm", 0, 10), _event("epi", 10, 12), _event("gemm", 12, 20),
              _event("gemm", 30, 40), _event("epi", 40, 43), _event("gemm", 43, 50)]
    launches, device_us, kernels = gpu_profile.per_call(events, iters=2)
    assert launches == 3
    assert device_us == pytest.approx((10 + 2 + 8 + 10 + 3 + 7) / 2)
    assert kernels == [["gemm", 2], ["epi", 1]]


def test_gpu_profile_runs_every_candidate_on_the_cpu(tmp_path):
    out = tmp_path / "profile.json"
    gpu_profile.main(["--device", "cpu", "--shapes", "4x8x6", "--dtypes", "float32", "--activations", "relu",
                      "--json", str(out)])
    saved = json.loads(out.read_text())
    (row,) = saved["rows"]
    assert row["shape"] == [4, 8, 6] and row["activation"] == "relu"
    for name in gpu_profile.CANDIDATES:
        r = row[name]
        assert r["host_us"] > 0 and r["wall_us"] >= r["host_us"] * 0.5
        assert r["launches"] == 0 and r["device_us"] == 0 and r["kernels"] == []  # no GPU kernels on the CPU
        assert r["host_ops"] and all(us >= 0 and calls > 0 for _, us, calls in r["host_ops"])
    assert any(name.startswith("fastmlp::linear_act") for name, _, _ in row["fastmlp"]["host_ops"])
    assert any(name == "aten::mm" for name, _, _ in row["floor"]["host_ops"])
    (item,) = saved["summary"]["launch_bound"]
    assert saved["summary"]["compute_bound"] == []
    assert item["wall_vs_eager"] == pytest.approx(row["eager"]["wall_us"] / row["fastmlp"]["wall_us"])
    assert item["device_over_floor"] is None and item["host_bound"] is True


def test_gpu_profile_rejects_bad_shapes(capsys):
    with pytest.raises(SystemExit):
        gpu_profile.main(["--device", "cpu", "--shapes", "4x8"])
    assert "BATCHxINxOUT" in capsys.readouterr().err
