"""The benchmark scripts run end to end on tiny settings and report what they claim to.

Nothing here asserts a speed (timings on a shared machine are not test material); the tests check
that every candidate ran, produced a positive time, and that the derived columns are computed from
those times, so a benchmark cannot rot silently between the runs that produce the README numbers.
"""

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import types

import pytest
import torch

import fastmlp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import bench_dropout  # noqa: E402
import bench_ema  # noqa: E402
import bench_linear_act  # noqa: E402
import bench_mlp  # noqa: E402
import bench_norm  # noqa: E402
import bench_optim  # noqa: E402
import bwd_prologue_sweep  # noqa: E402
import common  # noqa: E402
import gpu_profile  # noqa: E402
import train_compare  # noqa: E402


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
    # What a rerun needs: the command, the code (commit when in a checkout), versions, threads.
    run = saved["run"]
    assert run["command"].startswith("python bench/bench_mlp.py --widths 24,16,16,5 --batch 8")
    assert run["fastmlp"] == fastmlp.__version__ and run["torch"] == torch.__version__
    assert run["threads"] == torch.get_num_threads() and run["date_utc"].endswith("+00:00")
    assert run["git_commit"] is None or len(run["git_commit"].split("-")[0]) == 40
    assert run["source_digest"] == common.source_digest()


def test_results_record_no_machine_paths(tmp_path):
    root, outside = str(tmp_path / "repo"), str(tmp_path / "out")
    assert common.portable_arg(os.path.join(outside, "bench_mlp.json"), root) == "bench_mlp.json"
    assert common.portable_arg("--json=" + os.path.join(outside, "x.json"), root) == "--json=x.json"
    assert common.portable_arg(os.path.join(root, "bench", "results", "a.json"), root) == "bench/results/a.json"
    assert common.portable_arg("4096x2048", root) == "4096x2048" and common.portable_arg("--quick", root) == "--quick"


