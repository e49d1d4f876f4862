"""fastmlp.linear_act against PyTorch: act(F.linear(x, W, b)).

Every test takes the `device` fixture, so the CUDA backend runs the same grid when present.
Tolerances: fp32/fp64 at torch.testing's defaults against native in the same dtype; fp16/bf16
relative to PyTorch: our max error vs an fp64 reference is at most 2x native's error vs the same
reference, plus a floor of a few ulps of the output scale.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmlp
from fastmlp import ops
from fastmlp.functional import linear_act

ACTS = list(ops.ACTIVATIONS)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NATIVE_ACT = {
    "none": lambda t: t,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
}
NN_ACT = {"relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU}


def native(x, w, b, act):
    return NATIVE_ACT[act](F.linear(x, w, b))


def make(shape_x, out_f, dtype, device, bias=True, requires_grad=(True, True, True)):
    in_f = shape_x[-1]
    x = torch.randn(shape_x, dtype=torch.float64).to(device=device, dtype=dtype)
    w = (torch.randn(out_f, in_f, dtype=torch.float64) / max(in_f, 1) ** 0.5).to(device=device, dtype=dtype)
    b = torch.randn(out_f, dtype=torch.float64).to(device=device, dtype=dtype) if bias else None
    x.requires_grad_(requires_grad[0])
    w.requires_grad_(requires_grad[1])
    if b is not None:
        b.requires_grad_(requires_grad[2])
    return x, w, b


def run(fn, x, w, b, act, grad_out):
    """Output and the gradients of every input that requires grad, for one implementation."""
    y = fn(x, w, b, act)
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, inputs, grad_out) if inputs and y.requires_grad else ()
    return y, list(grads)


def ulp(dtype):
    return torch.finfo(dtype).eps


def assert_matches_native(x, w, b, act, low_precision_floor=4, relative=None):
    """Compare fastmlp with native on the same inputs (outputs and gradients).

    relative=False: assert_close against native (fp32/fp64 default); relative=True: the error
    rule against an fp64 reference (fp16/bf16 default, and large fp32 reductions, where the
    summation order alone moves results past assert_close's float32 tolerance)."""
    dtype = x.dtype
    g = torch.randn(*x.shape[:-1], w.shape[0], dtype=torch.float64).to(device=x.device, dtype=dtype)
    ours = run(linear_act, x, w, b, act, g)
    nat = run(native, x, w, b, act, g)
    assert ours[0].shape == nat[0].shape and ours[0].dtype == nat[0].dtype
    if relative is None:
        relative = dtype not in (torch.float32, torch.float64)
    if not relative:
        torch.testing.assert_close(ours[0], nat[0])
        for a, n in zip(ours[1], nat[1]):
            torch.testing.assert_close(a, n)
        return
    # fp16/bf16: error relative to native's, both measured against an fp64 reference.
    leaf = lambda t: None if t is None else t.detach().double().requires_grad_(t.requires_grad)  # noqa: E731
    ref = run(native, leaf(x), leaf(w), leaf(b), act, g.double())
    for name, o, n, r in zip(["output", "grad_a", "grad_b", "grad_c"], [ours[0]] + ours[1], [nat[0]] + nat[1], [ref[0]] + ref[1]):
        if r.numel() == 0:
            continue
        # NaN and Inf exactly where native has them; the error bound over the finite rest.
        assert torch.equal(o.isnan(), n.isnan()), f"{name}: NaN positions differ from native's"
        inf = n.isinf()
        assert torch.equal(o[inf], n[inf]), f"{name}: fastmlp differs from native where native is +-inf"
        finite = n.isfinite() & r.isfinite()
        if not finite.any():
            continue
        o, n, r = o[finite], n[finite], r[finite]
        err_ours = (o.double() - r).abs().max().item()
        err_native = (n.double() - r).abs().max().item()
        floor = low_precision_floor * ulp(dtype) * max(r.abs().max().item(), 1e-3)
        assert err_ours <= 2 * err_native + floor, (
            f"{name}: fastmlp error {err_ours:.3g} > 2 x native error {err_native:.3g} + floor {floor:.3g}"
        )


SHAPES = [  # (input shape, out_features)
    ((13,), 7),  # 1-D input
    ((0, 13), 7),  # empty batch
    ((1, 13), 7),  # batch 1
    ((3, 4, 13), 9),  # 3-D input
    ((37, 29), 10),  # odd sizes, width 10 like a classifier head
    ((5, 0), 6),  # in_features 0
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}->{s[1]}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_parity_grid(device, act, dtype, bias, shape):
    x, w, b = make(shape[0], shape[1], dtype, device, bias)
    assert_matches_native(x, w, b, act)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_parity_large_odd(device, act, dtype):
    """The odd-sized layer from the test plan: 1823 x 781 -> 389."""
    x, w, b = make((1823, 781), 389, dtype, device)
    assert_matches_native(x, w, b, act, relative=dtype != torch.float64)  # native fp64 is the reference itself


@pytest.mark.parametrize("rows", [100, 1000], ids=["column_split", "row_blocks"])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_cpu_backward_same_for_any_thread_count(act, rows):
    # The bias gradient's summation order is fixed by the shape alone (csrc/cpu/linear_act.cpp).
    x = torch.randn(rows, 96)
    w = torch.randn(300, 96) / 10
    b = torch.randn(300)
    g = torch.randn(rows, 300)
    out, saved = ops.linear_act_forward(x, w, b, act, True)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(ops.linear_act_backward(g, x, w, out, saved, act, [True, True, True]))
    finally:
        torch.set_num_threads(old)
    # Bitwise equal bias gradients (ours); grad_x and grad_w come from the BLAS, whose own
    # blocking may change with the thread count, so they are only compared to a reference.
    for r in results[1:]:
        assert torch.equal(results[0][2], r[2])
    z = torch.addmm(b, x, w.t())
    dz = g * (z > 0) if act == "relu" else g * torch.ops.aten.gelu_backward(torch.ones_like(z), z)
    torch.testing.assert_close(results[0][2], dz.double().sum(0).float())
    torch.testing.assert_close(results[0][0], dz @ w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_kernels_same_for_any_thread_count(dtype):
    # The epilogue and the backward's dZ pass, fed directly (identity weight: the GEMMs are exact),
    # over shapes whose thread split cuts rows, columns or the flat range at odd places: each
    # element must get the same arithmetic wherever the split puts it (vector body or remainder).
    torch.manual_seed(0)
    old = torch.get_num_threads()
    try:
        for rows, cols in [(64, 300), (3, 8193), (17, 1639), (5000, 7)]:
            z = (torch.randn(rows, cols) * 3).to(dtype)
            g = torch.randn(rows, cols).to(dtype)
            eye = torch.eye(cols, dtype=dtype)
            for act in ("gelu", "gelu_tanh", "silu"):
                runs = []
                for threads in (1, 2, 3):
                    torch.set_num_threads(threads)
                    y, saved = ops.linear_act_forward(z, eye, None, act, True)
                    dz, _, db = ops.linear_act_backward(g, z, eye, y, saved, act, [True, False, True])
                    dz_only, _, _ = ops.linear_act_backward(g, z, eye, y, saved, act, [True, False, False])
                    runs.append((y, dz, db, dz_only))
                for r in runs[1:]:
                    for a, b in zip(runs[0], r):
                        assert torch.equal(a, b), (rows, cols, act)
    finally:
        torch.set_num_threads(old)


# Ranges free of cancellation (where 1 + erf or 1 + tanh rounds away the answer, native fp32 is no
# yardstick): silu everywhere off its gradient's root at -1.28; gelu's gradient where Phi(x) is 0 in
# fp32 and only x phi(x) remains (x < -6.5), e^x underflowing or near overflow.
EXP_RANGES = {
    "silu": [(-110, -2), (0.5, 95)],
    "gelu": [(-110, -60), (-16, -6.5), (0.5, 16), (60, 95)],
    "gelu_tanh": [(0.5, 16), (60, 95)],
}


@pytest.mark.parametrize("act", list(EXP_RANGES))
def test_cpu_exp_range_as_accurate_as_native(act):
    # Arguments where e^x is subnormal or close to overflow: every element's error against an fp64
    # reference is at most 2x native fp32's plus 4 units of fp32 spacing (the polynomial exp was
    # clamped at [-87, 88]: silu(-88.3) came out 35% off, gelu'(-13.5) 60x).
    x = torch.cat([torch.linspace(a, b, 2001) for a, b in EXP_RANGES[act]])
    x = x.reshape(-1, 1)
    eye = torch.eye(1)
    ours_x = x.clone().requires_grad_()
    y = linear_act(ours_x, eye, None, act)
    (gx,) = torch.autograd.grad(y, ours_x, torch.ones_like(y))
    results = {}
    for name, dtype in (("native", torch.float32), ("ref", torch.float64)):
        t = x.to(dtype).requires_grad_()
        out = NATIVE_ACT[act](t)
        (gt,) = torch.autograd.grad(out, t, torch.ones_like(out))
        results[name] = (out.detach(), gt)
    for k, ours in enumerate((y.detach(), gx)):
        nat, ref = results["native"][k].double(), results["ref"][k]
        spacing = torch.clamp(ref.abs() * 2.0**-23, min=2.0**-149)

        def err(a):
            return torch.where(a == ref, 0.0, (a - ref).abs())  # inf == inf counts as exact

        bad = err(ours.double()) > 2 * err(nat) + 4 * spacing
        assert not bad.any(), (("forward", "gradient")[k], x[bad][:5].tolist())


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("rg", [c for c in itertools.product([False, True], repeat=3)], ids=lambda c: "".join("xwb"[i] if v else "_" for i, v in enumerate(c)))
def test_requires_grad_combinations(device, act, rg):
    x, w, b = make((6, 11), 5, torch.float32, device, True, rg)
    y = linear_act(x, w, b, act)
    assert y.requires_grad == any(rg)
    assert_matches_native(x, w, b, act)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_non_contiguous(device, act, dtype):
    b = torch.randn(2 * 23, dtype=dtype, device=device)[::2].requires_grad_()  # strided bias
    x = torch.randn(9, 2 * 17, dtype=dtype, device=device)[:, ::2].requires_grad_()  # strided columns
    w = torch.randn(2 * 17, 2 * 23, dtype=dtype, device=device).t()[::2, ::2].requires_grad_()  # transposed, strided
    xt = torch.randn(17, 4, 3, dtype=dtype, device=device).transpose(0, 2).requires_grad_()  # (3, 4, 17)
    assert not x.is_contiguous() and not w.is_contiguous() and not xt.is_contiguous() and not b.is_contiguous()
    assert_matches_native(x, w, b, act)
    assert_matches_native(xt, w, b, act)


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_float64(device, act):
    for shape, out_f, bias in [((4, 8), 6, True), ((2, 3, 5), 4, False), ((8,), 3, True), ((0, 5), 3, True)]:
        x, w, b = make(shape, out_f, torch.float64, device, bias)
        fn = lambda x, w, *b: linear_act(x, w, b[0] if b else None, act)  # noqa: E731
        args = (x, w) + ((b,) if bias else ())
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)
    # Non-contiguous input (strided columns), weight (transposed) and bias (strided).
    x = torch.randn(4, 14, dtype=torch.float64, device=device)[:, ::2].requires_grad_()
    w = torch.randn(7, 5, dtype=torch.float64, device=device).t().requires_grad_()
    b = torch.randn(10, dtype=torch.float64, device=device)[::2].requires_grad_()
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous())
    assert torch.autograd.gradcheck(lambda x, w, b: linear_act(x, w, b, act), (x, w, b), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("act", ACTS)
def test_forward_ad_and_torch_func_transforms_match_native(device, act):
    # torch's C++ autograd Functions support neither forward-mode AD (the tangent was dropped: zeros)
    # nor torch.func (it raised); there the op runs as the ATen ops it fuses.
    import torch.autograd.forward_ad as fwAD

    x, w, b = make((5, 7), 4, torch.float64, device, requires_grad=(False, False, False))
    t = torch.randn_like(x)
    tw = torch.randn_like(w)
    ref_t = torch.func.jvp(lambda x, w: native(x, w, b, act), (x, w), (t, tw))[1]
    got = torch.func.jvp(lambda x, w: linear_act(x, w, b, act), (x, w), (t, tw))
    torch.testing.assert_close(got[0], native(x, w, b, act))
    torch.testing.assert_close(got[1], ref_t)
    with fwAD.dual_level():
        out = linear_act(fwAD.make_dual(x, t), fwAD.make_dual(w, tw), b, act)
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, ref_t)
    g = torch.func.grad(lambda w: linear_act(x, w, b, act).pow(2).sum())(w)
    torch.testing.assert_close(g, torch.func.grad(lambda w: native(x, w, b, act).pow(2).sum())(w))
    # Per-sample gradients, the usual vmap(grad) use.
    per = torch.func.vmap(torch.func.grad(lambda w, xi: linear_act(xi, w, b, act).sum()), in_dims=(None, 0))(w, x)
    ref = torch.func.vmap(torch.func.grad(lambda w, xi: native(xi, w, b, act).sum()), in_dims=(None, 0))(w, x)
    torch.testing.assert_close(per, ref)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        torch.func.jvp(lambda x: linear_act(x, w, b, "tanh"), (x,), (t,))


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_plain_vmap_runs_as_one_batched_call(device, act):
    # vmap without a grad transform (a model ensemble through torch.func.stack_module_state): the op
    # runs as the ATen ops it fuses, batched, not once per ensemble member through torch's fallback.
    from torch.func import functional_call, stack_module_state, vmap

    torch.manual_seed(0)
    models = [nn.Sequential(fastmlp.FusedLinear(6, 8, activation=act), fastmlp.FusedLinear(8, 3, activation="none")).to(device)
              for _ in range(5)]
    params, buffers = stack_module_state(models)
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    x = torch.randn(4, 6, device=device)
    ensemble = lambda p, b: functional_call(models[0], (p, b), (x,))  # noqa: E731
    with torch.profiler.profile() as prof:
        y = vmap(ensemble)(params, buffers)
    calls = [e.name for e in prof.events() if e.name == "fastmlp::linear_act_forward"]
    assert len(calls) == 2, calls  # one per layer, not one per layer and member
    want = torch.stack([m(x) for m in models])
    torch.testing.assert_close(y, want)
    # The op called directly under vmap returns the pre-activation when asked to save it, as eagerly.
    w, b = params["0.weight"].detach(), params["0.bias"].detach()
    _, saved = vmap(lambda w, b: ops.linear_act_forward(x, w, b, act, True))(w, b)
    want_saved = torch.stack([ops.linear_act_forward(x, wi, bi, act, True)[1] for wi, bi in zip(w, b)])
    if act == "relu":  # (relu saves no pre-activation)
        assert saved.numel() == 0 and want_saved.numel() == 0
    else:
        torch.testing.assert_close(saved, want_saved)
    # Gradients through the vmapped ensemble (ordinary autograd around vmap).
    y.square().sum().backward()
    for i, m in enumerate(models):
        m.zero_grad()
        m(x).square().sum().backward()
        torch.testing.assert_close(params["0.weight"].grad[i], m[0].weight.grad)
        torch.testing.assert_close(params["1.bias"].grad[i], m[1].bias.grad)


