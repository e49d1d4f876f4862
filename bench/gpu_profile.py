"""Where a layer's forward + backward spends its time on the GPU: launches, device time, host time.

    python3 bench/gpu_profile.py [--json PATH] [--shapes 64x512x512,4096x2048x2048]

For relu and gelu in fp32 and bf16, at a launch-bound and a compute-bound shape, each candidate's
call (forward + torch.autograd.grad for input, weight and bias, as bench_linear_act.py times it):
  fastmlp         fastmlp.functional.linear_act
  eager           F.linear + activation
  compiled        the same under torch.compile (a fresh compile per row)
  floor           the three GEMMs alone (X W^T, dZ W, dZ^T X), no autograd
  autograd_floor  the same GEMMs through the autograd engine (torch.mm(x, Wt), Wt = W^T a leaf, and its grad)
  fastmlp_bgrad   (CUDA only) fastmlp with FASTMLP_LT_BGRAD=1 set while it is measured: the bias
                  gradient from the weight-gradient GEMM's BGRADB epilogue, an opt-in path that
                  becomes the default if it is faster here and passes the CUDA tests

and for each, per call:
  launches   CUDA kernels + memsets + copies seen by torch.profiler
  device_us  the sum of those kernels' durations: the GPU's work, whatever the host does
  host_us    CPU time to issue one call (k calls timed without synchronising, then one sync)
  wall_us    k calls and the final sync, per call: max(host, device) when they overlap
  kernels    each kernel's name with its launches and device us per call, in launch order
  host_ops   the CPU ops with the most self time under the profiler (where host_us goes)

Launch-bound calls are limited by host_us and launches; compute-bound ones by device_us, where
fastmlp's device_us / floor's device_us is the fusion's cost on the GPU itself. Runs on the CPU
too (--device cpu, for the tests): no kernels there, only host and wall time.
"""

import argparse
import collections
import contextlib
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_linear_act  # noqa: E402
from common import gc_paused, machine_name, sync, write_json  # noqa: E402

SHAPES = "64x512x512,4096x2048x2048"  # (batch, in, out): bench_linear_act --device cuda --quick's extremes
CANDIDATES = ("fastmlp", "eager", "compiled", "floor", "autograd_floor")
# fastmlp with opt-in switches of the CUDA op (read on every call) set while it is measured.
VARIANTS = {"fastmlp_bgrad": {"FASTMLP_LT_BGRAD": "1"}}


@contextlib.contextmanager
def env_set(env):
    """The environment variables in `env` set inside the block, put back as they were after it."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def parse_shapes(s):
    out = []
    for item in s.split(","):
        parts = [int(v) for v in item.lower().split("x")]
        if len(parts) != 3 or min(parts) < 1:
            raise argparse.ArgumentTypeError(f"--shapes: expected BATCHxINxOUT items, got {item!r}")
        out.append(tuple(parts))
    return out


def device_events(prof):
    """The profiler's device-side events (kernels, memsets, copies) in start order."""
    cuda = torch.autograd.DeviceType.CUDA
    events = [e for e in prof.events() if e.device_type == cuda]
    return sorted(events, key=lambda e: e.time_range.start)


def per_call(events, iters):
    """(launches, device microseconds, [[kernel, launches, device us], ...] in first-launch order),
    per call."""
    counts = collections.Counter(e.name for e in events)
    us = collections.Counter()
    for e in events:
        us[e.name] += e.time_range.end - e.time_range.start
    order = list(dict.fromkeys(e.name for e in events))
    device_us = sum(us.values())
    return len(events) / iters, device_us / iters, [[k, counts[k] / iters, us[k] / iters] for k in order]


# ATen's generic kernels, whose names say what they compute only inside their template arguments.
_GENERIC_KERNELS = ("vectorized_elementwise_kernel", "unrolled_elementwise_kernel", "elementwise_kernel",
                    "reduce_kernel")
