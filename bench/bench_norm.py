"""Benchmark: fastmlp's layer norm and batch norm vs torch's (eager and torch.compile), on the CPU.

For each norm and activation shape (batch x features), in one process and interleaved (the protocol
of bench_linear_act.py): forward, and forward+backward (autograd.grad of the input, weight and
bias), each candidate a norm with a weight and a bias, batch norm in training mode (batch
statistics) as in a training step. Forward+backward also times the forward and backward ops called
directly ("kernels": torch's native_*_norm and *_backward, and fastmlp's), which leaves out the
autograd engine's fixed cost. The floor is a copy of the tensor (read it, write the output): no
norm's forward moves less memory, and a forward+backward, at least two passes, not less than twice
the floor column.

    python bench/bench_norm.py
    python bench/bench_norm.py --json bench/results/norm_cpu.json

torch's CPU norms for (batch, features) inputs make several passes over the tensor (and batch
norm's backward several more); fastmlp's kernels (csrc/cpu/norm.cpp) read each input once per pass
they need, work on rows while they sit in L1, and run on every core.
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
from fastmlp.functional import batch_norm, layer_norm  # noqa: E402

NORMS = ("layer", "batch")


def norm_fns(norm, width):
    """{candidate: fn(x, weight, bias)} for one norm: torch's functional, it compiled, fastmlp's."""
    if norm == "layer":
        native = lambda x, w, b: F.layer_norm(x, (width,), w, b)  # noqa: E731
        ours = lambda x, w, b: layer_norm(x, width, w, b)  # noqa: E731
    else:
        native = lambda x, w, b: F.batch_norm(x, None, None, w, b, True)  # noqa: E731
        ours = lambda x, w, b: batch_norm(x, None, None, w, b, True)  # noqa: E731
    torch._dynamo.reset()
    return {"native": native, "compiled": torch.compile(native, dynamic=False), "fastmlp": ours}


def candidates(norm, batch, width, mode):
    x = torch.randn(batch, width, requires_grad=True)
    w = (1 + 0.1 * torch.randn(width)).requires_grad_()
    b = (0.1 * torch.randn(width)).requires_grad_()
    g = torch.randn(batch, width)
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    fns = norm_fns(norm, width)
    if mode == "fwd":
        out = {k: (lambda f=f: f(xd, wd, bd)) for k, f in fns.items()}
    else:
        out = {k: (lambda f=f: torch.autograd.grad(f(x, w, b), (x, w, b), g)) for k, f in fns.items()}
        out.update(kernel_fns(norm, xd, wd, bd, g))
    out["floor"] = lambda: xd.clone()
    return out


def kernel_fns(norm, x, w, b, g):
    """The forward and backward ops called directly, without autograd: torch's native ones and
    fastmlp's. torch.autograd.grad itself costs ~0.3 ms per call on the 2-core VM, whatever the
    graph (a one-multiply graph included), which the autograd rows above carry and these do not."""
    A, width = torch.ops.aten, x.shape[1]
    mask = [True, True, True]
    if norm == "layer":
        def native():
            _, mean, rstd = A.native_layer_norm(x, [width], w, b, 1e-5)
            return A.native_layer_norm_backward(g, x, [width], mean, rstd, w, b, mask)

        def ours():
            _, mean, rstd = fastmlp.ops.layer_norm(x, [width], w, b, 1e-5)
            return fastmlp.ops.layer_norm_backward(g, x, [width], mean, rstd, w, mask)
    else:
        def native():
            _, mean, invstd = A.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5)
            return A.native_batch_norm_backward(g, x, w, None, None, mean, invstd, True, 1e-5, mask)

        def ours():
            _, mean, invstd, _ = fastmlp.ops.batch_norm(x, w, b, 1e-5)
            return fastmlp.ops.batch_norm_backward(g, x, mean, invstd, w, mask)
    return {"native kernels": native, "fastmlp kernels": ours}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--norms", default=",".join(NORMS), help="comma list of: layer, batch")
    ap.add_argument("--shapes", default="64x512,256x512,1024x1024,4096x64", help="comma list of BATCHxWIDTH")
    add_repeats_arg(ap)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    check_repeats(ap, args)
    norms = args.norms.split(",")
    if any(n not in NORMS for n in norms):
        ap.error(f"--norms takes a comma list of {', '.join(NORMS)}, got {args.norms!r}")
    machine = machine_name("cpu")
    print(f"fastmlp {fastmlp.__version__} norm benchmark on {machine} ({torch.get_num_threads()} threads)")
    print(f"median of {args.repeats} interleaved samples; floor = a copy of the tensor")
    print(f"{'norm':>5} {'shape':>10} {'mode':>6} | {'native ms':>9} {'compiled ms':>11} {'fastmlp ms':>10} "
          f"{'floor ms':>8} | {'vs native':>9} {'vs compiled':>11} | kernels: {'native ms':>9} {'fastmlp ms':>10} {'speedup':>7}")

    def save(rows, complete):
        if args.json:
            write_json(args.json, {"machine": machine, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                   "repeats": args.repeats, "rows": rows}, __file__, argv, complete)

    rows = []
    for norm in norms:
        for shape in args.shapes.split(","):
            batch, width = (int(v) for v in shape.split("x"))
            for mode in ("fwd", "fwdbwd"):
                t, _ = time_interleaved(candidates(norm, batch, width, mode), "cpu", args.repeats)
                row = {"norm": norm, "shape": shape, "mode": mode,
                       **{f"{k.replace(' ', '_')}_ms": v * 1e3 for k, v in t.items()},
                       "speedup_vs_native": t["native"] / t["fastmlp"],
                       "speedup_vs_compiled": t["compiled"] / t["fastmlp"]}
                if mode == "fwdbwd":
                    row["kernels_speedup"] = t["native kernels"] / t["fastmlp kernels"]
                rows.append(row)
                save(rows, complete=False)
                kernels = (f" | kernels: {row['native_kernels_ms']:9.3f} {row['fastmlp_kernels_ms']:10.3f} "
                           f"{row['kernels_speedup']:6.2f}x" if mode == "fwdbwd" else "")
                print(f"{norm:>5} {shape:>10} {mode:>6} | {row['native_ms']:9.3f} {row['compiled_ms']:11.3f} "
                      f"{row['fastmlp_ms']:10.3f} {row['floor_ms']:8.3f} | {row['speedup_vs_native']:8.2f}x "
                      f"{row['speedup_vs_compiled']:10.2f}x{kernels}", flush=True)
    save(rows, complete=True)


if __name__ == "__main__":
    main()
