"""Benchmark: fastmlp.functional.dropout vs torch's dropout (eager and torch.compile), on the CPU.

For each activation shape (batch x width), in one process and interleaved (the protocol of
bench_linear_act.py): forward, and forward+backward (autograd.grad of the input). The floor is a
copy of the tensor (read it, write the output): a forward cannot move less memory, and a
forward+backward, two such passes, not less than twice the floor column.

    python bench/bench_dropout.py                 # p = 0.2, the training recipe's rate
    python bench/bench_dropout.py --json out.json

torch's CPU dropout draws its Bernoulli mask with the generator on one thread and saves it for the
backward; fastmlp's mask is a hash of (seed, element index), computed on every core, regenerated in
the backward instead of saved (csrc/cpu/dropout.cpp).
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fastmlp  # noqa: E402
from common import add_repeats_arg, check_repeats, machine_name, time_interleaved, write_json  # noqa: E402
from fastmlp.functional import dropout  # noqa: E402


def candidates(batch, width, p, mode):
    x = torch.randn(batch, width, requires_grad=True)
    g = torch.randn(batch, width)
    xd = x.detach()
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: F.dropout(t, p, training=True), dynamic=False)
    fns = {"native": lambda t: F.dropout(t, p, training=True), "compiled": compiled,
           "fastmlp": lambda t: dropout(t, p, training=True)}
    if mode == "fwd":
        out = {k: (lambda f=f: f(xd)) for k, f in fns.items()}
    else:
        out = {k: (lambda f=f: torch.autograd.grad(f(x), x, g)) for k, f in fns.items()}
    out["floor"] = lambda: xd.clone()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--p", type=float, default=0.2)
    ap.add_argument("--shapes", default="256x512,1024x512,4096x2048", help="comma list of BATCHxWIDTH")
    add_repeats_arg(ap)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    check_repeats(ap, args)
    if not 0.0 < args.p < 1.0:
        ap.error(f"--p must be in (0, 1), got {args.p}")
    machine = machine_name("cpu")
    print(f"fastmlp {fastmlp.__version__} dropout benchmark (p = {args.p}) on {machine}")
    print(f"median of {args.repeats} interleaved samples; floor = a copy of the tensor")
    hdr = f"{'shape':>10} {'mode':>6} | {'native ms':>9} {'compiled ms':>11} {'fastmlp ms':>10} {'floor ms':>8} | {'vs native':>9} {'vs compiled':>11}"
    print(hdr)
    def save(rows, complete):
        if args.json:
            write_json(args.json, {"machine": machine, "torch": torch.__version__, "repeats": args.repeats,
                                   "rows": rows}, __file__, argv, complete)

    rows = []
    for shape in args.shapes.split(","):
        batch, width = (int(v) for v in shape.split("x"))
        for mode in ("fwd", "fwdbwd"):
            t, _ = time_interleaved(candidates(batch, width, args.p, mode), "cpu", args.repeats)
            row = {"shape": shape, "mode": mode, "p": args.p, **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                   "speedup_vs_native": t["native"] / t["fastmlp"], "speedup_vs_compiled": t["compiled"] / t["fastmlp"]}
            rows.append(row)
            save(rows, complete=False)
            print(f"{shape:>10} {mode:>6} | {row['native_ms']:9.3f} {row['compiled_ms']:11.3f} {row['fastmlp_ms']:10.3f} "
                  f"{row['floor_ms']:8.3f} | {row['speedup_vs_native']:8.2f}x {row['speedup_vs_compiled']:10.2f}x", flush=True)
    save(rows, complete=True)


if __name__ == "__main__":
    main()