# Higher-order gradients: a backward recorded with create_graph=True runs as the ATen ops it fuses,
# and the pre-activation it reads routes the second-order term back through the op.
HIGHER_ORDER_CASES = [((4, 5), True, (True, True, True)), ((2, 3, 5), False, (True, True, False)),
                      ((4, 5), True, (True, False, False)), ((4, 5), True, (False, True, True)),
                      ((4, 5), True, (False, False, True))]


@pytest.mark.parametrize("act", ACTS)
def test_gradgradcheck(device, act):
    for shape, bias, rg in HIGHER_ORDER_CASES:
        x, w, b = make(shape, 3, torch.float64, device, bias=bias, requires_grad=rg)
        inputs = (x, w) if b is None else (x, w, b)
        assert torch.autograd.gradgradcheck(lambda *t: linear_act(*t, activation=act), inputs), (shape, rg)


def _two_layers(impl, x, params, act):
    w1, b1, w2, b2 = params
    return impl(impl(x, w1, b1, act), w2, b2, "none")


@pytest.mark.parametrize("act", ACTS)
def test_second_order_training_matches_native(device, act):
    """A WGAN-GP gradient penalty, a MAML outer step and a Hessian, each against nn.Linear's ops."""
    torch.manual_seed(0)
    x0 = torch.randn(6, 5, dtype=torch.float64, device=device)
    params = [torch.randn(7, 5, dtype=torch.float64, device=device) / 5 ** 0.5,
              torch.randn(7, dtype=torch.float64, device=device),
              torch.randn(3, 7, dtype=torch.float64, device=device) / 7 ** 0.5,
              torch.randn(3, dtype=torch.float64, device=device)]
    params = [p.requires_grad_() for p in params]
    got = {}
    for name, impl in (("fastmlp", linear_act), ("native", native)):
        # Gradient penalty: the critic's input gradient is part of the loss.
        x = x0.clone().requires_grad_()
        out = _two_layers(impl, x, params, act).sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        penalty = torch.autograd.grad(out + ((gx.norm(dim=1) - 1) ** 2).mean(), [x] + params)
        # The same with the critic frozen: only the input gets the penalty's gradient (the layers
        # then keep the weight but not the input).
        frozen = [p.detach() for p in params]
        out = _two_layers(impl, x, frozen, act).sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        # (none: the input gradient does not depend on the input; relu: it does, with a zero derivative.)
        penalty_frozen = torch.autograd.grad((gx ** 2).sum(), x) if gx.requires_grad else (torch.zeros_like(x),)
        got[name + " input gradient has a graph"] = gx.requires_grad
        # MAML: an inner step on the weights, the outer loss through it (the data needs no
        # gradient, so the first layer keeps its input but not its weight).
        inner = _two_layers(impl, x0, params, act).square().mean()
        g = torch.autograd.grad(inner, params, create_graph=True)
        assert all(t.requires_grad for t in g)
        fast = [p - 0.1 * gi for p, gi in zip(params, g)]
        maml = torch.autograd.grad(_two_layers(impl, x0, fast, act).sum(), params)
        hessian = torch.autograd.functional.hessian(lambda w: impl(x0, w, params[1], act).square().sum(),
                                                    params[0].detach())
        got[name] = [*penalty, *penalty_frozen, *maml, hessian]
    for a, n in zip(got["fastmlp"], got["native"]):
        torch.testing.assert_close(a, n)
    assert got["fastmlp input gradient has a graph"] == got["native input gradient has a graph"] == (act != "none")


