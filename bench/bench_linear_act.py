"""Benchmark: fused linear + bias + activation vs nn.Linear + activation (eager and torch.compile).

For each shape (batch x in -> out), activation and dtype, in one process and interleaved:
  native    F.linear + activation, eager
  compiled  the same under torch.compile (a fresh compile per shape: torch._dynamo.reset(), so
            the compiled baseline never falls back to eager after the recompile limit)
  fastmlp   fastmlp.functional.linear_act
  floor     the GEMMs alone, in the layouts the op uses: X W^T (forward); dZ W and dZ^T X
            (backward). No implementation of the layer can beat it; "% of floor" is floor / time.
  kernels   (fwdbwd only) fastmlp's forward and backward ops called directly, without autograd:
            what the fused kernels cost. fastmlp minus kernels is the autograd engine's share
            (torch.autograd.grad and the graph), which every candidate but the floor pays.
  autograd floor  (fwdbwd only) the same three GEMMs issued through the autograd engine:
            torch.autograd.grad(torch.mm(x, Wt), (x, Wt), g) with Wt = W^T a leaf (a view of W's
            memory), whose one MmBackward node runs g W and (g^T x)^T, the op's layouts. The least
            any one-node autograd op of this layer can take; fastmlp / autograd floor is what the
            fusion itself costs over bare GEMMs.

Forward+backward ("fwdbwd") runs the forward and autograd.grad for input, weight and bias (a
hidden layer: all three gradients). Each sample times enough calls to last >= 2 ms; candidates
are interleaved in rotating order and the median of --repeats samples is reported.

    python bench/bench_linear_act.py --quick              # the target grid, a few minutes on 2 cores
    python bench/bench_linear_act.py --json out.json      # the full grid
    python bench/bench_linear_act.py --device cuda --quick
"""

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fastmlp  # noqa: E402
from common import add_repeats_arg, check_repeats, machine_name, time_interleaved, write_json  # noqa: E402
from fastmlp import ops as fm_ops  # noqa: E402
from fastmlp.functional import linear_act  # noqa: E402

