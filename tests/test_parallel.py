"""fastmlp across processes: FSDP2's DTensor shards and tensor parallelism's sharded FusedLinear
weights (2 ranks, gloo, on the CPU), optimizer state in shared memory (the Hogwild / A3C "SharedAdam"
pattern); and a removed param group freed as torch.optim frees it."""

import gc
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

import fastmlp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, script, timeout=300):
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


# The scripts' shared start: fn() on 2 gloo ranks in spawned processes, rank 0's result back.
TWO_RANKS = """
import os, socket, torch, torch.distributed as dist, torch.multiprocessing as mp
import torch.nn.functional as F
import fastmlp

def _rank(rank, port, fn, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    result = fn()
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()

def on_two_ranks(fn):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, fn, "rank0.pt"), nprocs=2)
    return torch.load("rank0.pt")
"""

FSDP2 = TWO_RANKS + """

def train(make_opt, impl, use_fsdp, rank):
    torch.manual_seed(0)
    # 3 outputs over 2 ranks: shards of unequal size (2 rows and 1).
    model = fastmlp.nn.MLP([10, 16, 16, 3], impl=impl)
    if use_fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in model:
            fully_shard(block)
        fully_shard(model)
    opt = make_opt(model.parameters())
    ema = fastmlp.optim.EMA(model, decay=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)
        rows = slice(8 * rank, 8 * rank + 8) if use_fsdp else slice(None)  # each rank its half of the batch
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
        ema.update()
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
    state = opt.state_dict()["state"]
    return ({k: full(v) for k, v in model.state_dict().items()},
            {k: full(v) for k, v in ema.averaged_state_dict().items()},
            {i: {k: full(v) for k, v in st.items()} for i, st in state.items()})

OPTS = {
    "adamw": (lambda ps: fastmlp.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
              lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)),
    "adam_amsgrad": (lambda ps: fastmlp.optim.Adam(ps, lr=1e-2, amsgrad=True),
                     lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True)),
    "sgd": (lambda ps: fastmlp.optim.SGD(ps, lr=1e-1, momentum=0.9, nesterov=True),
            lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9, nesterov=True)),
}

def sharded_runs():
    return {name: train(ours, "fastmlp", True, dist.get_rank()) for name, (ours, _) in OPTS.items()}

if __name__ == "__main__":
    got = on_two_ranks(sharded_runs)
    for name, (_, theirs) in OPTS.items():
        # One process, the whole batch: the same gradients (the mean over both halves), torch's optimizer.
        want = train(theirs, "torch", False, 0)
        for part, g, w in zip(("model", "ema", "state"), got[name], want):
            if part == "state":
                g = {i: {k: v for k, v in st.items() if k != "step"} for i, st in g.items()}
                w = {i: {k: v for k, v in st.items() if k != "step"} for i, st in w.items()}
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {part}: {m}")
        print(name, "ok")
"""