def test_backward_op_called_directly_is_differentiable(device):
    x, w, b = make((4, 5), 3, torch.float64, device)
    for act in ACTS:
        y, saved = ops.linear_act_forward(x.detach(), w.detach(), b.detach(), act, True)
        g = torch.randn_like(y).requires_grad_()
        ins = [g, x.detach().requires_grad_(), w.detach().requires_grad_(), y.detach(), saved.detach()]
        if saved.numel():
            ins[4].requires_grad_()
        assert torch.autograd.gradcheck(
            lambda g, x, w, y, s: ops.linear_act_backward(g, x, w, y, s, act, [True, True, True]), ins), act
        # Without anything to record it stays the fused op and returns empty unrequested gradients.
        with torch.no_grad():
            gx, gw, gb = ops.linear_act_backward(*ins, act, [True, False, False])
        assert gw.numel() == 0 and gb.numel() == 0 and gx.shape == x.shape


def test_compiled_autograd(device):
    # torch's compiled autograd (the whole backward graph traced by dynamo) runs the op's C++
    # autograd node: gradients as eager's, for every activation.
    from torch._dynamo import compiled_autograd

    x, w, b = make((8, 5), 3, torch.float32, device)
    for act in ACTS:
        want = torch.autograd.grad(linear_act(x, w, b, act).square().sum(), (x, w, b))
        for t in (x, w, b):
            t.grad = None
        torch._dynamo.reset()
        with compiled_autograd._enable(torch.compile(backend="eager")):
            linear_act(x, w, b, act).square().sum().backward()
        for t, g in zip((x, w, b), want):
            torch.testing.assert_close(t.grad, g)