NATIVE_ACT = {
    "none": lambda t: t,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def candidates(batch, in_f, out_f, act, dtype, device, mode):
    x = torch.randn(batch, in_f, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(out_f, in_f, device=device) / in_f**0.5).to(dtype).requires_grad_()
    b = torch.randn(out_f, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(batch, out_f, device=device, dtype=dtype)
    xd, wd, gd = x.detach(), w.detach(), g.detach()

    def native(x, w, b):
        return NATIVE_ACT[act](F.linear(x, w, b))

    def fused(x, w, b):
        return linear_act(x, w, b, act)

    torch._dynamo.reset()
    compiled = torch.compile(native, dynamic=False)

    if mode == "fwd":
        with_grad = lambda f: (lambda: f(xd, wd, b.detach()))  # noqa: E731
        floor = lambda: torch.mm(xd, wd.t())  # noqa: E731
    else:
        with_grad = lambda f: (lambda: torch.autograd.grad(f(x, w, b), (x, w, b), g))  # noqa: E731

        def floor():
            torch.mm(xd, wd.t())
            torch.mm(gd, wd)
            torch.mm(gd.t(), xd)

        bd = b.detach()
        # W^T as a leaf of its own (a transposed view of W's memory): the graph holds the one MmBackward
        # node, whose backward runs g W and (g^T x)^T, the op's layouts. (torch.mm(x, w.t()) added a
        # TBackward node: 4-6% of this floor at 64 x 512.)
        wt = wd.t().requires_grad_()

        def autograd_floor():
            torch.autograd.grad(torch.mm(x, wt), (x, wt), g)

        def kernels():
            y, saved = fm_ops.linear_act_forward(xd, wd, bd, act, True)
            fm_ops.linear_act_backward(gd, xd, wd, y, saved, act, [True, True, True])

    fns = {"native": with_grad(native), "compiled": with_grad(compiled), "fastmlp": with_grad(fused), "floor": floor}
    if mode != "fwd":
        fns["kernels"] = kernels
        fns["autograd_floor"] = autograd_floor
    return fns


def run_grid(args, on_row=None):
    """The rows, measured in order; on_row(rows) after each (for partial results files)."""
    rows = []
    for dtype_name in args.dtypes:
        for act in args.activations:
            for batch in args.batches:
                for in_f, out_f in args.widths:
                    for mode in args.modes:
                        t, _ = time_interleaved(
                            candidates(batch, in_f, out_f, act, DTYPES[dtype_name], args.device, mode),
                            args.device, args.repeats, min_sample_s=args.min_sample_ms * 1e-3,
                        )
                        row = {
                            "shape": f"{batch}x{in_f}->{out_f}", "batch": batch, "in": in_f, "out": out_f,
                            "activation": act, "dtype": dtype_name, "mode": mode,
                            "native_ms": t["native"] * 1e3, "compiled_ms": t["compiled"] * 1e3,
                            "fastmlp_ms": t["fastmlp"] * 1e3, "floor_ms": t["floor"] * 1e3,
                        }
                        row["speedup_vs_native"] = t["native"] / t["fastmlp"]
                        row["speedup_vs_compiled"] = t["compiled"] / t["fastmlp"]
                        row["pct_of_floor"] = 100 * t["floor"] / t["fastmlp"]
                        if "kernels" in t:
                            row["kernels_ms"] = t["kernels"] * 1e3
                            row["kernels_pct_of_floor"] = 100 * t["floor"] / t["kernels"]
                            row["autograd_floor_ms"] = t["autograd_floor"] * 1e3
                            row["pct_of_autograd_floor"] = 100 * t["autograd_floor"] / t["fastmlp"]
                        rows.append(row)
                        print_row(row)
                        if on_row is not None:
                            on_row(rows)
    return rows


HEADER = (f"{'shape':>16} {'act':>9} {'dtype':>8} {'mode':>6} | {'native ms':>9} {'compiled ms':>11} {'fastmlp ms':>10} | "
          f"{'vs native':>9} {'vs compiled':>11} {'% of floor':>10} | {'kernels % of floor':>18} {'% of autograd floor':>19}")


def print_row(r):
    print(
        f"{r['shape']:>16} {r['activation']:>9} {r['dtype']:>8} {r['mode']:>6} | {r['native_ms']:9.3f} "
        f"{r['compiled_ms']:11.3f} {r['fastmlp_ms']:10.3f} | {r['speedup_vs_native']:8.2f}x "
        f"{r['speedup_vs_compiled']:10.2f}x {r['pct_of_floor']:9.1f}% | "
        + (f"{r['kernels_pct_of_floor']:17.1f}% {r['pct_of_autograd_floor']:18.1f}%" if "kernels_pct_of_floor" in r
           else f"{'-':>18} {'-':>19}"),
        flush=True,
    )


def geomean(xs):
    return math.exp(sum(math.log(v) for v in xs) / len(xs)) if xs else float("nan")


def summary(rows):
    out = {}
    for mode in sorted({r["mode"] for r in rows}):
        rs = [r for r in rows if r["mode"] == mode]
        out[mode] = {
            "geomean_fastmlp_over_floor": geomean([r["fastmlp_ms"] / r["floor_ms"] for r in rs]),
            "geomean_native_over_floor": geomean([r["native_ms"] / r["floor_ms"] for r in rs]),
            "geomean_compiled_over_floor": geomean([r["compiled_ms"] / r["floor_ms"] for r in rs]),
            "geomean_kernels_over_floor": (geomean([r["kernels_ms"] / r["floor_ms"] for r in rs])
                                           if all("kernels_ms" in r for r in rs) else None),
            "geomean_autograd_floor_over_floor": (geomean([r["autograd_floor_ms"] / r["floor_ms"] for r in rs])
                                                  if all("autograd_floor_ms" in r for r in rs) else None),
            "geomean_fastmlp_over_autograd_floor": (geomean([r["fastmlp_ms"] / r["autograd_floor_ms"] for r in rs])
                                                    if all("autograd_floor_ms" in r for r in rs) else None),
            "geomean_speedup_vs_native": geomean([r["speedup_vs_native"] for r in rs]),
            "geomean_speedup_vs_compiled": geomean([r["speedup_vs_compiled"] for r in rs]),
            "slower_than_native": [f"{r['shape']} {r['activation']} {r['dtype']}" for r in rs if r["speedup_vs_native"] < 1],
            "slower_than_compiled": [f"{r['shape']} {r['activation']} {r['dtype']}" for r in rs if r["speedup_vs_compiled"] < 1],
        }
    return out


def parse_widths(s):
    out = []
    for item in s.split(","):
        a, _, b = item.partition("->")
        out.append((int(a), int(b or a)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true",
                   help="the target grid only: batch 64/256/1024, widths 512->512 and 784->512, relu/gelu/silu, float32, fwdbwd")
    p.add_argument("--batches", default="64,256,1024,4096")
    p.add_argument("--widths", default="256,512,784->512,1024,2048", help="comma list of N (square) or IN->OUT")
    p.add_argument("--activations", default="relu,gelu,silu")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--modes", default="fwd,fwdbwd")
    add_repeats_arg(p)
    p.add_argument("--min-sample-ms", type=float, default=2.0,
                   help="each sample times enough back-to-back calls to last at least this long (default 2)")
    p.add_argument("--json", help="also write the rows and the summary here")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.widths, args.dtypes, args.modes = "64,256,1024", "512,784->512", "float32", "fwdbwd"
        if args.device == "cuda":
            # 4 shapes from launch-bound (64 x 512) to compute-bound (4096 x 2048).
            args.batches, args.widths, args.dtypes = "64,4096", "512,2048", "float32,bfloat16"
            args.activations = "relu,gelu"
    if not args.min_sample_ms > 0:
        p.error("--min-sample-ms must be positive")
    check_repeats(p, args)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    args.batches = [int(v) for v in args.batches.split(",")]
    args.widths = parse_widths(args.widths)
    args.activations = args.activations.split(",")
    args.dtypes = args.dtypes.split(",")
    args.modes = args.modes.split(",")
    for a in args.activations:
        if a not in NATIVE_ACT:
            p.error(f"--activations: unknown {a!r}; expected some of {', '.join(NATIVE_ACT)}")
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"--dtypes: unknown {d!r}; expected some of {', '.join(DTYPES)}")

    machine = machine_name(args.device)
    print(f"fastmlp {fastmlp.__version__} linear_act benchmark on {machine}")
    print(f"median of {args.repeats} interleaved samples of >= {args.min_sample_ms:g} ms; speedup = baseline time / fastmlp time; % of floor = GEMM-only time / fastmlp time")
    print(HEADER)
    def save(rows, complete):
        if args.json:
            write_json(args.json, {"machine": machine, "device": args.device, "torch": torch.__version__,
                                   "repeats": args.repeats, "min_sample_ms": args.min_sample_ms, "rows": rows, "summary": summary(rows)},
                       __file__, argv, complete)

    rows = run_grid(args, on_row=lambda rows: save(rows, complete=False))
    summ = summary(rows)
    for mode, s in summ.items():
        print(
            f"[{mode}] geomean time / floor: fastmlp {s['geomean_fastmlp_over_floor']:.3f}x, native "
            f"{s['geomean_native_over_floor']:.3f}x, compiled {s['geomean_compiled_over_floor']:.3f}x"
            + (f", fastmlp kernels without autograd {s['geomean_kernels_over_floor']:.3f}x; autograd floor "
               f"{s['geomean_autograd_floor_over_floor']:.3f}x, fastmlp over it {s['geomean_fastmlp_over_autograd_floor']:.3f}x"
               if s["geomean_kernels_over_floor"] is not None else "") + "; "
            f"slower than native: {len(s['slower_than_native'])}, slower than compiled: {len(s['slower_than_compiled'])}"
        )
    save(rows, complete=True)


if __name__ == "__main__":
    main()
