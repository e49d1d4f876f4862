"""fastmlp.layer_norm / batch_norm (CPU ops), their functional forms and fastmlp.nn.LayerNorm /
BatchNorm1d.

Every case is checked against torch's norm computed in float64 (forward, the three gradients, the
running estimates): within 2x torch's own error in the input dtype, plus a few float64 ulps. Also:
odd and empty shapes, 3-D inputs, every weight/bias combination, float32 parameters on half inputs,
non-contiguous inputs, NaN, thread-count independence, gradcheck and gradgradcheck, opcheck,
forward-mode AD and vmap, errors (eager and fake kernels alike), torch.compile, torch.fx, the
modules as drop-ins (state, running estimates, momentum=None, eval mode), convert() and MLP.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmlp
from fastmlp import ops
from fastmlp.functional import batch_norm, layer_norm

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FLOOR = {torch.float64: 1e-13, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _ln(x, n_shape, w=None, b=None, eps=1e-5):
    """The op itself (fastmlp.functional sends float16 / bfloat16 inputs to torch's norms)."""
    return ops.layer_norm(x, [n_shape] if isinstance(n_shape, int) else list(n_shape), w, b, eps)[0]


def _bn(x, w=None, b=None, eps=1e-5):
    return ops.batch_norm(x, w, b, eps)[0]


def _err(got, ref):
    return (got.double() - ref).abs().max().item() if got.numel() else 0.0


def _params(n_shape, dtype, weight, bias):
    w = torch.randn(n_shape, dtype=torch.float64).to(dtype) if weight else None
    b = torch.randn(n_shape, dtype=torch.float64).to(dtype) if bias else None
    return w, b


def _compare(ours_fn, torch_fn, x, w, b, g):
    """Forward and gradients of ours_fn against torch_fn in float64 (the reference) and in x's dtype
    (torch's own error): ours may be off by at most 2x torch's error plus a floor."""
    ref_args = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    ref_y = torch_fn(*ref_args)
    ref_y.backward(g.double())
    tr_args = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    tr_y = torch_fn(*tr_args)
    tr_y.backward(g)
    our_args = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    our_y = ours_fn(*our_args)
    our_y.backward(g)
    assert our_y.dtype == tr_y.dtype and our_y.shape == tr_y.shape
    floor = FLOOR[x.dtype] * max(1.0, ref_y.abs().max().item() if ref_y.numel() else 1.0)
    assert _err(our_y, ref_y) <= 2 * _err(tr_y, ref_y) + floor, ("y", _err(our_y, ref_y), _err(tr_y, ref_y))
    for name, o, t, r in zip(("x", "weight", "bias"), our_args, tr_args, ref_args):
        if r is None:
            continue
        assert o.grad.dtype == t.grad.dtype and o.grad.shape == t.grad.shape, name
        fl = FLOOR[o.dtype] * max(1.0, r.grad.abs().max().item() if r.grad.numel() else 1.0)
        assert _err(o.grad, r.grad) <= 2 * _err(t.grad, r.grad) + fl, (name, _err(o.grad, r.grad), _err(t.grad, r.grad))
    return our_y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,n_shape", [((7, 781), (781,)), ((300, 10), (10,)), ((1, 33), (33,)),
                                           ((4, 5, 12), (12,)), ((3, 5, 12), (5, 12)), ((256, 512), (512,))])
def test_layer_norm_matches_torch(dtype, shape, n_shape):
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(dtype)
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    for weight, bias in [(True, True), (True, False), (False, False), (False, True)]:
        w, b = _params(n_shape, dtype, weight, bias)
        _compare(lambda x, w, b: _ln(x, n_shape, w, b), lambda x, w, b: F.layer_norm(x, n_shape, w, b, 1e-5), x, w, b, g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 781), (300, 10), (2, 1), (256, 512), (5000, 3)])