def test_compiled_backward_uses_the_fused_op(device):
    # torch.compile's joint graph runs the backward without recording it: the fused op, not its
    # ATen decomposition, must be what the compiled backward calls.
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def record(name):
        def compiler(gm, example_inputs):
            graphs[name] = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=record("forward"), bw_compiler=record("backward"))
    x, w, b = make((8, 5), 3, torch.float32, device)
    for act in ACTS:
        torch._dynamo.reset()
        f = torch.compile(lambda x, w, b: linear_act(x, w, b, act), backend=backend, fullgraph=True)
        f(x, w, b).sum().backward()
        assert "fastmlp.linear_act_forward.default" in graphs["forward"], act
        assert "fastmlp.linear_act_backward.default" in graphs["backward"], (act, graphs["backward"])
        assert not any("mm" in t for t in graphs["backward"]), (act, graphs["backward"])


def _opcheck_samples(device):
    samples = []
    for act, dtype, bias, shape, rg in [
        ("none", torch.float32, True, ((5, 7), 3), True),
        ("relu", torch.float32, True, ((5, 7), 3), True),
        ("relu", torch.float32, False, ((2, 3, 7), 4), True),
        ("relu", torch.bfloat16, True, ((5, 7), 3), True),
        ("gelu", torch.float32, True, ((5, 7), 3), True),
        ("gelu", torch.float64, False, ((7,), 2), True),
        ("gelu", torch.float16, True, ((4, 8), 8), True),
        ("gelu_tanh", torch.float32, True, ((5, 7), 3), True),
        ("gelu_tanh", torch.bfloat16, False, ((3, 2, 5), 6), True),
        ("silu", torch.float32, True, ((5, 7), 3), True),
        ("silu", torch.float64, True, ((1, 9), 10), True),
        ("silu", torch.float32, True, ((0, 7), 3), True),
        ("relu", torch.float32, True, ((6, 7), 5), False),
        ("gelu", torch.float32, True, ((6, 7), 5), False),
    ]:
        x, w, b = make(shape[0], shape[1], dtype, device, bias, (rg, rg, rg))
        samples.append((x, w, b, act, rg))
    return samples


