"""fastmlp.dropout (CPU op), fastmlp.functional.dropout and fastmlp.nn.Dropout.

The op's mask is a counter-based hash of (seed, element index): tests check its statistics
(keep rate, independence of neighbours), that kept values are input / (1 - p) and dropped ones 0,
that the backward applies the same mask, determinism (seed, thread count), every dtype, odd
layouts, NaN, errors, gradcheck and opcheck; and that the module is a drop-in for nn.Dropout.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmlp
from fastmlp import ops
from fastmlp.functional import dropout

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def keep_mask(y):
    return y != 0


def drop(x, p, seed):
    """The op with an int seed (its schema takes the seed as a one-element int64 tensor)."""
    return ops.dropout(x, p, torch.tensor(seed))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_neighbour_independence(p):
    n = 1 << 20
    x = torch.ones(n)
    y = drop(x, p, 1234)
    k = keep_mask(y).double()
    q = 1 - p
    sigma = math.sqrt(q * (1 - q) / n)
    assert abs(k.mean().item() - q) < 5 * sigma
    # Adjacent elements (and elements one 512-wide row apart) are kept independently.
    for lag in (1, 512):
        both = (k[:-lag] * k[lag:]).mean().item()
        s2 = math.sqrt(q * q * (1 - q * q) / (n - lag))
        assert abs(both - q * q) < 6 * s2, (lag, both, q * q)


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_and_backward(dtype):
    p = 0.3
    x = torch.randn(37, 129, dtype=torch.float64).to(dtype).requires_grad_()
    y = drop(x, p, 99)
    assert y.dtype == dtype and y.shape == x.shape
    kept = keep_mask(y) | (x == 0)
    # Kept: x / (1 - p) computed in float (double for float64) and rounded once; dropped: 0.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = 1.0 / (1.0 - p)
    expect = torch.where(kept, (x.detach().to(acc) * torch.tensor(scale, dtype=acc)).to(dtype), torch.zeros((), dtype=dtype))
    torch.testing.assert_close(y.detach(), expect, rtol=0, atol=0)
    frac = kept.double().mean().item()
    assert 0.6 < frac < 0.8
    g = torch.randn_like(x)
    (gx,) = torch.autograd.grad(y, x, g)
    expect_g = torch.where(kept, (g.to(acc) * torch.tensor(scale, dtype=acc)).to(dtype), torch.zeros((), dtype=dtype))
    torch.testing.assert_close(gx, expect_g, rtol=0, atol=0)


def test_seed_determinism_and_thread_count():
    x = torch.randn(300, 1000)
    a = drop(x, 0.5, 7)
    assert torch.equal(a, drop(x, 0.5, 7))
    assert not torch.equal(keep_mask(a), keep_mask(drop(x, 0.5, 8)))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(a, drop(x, 0.5, 7))
    finally:
        torch.set_num_threads(old)
    # functional.dropout draws its seed from torch's generator: manual_seed reproduces it.
    torch.manual_seed(3)
    b = dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(b, dropout(x, 0.5))


def test_layouts_and_edge_shapes():
    base = torch.randn(64, 48)
    xt = base.t()  # non-contiguous: the mask follows the logical (row-major) order
    assert torch.equal(drop(xt, 0.4, 5), drop(xt.contiguous(), 0.4, 5))
    sliced = torch.randn(10, 20)[:, ::3]
    assert torch.equal(drop(sliced, 0.4, 5), drop(sliced.contiguous(), 0.4, 5))
    # The output keeps the input's layout, as torch's dropout (empty_like), and so does the
    # gradient; the mask still follows the logical order.
    nhwc = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    for x in (xt, nhwc):
        y = drop(x, 0.4, 5)
        assert y.stride() == torch.empty_like(x).stride() == torch.nn.functional.dropout(x, 0.4).stride()
        assert torch.equal(y, drop(x.detach().contiguous(), 0.4, 5))
    torch.manual_seed(1)
    y = fastmlp.nn.Dropout(0.4)(nhwc)
    (g,) = torch.autograd.grad(y, nhwc, torch.ones_like(y))
    assert y.is_contiguous(memory_format=torch.channels_last) and g.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(g, (y != 0).to(g.dtype) / 0.6)
    assert drop(torch.randn(0, 7), 0.5, 1).shape == (0, 7)
    # A 0-d input: one element, kept as x / (1 - p) or dropped to 0, both across seeds; the same
    # through functional.dropout and the module in training, and x itself in evaluation.
    x0, p = torch.tensor(-1.7), 0.3
    kept_value = x0 * torch.tensor(1.0 / (1.0 - p))
    outs = [drop(x0, p, s) for s in range(64)]
    torch.manual_seed(0)
    outs += [dropout(x0, p) for _ in range(64)] + [fastmlp.nn.Dropout(p)(x0) for _ in range(64)]
    assert all(y.shape == () and y.dtype == x0.dtype for y in outs)
    assert all(torch.equal(y, kept_value) or torch.equal(y, torch.zeros(())) for y in outs)
    assert 0 < sum(bool(y == 0) for y in outs) < len(outs)
    assert torch.equal(dropout(x0, p, training=False), x0)
    assert torch.equal(fastmlp.nn.Dropout(p).eval()(x0), x0)
    x3 = torch.randn(2, 3, 4)
    assert torch.equal(drop(x3, 0.5, 11).flatten(), drop(x3.flatten(), 0.5, 11))
    # p = 0 keeps everything exactly.
    assert torch.equal(drop(base, 0.0, 1), base)


def test_nan_and_inf_propagate_like_torch():
    x = torch.tensor([float("nan"), float("inf"), 1.0, 2.0] * 256)
    for y in (drop(x, 0.5, 21), F.dropout(x, 0.5, training=True)):
        # NaN stays NaN whether kept or dropped (x * 0); a dropped Inf becomes NaN, a kept one Inf.
        assert torch.isnan(y[0::4]).all()
        inf = y[1::4]
        assert (torch.isinf(inf) | torch.isnan(inf)).all()
        assert torch.isinf(inf).any() and torch.isnan(inf).any()


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"fastmlp\.dropout: p must be in \[0, 1\), got 1"):
        drop(torch.randn(3), 1.0, 0)
    with pytest.raises(ValueError, match="p must be in"):
        drop(torch.randn(3), -0.1, 0)
    with pytest.raises(TypeError, match="input must be a floating-point tensor.*got Long"):
        drop(torch.arange(3), 0.5, 0)
    for seed, what in [(torch.tensor(1.0), "Float"), (torch.tensor([1, 2]), r"shape \[2\]"),
                       (torch.tensor(1, dtype=torch.int32), "Int")]:
        with pytest.raises(ValueError, match=f"seed must be a one-element int64 CPU tensor, got .*{what}"):
            ops.dropout(torch.randn(3), 0.5, seed)


def test_seed_changed_before_backward_is_caught():
    x = torch.randn(16, requires_grad=True)
    seed = torch.tensor(3)
    y = ops.dropout(x, 0.5, seed)
    seed.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_default_device_does_not_move_the_seed():
    x = torch.randn(32, 8)
    with torch.device("meta"):
        y = dropout(x, 0.5)
    assert y.device.type == "cpu" and 0 < keep_mask(y).float().mean().item() < 1


def test_gradcheck_and_opcheck():
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: drop(t, 0.35, 17), (x,))
    assert torch.autograd.gradgradcheck(lambda t: drop(t, 0.35, 17), (x,))
    for args in [(torch.randn(5, 7), 0.2, torch.tensor(3)),
                 (torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True), 0.5, torch.tensor(9)),
                 (torch.randn(0, 4), 0.1, torch.tensor(1)), (torch.randn(8, 16).t(), 0.7, torch.tensor([2])),
                 (torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last), 0.3, torch.tensor(4))]:
        torch.library.opcheck(ops.dropout, args)


def test_module_is_a_drop_in():
    ours, ref = fastmlp.nn.Dropout(0.25), nn.Dropout(0.25)
    assert repr(ours) == repr(ref) and ours.state_dict() == ref.state_dict() == {}
    assert isinstance(ours, nn.Dropout)
    x = torch.randn(64, 32)
    y = ours(x)
    assert 0.6 < keep_mask(y).float().mean().item() < 0.9
    ours.eval()
    assert torch.equal(ours(x), x)
    # p = 1, which the op does not take, matches torch exactly.
    assert torch.equal(fastmlp.nn.Dropout(1.0)(x), torch.zeros_like(x))
    # inplace=True: the result written into the input, the same mask as inplace=False for one seed
    # (as torch's); the backward is intact, and a leaf that requires grad is refused, as by torch.
    xi = x.clone()
    torch.manual_seed(5)
    a = fastmlp.nn.Dropout(0.5, inplace=True)(xi)
    torch.manual_seed(5)
    b = fastmlp.nn.Dropout(0.5)(x)
    assert a is xi and torch.equal(a, b)
    leaf = x.clone().requires_grad_()
    h = leaf * 2.0
    torch.manual_seed(5)
    out = fastmlp.functional.dropout(h, 0.5, inplace=True)
    assert out is h
    out.sum().backward()
    torch.testing.assert_close(leaf.grad, 2.0 * (b != 0).float() / 0.5)
    for impl in (fastmlp.functional.dropout, torch.nn.functional.dropout):
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
            impl(x.clone().requires_grad_(), 0.5, True, True)


def test_mlp_uses_it_and_compiles():
    m = fastmlp.nn.MLP([20, 16, 4], activation="gelu", dropout=0.2)
    assert isinstance(m[0].dropout, fastmlp.nn.Dropout)
    assert type(fastmlp.nn.MLP([20, 16, 4], dropout=0.2, impl="torch")[0].dropout) is nn.Dropout
    x = torch.randn(8, 20)
    m(x).sum().backward()
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(x)
    assert out.shape == (8, 4) and torch.isfinite(out).all()


def test_compiled_dropout_is_the_op_with_a_fresh_mask_per_call():
    """Under torch.compile(fullgraph=True) the op (not torch's dropout) runs, the seed is drawn
    inside the graph (a new mask per call, reproducible from torch.manual_seed), and the backward
    applies the forward's mask."""
    from torch._dynamo.testing import CompileCounterWithBackend

    backend = CompileCounterWithBackend("aot_eager")
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return backend(gm, example_inputs)

    f = torch.compile(lambda t: dropout(t, 0.5) * 2.0, backend=capture, fullgraph=True)
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(0)
    a = f(x)
    b = f(x)
    assert backend.frame_count == 1
    assert any("fastmlp.dropout" in str(n.target) for g in graphs for n in g.graph.nodes)
    assert not torch.equal(keep_mask(a), keep_mask(b))
    for y in (a, b):
        kept = keep_mask(y)
        assert 0.35 < kept.float().mean().item() < 0.65
        torch.testing.assert_close(y[kept], x.detach()[kept] * 4.0)
    torch.manual_seed(0)
    assert torch.equal(f(x), a)
    (g,) = torch.autograd.grad(a.sum(), x)
    assert torch.equal(g != 0, keep_mask(a))
    torch.testing.assert_close(g[keep_mask(a)], torch.full_like(g[keep_mask(a)], 4.0))
    # Inductor (the default backend) draws the seed with its own RNG lowering (as for torch's own
    # compiled dropout, the masks differ from eager's), still from the default generator.
    fi = torch.compile(lambda t: dropout(t, 0.5), fullgraph=True)
    torch.manual_seed(1)
    c1, c2 = fi(x), fi(x)
    torch.manual_seed(1)
    assert torch.equal(fi(x), c1) and not torch.equal(keep_mask(c1), keep_mask(c2))
    torch.testing.assert_close(c1[keep_mask(c1)], x.detach()[keep_mask(c1)] * 2.0)


def test_cuda_falls_back_to_torch(device):
    if device == "cpu":
        pytest.skip("the CUDA fallback")
    x = torch.randn(32, 16, device=device, requires_grad=True)
    y = fastmlp.nn.Dropout(0.5)(x)
    y.sum().backward()
    assert y.device == x.device and torch.equal(keep_mask(y), x.grad != 0)


def test_forward_ad_tangent_is_the_same_mask():
    import torch.autograd.forward_ad as fwAD

    x, t = torch.randn(64, 33, dtype=torch.float64), torch.randn(64, 33, dtype=torch.float64)
    torch.manual_seed(5)
    y = dropout(x, 0.3)
    torch.manual_seed(5)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(dropout(fwAD.make_dual(x, t), 0.3))
    assert torch.equal(out.primal, y)
    torch.testing.assert_close(out.tangent, torch.where(y == 0, 0.0, t / 0.7))
    torch.manual_seed(5)
    primal, tangent = torch.func.jvp(lambda x: dropout(x, 0.3), (x,), (t,))
    assert torch.equal(primal, y)
    torch.testing.assert_close(tangent, out.tangent)
