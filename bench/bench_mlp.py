"""Whole training step of an MLP: fastmlp against PyTorch eager and torch.compile, in one run.

One step = zero_grad, forward, cross-entropy loss (label smoothing 0.1), backward, AdamW step:
what `fastmlp train` does per batch, on random data of the same shape. Candidates, each with its
own copy of the same initial weights and the same batch, run interleaved in this process:

  torch eager          nn.Linear + activation + nn.Dropout, torch.optim.AdamW() (torch's default
                       implementation for the device: for-loop on the CPU, foreach on CUDA)
  torch eager fused    the same model, torch.optim.AdamW(fused=True)
  torch.compile        torch.compile(model) (default mode), torch.optim.AdamW(fused=True)
  fastmlp              fastmlp.nn.MLP (FusedLinear, fastmlp.nn.Dropout), fastmlp.optim.AdamW
  fastmlp compiled     torch.compile of the fastmlp model (our ops are opaque to Inductor)
  torch graphed        CUDA only: the torch eager step captured whole into one CUDA graph
                       (torch.optim.AdamW(fused=True, capturable=True)), each step one replay
  fastmlp graphed      CUDA only: the same for the fastmlp step (fastmlp.optim.AdamW(capturable=True))
  gemm floor           the step's matrix products alone: per layer X W^T and dZ^T X, and dZ W for
                       every layer but the first (no gradient flows into the data)

Each sample times enough steps to last >= 5 ms after one untimed step; the table reports the median
of --repeats samples per candidate, the speedup of fastmlp over each baseline, and the floor's
share of each candidate's time.

    python bench/bench_mlp.py                                  # default model, batch 256, CPU
    python bench/bench_mlp.py --batch 64 --json out.json
    python bench/bench_mlp.py --device cuda --amp bf16
"""

import argparse
import contextlib
import copy
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fastmlp  # noqa: E402
from common import add_repeats_arg, check_repeats, machine_name, time_interleaved, write_json  # noqa: E402
from fastmlp.nn import MLP  # noqa: E402

CANDIDATES = ("torch eager", "torch eager fused", "torch.compile", "fastmlp", "fastmlp torch norms", "fastmlp compiled",
              "torch graphed", "fastmlp graphed", "gemm floor")
GRAPHED = ("torch graphed", "fastmlp graphed")  # CUDA only
NORMED = ("fastmlp torch norms",)  # with --norm batch / layer only: fastmlp's model with torch's norm modules
AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def loss_of(model, x, y):
    """The training objective of `fastmlp train`'s default recipe."""
    return F.cross_entropy(model(x), y, label_smoothing=0.1)


def make_step(model, opt, x, y, amp, device):
    """One training step; fp16 goes through a GradScaler as in `fastmlp train --amp fp16`."""
    scaler = torch.amp.GradScaler(device) if amp is torch.float16 else None

    def step():
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast(device, dtype=amp) if amp is not None else contextlib.nullcontext()
        with ctx:
            loss = loss_of(model, x, y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    step.model, step.x, step.y = model, x, y  # for inspection (tests)
    return step


def make_graphed_step(model, opt, x, y, amp, device):
    """The step of make_step captured whole into a CUDA graph, as in torch's whole-network capture
    recipe: three eager steps on a side stream (optimizer state, cuBLAS(Lt) handles and algorithm
    choices), then one captured step into the graph's own memory pool; each call replays it on the
    same static x and y. The optimizer must be capturable (its step count on the GPU). The warm-up
    and the capture happen here, so the table's warm-up column counts only the first replays."""
    if amp is torch.float16:
        raise ValueError("graphed candidates: --amp fp16 (GradScaler) is not captured; use --amp off or bf16")
    # autocast's weight cache must stay off while capturing (torch.cuda.graph's documentation).
    ctx = (lambda: torch.autocast(device, dtype=amp, cache_enabled=False)) if amp is not None else contextlib.nullcontext

    eager_step = make_step(model, opt, x, y, amp, device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            for _ in range(3):
                eager_step()
    except Exception as e:
        raise RuntimeError(f"the eager warm-up before the capture failed: {type(e).__name__}: {e}") from e
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)  # the captured backward allocates the grads in the graph's pool
    stream = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph):
            with ctx():
                loss = loss_of(model, x, y)
            loss.backward()
            opt.step()
    except Exception as e:
        # An op that fails while capturing makes capture_end raise "invalidated" in torch.cuda.graph's
        # exit, before it restores the stream: name the first error, and put the stream back.
        torch.cuda.set_stream(stream)
        first = e.__context__ or e.__cause__ or e
        raise RuntimeError(f"the CUDA graph capture failed: {type(first).__name__}: {first}") from e

    def step():
        graph.replay()

    step.model, step.x, step.y, step.loss, step.graph = model, x, y, loss, graph
    return step