@pytest.mark.timeout(900)
def test_opcheck_forward(device):
    for x, w, b, act, save in _opcheck_samples(device):
        torch.library.opcheck(ops.linear_act_forward, (x, w, b, act, save))


@pytest.mark.timeout(900)
def test_opcheck_backward(device):
    for x, w, b, act, _ in _opcheck_samples(device):
        y, saved = ops.linear_act_forward(x.detach(), w.detach(), None if b is None else b.detach(), act, True)
        g = torch.randn_like(y)
        out = y if act == "relu" else y.new_empty(0)
        for mask in ([True, True, b is not None], [False, True, False], [True, False, False]):
            torch.library.opcheck(ops.linear_act_backward, (g, x.detach(), w.detach(), out, saved, act, mask))


@pytest.mark.timeout(900)
def test_torch_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    for act, dtype, bias, shape in [
        ("relu", torch.float32, True, ((16, 12), 8)),
        ("gelu", torch.float32, True, ((2, 5, 12), 8)),
        ("gelu_tanh", torch.float32, False, ((16, 12), 8)),
        ("silu", torch.float64, True, ((16, 12), 8)),
        ("none", torch.float32, True, ((16, 12), 8)),
        ("gelu", torch.bfloat16, True, ((16, 12), 8)),
    ]:
        x, w, b = make(shape[0], shape[1], dtype, device, bias)

        def f(x, w, b):
            return linear_act(x, w, b, act).square().sum()

        compiled = torch.compile(f, fullgraph=True)
        inputs = [t for t in (x, w, b) if t is not None]
        ref = torch.autograd.grad(f(x, w, b), inputs)
        out = compiled(x, w, b)
        got = torch.autograd.grad(out, inputs)
        torch.testing.assert_close(out, f(x, w, b))
        for a, r in zip(got, ref):
            torch.testing.assert_close(a, r)


def test_fused_module_under_compile(device):
    torch._dynamo.reset()
    model = nn.Sequential(fastmlp.FusedLinear(12, 16, activation="gelu"), fastmlp.FusedLinear(16, 3, activation="none")).to(device)
    x = torch.randn(8, 12, device=device)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    g_compiled = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for a, p in zip(g_compiled, model.parameters()):
        torch.testing.assert_close(a, p.grad)


# ---- special values -------------------------------------------------------------------------

SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 100.0, -100.0, 3.0, -3.0]


def test_torch_export_and_jit_trace(device, tmp_path):
    # The README says both work: an exported program keeps fastmlp's op, saves, loads and runs;
    # a traced module gives the eager module's outputs.
    model = nn.Sequential(fastmlp.FusedLinear(12, 16, activation="gelu"), fastmlp.FusedLinear(16, 3, activation="none")).to(device)
    x = torch.randn(5, 12, device=device)
    want = native(native(x, model[0].weight, model[0].bias, "gelu"), model[1].weight, model[1].bias, "none")
    with torch.no_grad():
        ep = torch.export.export(model, (x,))
        assert "fastmlp.linear_act_forward" in str(ep.graph)
        torch.export.save(ep, tmp_path / "m.pt2")
        loaded = torch.export.load(tmp_path / "m.pt2")
        torch.testing.assert_close(loaded.module()(x), want)
        traced = torch.jit.trace(model, (x,))
        x2 = torch.randn(7, 12, device=device)
        torch.testing.assert_close(traced(x2), model(x2))
    torch.testing.assert_close(model(x), want)


