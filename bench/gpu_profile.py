"""Kernel launches per training call (forward + backward of one layer): fastmlp vs eager vs compiled.

    python3 bench/gpu_profile.py [--json PATH]

Counts the CUDA kernels (and memsets/copies) torch.profiler sees per call, for relu and gelu in
fp32 and bf16 at one launch-bound and one compute-bound shape. Launch-bound layers are limited by
these counts (~2-5 us each), so "fewer launches than eager" is the target there.
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fastmlp  # noqa: E402

SHAPES = [(256, 512, 512), (4096, 4096, 4096)]  # (batch, in, out)
ACTS = {"relu": torch.relu, "gelu": F.gelu}


def count(fn, iters=5):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    names = sorted({e.key for e in events})
    return sum(e.count for e in events) / iters, names


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_profile.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    print(f"{'shape':>18} {'dtype':>9} {'act':>5} | {'fastmlp':>7} {'eager':>6} {'compiled':>8}")
    for n, i, o in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for name, act in ACTS.items():
                x = torch.randn(n, i, device="cuda", dtype=dtype, requires_grad=True)
                w = (torch.randn(o, i, device="cuda", dtype=dtype) / i**0.5).requires_grad_()
                b = torch.zeros(o, device="cuda", dtype=dtype, requires_grad=True)
                g = torch.randn(n, o, device="cuda", dtype=dtype)

                def eager_fn(x, w, b):
                    return act(F.linear(x, w, b))

                torch._dynamo.reset()
                compiled_fn = torch.compile(eager_fn)

                def run(f):
                    return lambda: torch.autograd.grad(f(x, w, b), (x, w, b), g)

                ours = run(lambda x, w, b: fastmlp.functional.linear_act(x, w, b, name))
                n_ours, k_ours = count(ours)
                n_eager, k_eager = count(run(eager_fn))
                n_comp, k_comp = count(run(compiled_fn))
                row = dict(shape=[n, i, o], dtype=str(dtype).replace("torch.", ""), activation=name,
                           launches_fastmlp=n_ours, launches_eager=n_eager, launches_compiled=n_comp,
                           kernels_fastmlp=k_ours, kernels_eager=k_eager, kernels_compiled=k_comp)
                rows.append(row)
                print(f"{str((n, i, o)):>18} {row['dtype']:>9} {name:>5} | {n_ours:7.1f} {n_eager:6.1f} {n_comp:8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
