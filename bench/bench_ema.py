"""Benchmark: one update of fastmlp.optim.EMA against torch's moving averages, on the CPU.

    python bench/bench_ema.py [--repeats N] [--json PATH]

Cases as bench_optim.py's: the 784-512-512-10 MLP (670k parameters in 6 tensors), 200 tensors of
64x64, one 16M tensor. Candidates, each on its own copy of the tensors, interleaved in one process
(bench/common.py's protocol): torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn (what
torch documents for an EMA; its update_parameters runs torch._foreach_lerp_), that
torch._foreach_lerp_ alone, the same under torch.compile, and fastmlp.optim.EMA.update() (the
fastmlp.ops.ema_update_ op: one parallel pass over every element). An update reads the average and
the weights and writes the average: 12 bytes per fp32 parameter, the traffic of an in-place add
of one tensor to another of the same size, which is the floor here.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fastmlp  # noqa: E402
from common import add_repeats_arg, check_repeats, machine_name, time_interleaved, write_json  # noqa: E402

DECAY = 0.999


def cases():
    return {
        "mlp 784-512-512-10": [(512, 784), (512,), (512, 512), (512,), (10, 512), (10,)],
        "200 x 64x64": [(64, 64)] * 200,
        "1 x 16M": [(16 * 1024 * 1024,)],
    }


def module_of(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in shapes])


def candidates(shapes):
    """{name: update function}, each on its own model and average; also returns the models and a
    function that reads each candidate's average (for the test that they compute the same)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # noqa: PLC0415

    models = {k: module_of(shapes) for k in ("torch AveragedModel", "torch _foreach_lerp_", "torch.compile lerp",
                                             "fastmlp EMA")}
    averaged = AveragedModel(models["torch AveragedModel"], multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    averaged.update_parameters(models["torch AveragedModel"])  # its first call only copies

    def lerp_pair(m):
        live = [p.detach() for p in m.parameters()]
        return [t.clone() for t in live], live

    avg_l, live_l = lerp_pair(models["torch _foreach_lerp_"])
    avg_c, live_c = lerp_pair(models["torch.compile lerp"])
    torch._dynamo.reset()

    @torch.compile(dynamic=False)
    def compiled(a, b):
        torch._foreach_lerp_(a, b, 1.0 - DECAY)

    ema = fastmlp.optim.EMA(models["fastmlp EMA"], decay=DECAY, warmup=False)
    n = sum(torch.Size(s).numel() for s in shapes)
    a, b = torch.randn(n), torch.randn(n)
    fns = {
        "torch AveragedModel": lambda: averaged.update_parameters(models["torch AveragedModel"]),
        "torch _foreach_lerp_": lambda: torch._foreach_lerp_(avg_l, live_l, 1.0 - DECAY),
        "torch.compile lerp": lambda: compiled(avg_c, live_c),
        "fastmlp EMA": ema.update,
        "floor": lambda: a.add_(b),
    }
    averages = {
        "torch AveragedModel": lambda: [p.detach() for p in averaged.module.parameters()],
        "torch _foreach_lerp_": lambda: avg_l,
        "torch.compile lerp": lambda: avg_c,
        "fastmlp EMA": lambda: list(ema.averaged_state_dict().values()),
    }
    return fns, models, averages


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_repeats_arg(ap)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    check_repeats(ap, args)
    machine = machine_name("cpu")
    print(f"fastmlp {fastmlp.__version__} EMA update (decay {DECAY}) on {machine}")
    print(f"median of {args.repeats} interleaved samples, microseconds; floor = an in-place add of the same bytes")

    def save(rows, complete):
        if args.json:
            write_json(args.json, {"machine": machine, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                   "repeats": args.repeats, "rows": rows}, __file__, argv, complete)

    names = ["torch AveragedModel", "torch _foreach_lerp_", "torch.compile lerp", "fastmlp EMA", "floor"]
    print(f"{'case':>20} | " + " ".join(f"{n:>20}" for n in names) + " | fastmlp vs AveragedModel")
    rows = []
    for case, shapes in cases().items():
        fns, _, _ = candidates(shapes)
        t, _ = time_interleaved(fns, "cpu", args.repeats)
        n = sum(torch.Size(s).numel() for s in shapes)
        row = {"case": case, "params": n, **{f"{k}_us": v * 1e6 for k, v in t.items()},
               "fastmlp_gb_s": 12 * n / t["fastmlp EMA"] / 1e9,
               "speedup_vs_averaged_model": t["torch AveragedModel"] / t["fastmlp EMA"],
               "speedup_vs_foreach_lerp": t["torch _foreach_lerp_"] / t["fastmlp EMA"],
               "speedup_vs_compiled": t["torch.compile lerp"] / t["fastmlp EMA"]}
        rows.append(row)
        save(rows, complete=False)
        print(f"{case:>20} | " + " ".join(f"{row[k + '_us']:20.1f}" for k in names)
              + f" | {row['speedup_vs_averaged_model']:.2f}x", flush=True)
    save(rows, complete=True)


if __name__ == "__main__":
    main()