def make_floor(widths, batch, dtype, device):
    gen = torch.Generator().manual_seed(1)
    mats = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        x = torch.randn(batch, fan_in, generator=gen).to(device, dtype)
        w = torch.randn(fan_out, fan_in, generator=gen).to(device, dtype)
        dz = torch.randn(batch, fan_out, generator=gen).to(device, dtype)
        mats.append((x, w, dz, i > 0))

    def floor():
        for x, w, dz, grad_input in mats:
            torch.mm(x, w.t())
            if grad_input:
                torch.mm(dz, w)
            torch.mm(dz.t(), x)

    return floor


def build(args, failures=None):
    """{candidate: step}. With a dict for `failures`, a graphed candidate whose capture fails is
    recorded there (name: error) and left out instead of ending the run; without one it raises."""
    device, amp = args.device, AMP[args.amp]
    torch.manual_seed(0)
    ref = MLP(args.widths, activation=args.activation, dropout=args.dropout, norm=args.norm, impl="torch", device=device)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(args.batch, args.widths[0], generator=gen).to(device)
    y = torch.randint(0, args.widths[-1], (args.batch,), generator=gen).to(device)
    lr, wd = 2e-3, 0.05

    def torch_model():
        return copy.deepcopy(ref)

    def fastmlp_model():
        m = MLP(args.widths, activation=args.activation, dropout=args.dropout, norm=args.norm, impl="fastmlp",
                device=device)
        m.load_state_dict(ref.state_dict())
        return m

    def fastmlp_model_torch_norms():
        """fastmlp's model whose norms run torch's modules (fastmlp's are subclasses with no state of
        their own, so the class is all that changes): the norm kernels' share of the step."""
        m = fastmlp_model()
        for block in m:
            if hasattr(block, "norm"):
                block.norm.__class__ = type(block.norm).__mro__[1]
        return m

    optimizers = {
        "torch": lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=wd),
        "torch fused": lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=wd, fused=True),
        "fastmlp": lambda ps: fastmlp.optim.AdamW(ps, lr=lr, weight_decay=wd),
        # A tensor lr, as a scheduler driving a captured step needs (a float is baked into the
        # graph). It is float32: these steps differ from the eager candidates' by its rounding.
        "torch capturable": lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(lr, device=device), weight_decay=wd,
                                                         fused=True, capturable=True),
        "fastmlp capturable": lambda ps: fastmlp.optim.AdamW(ps, lr=torch.tensor(lr, device=device), weight_decay=wd,
                                                             capturable=True),
    }
    # candidate: (model, optimizer, how: eager / compile / graph)
    setups = {
        "torch eager": (torch_model, "torch", "eager"),
        "torch eager fused": (torch_model, "torch fused", "eager"),
        "torch.compile": (torch_model, "torch fused", "compile"),
        "fastmlp": (fastmlp_model, "fastmlp", "eager"),
        "fastmlp torch norms": (fastmlp_model_torch_norms, "fastmlp", "eager"),
        "fastmlp compiled": (fastmlp_model, "fastmlp", "compile"),
        "torch graphed": (torch_model, "torch capturable", "graph"),
        "fastmlp graphed": (fastmlp_model, "fastmlp capturable", "graph"),
    }
    fns = {}
    for name in args.candidates:
        if name == "gemm floor":
            fns[name] = make_floor(args.widths, args.batch, amp or torch.float32, device)
            continue
        make_model, opt_name, how = setups[name]
        model = make_model()
        model.train()
        opt = optimizers[opt_name](model.parameters())
        if how == "graph":
            try:
                fns[name] = make_graphed_step(model, opt, x, y, amp, device)
            except Exception as e:  # noqa: BLE001 (reported below and in the JSON)
                if failures is None:
                    raise
                failures[name] = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
                torch.cuda.synchronize()
        else:
            fns[name] = make_step(torch.compile(model) if how == "compile" else model, opt, x, y, amp, device)
    return fns


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--widths", default="784,512,512,10", help="comma list: input, hidden..., classes")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--activation", default="gelu", choices=["relu", "gelu", "gelu_tanh", "silu"])
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--norm", default="none", choices=["none", "batch", "layer"],
                   help="a norm after each hidden activation (fastmlp's BatchNorm1d / LayerNorm against torch's)")
    p.add_argument("--amp", default="off", choices=list(AMP))
    p.add_argument("--candidates", default=None,
                   help=f"comma list, some of: {', '.join(CANDIDATES)} (default: all; the graphed ones on CUDA only)")
    add_repeats_arg(p)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    try:
        args.widths = [int(v) for v in args.widths.split(",")]
    except ValueError:
        p.error(f"--widths: expected a comma list of ints, got {args.widths!r}")
    if len(args.widths) < 2 or min(args.widths) < 1:
        p.error(f"--widths: expected at least two positive widths, got {args.widths}")
    if args.batch < 1:
        p.error(f"--batch must be positive, got {args.batch}")
    if not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    check_repeats(p, args)
    if args.candidates is None:
        args.candidates = [c for c in CANDIDATES if (args.device == "cuda" or c not in GRAPHED)
                           and (args.norm != "none" or c not in NORMED)]
    else:
        args.candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    for c in args.candidates:
        if c not in CANDIDATES:
            p.error(f"--candidates: unknown {c!r}; expected some of {', '.join(CANDIDATES)}")
        if c in NORMED and args.norm == "none":
            p.error(f"--candidates: {c!r} swaps the model's norms for torch's; it needs --norm batch or layer")
        if c in GRAPHED and args.device != "cuda":
            p.error(f"--candidates: {c!r} captures the step into a CUDA graph; it needs --device cuda")
        if c in GRAPHED and args.amp == "fp16":
            p.error(f"--candidates: {c!r} does not capture GradScaler; use --amp off or bf16")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if args.amp == "fp16" and args.device == "cpu":
        p.error("--amp fp16 is for CUDA (GradScaler); use --amp bf16 on the CPU")

    machine = machine_name(args.device)
    model_desc = (f"{'-'.join(map(str, args.widths))} {args.activation}, norm {args.norm}, dropout {args.dropout}, "
                  f"batch {args.batch}, "
                  f"amp {args.amp}")
    print(f"fastmlp {fastmlp.__version__} training-step benchmark on {machine}")
    print(f"model {model_desc}; median of {args.repeats} interleaved samples")
    failures = {}
    med, compile_s = time_interleaved(build(args, failures), args.device, args.repeats, min_sample_s=5e-3,
                                      untimed_first=True, max_inner=200)
    for name, err in failures.items():
        print(f"{name}: not measured: {err}")

    rows = []
    floor = med.get("gemm floor")
    fast = med.get("fastmlp")
    print(f"{'candidate':>18} | {'ms / step':>9} | {'samples/s':>10} | {'fastmlp speedup':>15} | {'floor share':>11} | {'warm-up s':>9}")
    for name, t in med.items():
        row = {"candidate": name, "ms_per_step": t * 1e3, "samples_per_s": args.batch / t,
               "fastmlp_speedup": (t / fast) if fast and name != "fastmlp" and name != "gemm floor" else None,
               "floor_share": (floor / t) if floor else None, "warmup_s": compile_s[name]}
        rows.append(row)
        sp = f"{row['fastmlp_speedup']:.2f}x" if row["fastmlp_speedup"] else "-"
        fs = f"{100 * row['floor_share']:.0f}%" if row["floor_share"] else "-"
        print(f"{name:>18} | {row['ms_per_step']:9.3f} | {row['samples_per_s']:10.0f} | {sp:>15} | {fs:>11} | "
              f"{compile_s[name]:9.1f}")
    if args.json:
        write_json(args.json, {"machine": machine, "device": args.device, "torch": torch.__version__,
                               "model": model_desc, "repeats": args.repeats, "rows": rows, "failed": failures},
                   __file__, argv)
    return rows


if __name__ == "__main__":
    main()