def native_lane_consistent(y_native, x, w, b, act):
    """Native's output, except where torch's vectorised kernel returned NaN for a value whose
    one-element answer is not NaN: there, the one-element answer.

    torch 2.14.1's float32 and bf16 GELU returns NaN for +inf in its vector lanes on some CPUs (seen
    on an AVX-512 Xeon, with both its AVX-512 and AVX2 kernels; on the AMD EPYC machine before it
    this test passed against native's plain output), while the scalar tail of the same call, its
    fp64 kernel and its CUDA kernel return +inf: torch gives both answers for one input, depending
    on its position in the tensor."""
    with torch.no_grad():
        z = F.linear(x, w, b)
        lone = torch.stack([NATIVE_ACT[act](v.reshape(1))[0] for v in z.flatten()]).view_as(z)
    return torch.where(y_native.isnan() & ~lone.isnan(), lone, y_native)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_nan_inf_propagate_like_native(device, act, dtype):
    """act(special) and its gradients must match torch's, element by element.

    The specials reach the activation unmixed only through a 1-wide contraction: with
    in_features = 1, a weight of ones and a zero bias, Z[i, j] = x[i] exactly (a wider one sums
    each row, and one NaN or inf * 0 makes every output NaN). Two layouts, so that each gradient
    is per special: the specials as the input column (dZ -> grad_x[i] = sum_j dZ[i, j]) and as the
    weight column with an input of ones (grad_w[j], grad_b[j] = sums over rows of dZ[:, j])."""
    specials = torch.tensor(SPECIALS * 3, dtype=dtype, device=device)  # 39: vector bodies and remainders
    n = specials.numel()
    ones_col = lambda k: torch.ones(k, 1, dtype=dtype, device=device)  # noqa: E731
    layouts = {
        "specials as the input": (specials[:, None], ones_col(5), torch.zeros(5, dtype=dtype, device=device), 0),
        "specials as the weight": (ones_col(4), specials[:, None], torch.zeros(n, dtype=dtype, device=device), 1),
    }
    for layout, (x, w, b, informative) in layouts.items():
        x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
        g = torch.ones(x.shape[0], w.shape[0], dtype=dtype, device=device)
        ours = run(linear_act, x, w, b, act, g)
        nat = run(native, x, w, b, act, g)
        assert not nat[0].isnan().all(), layout  # the specials did reach the activation unmixed
        want = native_lane_consistent(nat[0], x, w, b, act)
        torch.testing.assert_close(ours[0], want, equal_nan=True, msg=lambda m: f"{layout}: {m}")
        # Gradients: NaN where native has NaN (nothing silently zeroed), the rest equal to native's.
        tol = dict(atol=1e-5, rtol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1.3e-6)
        for name, a, r in zip(("grad_x", "grad_w", "grad_b"), ours[1], nat[1]):
            assert torch.equal(a.isnan(), r.isnan()), f"{layout}, {name}: NaN pattern differs:\n{a}\n{r}"
            torch.testing.assert_close(a, r, equal_nan=True, **tol, msg=lambda m: f"{layout}, {name}: {m}")
        if act != "none":  # the per-special gradient is not all NaN either (see the docstring)
            assert not nat[1][informative].isnan().all(), layout


def test_nan_in_gives_nan_out(device):
    x, w, b = make((4, 6), 5, torch.float32, device)
    x = x.detach().clone()
    x[1, 2] = float("nan")
    for act in ACTS:
        y = linear_act(x, w, b, act)
        assert y[1].isnan().all() and not y[[0, 2, 3]].isnan().any(), act


# ---- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["kernel", "fake"])
def test_bad_inputs_raise_clear_errors(device, mode):
    # The same exception types and messages from the C++ checks and from the fake kernel (meta tensors;
    # torch.compile and torch.export run it on fake ones).
    if mode == "fake":
        device = "meta"
    x, w, b = make((4, 6), 5, torch.float32, device, requires_grad=(False, False, False))
    cases = [
        (lambda: linear_act(x, w, b, "tanh"), ValueError, r"unknown activation 'tanh'; expected one of: none, relu, gelu, gelu_tanh, silu"),
        (lambda: linear_act(x.double(), w, b), TypeError, r"expected input and weight to have the same dtype, but got input: (Double|torch.float64), weight: (Float|torch.float32)"),
        (lambda: linear_act(x, w, b.half()), TypeError, r"expected input and bias to have the same dtype"),
        (lambda: linear_act(x, w[:, :5]), ValueError, r"input.shape\[-1\] must equal in_features = weight.shape\[1\] = 5, got input of shape \[4, 6\]"),
        (lambda: linear_act(x, w.reshape(5, 6, 1)), ValueError, r"weight must be 2-D \(out_features, in_features\), got a 3-D tensor"),
        (lambda: linear_act(x, w, b[:4]), ValueError, r"bias must be 1-D of shape \[out_features\] = \[5\], got shape \[4\]"),
        (lambda: linear_act(x, w, b.reshape(5, 1)), ValueError, r"bias must be 1-D"),
        (lambda: linear_act(x.long(), w.long()), TypeError, r"input must be a floating-point tensor \(float32, float64, float16 or bfloat16\), got (Long|torch.int64)"),
        (lambda: linear_act(x[0, 0], w), ValueError, r"input must have at least 1 dimension"),
    ]
    for fn, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            fn()