def test_batch_norm_matches_torch(dtype, shape):
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(dtype)
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    for weight, bias in [(True, True), (False, False), (True, False)]:
        w, b = _params(shape[1], dtype, weight, bias)
        _compare(lambda x, w, b: _bn(x, w, b), lambda x, w, b: F.batch_norm(x, None, None, w, b, True), x, w, b, g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_parameters_on_half_inputs(dtype):
    # As torch allows (autocast leaves a norm's float32 parameters alone): the output in the input's
    # dtype, the parameter gradients in float32.
    x = torch.randn(64, 48, dtype=torch.float64).to(dtype)
    g = torch.randn(64, 48, dtype=torch.float64).to(dtype)
    w, b = _params(48, torch.float32, True, True)
    y = _compare(lambda x, w, b: _ln(x, 48, w, b), lambda x, w, b: F.layer_norm(x, (48,), w, b), x, w, b, g)
    assert y.dtype == dtype
    _compare(lambda x, w, b: _bn(x, w, b), lambda x, w, b: F.batch_norm(x, None, None, w, b, True), x, w, b, g)


def test_functional_forms_send_half_inputs_to_torch():
    # float32 / float64: the op (bitwise); float16 / bfloat16: torch's norm (bitwise), as its CPU
    # kernels convert half types faster than ours would.
    for dtype in DTYPES:
        x = torch.randn(32, 16, dtype=torch.float64).to(dtype)
        w, b = torch.randn(16), torch.randn(16)
        if dtype == torch.float64:
            w, b = w.double(), b.double()
        use_op = dtype in (torch.float32, torch.float64)
        expect_ln = _ln(x, 16, w, b) if use_op else F.layer_norm(x, (16,), w, b)
        expect_bn = _bn(x, w, b) if use_op else F.batch_norm(x, None, None, w, b, True)
        assert torch.equal(layer_norm(x, 16, w, b), expect_ln), dtype
        assert torch.equal(batch_norm(x, None, None, w, b, True), expect_bn), dtype


def test_statistics_outputs():
    x = torch.randn(9, 4, 20) * 2 + 5
    y, mean, rstd = ops.layer_norm(x, [20], None, None, 1e-5)
    assert mean.shape == rstd.shape == (36,) and mean.dtype == torch.float32
    torch.testing.assert_close(mean, x.reshape(36, 20).mean(1))
    torch.testing.assert_close(rstd, (x.reshape(36, 20).var(1, unbiased=False) + 1e-5).rsqrt())
    x2 = torch.randn(40, 6, dtype=torch.float64) * 3 - 7
    y, mean, invstd, uvar = ops.batch_norm(x2, None, None, 1e-3)
    assert mean.dtype == torch.float64 and mean.shape == (6,)
    torch.testing.assert_close(mean, x2.mean(0))
    torch.testing.assert_close(invstd, (x2.var(0, unbiased=False) + 1e-3).rsqrt())
    torch.testing.assert_close(uvar, x2.var(0))
    _, mean, rstd = ops.layer_norm(torch.randn(2, 8).bfloat16(), [8], None, None, 1e-5)
    assert mean.dtype == rstd.dtype == torch.float32


def test_large_mean_small_spread():
    # Two-pass statistics: no cancellation when the mean dwarfs the spread (a one-pass E[x^2] - E[x]^2
    # in float32 would lose the variance, ~0.01 against rounding errors of ~10, entirely). What is left
    # is the rounding of x - mean in float32, as in torch's.
    x = (1e4 + torch.randn(512, 64, dtype=torch.float64) * 1e-1).float()
    for fn, ref in [(lambda t: layer_norm(t, 64), lambda t: F.layer_norm(t, (64,))),
                    (lambda t: batch_norm(t, None, None, training=True), lambda t: F.batch_norm(t, None, None, training=True))]:
        expect = ref(x.double())
        ours, torchs = _err(fn(x), expect), _err(ref(x), expect)
        assert ours <= 2 * torchs + 1e-5 and ours < 0.1, (ours, torchs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_rows_and_columns_normalise_to_the_bias(dtype):
    # A constant row (layer norm) or column (batch norm) has the exact mean and a variance of 0, so
    # y = bias, as torch's Welford statistics give. (The mean as a rounded sum times a rounded 1/N is
    # off by an ulp; rstd ~ 1/sqrt(eps) then blew that up: 12345.678 in 512 columns gave -0.78.)
    b = torch.arange(781, dtype=dtype) / 7
    for c in (12345.678, 100.1, 2.7, 0.1, -3.3e7):
        x = torch.full((5, 781), c, dtype=dtype)
        x[2] = 1.0  # a row of another value
        assert torch.equal(layer_norm(x, 781, None, b), b.expand(5, 781)), c
        xb = torch.full((3000, 781), c, dtype=dtype)  # several chunks of rows, merged
        rm, rv = torch.zeros(781, dtype=dtype), torch.ones(781, dtype=dtype)
        assert torch.equal(batch_norm(xb, rm, rv, None, b, True), b.expand(3000, 781)), c
        # The running estimates moved towards the exact mean c and variance 0 (torch's float32 batch
        # norm itself has 12345.819 as the mean of 3000 x 12345.678).
        assert torch.equal(rm, torch.zeros_like(rm).lerp_(torch.full_like(rm, c), 0.1)), c
        assert torch.equal(rv, torch.ones_like(rv).lerp_(torch.zeros_like(rv), 0.1)), c
    # eps = 0: 0 / 0, NaN as torch's.
    assert torch.isnan(layer_norm(torch.full((2, 16), 3.3, dtype=dtype), 16, eps=0.0)).all()


def test_float32_statistics_past_the_float_range():
    # float32 inputs whose squares overflow a float (a spread past ~1.8e19) or whose sums do (values
    # near 3e38): the statistics of those rows / columns are taken again in double, and the results
    # are float64's (torch's float32 norms give NaN here; ours gave the bias and zero gradients).
    torch.manual_seed(0)
    for x in (torch.randn(6, 40) * 1e20, torch.randn(6, 40) * 1e36 + 2e38):
        x64 = x.double()
        w, b = torch.randn(40), torch.randn(40)
        a, r = x.clone().requires_grad_(), x64.clone().requires_grad_()
        y, yr = layer_norm(a, 40, w, b), F.layer_norm(r, (40,), w.double(), b.double())
        g = torch.randn(6, 40)
        y.backward(g)
        yr.backward(g.double())
        # (The mean is kept in float32: near 2e38 its rounding, 1e31, is 1e-5 of a 1e36 spread.)
        torch.testing.assert_close(y.double(), yr, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-3, atol=1e-30)
        xb = x.t().contiguous()  # (40, 6): columns of the same values
        rm, rv = torch.zeros(6), torch.ones(6)
        rm64, rv64 = rm.double(), rv.double()
        yb = batch_norm(xb, rm, rv, None, None, True)
        ybr = F.batch_norm(xb.double(), rm64, rv64, None, None, True)
        torch.testing.assert_close(yb.double(), ybr, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rm.double(), rm64)
        # The running variance of a 1e20 spread is ~1e40: past float32's range, inf as its float64 value rounded.
        torch.testing.assert_close(rv.double(), rv64.float().double())


def test_layouts_and_edge_shapes():
    # Non-contiguous inputs and gradients give what their contiguous copies give.
    base = torch.randn(96, 40)
    x = base.t()[:, ::2]  # (40, 48), strided
    g = torch.randn(48, 40).t()
    w, b = torch.randn(48), torch.randn(48)
    for fn in (lambda t: layer_norm(t, 48, w, b), lambda t: batch_norm(t, None, None, w, b, True)):
        a = x.clone().requires_grad_()
        c = x.contiguous().requires_grad_()
        ya, yc = fn(a), fn(c)
        ya.backward(g)
        yc.backward(g.contiguous())
        assert torch.equal(ya, yc) and torch.equal(a.grad, c.grad)
    # Empty batches: layer norm gives empty results and zero parameter gradients; a batch norm
    # module with an empty batch does what torch's does (torch's path).
    for shape in [(0, 16), (3, 0, 16)]:
        x0 = torch.randn(shape, requires_grad=True)
        w0 = torch.randn(16, requires_grad=True)
        y0 = layer_norm(x0, 16, w0)
        y0.sum().backward()
        assert y0.shape == shape and torch.equal(w0.grad, torch.zeros(16))
    ours, ref = fastmlp.nn.BatchNorm1d(16), nn.BatchNorm1d(16)
    e = torch.randn(0, 16)
    assert ours(e).shape == ref(e).shape == (0, 16)
    assert torch.equal(ours.num_batches_tracked, ref.num_batches_tracked)
    # One row in training: torch's error.
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fastmlp.nn.BatchNorm1d(4)(torch.randn(1, 4))


def test_nan_propagates():
    x = torch.randn(6, 8)
    x[2, 3] = float("nan")
    y = layer_norm(x, 8)
    assert torch.isnan(y[2]).all() and torch.isfinite(torch.cat([y[:2], y[3:]])).all()
    yb = batch_norm(x, None, None, training=True)
    assert torch.isnan(yb[:, 3]).all() and torch.isfinite(torch.cat([yb[:, :3], yb[:, 4:]], 1)).all()


def test_results_do_not_depend_on_the_thread_count():
    x = torch.randn(1000, 300)
    g = torch.randn(1000, 300)
    w, b = torch.randn(300), torch.randn(300)
    threads = torch.get_num_threads()

    def run():
        y, mean, rstd = ops.layer_norm(x, [300], w, b, 1e-5)
        lb = ops.layer_norm_backward(g, x, [300], mean, rstd, w, [True, True, True])
        yb, bmean, invstd, uvar = ops.batch_norm(x, w, b, 1e-5)
        bb = ops.batch_norm_backward(g, x, bmean, invstd, w, [True, True, True])
        return [y, mean, rstd, *lb, yb, bmean, invstd, uvar, *bb]

    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_output_mask():
    x, g, w = torch.randn(20, 12), torch.randn(20, 12), torch.randn(12)
    y, mean, rstd = ops.layer_norm(x, [12], w, None, 1e-5)
    full = ops.layer_norm_backward(g, x, [12], mean, rstd, w, [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, False, False]):
        part = ops.layer_norm_backward(g, x, [12], mean, rstd, w, mask)
        for m, p, f in zip(mask, part, full):
            assert torch.equal(p, f) if m else p.numel() == 0
    _, bmean, invstd, _ = ops.batch_norm(x, w, None, 1e-5)
    full = ops.batch_norm_backward(g, x, bmean, invstd, w, [True, True, True])
    for mask in ([True, False, False], [False, True, True]):
        part = ops.batch_norm_backward(g, x, bmean, invstd, w, mask)
        for m, p, f in zip(mask, part, full):
            assert torch.equal(p, f) if m else p.numel() == 0


def test_gradcheck_gradgradcheck_and_opcheck():
    x = torch.randn(5, 3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    xb = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    for fn, args in [(lambda x, w, b: layer_norm(x, 7, w, b), (x, w, b)),
                     (lambda x, w: layer_norm(x, (3, 7), w.expand(3, 7)), (x, w)),
                     (lambda x, w, b: batch_norm(x, None, None, w, b, True), (xb, w, b)),
                     (lambda x: batch_norm(x, None, None, training=True), (xb,))]:
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)
    # The backward ops called directly while recording are differentiable too.
    g = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    _, mean, rstd = ops.layer_norm(xb.detach(), [7], w.detach(), None, 1e-5)
    assert torch.autograd.gradcheck(
        lambda g, x, w: ops.layer_norm_backward(g, x, [7], mean, rstd, w, [True, True, True]), (g, xb, w))
    _, bmean, invstd, _ = ops.batch_norm(xb.detach(), w.detach(), None, 1e-5)
    assert torch.autograd.gradcheck(
        lambda g, x, w: ops.batch_norm_backward(g, x, bmean, invstd, w, [True, True, True]), (g, xb, w))
    f32 = torch.float32
    for args in [(torch.randn(6, 10), [10], torch.randn(10), torch.randn(10), 1e-5),
                 (torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True), [3, 4], None, None, 1e-3),
                 (torch.randn(0, 5), [5], torch.randn(5), None, 1e-5),
                 (torch.randn(8, 6).bfloat16(), [6], torch.randn(6, dtype=f32), torch.randn(6, dtype=f32), 1e-5),
                 (torch.randn(12, 8).t(), [12], None, torch.randn(12, requires_grad=True), 1e-5)]:
        torch.library.opcheck(ops.layer_norm, args)
    for args in [(torch.randn(6, 10), torch.randn(10), torch.randn(10), 1e-5),
                 (torch.randn(7, 3, dtype=torch.float64, requires_grad=True), None, None, 1e-3),
                 (torch.randn(16, 4).half(), torch.randn(4, dtype=f32), None, 1e-5),
                 (torch.randn(12, 8).t(), torch.randn(12, requires_grad=True), torch.randn(12), 1e-5)]:
        torch.library.opcheck(ops.batch_norm, args)
    x, g, w = torch.randn(6, 10), torch.randn(6, 10), torch.randn(10)
    _, mean, rstd = ops.layer_norm(x, [10], w, None, 1e-5)
    torch.library.opcheck(ops.layer_norm_backward, (g, x, [10], mean, rstd, w, [True, True, False]))
    torch.library.opcheck(ops.layer_norm_backward, (g, x, [10], mean, rstd, None, [True, False, True]))
    _, bmean, invstd, _ = ops.batch_norm(x, w, None, 1e-5)
    torch.library.opcheck(ops.batch_norm_backward, (g, x, bmean, invstd, w, [True, True, True]))
    torch.library.opcheck(ops.batch_norm_backward, (g, x, bmean, invstd, None, [False, False, True]))


def test_forward_ad_and_vmap():
    x, t = torch.randn(6, 9, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    w = torch.randn(9, dtype=torch.float64)
    for ours, ref in [(lambda x: layer_norm(x, 9, w), lambda x: F.layer_norm(x, (9,), w)),
                      (lambda x: batch_norm(x, None, None, w, None, True), lambda x: F.batch_norm(x, None, None, w, None, True))]:
        p1, t1 = torch.func.jvp(ours, (x,), (t,))
        p2, t2 = torch.func.jvp(ref, (x,), (t,))
        torch.testing.assert_close(p1, p2)
        torch.testing.assert_close(t1, t2)
        xs = torch.randn(3, 6, 9, dtype=torch.float64)
        torch.testing.assert_close(torch.func.vmap(ours)(xs), torch.stack([ref(v) for v in xs]))
        torch.testing.assert_close(torch.func.grad(lambda x: ours(x).pow(2).sum())(x),
                                   torch.func.grad(lambda x: ref(x).pow(2).sum())(x))


def test_bad_inputs_eager_and_fake_alike():
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases = [
        (lambda: ops.layer_norm(torch.randn(4, 6), [5], None, None, 1e-5), ValueError,
         r"fastmlp.layer_norm: input's last 1 dimension\(s\) must be normalized_shape = \[5\], got input of shape \[4, 6\]"),
        (lambda: ops.layer_norm(torch.randn(4, 6), [], None, None, 1e-5), ValueError, "normalized_shape must have at least one"),
        (lambda: ops.layer_norm(torch.randn(4, 6), [6], torch.randn(5), None, 1e-5), ValueError,
         r"weight must have shape normalized_shape = \[6\], got \[5\]"),
        (lambda: ops.layer_norm(torch.randn(4, 6), [6], torch.randn(6, dtype=torch.float64), None, 1e-5), TypeError,
         "expected weight to have the input's dtype"),
        (lambda: ops.layer_norm(torch.randn(4, 6, dtype=torch.float64), [6], torch.randn(6), None, 1e-5), TypeError,
         "expected weight to have the input's dtype"),
        (lambda: ops.layer_norm(torch.randint(0, 3, (4, 6)), [6], None, None, 1e-5), TypeError,
         "input must be a floating-point tensor"),
        (lambda: ops.batch_norm(torch.randn(4, 6, 2), None, None, 1e-5), ValueError,
         r"fastmlp.batch_norm: input must be 2-D \(batch, channels\), got a 3-D tensor"),
        (lambda: ops.batch_norm(torch.randn(4, 6), None, torch.randn(4), 1e-5), ValueError,
         r"bias must have shape \[channels\] = \[6\], got \[4\]"),
        (lambda: ops.batch_norm_backward(torch.randn(4, 5), torch.randn(4, 6), torch.zeros(6), torch.ones(6), None,
                                         [True, True, True]), ValueError, "grad_output must have the input's shape"),
        (lambda: ops.batch_norm_backward(torch.randn(4, 6), torch.randn(4, 6), torch.zeros(5), torch.ones(6), None,
                                         [True, True, True]), ValueError, "mean must have 6 elements"),
        (lambda: ops.layer_norm_backward(torch.randn(4, 6), torch.randn(4, 6), [6], torch.zeros(4, dtype=torch.float64),
                                         torch.ones(4), None, [True, True, True]), TypeError, "mean must be Float"),
    ]
    for fn, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            fn()
        with FakeTensorMode(), pytest.raises(exc, match=pattern.split(": ", 1)[-1].replace("Float", "(Float|torch.float32)")):
            fn()
    # The modules point at torch's own checks first.
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        fastmlp.nn.BatchNorm1d(4)(torch.randn(2, 4, 3, 3))


def test_modules_are_drop_ins():
    for ours, ref in [(fastmlp.nn.BatchNorm1d(12), nn.BatchNorm1d(12)),
                      (fastmlp.nn.BatchNorm1d(12, momentum=None), nn.BatchNorm1d(12, momentum=None)),
                      (fastmlp.nn.BatchNorm1d(12, affine=False, track_running_stats=False),
                       nn.BatchNorm1d(12, affine=False, track_running_stats=False)),
                      (fastmlp.nn.LayerNorm(12), nn.LayerNorm(12)),
                      (fastmlp.nn.LayerNorm(12, elementwise_affine=False), nn.LayerNorm(12, elementwise_affine=False)),
                      (fastmlp.nn.LayerNorm(12, bias=False), nn.LayerNorm(12, bias=False))]:
        assert repr(ours) == repr(ref) and isinstance(ours, type(ref))
        ours.load_state_dict(ref.state_dict())
        with torch.no_grad():
            for p in ref.parameters():
                p.uniform_(0.5, 1.5)
        ours.load_state_dict(ref.state_dict())
        for step in range(3):
            x = torch.randn(32, 12) * 2 + step
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = ours(xa), ref(xb)
            torch.testing.assert_close(ya, yb)
            ya.pow(2).sum().backward()
            yb.pow(2).sum().backward()
            torch.testing.assert_close(xa.grad, xb.grad)
        for (na, a), (nb, b) in zip(ours.named_parameters(), ref.named_parameters()):
            assert na == nb
            torch.testing.assert_close(a.grad, b.grad)
        sa, sb = ours.state_dict(), ref.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], msg=k)
        ours.eval()
        ref.eval()
        x = torch.randn(5, 12)
        torch.testing.assert_close(ours(x), ref(x))
    # A 3-D input (N, C, L) to BatchNorm1d: torch's path, the same result.
    ours, ref = fastmlp.nn.BatchNorm1d(4), nn.BatchNorm1d(4)
    x = torch.randn(6, 4, 5)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_compile_and_fx():
    torch._dynamo.reset()
    for norm in ("batch", "layer"):
        torch.manual_seed(0)
        m = fastmlp.nn.MLP([20, 32, 32, 4], activation="gelu", norm=norm)
        assert type(m[0].norm) is (fastmlp.nn.BatchNorm1d if norm == "batch" else fastmlp.nn.LayerNorm)
        torch.manual_seed(0)
        ref = fastmlp.nn.MLP([20, 32, 32, 4], activation="gelu", norm=norm, impl="torch")
        x = torch.randn(16, 20)
        compiled = torch.compile(m, fullgraph=True)
        for mod in (m, compiled):
            out, expect = mod(x), ref(x)
            torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
            out.sum().backward()
        expect.sum().backward()
        for p, q in zip(m.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, 2 * q.grad, rtol=1e-4, atol=1e-5)
        if norm == "batch":
            # Two training calls (eager, compiled): the running estimates moved twice.
            assert m[0].norm.num_batches_tracked.item() == 2
        # torch.fx: one call per norm module, following train() / eval() when run.
        gm = torch.fx.symbolic_trace(m)
        m.eval()
        gm.eval()
        torch.testing.assert_close(gm(x), m(x))