def test_fsdp2_sharded_parameters_step_as_torchs_optimizers(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch has no gloo backend")
    out = _run(tmp_path, FSDP2)
    assert out.split() == ["adamw", "ok", "adam_amsgrad", "ok", "sgd", "ok"]


TENSOR_PARALLEL = TWO_RANKS + """

def train(impl, activation, tp):
    torch.manual_seed(0)
    model = fastmlp.nn.MLP([12, 16, 16, 4], activation=activation, impl=impl)
    if tp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        # Megatron's MLP split: the first layer's weight by rows (outputs), the second's by columns.
        parallelize_module(model, init_device_mesh("cpu", (2,)),
                           {"0.linear": ColwiseParallel(), "1.linear": RowwiseParallel()})
    opt = (fastmlp.optim.AdamW if impl == "fastmlp" else torch.optim.AdamW)(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    outputs = []
    for _ in range(3):
        x, y = torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        out = model(x)
        F.cross_entropy(out, y).backward()
        opt.step()
        outputs.append(out.detach())
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
    return outputs, {k: full(v).detach() for k, v in model.state_dict().items()}

ACTS = ("relu", "gelu", "gelu_tanh", "silu")

def norms_and_dropout():
    # DTensor activations (SequenceParallel-style: rows sharded, norm weights replicated) through
    # fastmlp's layer norm, batch norm and dropout: torch's ops run for them, forward and backward.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(2)
    x, w, b = (torch.randn(*shape, dtype=torch.float64) for shape in ((6, 10), (10,), (10,)))
    results = {}
    for name, fm, ref in (
            ("layer_norm", lambda x, w, b: fastmlp.functional.layer_norm(x, (10,), w, b),
             lambda x, w, b: F.layer_norm(x, (10,), w, b)),
            ("batch_norm", lambda x, w, b: fastmlp.functional.batch_norm(x, None, None, w, b, training=True),
             lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True))):
        placement = Shard(0) if name == "layer_norm" else Shard(1)
        args = [distribute_tensor(x, mesh, [placement]).requires_grad_(),
                distribute_tensor(w, mesh, [Replicate() if name == "layer_norm" else Shard(0)]).requires_grad_(),
                distribute_tensor(b, mesh, [Replicate() if name == "layer_norm" else Shard(0)]).requires_grad_()]
        y = fm(*args)
        (y * distribute_tensor(torch.arange(10.0, dtype=torch.float64), mesh, [Replicate()])).sum().backward()
        plain = [t.clone().requires_grad_() for t in (x, w, b)]
        y_ref = ref(*plain)
        (y_ref * torch.arange(10.0, dtype=torch.float64)).sum().backward()
        results[name] = ([y.full_tensor()] + [a.grad.full_tensor() for a in args], [y_ref] + [t.grad for t in plain])
    d = fastmlp.functional.dropout(distribute_tensor(torch.ones(400, 50), mesh, [Shard(0)]), 0.25)
    results["dropout"] = d.full_tensor()
    return results

def parallel_runs():
    return {**{act: train("fastmlp", act, True) for act in ACTS}, "norms": norms_and_dropout()}

if __name__ == "__main__":
    got = on_two_ranks(parallel_runs)
    for act in ACTS:
        want = train("torch", act, False)  # nn.Linear + activation, torch.optim, one process
        torch.testing.assert_close(got[act], want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{act}: {m}")
        print(act, "ok")
    norms = got["norms"]
    for name in ("layer_norm", "batch_norm"):
        torch.testing.assert_close(*norms[name], msg=lambda m: f"{name}: {m}")
    d = norms["dropout"]
    assert set(d.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert abs((d == 0).double().mean().item() - 0.25) < 0.02
    print("norms_and_dropout ok")
"""


def test_tensor_parallel_fused_linear_trains_as_nn_linear(tmp_path):
    pytest.importorskip("torch.distributed.tensor.parallel")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch has no gloo backend")
    out = _run(tmp_path, TENSOR_PARALLEL)
    assert out.split() == ["relu", "ok", "gelu", "ok", "gelu_tanh", "ok", "silu", "ok", "norms_and_dropout", "ok"]


SHARED = """
import torch, torch.multiprocessing as mp
import fastmlp

def steps(model, opt, n):
    torch.set_num_threads(1)
    for _ in range(n):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()

def shared_state(opt):
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            for t in st.values():
                t.share_memory_()

if __name__ == "__main__":
    mp.set_start_method("spawn")
    results = []
    for cls in (fastmlp.optim.Adam, torch.optim.Adam):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3).share_memory()
        opt = cls(model.parameters(), lr=1e-2)
        shared_state(opt)
        steps(model, opt, 2)
        assert all(t.is_shared() for st in opt.state.values() for t in st.values()), cls
        worker = mp.Process(target=steps, args=(model, opt, 3))  # steps the same memory
        worker.start()
        worker.join()
        assert worker.exitcode == 0
        results.append((model.weight.detach().clone(), opt.state[model.weight]["exp_avg_sq"].clone(),
                        float(opt.state[model.weight]["step"])))
    (w, v, n), (w_ref, v_ref, n_ref) = results
    assert n == n_ref == 5.0, (n, n_ref)
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(v, v_ref)
    print("ok")
"""


def test_state_in_shared_memory_stays_shared(tmp_path):
    assert _run(tmp_path, SHARED).split() == ["ok"]


@pytest.mark.parametrize("cls", [fastmlp.optim.AdamW, fastmlp.optim.SGD])
def test_a_removed_param_group_is_freed(cls):
    keep = torch.nn.Parameter(torch.randn(4))
    head = torch.nn.Parameter(torch.randn(64, 64))  # e.g. a temporary head
    opt = cls([keep], lr=1e-3, **({"momentum": 0.9} if cls is fastmlp.optim.SGD else {}))
    opt.add_param_group({"params": [head]})
    for _ in range(2):
        keep.grad, head.grad = torch.ones_like(keep), torch.ones_like(head)
        opt.step()
    key = "momentum_buffer" if cls is fastmlp.optim.SGD else "exp_avg"
    refs = weakref.ref(head), weakref.ref(opt.state[head][key])
    opt.param_groups.pop()
    opt.state.pop(head)
    del head
    keep.grad = torch.ones_like(keep)
    opt.step()
    gc.collect()
    assert [r() for r in refs] == [None, None]
    before = keep.detach().clone()
    opt.step()  # the remaining group still steps
    assert not torch.equal(keep, before)