@pytest.mark.parametrize("mode", ["kernel", "recorded", "fake"])
def test_bad_inputs_backward_raise_clear_errors(device, mode):
    # The backward op called directly: the same checks and messages whether it runs its kernel, is
    # recorded as the ATen ops it fuses (an input requires grad), or runs its fake kernel (meta).
    if mode == "fake":
        device = "meta"
    recorded = mode == "recorded"
    x, w = torch.randn(4, 6, device=device, requires_grad=recorded), torch.randn(5, 6, device=device)
    g, y, z = (torch.randn(4, 5, device=device) for _ in range(3))
    e = torch.empty(0, device=device)
    bwd = lambda g, x, w, y, s, act: ops.linear_act_backward(g, x, w, y, s, act, [True, True, True])  # noqa: E731
    op = r"^fastmlp.linear_act_backward: "
    cases = [
        (lambda: bwd(g, x, w, y, z, "tanh"), ValueError, r"unknown activation 'tanh'"),
        (lambda: bwd(g.long(), x, w, y, z, "gelu"), TypeError, r"grad_output must be a floating-point tensor"),
        (lambda: bwd(g, x, w[None], y, z, "gelu"), ValueError, r"weight must be 2-D \(out_features, in_features\), got a 3-D"),
        (lambda: bwd(g.double(), x, w, y, z, "gelu"), TypeError, r"expected grad_output and weight to have the same dtype"),
        (lambda: bwd(g, x.double(), w, y, z, "gelu"), TypeError, r"expected grad_output and input to have the same dtype"),
        (lambda: bwd(g[:, :4], x, w, y, z, "gelu"), ValueError, r"grad_output.shape\[-1\] must equal out_features = 5, got shape \[4, 4\]"),
        (lambda: bwd(g, torch.randn(4, 7, device=device, requires_grad=recorded), w, y, z, "gelu"), ValueError, r"input.shape\[-1\] must equal in_features = 6"),
        (lambda: bwd(g[:3], x, w, y, z, "gelu"), ValueError, r"grad_output of shape \[3, 5\] does not match input of shape \[4, 6\]"),
        (lambda: bwd(g, x, w, e, e, "relu"), ValueError, r"relu needs the forward output, got shape \[0\]"),
        (lambda: bwd(g, x, w, y.double(), e, "relu"), TypeError, r"expected grad_output and output to have the same dtype"),
        (lambda: bwd(g, x, w, e, e, "silu"), ValueError, r"silu needs the pre-activation saved by the forward"),
        (lambda: bwd(g, x, w, e, z.double(), "gelu"), TypeError, r"expected grad_output and saved to have the same dtype"),
    ]
    for fn, exc, pattern in cases:
        with pytest.raises(exc, match=op + pattern):
            fn()
    bwd(g, x, w, y, z, "gelu")  # the good call runs


@pytest.mark.parametrize("xs,out_f", [((2, 3, 6), 5), ((4, 0), 5), ((4, 6), 0), ((0, 6), 5)])
def test_backward_op_recorded_matches_kernel(device, xs, out_f):
    # The backward op called directly with an input that requires grad runs as ATen ops (its
    # gradients get a graph): the same results as its kernel, for 3-D inputs with a saved tensor of
    # any shape holding the right elements, zero features and zero rows.
    x = torch.randn(*xs, device=device)
    w = torch.randn(out_f, xs[-1], device=device)
    g = torch.randn(*xs[:-1], out_f, device=device)
    for act in ACTS:
        y, s = ops.linear_act_forward(x, w, None, act, True)
        if s.numel():
            s = s.reshape(*xs[:-1], out_f)
        want = ops.linear_act_backward(g, x, w, y, s, act, [True, True, True])
        got = ops.linear_act_backward(g, x.clone().requires_grad_(), w, y, s, act, [True, True, True])
        assert got[1].grad_fn is not None  # recorded (grad_w = dZ^T x has a graph)
        for name, a, b in zip(("grad_x", "grad_w", "grad_b"), got, want):
            torch.testing.assert_close(a, b, msg=lambda m: f"{act} {name}: {m}")


def test_backward_op_recorded_under_dynamic_compile():
    # The recorded path checks its arguments with symbolic sizes under torch.compile(dynamic=True).
    torch._dynamo.reset()
    bwd = lambda g, x, w, y, s: ops.linear_act_backward(g, x, w, y, s, "gelu", [True, True, True])  # noqa: E731
    compiled = torch.compile(bwd, dynamic=True, fullgraph=True)
    for rows in (4, 7):
        x, w = torch.randn(rows, 6, requires_grad=True), torch.randn(5, 6)
        y, s = ops.linear_act_forward(x.detach(), w, None, "gelu", True)
        g = torch.randn(rows, 5)
        for a, b in zip(compiled(g, x, w, y, s), bwd(g, x, w, y, s)):
            torch.testing.assert_close(a, b)
    with pytest.raises(Exception, match=r"grad_output of shape \[3, 5\] does not match input of shape \[7, 6\]"):
        compiled(g[:3], x, w, y, s)


def test_bad_inputs_fail_alike_under_compile():
    torch._dynamo.reset()
    x, w = torch.randn(4, 6), torch.randn(5, 7)
    compiled = torch.compile(lambda x, w: linear_act(x, w), fullgraph=True)
    with pytest.raises(Exception, match=r"input.shape\[-1\] must equal in_features"):
        compiled(x, w)


def test_module_rejects_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'Relu'"):
        fastmlp.FusedLinear(3, 4, activation="Relu")