def test_modules_traced_on_their_own():
    # torch.fx.symbolic_trace of the module itself (the root, which FX cannot pass to a wrapped
    # call): LayerNorm traces as torch's does; BatchNorm1d fails with torch's own TraceError.
    x = torch.randn(3, 4)
    ln = fastmlp.nn.LayerNorm(4)
    with torch.no_grad():
        ln.weight.uniform_()
    torch.testing.assert_close(torch.fx.symbolic_trace(ln)(x), F.layer_norm(x, (4,), ln.weight, ln.bias))
    errors = []
    for bn in (fastmlp.nn.BatchNorm1d(4), nn.BatchNorm1d(4)):
        with pytest.raises(torch.fx.proxy.TraceError) as info:
            torch.fx.symbolic_trace(bn)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_batch_norm_argument_errors_are_torchs():
    # Checked before the fast path's op runs, so the running estimates never move on bad input.
    # The messages are torch 2.14's F.batch_norm's (2.11's lacks the eps checks).
    x = torch.randn(3, 5)
    both = "running_mean and running_var must either both be None or neither be None"
    cases = [
        ((x, torch.zeros(4), torch.ones(4)), {"training": True}, RuntimeError, "running_mean should contain 5 elements not 4"),
        ((x, torch.zeros(5), torch.ones(4)), {"training": True}, RuntimeError, "running_var should contain 5 elements not 4"),
        ((x, torch.zeros(5), torch.ones(5)), {"training": True, "momentum": None}, TypeError,
         "batch_norm(): argument 'momentum' must be float, not NoneType"),
        ((x, torch.zeros(5), None), {"training": True}, ValueError, both),
        ((x, None, torch.ones(5)), {"training": True}, ValueError, both),
        ((x, None, None), {"training": True, "eps": 0.0}, ValueError, "batch_norm eps must be positive during training, but got 0.0"),
        ((x, torch.zeros(5), torch.ones(5)), {"training": False, "eps": -1e-5}, ValueError,
         "batch_norm eps must be non-negative, but got -1e-05"),
    ]
    for args, kw, error, message in cases:
        with pytest.raises(error) as ours:
            fastmlp.functional.batch_norm(*args, **kw)
        assert str(ours.value) == message
        if args[1] is not None:
            assert not args[1].any(), "the running mean moved"
        try:
            F.batch_norm(*args, **kw)
        except Exception as theirs:  # torch's, where it checks: the same error (but for the arg position)
            assert type(theirs) is error and str(theirs).replace(" (position 7)", "") == message
    for dtype in (torch.float64, torch.float16):   # running estimates of another dtype: refused, as by torch
        stats = (torch.zeros(5, dtype=dtype), torch.ones(5, dtype=dtype))
        with pytest.raises(RuntimeError, match=f"running_mean must have the input's dtype torch.float32, got {dtype}"):
            fastmlp.functional.batch_norm(x, *stats, training=True)
        with pytest.raises(RuntimeError, match="mixed dtype"):
            F.batch_norm(x, *stats, training=True)
        assert not stats[0].any()
    bn = fastmlp.nn.BatchNorm1d(4, affine=False)
    with pytest.raises(RuntimeError, match="running_mean should contain 5 elements not 4"):
        bn(x)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        fastmlp.nn.BatchNorm1d(5, eps=0.0)(x)