_OP_WORDS = ("threshold", "clamp", "gelubackward", "gelu", "silubackward", "silu", "sigmoid", "tanh", "relu",
             "sum", "mean", "add", "mul", "div", "copy", "fill")


def short_kernel_name(name, width=48):
    """A kernel's name without its template arguments and namespaces, for the printed table; ATen's
    generic kernels get the first op word found in their arguments, e.g. reduce_kernel[sum]."""
    base = name.replace("(anonymous namespace)::", "").split("<", 1)[0].split("(", 1)[0].replace("void ", "").strip()
    base = base.rsplit("::", 1)[-1] or name
    if base in _GENERIC_KERNELS:
        lower = name.lower()
        hits = [(lower.find(w), -len(w), w) for w in _OP_WORDS if w in lower]
        if hits:
            base = f"{base}[{min(hits)[2]}]"  # the first word in the name, the longest there
    return base[:width]


def host_ops(prof, iters, top=12):
    """The CPU ops with the most self time, [[name, self us, calls], ...] per call (profiled, so
    inflated by the profiler's own cost: for where the host time goes, not for how much)."""
    cpu = torch.autograd.DeviceType.CPU
    ops = [e for e in prof.key_averages() if e.device_type == cpu and e.key != "cudaDeviceSynchronize"]
    ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [[e.key, e.self_cpu_time_total / iters, e.count / iters] for e in ops[:top]]


def profile_fn(fn, device, iters=5):
    """(launches, device us, kernels, host ops) per call; see per_call and host_ops."""
    for _ in range(3):
        fn()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        sync(device)
    return (*per_call(device_events(prof), iters), host_ops(prof, iters))


def host_and_wall(fn, device, calls=20, repeats=7):
    """Medians over `repeats` of: seconds to issue one call, seconds per call including the sync."""
    hosts, walls = [], []
    with gc_paused():
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            t1 = time.perf_counter()
            sync(device)
            t2 = time.perf_counter()
            hosts.append((t1 - t0) / calls)
            walls.append((t2 - t0) / calls)
    return statistics.median(hosts), statistics.median(walls)


def candidates(batch, in_f, out_f, act_name, dtype, device):
    """bench_linear_act's forward + backward callables for one row, under this script's names."""
    fns = bench_linear_act.candidates(batch, in_f, out_f, act_name, dtype, device, "fwdbwd")
    out = {name: fns["native" if name == "eager" else name] for name in CANDIDATES}
    if device == "cuda":
        out.update({name: out["fastmlp"] for name in VARIANTS})  # the same call, under VARIANTS[name]
    return out


def measure_row(batch, in_f, out_f, act_name, dtype_name, device):
    row = {"shape": [batch, in_f, out_f], "dtype": dtype_name, "activation": act_name}
    for name, fn in candidates(batch, in_f, out_f, act_name, bench_linear_act.DTYPES[dtype_name], device).items():
        with env_set(VARIANTS.get(name, {})):
            launches, device_us, kernels, ops = profile_fn(fn, device)
            host_s, wall_s = host_and_wall(fn, device)
        row[name] = {"launches": launches, "device_us": device_us, "host_us": host_s * 1e6,
                     "wall_us": wall_s * 1e6, "kernels": kernels, "host_ops": ops}
    return row


def launch_bound(row):
    # The definitions: launch-bound batch <= 1024 and width <= 1024; compute-bound
    # batch x width >= 1024 x 2048.
    batch, in_f, out_f = row["shape"]
    return batch <= 1024 and max(in_f, out_f) <= 1024