# ---- autocast -------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_autocast_runs_in_autocast_dtype(device, act):
    amp_dtype = torch.bfloat16
    layer = fastmlp.FusedLinear(32, 16, activation=act).to(device)
    ref = nn.Linear(32, 16).to(device)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(8, 32, device=device)
    with torch.autocast(device_type=device, dtype=amp_dtype):
        y = layer(x)
        y_ref = NATIVE_ACT[act](ref(x))
    assert y.dtype == y_ref.dtype == amp_dtype
    torch.testing.assert_close(y, y_ref)
    y.float().sum().backward()
    y_ref.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=2e-2, atol=2e-2)


def test_pre_activation_saved_only_when_a_gradient_can_flow(device):
    x, w, b = make((4, 6), 5, torch.float32, device, requires_grad=(False, False, False))
    _, saved = ops.linear_act_forward(x, w, b, "gelu", False)
    assert saved.numel() == 0  # inference: no extra write
    w.requires_grad_()
    _, saved = ops.linear_act_forward(x, w, b, "gelu", False)
    assert saved.shape == (4, 5)  # the autograd kernel keeps what the backward needs
    with torch.no_grad():
        assert ops.linear_act_forward(x, w, b, "gelu", False)[1].numel() == 0


def _kept_for_backward(fn, *args):
    """Output of fn(*args) and the data pointers of the tensors its graph packed for the backward."""
    kept = []

    def pack(t):
        kept.append(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(*args)
    return y, kept


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("rg", [c for c in itertools.product([False, True], repeat=3) if any(c)],
                         ids=lambda c: "".join("xwb"[i] if v else "_" for i, v in enumerate(c)))
def test_backward_keeps_what_native_keeps(device, act, rg):
    # nn.Linear keeps the input only when the weight needs a gradient and the weight only when the
    # input does; fastmlp the same, plus the weight when only the bias needs one (for its shape).
    x, w, b = make((6, 7), 5, torch.float32, device, requires_grad=rg)
    _, nat = _kept_for_backward(native, x, w, b, act)
    _, ours = _kept_for_backward(linear_act, x, w, b, act)
    assert (x.data_ptr() in ours) == (x.data_ptr() in nat) == rg[1]
    assert (w.data_ptr() in ours) == (rg[0] or not rg[1])
    assert (w.data_ptr() in nat) == rg[0]
    g = torch.randn(6, 5, device=device)
    assert_matches_native(x, w, b, act)
    # What was not kept is not read: gradients still right with create_graph (a recorded backward).
    y = linear_act(x, w, b, act)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t.requires_grad], g, create_graph=True)
    want = torch.autograd.grad(native(x, w, b, act), [t for t in (x, w, b) if t.requires_grad], g)
    for a, n in zip(grads, want):
        torch.testing.assert_close(a, n)


def test_frozen_layer_does_not_keep_its_input_alive(device):
    import weakref

    x0 = torch.randn(8, 16, device=device, requires_grad=True)
    w = torch.randn(4, 16, device=device)  # frozen
    x = x0 * 2.0  # an activation only the layer refers to
    ref = weakref.ref(x)
    y = linear_act(x, w, None, "gelu")
    del x
    assert ref() is None  # native drops it too: dX = dZ W does not read X
    y.sum().backward()
    torch.testing.assert_close(x0.grad, torch.autograd.grad(native(x0 * 2.0, w, None, "gelu").sum(), x0)[0])


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_in_place_edit_of_a_tensor_the_backward_does_not_read(device, act):
    # As with nn.Linear: editing the input of a frozen layer, or the weight of a layer whose input
    # needs no gradient, after the forward is not an error and the gradients are unchanged.
    x0 = torch.randn(5, 6, device=device, requires_grad=True)
    w = torch.randn(3, 6, device=device)
    grads = []
    for fn in (native, linear_act):
        x = x0 * 1.0
        y = fn(x, w, None, act)
        x.add_(1.0)
        grads.append(torch.autograd.grad(y.sum(), x0)[0])
    torch.testing.assert_close(grads[1], grads[0])
    x = torch.randn(5, 6, device=device)
    grads = []
    for fn in (native, linear_act):
        w1 = torch.randn(3, 6, device=device, generator=None).requires_grad_()
        with torch.no_grad():
            w1.copy_(w)
        y = fn(x, w1, None, act)
        with torch.no_grad():
            w1.mul_(3.0)
        grads.append(torch.autograd.grad(y.sum(), w1)[0])
    torch.testing.assert_close(grads[1], grads[0])
    # The input the weight's gradient reads is still checked, as natively.
    xr = x0 * 1.0
    w2 = w.clone().requires_grad_()
    y = linear_act(xr, w2, None, act)
    xr.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_frozen_layers_under_compile(device):
    # torch.compile traces the backward with the stand-in for the input the frozen layer drops.
    torch._dynamo.reset()
    w1 = torch.randn(16, 8, device=device)  # frozen first layer
    w2 = torch.randn(4, 16, device=device, requires_grad=True)

    def f(x, act_fn):
        return act_fn(act_fn(x, w1, None, "gelu"), w2, None, "relu").sum()

    x = torch.randn(5, 8, device=device, requires_grad=True)
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(x, linear_act), [x, w2])
    want = torch.autograd.grad(f(x, native), [x, w2])
    for a, n in zip(got, want):
        torch.testing.assert_close(a, n)


def test_activation_passed_as_bias_gets_a_hint():
    x, w, _ = make((3, 4), 2, torch.float32, "cpu")
    with pytest.raises(TypeError, match=r"bias must be a Tensor or None, got the string 'relu'.*activation='relu'"):
        linear_act(x, w, "relu")