def test_export_in_training_mode_saves_and_loads(tmp_path):
    # The running estimates move outside a no_grad block (torch.export records one as a node its
    # .pt2 loader could not rebuild: the file saved, then failed to load).
    torch.manual_seed(0)
    m = fastmlp.nn.MLP([8, 16, 3], norm="batch").train()
    ref = copy.deepcopy(m)
    x = torch.randn(6, 8)
    torch.export.save(torch.export.export(m, (x,)), tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    torch.testing.assert_close(loaded(x), ref(x))
    state = loaded.state_dict()
    for k in ("0.norm.running_mean", "0.norm.running_var"):
        torch.testing.assert_close(state[k], ref.state_dict()[k], msg=k)
    assert not ref[0].norm.running_mean.requires_grad


def test_convert_swaps_norms():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 16), nn.LayerNorm(16),
                      nn.Linear(16, 3))
    m(torch.randn(10, 8))  # moves the running estimates
    state = {k: v.clone() for k, v in m.state_dict().items()}
    bn, ln = m[2], m[4]
    fastmlp.convert(m)
    assert type(m[2]) is fastmlp.nn.BatchNorm1d and type(m[4]) is fastmlp.nn.LayerNorm
    assert m[2].weight is bn.weight and m[2].running_mean is bn.running_mean and m[4].weight is ln.weight
    assert m[2].num_batches_tracked is bn.num_batches_tracked and repr(m[2]) == repr(bn)
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items()) and m.state_dict().keys() == state.keys()
    # The two modules do not share their containers.
    m[2].register_buffer("extra", torch.zeros(1))
    assert "extra" not in bn._buffers
    kept = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert type(fastmlp.convert(kept, norm=False)[1]) is nn.BatchNorm1d
    hooked = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    hooked[1].register_forward_hook(lambda *a: None)
    with pytest.warns(UserWarning, match="1 kept as they were"):
        fastmlp.convert(hooked)
    assert type(hooked[1]) is nn.LayerNorm
    assert type(fastmlp.convert(nn.BatchNorm1d(3))) is fastmlp.nn.BatchNorm1d


