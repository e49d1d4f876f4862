"""Step time of fastmlp.optim.AdamW against torch.optim.AdamW (for-loop, foreach, fused=True).

    python bench/bench_optim.py [--quick] [--device cpu|cuda|all] [--json PATH]

Cases: the 784-512-512-10 MLP (670k parameters in 6 tensors), 200 tensors of 64x64 (per-tensor
overhead), one 16M-parameter tensor (memory-bound). Candidates run interleaved in this process: per
repeat each runs a burst of --burst consecutive steps in turn, in rotating order, the first step of
each burst untimed; the table reports the median step. Repeats: 100 (16M tensor: 25) on the CPU,
200 on CUDA; --quick 30 (20) and 50.

Napkin math: an AdamW step reads p, g, m, v and writes p, m, v: 28 bytes per fp32 parameter. The
reference is the machine's copy bandwidth at the same working-set size (p, g, m, v: 16 bytes per
parameter), measured here in the same run with a tensor copy of that footprint; "% of copy" is
our GB/s over it. It is a yardstick, not a floor: a copy's counted 16 bytes leave out the
write-allocate traffic of its destination, so a step can exceed 100%. The MLP's state fits in a
large L3, the 16M tensor's does not.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastmlp  # noqa: E402
from common import cpu_model, gc_paused, write_json  # noqa: E402

BYTES_PER_PARAM = 28


def cases(quick):
    return {
        "mlp 784-512-512-10": [(512, 784), (512,), (512, 512), (512,), (10, 512), (10,)],
        "200 x 64x64": [(64, 64)] * 200,
        "1 x 16M": [(16 * 1024 * 1024,)],
    }


def make_candidates(shapes, device):
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 0.01 for s in shapes]

    def setup(make):
        # Each candidate its own copies (.to("cpu") of a CPU tensor would return the tensor itself).
        ps = [b.to(device, copy=True).requires_grad_() for b in base]
        for p, g in zip(ps, grads):
            p.grad = g.to(device, copy=True)
        opt = make(ps)
        opt.step()  # lazy state init outside the timing
        return opt

    cands = {
        "torch for-loop": setup(lambda ps: torch.optim.AdamW(ps, foreach=False)),
        "torch foreach": setup(lambda ps: torch.optim.AdamW(ps, foreach=True)),
        "torch fused": setup(lambda ps: torch.optim.AdamW(ps, fused=True)),
        "fastmlp": setup(lambda ps: fastmlp.optim.AdamW(ps)),
    }
    return {k: v.step for k, v in cands.items()}


def make_copy(n_params, device):
    # Same footprint as p, g, m, v (16 bytes per parameter): src and dst of 8 bytes per parameter.
    src = torch.randn(2 * n_params, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src), 16 * n_params


def bench_case(name, shapes, device, repeats, warmup, burst):
    n = sum(torch.Size(s).numel() for s in shapes)
    fns = make_candidates(shapes, device)
    copy_fn, copy_bytes = make_copy(n, device)
    fns["copy (reference)"] = copy_fn
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    # Interleaved bursts: each repeat runs every candidate for `burst` consecutive steps and keeps
    # the steps after the first, so that every candidate is timed in the steady state of a training
    # loop (its own state warm in the caches where it fits) and machine noise hits all of them alike.
    names = list(fns)
    with gc_paused():  # (as timeit does; see bench/common.py)
        for r in range(repeats):
            for k in names[r % len(names):] + names[:r % len(names)]:  # rotating order
                fn = fns[k]
                for b in range(burst):
                    sync()
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    if b > 0:
                        times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    copy_gbs = copy_bytes / med["copy (reference)"] / 1e9
    rows = []
    for k, t in med.items():
        is_copy = k == "copy (reference)"
        gbs = (copy_bytes if is_copy else BYTES_PER_PARAM * n) / t / 1e9
        rows.append({
            "device": device, "case": name, "params": n, "candidate": k, "median_us": t * 1e6,
            "gb_s": gbs,
            "speedup_vs_torch_fused": None if is_copy else med["torch fused"] / t,
            "pct_of_copy_bw": 100.0 * gbs / copy_gbs,
            "repeats": repeats, "timed_steps": len(times[k]),
        })
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (~1 minute)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "all"])
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--burst", type=int, default=4,
                    help="consecutive steps per candidate per repeat; the first of each burst is not "
                         "timed, so (burst - 1) x repeats steps are timed (default 4)")
    args = ap.parse_args(argv)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not (torch.cuda.is_available() and fastmlp.WITH_CUDA):
        if args.device == "cuda":
            sys.exit("--device cuda needs a GPU and fastmlp built with its CUDA kernels")
        devices.remove("cuda")
    machine = {
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if "cuda" in devices else None,
    }
    print(f"# fastmlp.optim.AdamW step time | CPU: {machine['cpu']} ({machine['threads']} threads)"
          f" | torch {machine['torch']}" + (f" | GPU: {machine['gpu']}" if machine["gpu"] else ""))
    print("# GB/s counts 28 bytes per parameter; copy (reference) moves 16 bytes per parameter at the same footprint")

    def save(rows, complete):
        if args.json:
            write_json(args.json, {"machine": machine, "quick": args.quick, "burst": args.burst, "rows": rows},
                       __file__, argv, complete)

    rows = []
    for device in devices:
        for name, shapes in cases(args.quick).items():
            big = name.startswith("1 x")
            if device == "cuda":
                repeats = 50 if args.quick else 200
            else:
                repeats = (20 if big else 30) if args.quick else (25 if big else 100)
            rows += bench_case(name, shapes, device, repeats, warmup=3, burst=args.burst)
            save(rows, complete=False)
    hdr = f"{'device':6} | {'case':20} | {'candidate':16} | {'median us':>10} | {'GB/s':>7} | {'vs fused':>8} | {'% of copy':>9}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        sp = "" if r["speedup_vs_torch_fused"] is None else f"{r['speedup_vs_torch_fused']:.2f}x"
        print(f"{r['device']:6} | {r['case']:20} | {r['candidate']:16} | {r['median_us']:10.1f} | "
              f"{r['gb_s']:7.1f} | {sp:>8} | {r['pct_of_copy_bw']:8.0f}%")
    save(rows, complete=True)


if __name__ == "__main__":
    main()