def test_source_digest_follows_the_code_not_the_build(tmp_path):
    for rel, text in {"setup.py": "s", "csrc/a.cpp": "int a;", "fastmlp/__init__.py": "x = 1",
                      "bench/b.py": "b", "fastmlp/_build_info.py": "TORCH_VERSION = '1'"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    d0 = common.source_digest(str(tmp_path))
    (tmp_path / "fastmlp/_build_info.py").write_text("TORCH_VERSION = '2'")  # a rebuild elsewhere
    (tmp_path / "fastmlp/_C.so").write_bytes(b"\0")
    (tmp_path / "fastmlp/__pycache__").mkdir()
    (tmp_path / "fastmlp/__pycache__/x.py").write_text("cache")
    assert common.source_digest(str(tmp_path)) == d0
    (tmp_path / "csrc/a.cpp").write_text("int b;")
    d1 = common.source_digest(str(tmp_path))
    assert d1 != d0
    (tmp_path / "csrc/a.cpp").rename(tmp_path / "csrc/c.cpp")  # same bytes, another file
    assert common.source_digest(str(tmp_path)) not in (d0, d1)


def test_bench_mlp_step_trains_the_candidates():
    """The timed step is a real training step: each candidate's loss goes down on its batch."""
    args = argparse.Namespace(device="cpu", widths=[12, 16, 3], batch=32, activation="relu", dropout=0.0, norm="none",
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
        bench_mlp.main(["--candidates", "fastmlp graphed"])
    assert "'fastmlp graphed' captures the step into a CUDA graph; it needs --device cuda" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_mlp.main(["--repeats", "5"])
    assert "at least 20" in capsys.readouterr().err


def test_bench_mlp_default_candidates_per_device(monkeypatch):
    seen = []
    monkeypatch.setattr(bench_mlp, "build", lambda args, failures=None: seen.append(args.candidates) or {})
    monkeypatch.setattr(bench_mlp, "time_interleaved", lambda *a, **k: ({}, {}))
    bench_mlp.main([])
    bench_mlp.main(["--norm", "layer"])
    plain = [c for c in bench_mlp.CANDIDATES if c not in bench_mlp.GRAPHED]
    assert seen == [[c for c in plain if c not in bench_mlp.NORMED], plain]


def test_bench_mlp_torch_norms_candidate():
    """With --norm, "fastmlp torch norms" is fastmlp's model with torch's norm modules: the same
    parameters and running estimates, the same step (to rounding) as the fastmlp candidate."""
    for norm, cls in (("batch", torch.nn.BatchNorm1d), ("layer", torch.nn.LayerNorm)):
        args = argparse.Namespace(device="cpu", widths=[12, 16, 16, 3], batch=32, activation="gelu", dropout=0.0,
                                  norm=norm, amp="off", candidates=["fastmlp", "fastmlp torch norms"])
        steps = bench_mlp.build(args)
        ours, theirs = steps["fastmlp"], steps["fastmlp torch norms"]
        assert type(ours.model[0].norm) is not cls and type(theirs.model[0].norm) is cls
        for _ in range(3):
            ours()
            theirs()
        for (n, a), b in zip(ours.model.state_dict().items(), theirs.model.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
    with pytest.raises(SystemExit):
        bench_mlp.main(["--candidates", "fastmlp torch norms"])


def test_bench_mlp_reports_a_failed_capture(monkeypatch):
    # A capture that fails (on the GPU machine) is recorded and the other candidates still run,
    # when main asks for that; called without the dict, build raises.
    def fail(*a, **k):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(bench_mlp, "make_graphed_step", fail)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    args = argparse.Namespace(device="cpu", widths=[12, 16, 3], batch=8, activation="relu", dropout=0.0, norm="none",
                              amp="off", candidates=["fastmlp", "fastmlp graphed"])
    failures = {}
    assert list(bench_mlp.build(args, failures)) == ["fastmlp"]
    assert failures == {"fastmlp graphed": "operation not permitted when stream is capturing"}
    with pytest.raises(RuntimeError, match="stream is capturing"):
        bench_mlp.build(args)


@pytest.mark.cuda
def test_bench_mlp_graphed_steps_match_eager():
    """The graphed candidates replay the same training step as the eager ones: without dropout the
    parameters after k replays equal those after k eager steps (the graphed build already took 3
    warm-up steps), and with dropout on the replays still train."""
    if not (torch.cuda.is_available() and fastmlp.WITH_CUDA):
        pytest.skip("needs a CUDA GPU and fastmlp built with CUDA kernels")
    for amp in ("off", "bf16"):
        args = argparse.Namespace(device="cuda", widths=[24, 32, 32, 5], batch=16, activation="gelu", dropout=0.0, norm="none",
                                  amp=amp, candidates=["torch eager fused", "torch graphed", "fastmlp",
                                                       "fastmlp graphed"])
        fns = bench_mlp.build(args)
        for eager, graphed in (("torch eager fused", "torch graphed"), ("fastmlp", "fastmlp graphed")):
            for _ in range(3):
                fns[eager]()
            for _ in range(4):
                fns[eager]()
                fns[graphed]()
            torch.cuda.synchronize()
            tol = {} if amp == "off" else {"rtol": 2e-2, "atol": 2e-3}
            for (name, a), b in zip(fns[eager].model.named_parameters(), fns[graphed].model.parameters()):
                torch.testing.assert_close(b, a, **tol, msg=lambda m: f"{graphed} vs {eager}, {amp}, {name}: {m}")
    args = argparse.Namespace(device="cuda", widths=[12, 16, 3], batch=32, activation="relu", dropout=0.2, norm="none",
                              amp="off", candidates=["torch graphed", "fastmlp graphed"])
    for name, step in bench_mlp.build(args).items():
        def loss():  # outside the graph, without dropout
            step.model.eval()
            with torch.no_grad():
                out = torch.nn.functional.cross_entropy(step.model(step.x), step.y).item()
            step.model.train()
            return out
        before = loss()
        for _ in range(100):
            step()
        assert loss() < 0.7 * before, name


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


def test_bench_linear_act_keeps_the_rows_of_a_stopped_run(tmp_path, monkeypatch):
    # The GPU check runs each benchmark under a time limit: what was measured before the limit
    # stays in the JSON, marked incomplete; a finished run is marked complete.
    out = tmp_path / "la.json"
    real, calls = bench_linear_act.time_interleaved, []

    def stopped_after_two(*a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt  # what a kill looks like from here: no more rows
        return real(*a, **k)

    monkeypatch.setattr(bench_linear_act, "time_interleaved", stopped_after_two)
    with pytest.raises(KeyboardInterrupt):
        bench_linear_act.main(["--batches", "4,5", "--widths", "8->6", "--activations", "relu", "--dtypes",
                               "float32", "--modes", "fwd,fwdbwd", "--repeats", "20", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["complete"] is False and [r["shape"] for r in saved["rows"]] == ["4x8->6", "4x8->6"]
    assert saved["summary"]["fwd"]["geomean_fastmlp_over_floor"] > 0 and saved["run"]["command"]
    assert os.listdir(tmp_path) == ["la.json"]  # no temp file left behind
    monkeypatch.setattr(bench_linear_act, "time_interleaved", real)
    bench_linear_act.main(["--batches", "4", "--widths", "8->6", "--activations", "relu", "--dtypes", "float32",
                           "--modes", "fwd", "--repeats", "20", "--json", str(out)])
    assert json.loads(out.read_text())["complete"] is True


def test_bench_linear_act_min_sample_ms(tmp_path, monkeypatch, capsys):
    real, seen = bench_linear_act.time_interleaved, []

    def spy(*a, **k):
        seen.append(k["min_sample_s"])
        return real(*a, **k)

    monkeypatch.setattr(bench_linear_act, "time_interleaved", spy)
    out = tmp_path / "la.json"
    bench_linear_act.main(["--batches", "4", "--widths", "8->6", "--activations", "relu", "--dtypes", "float32",
                           "--modes", "fwd", "--repeats", "20", "--min-sample-ms", "5", "--json", str(out)])
    assert seen == [pytest.approx(5e-3)] and json.loads(out.read_text())["min_sample_ms"] == 5
    with pytest.raises(SystemExit):
        bench_linear_act.main(["--min-sample-ms", "0"])
    assert "--min-sample-ms must be positive" in capsys.readouterr().err


OPTIM_CANDIDATES = ["torch for-loop", "torch foreach", "torch fused", "fastmlp", "copy (reference)"]


def test_bench_optim_runs_every_candidate(tmp_path, monkeypatch):
    # The script's cases are fixed (the smallest is an MLP of 670k parameters, and a 16M tensor):
    # here main runs end to end on two tiny cases instead.
    tiny = {"tiny mlp": [(6, 5), (6,), (3, 6), (3,)], "3 x 4x4": [(4, 4)] * 3}
    monkeypatch.setattr(bench_optim, "cases", lambda quick: tiny)
    out = tmp_path / "optim.json"
    bench_optim.main(["--quick", "--device", "cpu", "--burst", "2", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["complete"] is True and saved["quick"] is True and saved["burst"] == 2
    rows = saved["rows"]
    assert [(r["case"], r["candidate"]) for r in rows] == [(c, k) for c in tiny for k in OPTIM_CANDIDATES]
    for case, shapes in tiny.items():
        n = sum(torch.Size(s).numel() for s in shapes)
        by = {r["candidate"]: r for r in rows if r["case"] == case}
        copy_gbs = 16 * n / (by["copy (reference)"]["median_us"] / 1e6) / 1e9
        for k, r in by.items():
            assert r["device"] == "cpu" and r["params"] == n
            assert r["median_us"] > 0 and math.isfinite(r["median_us"]), k
            assert r["repeats"] == 30 and r["timed_steps"] == 30  # one timed step per burst of 2
            moved = 16 * n if k == "copy (reference)" else bench_optim.BYTES_PER_PARAM * n
            assert r["gb_s"] == pytest.approx(moved / (r["median_us"] / 1e6) / 1e9)
            assert r["pct_of_copy_bw"] == pytest.approx(100 * r["gb_s"] / copy_gbs)
            if k == "copy (reference)":
                assert r["speedup_vs_torch_fused"] is None
            else:
                assert r["speedup_vs_torch_fused"] == pytest.approx(by["torch fused"]["median_us"] / r["median_us"])
    run = saved["run"]
    assert run["command"] == shlex.join(["python", "bench/bench_optim.py", "--quick", "--device", "cpu", "--burst", "2",
                                         "--json", out.name])
    assert run["fastmlp"] == fastmlp.__version__ and run["torch"] == torch.__version__
    assert "threads" in saved["machine"] and os.listdir(tmp_path) == ["optim.json"]


def test_bench_optim_candidates_compute_the_same_update():
    """The timed candidates are the same AdamW step: after the same steps on the same gradients
    every candidate's parameters and moments agree with torch's for-loop."""
    shapes = [(6, 5), (6,), (4, 4)]
    fns = bench_optim.make_candidates(shapes, "cpu")
    assert list(fns) == OPTIM_CANDIDATES[:-1]
    for fn in fns.values():  # (make_candidates took one step already)
        for _ in range(3):
            fn()
    opts = {k: fn.__self__ for k, fn in fns.items()}
    assert type(opts["fastmlp"]) is fastmlp.optim.AdamW
    ref = opts["torch for-loop"]
    ref_params = ref.param_groups[0]["params"]
    start = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=start) * 0.1 for s in shapes]  # the script's starting values
    for k, opt in opts.items():
        params = opt.param_groups[0]["params"]
        for p, r, b in zip(params, ref_params, base):
            assert not torch.equal(p.detach(), b), k  # it stepped (4 steps of lr 1e-3)
            torch.testing.assert_close(p.detach(), r.detach(), msg=k)
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt.state[p][key], ref.state[r][key], msg=f"{k} {key}")
            assert opt.state[p]["step"].item() == 4


EMA_CANDIDATES = ["torch AveragedModel", "torch _foreach_lerp_", "torch.compile lerp", "fastmlp EMA", "floor"]


def test_bench_ema_tiny_run(tmp_path, monkeypatch):
    tiny = {"tiny mlp": [(6, 5), (6,), (3, 6), (3,)], "3 x 4x4": [(4, 4)] * 3}
    monkeypatch.setattr(bench_ema, "cases", lambda: tiny)
    out = tmp_path / "ema.json"
    bench_ema.main(["--repeats", "20", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["complete"] is True and [r["case"] for r in saved["rows"]] == list(tiny)
    for r in saved["rows"]:
        t = {k: r[f"{k}_us"] for k in EMA_CANDIDATES}
        assert all(v > 0 and math.isfinite(v) for v in t.values())
        assert r["params"] == sum(torch.Size(s).numel() for s in tiny[r["case"]])
        assert r["speedup_vs_averaged_model"] == pytest.approx(t["torch AveragedModel"] / t["fastmlp EMA"])
        assert r["speedup_vs_compiled"] == pytest.approx(t["torch.compile lerp"] / t["fastmlp EMA"])
        assert r["fastmlp_gb_s"] == pytest.approx(12 * r["params"] / (t["fastmlp EMA"] / 1e6) / 1e9)
    assert saved["run"]["command"] == shlex.join(["python", "bench/bench_ema.py", "--repeats", "20", "--json", out.name])


def test_bench_ema_candidates_compute_the_same_average():
    """Every timed candidate is the same EMA: after the same updates towards weights that moved, the
    averages agree with a float64 reference."""
    shapes = [(6, 5), (6,), (40, 3)]
    fns, models, averages = bench_ema.candidates(shapes)
    assert list(fns) == EMA_CANDIDATES
    ref = [p.detach().double().clone() for p in bench_ema.module_of(shapes).parameters()]
    for step in range(3):
        for k, m in models.items():
            with torch.no_grad():
                for i, p in enumerate(m.parameters()):
                    p.fill_(step + i)  # the weights move between updates, alike for every candidate
            fns[k]()
        ref = [r * bench_ema.DECAY + (step + i) * (1 - bench_ema.DECAY) for i, r in enumerate(ref)]
    for k, read in averages.items():
        for a, r in zip(read(), ref):
            torch.testing.assert_close(a.double(), r, rtol=1e-6, atol=1e-7, msg=k)


def test_bench_dropout_tiny_run(tmp_path):
    out = tmp_path / "dropout.json"
    bench_dropout.main(["--shapes", "4x8", "--p", "0.3", "--repeats", "20", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["complete"] is True and saved["repeats"] == 20
    assert [(r["shape"], r["mode"], r["p"]) for r in saved["rows"]] == [("4x8", "fwd", 0.3), ("4x8", "fwdbwd", 0.3)]
    for r in saved["rows"]:
        for k in ("native_ms", "compiled_ms", "fastmlp_ms", "floor_ms"):
            assert r[k] > 0 and math.isfinite(r[k]), k
        assert r["speedup_vs_native"] == pytest.approx(r["native_ms"] / r["fastmlp_ms"])
        assert r["speedup_vs_compiled"] == pytest.approx(r["compiled_ms"] / r["fastmlp_ms"])
    run = saved["run"]
    assert run["command"] == shlex.join(["python", "bench/bench_dropout.py", "--shapes", "4x8", "--p", "0.3", "--repeats",
                                         "20", "--json", out.name])
    assert run["fastmlp"] == fastmlp.__version__ and run["torch"] == torch.__version__
    assert os.listdir(tmp_path) == ["dropout.json"]


def test_bench_dropout_candidates_are_dropout():
    """Each timed candidate is dropout at p: outputs 0 or x / (1 - p), about p of them 0 (the
    floor candidate returns a copy of x); in fwdbwd, the input's gradient has that keep rate too."""
    p = 0.3
    torch.manual_seed(0)
    for mode in ("fwd", "fwdbwd"):
        fns = bench_dropout.candidates(64, 96, p, mode)
        assert set(fns) == {"native", "compiled", "fastmlp", "floor"}
        x = fns["floor"]()
        assert x.shape == (64, 96)
        for name in ("native", "compiled", "fastmlp"):
            y = fns[name]()
            if mode == "fwdbwd":
                (y,) = y  # the input's gradient
            assert y.shape == (64, 96), name
            kept = y != 0
            assert 0.6 < kept.float().mean().item() < 0.8, name
            if mode == "fwd":
                torch.testing.assert_close(y[kept], x[kept] / (1 - p), msg=name)


def test_bench_norm_tiny_run(tmp_path):
    out = tmp_path / "norm.json"
    bench_norm.main(["--shapes", "4x8", "--repeats", "20", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["complete"] is True and saved["threads"] == torch.get_num_threads()
    assert [(r["norm"], r["shape"], r["mode"]) for r in saved["rows"]] == [
        (n, "4x8", m) for n in ("layer", "batch") for m in ("fwd", "fwdbwd")]
    for r in saved["rows"]:
        kernels = ("native_kernels_ms", "fastmlp_kernels_ms") if r["mode"] == "fwdbwd" else ()
        for k in ("native_ms", "compiled_ms", "fastmlp_ms", "floor_ms", *kernels):
            assert r[k] > 0 and math.isfinite(r[k]), k
        assert r["speedup_vs_native"] == pytest.approx(r["native_ms"] / r["fastmlp_ms"])
        assert r["speedup_vs_compiled"] == pytest.approx(r["compiled_ms"] / r["fastmlp_ms"])
        if kernels:
            assert r["kernels_speedup"] == pytest.approx(r["native_kernels_ms"] / r["fastmlp_kernels_ms"])
    with pytest.raises(SystemExit):
        bench_norm.main(["--norms", "group"])


@pytest.mark.parametrize("norm", bench_norm.NORMS)
def test_bench_norm_candidates_compute_the_same_norm(norm):
    """Every timed candidate is the same norm: equal outputs, and in fwdbwd equal gradients."""
    torch.manual_seed(0)
    for mode in ("fwd", "fwdbwd"):
        fns = bench_norm.candidates(norm, 64, 96, mode)
        kernels = {"native kernels", "fastmlp kernels"} if mode == "fwdbwd" else set()
        assert set(fns) == {"native", "compiled", "fastmlp", "floor"} | kernels
        assert fns["floor"]().shape == (64, 96)
        ref = fns["native"]()
        for name in ("compiled", "fastmlp", *sorted(kernels)):
            got = fns[name]()
            for a, b in zip(got if mode == "fwdbwd" else [got], ref if mode == "fwdbwd" else [ref]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def _event(name, start, end):
    return types.SimpleNamespace(name=name, time_range=types.SimpleNamespace(start=start, end=end))


def test_gpu_profile_per_call_counts_and_times_device_events():
    # Two calls of: gemm, epilogue, gemm (the second call's events interleaved as a profiler lists them).
    events = [_event("gemm", 0, 10), _event("epi", 10, 12), _event("gemm", 12, 20),
              _event("gemm", 30, 40), _event("epi", 40, 43), _event("gemm", 43, 50)]
    launches, device_us, kernels = gpu_profile.per_call(events, iters=2)
    assert launches == 3
    assert device_us == pytest.approx((10 + 2 + 8 + 10 + 3 + 7) / 2)
    assert kernels == [["gemm", 2, (10 + 8 + 10 + 7) / 2], ["epi", 1, (2 + 3) / 2]]


def test_bwd_prologue_sweep_case_on_the_cpu(monkeypatch):
    # The sweep's bookkeeping, run through the CPU kernels (the grid switches only matter on CUDA):
    # every setting is timed once with its switches set, the bias gradient is compared with the
    # default's, and the switches are put back.
    seen = []

    def fake_us(fn, match, iters=20):
        seen.append((match, os.environ.get("FASTMLP_BWD_BLOCKS_PER_SM"), os.environ.get("FASTMLP_BWD_MIN_ROWS")))
        fn()
        return 2.0

    monkeypatch.setattr(bwd_prologue_sweep, "kernel_us", fake_us)
    for k in bwd_prologue_sweep.ENV:  # restored (unset) after the test, whatever the sweep sets
        monkeypatch.setenv(k, "4")
    grid = [(4, 4), (8, 1)]
    for act in ("relu", "gelu"):
        c = bwd_prologue_sweep.sweep_case(96, 40, torch.float32, act, grid, in_f=8, device="cpu")
        assert [(s["blocks_per_sm"], s["min_rows"]) for s in c["settings"]] == grid
        assert c["bytes"] == 3 * 96 * 40 * 4 and c["eager_us"] == 2.0
        for s in c["settings"]:
            assert s["us"] == 2.0 and s["gb_s"] == pytest.approx(c["bytes"] / 2.0 / 1e3)
            assert s["db_max_rel_diff_vs_default"] == 0.0  # the CPU ignores the switches
    assert seen[:3] == [("bwd_prologue_kernel", "4", "4"), ("bwd_prologue_kernel", "8", "1"), (None, "4", "4")]


def test_bwd_prologue_sweep_kernel_us_picks_the_named_kernel(monkeypatch):
    kernels = [["gemm", 1.0, 40.0], ["bwd_prologue_kernel", 1.0, 25.5], ["reduce_kernel[sum]", 1.0, 3.0]]
    monkeypatch.setattr(gpu_profile, "profile_fn", lambda fn, device, iters: (3.0, 68.5, kernels, []))
    assert bwd_prologue_sweep.kernel_us(None, "bwd_prologue_kernel") == 25.5
    assert bwd_prologue_sweep.kernel_us(None, None) == 68.5
    with pytest.raises(RuntimeError, match="no CUDA kernel named"):
        bwd_prologue_sweep.kernel_us(None, "fwd_epilogue_kernel")


def test_bwd_prologue_sweep_arguments(capsys):
    for argv, err in ((["--shapes", "4x"], "expected ROWSxCOLS items"), (["--min-rows", "0"], "expected positive"),
                      (["--dtypes", "int8"], "unknown 'int8'"), (["--activations", "silu"], "unknown 'silu'")):
        with pytest.raises(SystemExit):
            bwd_prologue_sweep.main(argv)
        assert err in capsys.readouterr().err
    if not (torch.cuda.is_available() and fastmlp.WITH_CUDA):
        with pytest.raises(SystemExit):
            bwd_prologue_sweep.main([])
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_gpu_profile_short_kernel_names():
    short = gpu_profile.short_kernel_name
    assert short("void fastmlp::cuda::(anonymous namespace)::bwd_prologue_kernel<(fastmlp::Act)1, "
                 "__nv_bfloat16, 8>(fastmlp::cuda::BwdPrologueParams)") == "bwd_prologue_kernel"
    assert short("nvjet_sm90_tst_64x8_64x16_2x4_h_bz_bias_TNT") == "nvjet_sm90_tst_64x8_64x16_2x4_h_bz_bias_TNT"
    # ATen's generic kernels are told apart by the op in their template arguments.
    gelu = ("void at::native::vectorized_elementwise_kernel<8, at::native::GeluCUDAKernelImpl("
            "at::TensorIteratorBase&, at::native::GeluType)::{lambda()#2}>(int)")
    assert short(gelu) == "vectorized_elementwise_kernel[gelu]"
    assert short(gelu.replace("GeluCUDA", "GeluBackwardCUDA")) == "vectorized_elementwise_kernel[gelubackward]"
    assert short("void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float, at::native::func_wrapper_t<"
                 "float, at::native::sum_functor<float, float, float>>>>(int)") == "reduce_kernel[sum]"
    assert short("Memset (Device)") == "Memset"


def test_gpu_profile_runs_every_candidate_on_the_cpu(tmp_path):
    out = tmp_path / "profile.json"
    gpu_profile.main(["--device", "cpu", "--shapes", "4x8x6", "--dtypes", "float32", "--activations", "relu",
                      "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["complete"] is True
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


def test_gpu_profile_variants_measured_under_their_switches(monkeypatch):
    # A variant (fastmlp with an opt-in switch) is timed with its switches set, which are put back
    # afterwards, and its device time is summarised against fastmlp's and the floor's.
    monkeypatch.setenv("FASTMLP_LT_BGRAD", "0")
    seen = []

    def fake_profile(fn, device, iters=5):
        seen.append(os.environ.get("FASTMLP_LT_BGRAD"))
        return 5.0, {"fastmlp": 100.0, "fastmlp_bgrad": 90.0, "floor": 80.0}.get(fn(), 120.0), [], []

    monkeypatch.setattr(gpu_profile, "profile_fn", fake_profile)
    monkeypatch.setattr(gpu_profile, "host_and_wall", lambda fn, device: (1e-6, 2e-4))
    names = ("fastmlp", "eager", "compiled", "floor", "autograd_floor", "fastmlp_bgrad")
    monkeypatch.setattr(gpu_profile, "candidates", lambda *a: {n: (lambda n=n: n) for n in names})
    row = gpu_profile.measure_row(4096, 2048, 2048, "relu", "bfloat16", "cuda")
    assert seen == ["0", "0", "0", "0", "0", "1"] and os.environ["FASTMLP_LT_BGRAD"] == "0"
    (item,) = gpu_profile.summarise([row])["compute_bound"]
    v = item["variants"]["fastmlp_bgrad"]
    assert v["device_over_fastmlp"] == pytest.approx(0.9) and v["device_over_floor"] == pytest.approx(90 / 80)
    assert item["device_over_floor"] == pytest.approx(100 / 80)
    monkeypatch.delenv("FASTMLP_LT_BGRAD")
    with gpu_profile.env_set({"FASTMLP_LT_BGRAD": "1"}):
        assert os.environ["FASTMLP_LT_BGRAD"] == "1"
    assert "FASTMLP_LT_BGRAD" not in os.environ


def test_gpu_profile_rejects_bad_shapes(capsys):
    with pytest.raises(SystemExit):
        gpu_profile.main(["--device", "cpu", "--shapes", "4x8"])
    assert "BATCHxINxOUT" in capsys.readouterr().err


# bench/gpu_check.sh runs only on a lent GPU, once, so its control flow is checked here with a
# stand-in for python3 (PYTHON=...) that logs each call and exits with the status a case asks for.
STUB_PYTHON = r"""#!/usr/bin/env bash
echo "${FASTMLP_LT_BGRAD:+[FASTMLP_LT_BGRAD=$FASTMLP_LT_BGRAD] }$*" >> "$STUB_LOG"
case "$*" in
    -) cat > /dev/null; echo "torch stub" ;;
    *get_device_capability*) echo 9.0 ;;
    *"setup.py"*) exit "${STUB_BUILD_RC:-0}" ;;
    *"-m cuda"*) exit "${STUB_TESTS_RC:-0}" ;;
    *"bad_inputs or device_mismatch"*) exit "${STUB_ERRORS_RC:-0}" ;;
    *"-k smoke"*) sleep "${STUB_SMOKE_SLEEP:-0}" ;;
esac
exit 0
"""
GPU_CHECK_STEPS = ["build", "errors", "smoke", "tests", "bench_linear_act", "bench_optim", "profile", "bench_mlp",
                   "sweep"]


def run_gpu_check(tmp_path, *args, **env):
    import shutil
    import subprocess

    root = tmp_path / "repo"  # the script deletes fastmlp/_C*.so of the tree it sits in
    (root / "bench").mkdir(parents=True)
    (root / "fastmlp").mkdir()
    shutil.copy(os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_check.sh"), root / "bench")
    stub = tmp_path / "python3"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    out = tmp_path / "out"
    full_env = dict(os.environ, PYTHON=str(stub), STUB_LOG=str(log), **{k: str(v) for k, v in env.items()})
    proc = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), str(out), *args], env=full_env,
                          capture_output=True, text=True, timeout=120)
    summary = {line.split()[0]: line.split()[1] for line in (out / "summary.txt").read_text().splitlines()}
    return proc, summary, log.read_text().splitlines(), (out / "gpu_check.log").read_text()


def test_gpu_check_runs_every_step_and_leaves_smoke_out_of_the_grid(tmp_path):
    proc, summary, calls, _ = run_gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(summary) == GPU_CHECK_STEPS and set(summary.values()) == {"rc=0"}
    grid = [c for c in calls if "-m cuda" in c]
    assert len(grid) == 1 and "-k not smoke --junitxml" in grid[0]


def test_gpu_check_reruns_the_grid_under_switches_when_asked(tmp_path):
    # GPU_CHECK_GRID_ENV: one more step after the profile, the linear_act grid with those settings
    # in its environment (and only there), without the smoke, error and compile tests.
    proc, summary, calls, _ = run_gpu_check(tmp_path, GPU_CHECK_GRID_ENV="FASTMLP_LT_BGRAD=1 FASTMLP_OTHER=0",
                                            STUB_TESTS_RC=0)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = GPU_CHECK_STEPS[:GPU_CHECK_STEPS.index("profile") + 1] + ["tests_with_env", "bench_mlp", "sweep"]
    assert list(summary) == steps and set(summary.values()) == {"rc=0"}
    switched = [c for c in calls if c.startswith("[FASTMLP_LT_BGRAD=1] ")]
    assert len(switched) == 1 and "-m cuda tests/test_linear_act.py tests/test_linear_act_cuda.py" in switched[0]
    assert "not smoke and not bgrad and not compile" in switched[0]
    assert sum("-m cuda" in c for c in calls) == 2  # the plain grid ran without the switch
    # A failing grid under the switch fails the check.
    proc, summary, _, _ = run_gpu_check(tmp_path / "b", GPU_CHECK_GRID_ENV="FASTMLP_LT_BGRAD=1", STUB_TESTS_RC=1)
    assert proc.returncode == 1 and summary["tests_with_env"] == "rc=1"


def test_gpu_check_keeps_going_after_an_error_crash_and_a_failed_grid(tmp_path):
    # A segfault in the error tests (as on the H200 in session 1) and failing grid tests: every
    # later step still runs, the grid leaves the error tests out, and the script exits non-zero.
    proc, summary, calls, log = run_gpu_check(tmp_path, STUB_ERRORS_RC=139, STUB_TESTS_RC=1)
    assert proc.returncode == 1
    assert list(summary) == GPU_CHECK_STEPS
    assert summary["errors"] == "rc=139" and summary["tests"] == "rc=1" and summary["bench_mlp"] == "rc=0"
    grid = [c for c in calls if "-m cuda" in c]
    assert len(grid) == 1 and "not smoke and not (bad_inputs or device_mismatch or raises)" in grid[0]
    assert "errors crashed" in log


def test_gpu_check_fail_fast_stops_but_not_for_the_errors_diagnosis(tmp_path):
    proc, summary, _, _ = run_gpu_check(tmp_path, "--fail-fast", STUB_ERRORS_RC=1, STUB_TESTS_RC=1)
    assert proc.returncode == 1
    assert list(summary) == ["build", "errors", "smoke", "tests"]
    proc, summary, _, _ = run_gpu_check(tmp_path / "b", STUB_BUILD_RC=2)  # a failed build always stops
    assert proc.returncode == 2 and list(summary) == ["build"]


def test_gpu_check_keeps_within_its_budget(tmp_path):
    # 32 s budget, 10 s reserved for killing a step: smoke's 90 s limit is cut to the ~22 s left, it
    # sleeps 9 s, and every later step finds < 15 s left: skipped as rc=124, not run.
    proc, summary, calls, _ = run_gpu_check(tmp_path, GPU_CHECK_BUDGET_S=32, STUB_SMOKE_SLEEP=9)
    assert proc.returncode == 1
    assert summary["smoke"] == "rc=0"
    assert all(summary[s] == "rc=124" for s in GPU_CHECK_STEPS[3:])
    assert not any("-m cuda" in c or "bench/" in c for c in calls)


def test_gpu_check_rejects_unknown_options(tmp_path):
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_check.sh")
    proc = subprocess.run(["bash", script, str(tmp_path / "out"), "--keep-goin"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown option --keep-goin" in proc.stderr


def test_train_compare_gathers_both_runs_per_seed(tmp_path):
    # Two real (tiny) `fastmlp train --compare` runs, gathered: per seed the torch and the fastmlp run's
    # summary, the per-seed speedup and the means, the command that reproduces it.
    from test_data import real_data_dir

    out = tmp_path / "compare.json"
    train = ["--data-dir", real_data_dir(), "--train-subset", "256", "--batch-size", "64", "--epochs", "1",
             "--widths", "784", "16", "10", "--progress", "off", "--monitor-every", "0", "--no-plots"]
    # As a script, from another folder and without PYTHONPATH (it finds fastmlp itself).
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "train_compare.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, script, "--seeds", "0,1", "--out", str(tmp_path / "runs"), "--json", str(out),
                    "--", *train], check=True, cwd=tmp_path, env=env)
    saved = json.loads(out.read_text())
    summary = saved["summary"]
    assert saved["complete"] is True
    assert saved["train_args"] == [common.portable_arg(a) for a in train] and "fashion-mnist" in saved["train_args"]
    assert [(r["impl"], r["seed"]) for r in saved["runs"]] == [("torch", 0), ("fastmlp", 0), ("torch", 1), ("fastmlp", 1)]
    for r in saved["runs"]:
        assert r["status"] == "completed" and r["epochs"] == 1 and len(r["test_acc_per_epoch"]) == 1
        assert 0 < r["final_test_acc"] <= 1 and r["seconds_per_epoch"] > 0
        assert (tmp_path / "runs" / r["run_folder"] / "summary.json").is_file()
    by = {(r["impl"], r["seed"]): r for r in saved["runs"]}
    for seed in (0, 1):
        for key, field in (("per_seed_speedup", "seconds_per_epoch"),
                           ("per_seed_speedup_of_median_epochs", "seconds_per_epoch_median")):
            assert summary[key][str(seed)] == pytest.approx(by["torch", seed][field] / by["fastmlp", seed][field])
    assert summary["mean_test_acc"]["fastmlp"] == pytest.approx(
        (by["fastmlp", 0]["final_test_acc"] + by["fastmlp", 1]["final_test_acc"]) / 2)
    assert summary["speedup_of_means"] == pytest.approx(
        summary["mean_seconds_per_epoch"]["torch"] / summary["mean_seconds_per_epoch"]["fastmlp"])
    assert summary["median_seconds_per_epoch"]["torch"] == pytest.approx(
        (by["torch", 0]["seconds_per_epoch_median"] + by["torch", 1]["seconds_per_epoch_median"]) / 2)
    assert summary["speedup_of_medians"] == pytest.approx(
        summary["median_seconds_per_epoch"]["torch"] / summary["median_seconds_per_epoch"]["fastmlp"])
    assert saved["run"]["command"].startswith("python bench/train_compare.py --seeds 0,1 --out runs --json compare.json -- ")


def test_train_compare_arguments_and_failures(tmp_path, capsys):
    for argv, err in ((["--seeds", "0,x"], "comma list of whole numbers"), (["--seeds", "1,1"], "distinct seeds")):
        with pytest.raises(SystemExit):
            train_compare.main(argv)
        assert err in capsys.readouterr().err
    # A training run that fails (here: an unknown option) stops the comparison with its error.
    with pytest.raises(Exception, match="returned non-zero exit status 2"):
        train_compare.main(["--seeds", "0", "--out", str(tmp_path), "--", "--no-such-option", "1"])