def test_cuda_runs_torchs_norms(device):
    if device == "cpu":
        pytest.skip("the CUDA fallback")
    for ours, ref in [(fastmlp.nn.BatchNorm1d(16), nn.BatchNorm1d(16)), (fastmlp.nn.LayerNorm(16), nn.LayerNorm(16))]:
        ours.to(device)
        ref.to(device)
        x = torch.randn(32, 16, device=device)
        torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_mlp_under_cpu_autocast(norm):
    # Under CPU autocast the norm gets the bfloat16 output of the layer before it and keeps its
    # float32 parameters, as torch's norm modules do: the same dtypes and, within bfloat16's
    # precision, the same values and gradients as the torch MLP.
    torch.manual_seed(0)
    ours = fastmlp.nn.MLP([24, 32, 32, 5], activation="gelu", norm=norm)
    ref = fastmlp.nn.MLP([24, 32, 32, 5], activation="gelu", norm=norm, impl="torch")
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(16, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = ours(x), ref(x)
        ha, hb = ours[0](x), ref[0](x)
    assert ya.dtype == yb.dtype == torch.bfloat16 and ha.dtype == hb.dtype == torch.bfloat16
    torch.testing.assert_close(ya.float(), yb.float(), rtol=5e-2, atol=5e-2)
    ya.float().pow(2).sum().backward()
    yb.float().pow(2).sum().backward()
    for (n, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert a.grad.dtype == torch.float32, n
        torch.testing.assert_close(a.grad, b.grad, rtol=5e-2, atol=5e-2 * b.grad.abs().max().item(), msg=n)
