"""The CUDA backward prologue's grid, swept: its device time per call for each grid setting.

    python3 bench/bwd_prologue_sweep.py [--shapes 4096x2048] [--dtypes bfloat16,float32]
                                        [--activations relu,gelu] [--blocks-per-sm 4,8,16]
                                        [--min-rows 1,4] [--json PATH]

The prologue (dZ = dY * act'(.) and the bias gradient's column sums, one kernel) splits its rows
into chunks, one block row each, with a cross-block sum at the end; how many is
bwd_partial_rows's choice: blocks_per_sm blocks on every SM, at least min_rows rows a thread
(defaults 4 and 4, set per call by FASTMLP_BWD_BLOCKS_PER_SM and FASTMLP_BWD_MIN_ROWS). On an H200
the default moved bf16's 50 MB at 2.0 TB/s at 4096x2048 while fp32's ran at 3.4 TB/s (see
results/gpu_check_h200.md). For each (shape = rows x out features, dtype, activation) this times
the prologue kernel alone (torch.profiler's device time for it, per call, inside a
linear_act_backward that also computes dX) for every setting, with its bandwidth (dY and y or z
read, dZ written), and checks that each setting's bias gradient equals the default's within
float rounding (the order of its sums changes with the grid). Eager's elementwise + sum kernels
for the same work are timed beside it. CUDA only.
"""

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fastmlp  # noqa: E402
import gpu_profile  # noqa: E402
from common import machine_name, write_json  # noqa: E402
from fastmlp import ops  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ENV = ("FASTMLP_BWD_BLOCKS_PER_SM", "FASTMLP_BWD_MIN_ROWS")
DEFAULT = (4, 4)


def int_list(s):
    try:
        out = [int(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of whole numbers, got {s!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {s!r}")
    return out


def parse_shapes(s):
    out = []
    for item in s.split(","):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"expected ROWSxCOLS items, got {item!r}")
        out.append((int(parts[0]), int(parts[1])))
    return out


def prologue_bytes(rows, cols, dtype):
    """What the prologue must move: dY and y (relu) or z (the others) read, dZ written."""
    return 3 * rows * cols * torch.empty((), dtype=dtype).element_size()


def kernel_us(fn, match, iters=20):
    """Device microseconds per call of the kernels whose name contains `match` (all, if None), as
    gpu_profile.py measures them."""
    _, device_us, kernels, _ = gpu_profile.profile_fn(fn, "cuda", iters)
    if match is None:
        return device_us
    hits = [us for name, _, us in kernels if match in name]
    if not hits:
        raise RuntimeError(f"the profiler saw no CUDA kernel named *{match}*")
    return sum(hits)


def setting(blocks_per_sm, min_rows):
    """The grid switches set to these values inside the block, put back after it."""
    return gpu_profile.env_set(dict(zip(ENV, (str(blocks_per_sm), str(min_rows)))))


def sweep_case(rows, cols, dtype, act, grid, in_f=64, device="cuda"):
    """One (shape, dtype, activation): the prologue's time and bandwidth under every grid setting,
    its bias gradient against the default setting's, and eager's time for the same work."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, in_f, device=device, dtype=dtype, generator=gen)
    w = torch.randn(cols, in_f, device=device, dtype=dtype, generator=gen) / in_f**0.5
    b = torch.randn(cols, device=device, dtype=dtype, generator=gen)
    with torch.no_grad():
        y, saved = ops.linear_act_forward(x, w, b, act, True)
        g = torch.randn(rows, cols, device=device, dtype=dtype, generator=gen)

    def backward():
        return ops.linear_act_backward(g, x, w, y, saved, act, [True, False, True])

    def eager():  # the same work as native autograd does it: act' elementwise, then the column sums
        dz = torch.ops.aten.threshold_backward(g, y, 0) if act == "relu" else torch.ops.aten.gelu_backward(g, saved)
        return dz.sum(0)

    nbytes = prologue_bytes(rows, cols, dtype)
    with setting(*DEFAULT):
        want = backward()[2].double()
    scale = want.abs().max().item() or 1.0
    rows_out = []
    for bps, mr in grid:
        with setting(bps, mr):
            us = kernel_us(backward, "bwd_prologue_kernel")
            db = backward()[2].double()
        rows_out.append({"blocks_per_sm": bps, "min_rows": mr, "us": us, "gb_s": nbytes / us / 1e3,
                         "db_max_rel_diff_vs_default": (db - want).abs().max().item() / scale})
    eager_us = kernel_us(eager, None)
    return {"rows": rows, "cols": cols, "dtype": str(dtype).replace("torch.", ""), "activation": act,
            "bytes": nbytes, "eager_us": eager_us, "settings": rows_out}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", type=parse_shapes, default=parse_shapes("4096x2048"))
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--activations", default="relu,gelu")
    ap.add_argument("--blocks-per-sm", type=int_list, default=[4, 8, 16])
    ap.add_argument("--min-rows", type=int_list, default=[1, 4])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    for d in args.dtypes.split(","):
        if d not in DTYPES:
            ap.error(f"--dtypes: unknown {d!r}; expected some of {', '.join(DTYPES)}")
    for a in args.activations.split(","):
        if a not in ("relu", "gelu"):
            ap.error(f"--activations: unknown {a!r}; expected relu and/or gelu")
    if not (torch.cuda.is_available() and fastmlp.WITH_CUDA):
        ap.error("needs a CUDA GPU and fastmlp built with CUDA kernels")
    torch.backends.cuda.matmul.allow_tf32 = False
    grid = list(itertools.product(args.blocks_per_sm, args.min_rows))
    cases = []
    print(f"backward prologue grid sweep on {machine_name('cuda')}; device us per call (GB/s)")
    for (rows, cols), d, act in itertools.product(args.shapes, args.dtypes.split(","), args.activations.split(",")):
        c = sweep_case(rows, cols, DTYPES[d], act, grid)
        cases.append(c)
        best = min(c["settings"], key=lambda s: s["us"])
        default = next((s for s in c["settings"] if (s["blocks_per_sm"], s["min_rows"]) == DEFAULT), None)
        cells = "; ".join(f"{s['blocks_per_sm']}/{s['min_rows']}: {s['us']:.1f} ({s['gb_s']:.0f})"
                          for s in c["settings"])
        print(f"{rows}x{cols} {d} {act}: eager {c['eager_us']:.1f} us | blocks per SM/min rows: {cells}")
        print(f"    best {best['blocks_per_sm']}/{best['min_rows']}: {best['us']:.1f} us"
              + (f" vs default {default['us']:.1f} us" if default else "")
              + f"; largest db difference from the default: "
                f"{max(s['db_max_rel_diff_vs_default'] for s in c['settings']):.1e} of max |db|", flush=True)
    if args.json:
        write_json(args.json, {"machine": machine_name("cuda"), "cases": cases}, __file__, argv)
    return cases


if __name__ == "__main__":
    main()