def summarise(rows):
    out = {"launch_bound": [], "compute_bound": []}
    for r in rows:
        f, e, fl = r["fastmlp"], r["eager"], r["floor"]
        item = {"row": f"{'x'.join(map(str, r['shape']))} {r['activation']} {r['dtype']}",
                "launches_fastmlp": f["launches"], "launches_eager": e["launches"],
                "fewer_launches_than_eager": f["launches"] < e["launches"],
                "wall_vs_eager": e["wall_us"] / f["wall_us"],
                "device_over_floor": f["device_us"] / fl["device_us"] if fl["device_us"] > 0 else None,
                "wall_over_floor": f["wall_us"] / fl["wall_us"],
                "host_bound": f["host_us"] >= f["device_us"],
                "variants": {name: {"launches": r[name]["launches"], "device_us": r[name]["device_us"],
                                    "device_over_fastmlp": (r[name]["device_us"] / f["device_us"]
                                                            if f["device_us"] > 0 else None),
                                    "device_over_floor": (r[name]["device_us"] / fl["device_us"]
                                                          if fl["device_us"] > 0 else None),
                                    "wall_over_fastmlp": r[name]["wall_us"] / f["wall_us"]}
                             for name in VARIANTS if name in r}}
        out["launch_bound" if launch_bound(r) else "compute_bound"].append(item)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shapes", type=parse_shapes, default=parse_shapes(SHAPES))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--activations", default="relu,gelu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    def save(rows, complete):
        if args.json:
            write_json(args.json, {"machine": machine_name(args.device), "torch": torch.__version__, "rows": rows,
                                   "summary": summarise(rows)}, __file__, argv, complete)

    rows = []
    print(f"{'shape':>16} {'dtype':>8} {'act':>4} | launches: {'fastmlp':>7} {'eager':>5} {'compiled':>8} "
          f"{'floor':>5} | device us: {'fastmlp':>7} {'eager':>7} {'floor':>7} | host us: {'fastmlp':>7} "
          f"{'eager':>7} {'ag floor':>8} | wall us: {'fastmlp':>7} {'eager':>7}")
    for batch, in_f, out_f in args.shapes:
        for dtype_name in args.dtypes.split(","):
            for act_name in args.activations.split(","):
                r = measure_row(batch, in_f, out_f, act_name, dtype_name, args.device)
                rows.append(r)
                save(rows, complete=False)
                print(f"{'x'.join(map(str, r['shape'])):>16} {dtype_name:>8} {act_name:>4} | "
                      f"{r['fastmlp']['launches']:17.1f} {r['eager']['launches']:5.1f} "
                      f"{r['compiled']['launches']:8.1f} {r['floor']['launches']:5.1f} | "
                      f"{r['fastmlp']['device_us']:18.1f} {r['eager']['device_us']:7.1f} {r['floor']['device_us']:7.1f} | "
                      f"{r['fastmlp']['host_us']:16.1f} {r['eager']['host_us']:7.1f} {r['autograd_floor']['host_us']:8.1f} | "
                      f"{r['fastmlp']['wall_us']:16.1f} {r['eager']['wall_us']:7.1f}", flush=True)
                if args.device == "cuda":
                    for name in ("fastmlp", *[v for v in VARIANTS if v in r], "eager"):
                        print(f"{'':>18}{name} kernels (us per call): " + "; ".join(
                            f"{short_kernel_name(k)} {t:.1f}" for k, _, t in r[name]["kernels"]))
    summary = summarise(rows)
    for kind, items in summary.items():
        for it in items:
            dev = f"{it['device_over_floor']:.3f}x" if it["device_over_floor"] is not None else "-"
            print(f"{kind:>13}: {it['row']:>28}: launches {it['launches_fastmlp']:.0f} vs eager "
                  f"{it['launches_eager']:.0f}; wall {it['wall_vs_eager']:.2f}x eager; device time {dev} "
                  f"the floor's; {'host' if it['host_bound'] else 'device'}-bound")
            for name, v in it["variants"].items():
                ratio = f"{v['device_over_fastmlp']:.3f}x" if v["device_over_fastmlp"] is not None else "-"
                print(f"{'':>15}{name}: launches {v['launches']:.0f}, device time {ratio} fastmlp's, "
                      f"wall {v['wall_over_fastmlp']:.3f}x")
    save(rows, complete=True)


if __name__ == "__main__":
    main()
