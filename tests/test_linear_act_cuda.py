"""CUDA-only checks of fastmlp.linear_act (the device-parametrised grid is in test_linear_act.py).

What only a GPU run can tell: each forward path (cuBLASLt epilogues BIAS / RELU_BIAS /
GELU_AUX_BIAS, our epilogue kernel after a BIAS GEMM, the at::mm fallback) agrees with native
PyTorch, including NaN and odd widths (10, 781) that break the epilogues' alignment rules; the
cuBLASLt path agrees with the fallback (FASTMLP_CUBLASLT=0); device mismatch errors; autocast +
GradScaler through FusedLinear; one bf16 case past 2^31 elements; that the cuBLASLt path is taken
where it should be (launch counts against eager are measured by bench/gpu_profile.py).

Every test here is marked `cuda` and skips with its reason on a machine without a GPU.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastmlp
from fastmlp import FusedLinear
from fastmlp.ops import linear_act_backward, linear_act_forward
from test_linear_act import assert_matches_native

HAS_CUDA = torch.cuda.is_available() and fastmlp.WITH_CUDA
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and fastmlp built with CUDA kernels"),
]

ACTS = ("none", "relu", "gelu", "gelu_tanh", "silu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Max-norm error relative to the reference's max-norm, per dtype (TF32 is off in these tests).
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def native_act(z, activation):
    if activation == "none":
        return z
    if activation == "relu":
        return torch.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return F.silu(z)


def native(x, w, b, activation):
    return native_act(F.linear(x, w, b), activation)


def assert_close(got, want, dtype, what=""):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    g, w = got.double(), want.double()
    nan_g, nan_w = torch.isnan(g), torch.isnan(w)
    assert torch.equal(nan_g, nan_w), f"{what}: NaN positions differ ({int(nan_g.sum())} vs {int(nan_w.sum())})"
    g, w = g[~nan_w], w[~nan_w]
    if w.numel() == 0:
        return
    inf_w = torch.isinf(w)
    assert torch.equal(g[inf_w], w[inf_w]), f"{what}: infinities differ"
    g, w = g[~inf_w], w[~inf_w]
    if w.numel() == 0:
        return
    scale = max(w.abs().max().item(), 1e-3)
    err = (g - w).abs().max().item() / scale
    assert err <= TOL[dtype], f"{what}: relative max error {err:.3g} > {TOL[dtype]:.1g} ({dtype})"


@pytest.fixture(autouse=True)
def _no_tf32():
    # Through fp32_precision: reading the legacy allow_tf32 raises once a test has used the newer
    # setting (torch rejects a mix of the two APIs).
    old = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    yield
    torch.backends.cuda.matmul.fp32_precision = old


def make(rows, in_f, out_f, dtype, bias=True, requires_grad=True):
    x = torch.randn(rows, in_f, device="cuda", dtype=dtype)
    w = (torch.randn(out_f, in_f, device="cuda", dtype=torch.float64) / in_f**0.5).to(dtype)
    b = (0.1 * torch.randn(out_f, device="cuda", dtype=dtype)) if bias else None
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, w, b


def check_fwd_bwd(x, w, b, activation, dtype):
    """Forward, saved tensor and all three gradients of ours vs native autograd."""
    if activation == "relu":
        # Our GEMM (cuBLASLt) and native's (cuBLAS addmm) sum in different orders, so a
        # pre-activation within rounding of 0 can flip ReLU's mask and move a gradient by a whole
        # weight; bound the error against an fp64 reference instead (at most 2x native's).
        assert_matches_native(x, w, b, activation, relative=True)
        return
    y = fastmlp.functional.linear_act(x, w, b, activation)
    ref = native(x, w, b, activation)
    assert_close(y, ref, dtype, "y")
    g = torch.randn_like(ref)
    params = [t for t in (x, w, b) if t is not None]
    got = torch.autograd.grad(y, params, g)
    want = torch.autograd.grad(ref, params, g)
    for name, a, e in zip(("grad_x", "grad_w", "grad_b"), got, want):
        assert_close(a, e, dtype, name)


# ------------------------------------------------------------------------------------------------
# Smoke test of every forward path (run first by bench/gpu_check.sh: -k smoke)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("out_f", [10, 781, 256])
@pytest.mark.parametrize("bias", [True, False])
def test_smoke_paths(activation, dtype, out_f, bias):
    x, w, b = make(37, 96, out_f, dtype, bias)
    check_fwd_bwd(x, w, b, activation, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("lt", ["1", "0"])
def test_smoke_nan_propagation(activation, dtype, lt, monkeypatch):
    """A NaN pre-activation gives NaN after every activation (relu included, as torch.relu), and
    relu's backward passes the gradient where y is NaN (as threshold_backward)."""
    monkeypatch.setenv("FASTMLP_CUBLASLT", lt)
    x, w, b = make(16, 32, 64, dtype)
    with torch.no_grad():
        x[3] = float("nan")
        x[5, 7] = float("nan")
    check_fwd_bwd(x, w, b, activation, dtype)
    y = fastmlp.functional.linear_act(x, w, b, activation)
    assert torch.isnan(y[3]).all() and torch.isnan(y[5]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh"])
def test_smoke_nan_large_tiles(activation, dtype):
    """NaN through the cuBLASLt epilogues at a compute-bound shape (other GEMM kernels than the
    small shapes, whose epilogue might treat NaN differently)."""
    x, w, b = make(2048, 1024, 2048, dtype, requires_grad=False)
    x[100] = float("nan")
    x[1000, 5] = float("nan")
    y = fastmlp.functional.linear_act(x, w, b, activation)
    want = native(x, w, b, activation)
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    assert torch.isnan(y[100]).all() and torch.isnan(y[1000]).all()
    assert_close(y, want, dtype, "y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("out_f", [10, 781, 512])
def test_smoke_lt_matches_fallback(activation, dtype, out_f, monkeypatch):
    """cuBLASLt epilogues and the at::mm + kernel fallback give the same outputs and gradients."""
    x, w, b = make(129, 200, out_f, dtype)
    g = torch.randn(129, out_f, device="cuda", dtype=dtype)
    outs = {}
    for lt in ("1", "0"):
        monkeypatch.setenv("FASTMLP_CUBLASLT", lt)
        with torch.no_grad():  # the fused backward kernel (with grad recording: the ATen ops it fuses)
            y, saved = linear_act_forward(x, w, b, activation, True)
            grads = linear_act_backward(g, x, w, y, saved, activation, [True, True, True])
        outs[lt] = (y, saved, *grads)
    names = ("y", "saved", "grad_x", "grad_w", "grad_b")
    if activation == "relu":
        # The two GEMMs sum in different orders, so a pre-activation within rounding of 0 can
        # take opposite signs and flip ReLU's mask; the backward (the same at::mm either way) is
        # then compared on different masks. Compare the forward only (the backward has its own
        # tests against native).
        names = names[:2]
    for name, a, e in zip(names, outs["1"], outs["0"]):
        assert a.shape == e.shape, name
        if a.numel():
            assert_close(a, e, dtype, name)


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("env", ["FASTMLP_LT_RELU=1", "FASTMLP_LT_GELU=0"])
def test_smoke_epilogue_switches(activation, env, monkeypatch):
    name, value = env.split("=")
    monkeypatch.setenv(name, value)
    x, w, b = make(64, 128, 256, torch.bfloat16)
    check_fwd_bwd(x, w, b, activation, torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# Layouts, sizes, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
def test_misaligned_and_noncontiguous(activation, dtype):
    """Offset views (pointers not 16-byte aligned: cuBLASLt alignment preferences, scalar kernel
    path) and non-contiguous inputs."""
    rows, in_f, out_f = 33, 65, 47
    xs = torch.randn(rows * in_f + 1, device="cuda", dtype=dtype)[1:].view(rows, in_f).requires_grad_()
    ws = (torch.randn(out_f * in_f + 3, device="cuda", dtype=dtype) / 8)[3:].view(out_f, in_f).requires_grad_()
    bs = torch.randn(out_f + 1, device="cuda", dtype=dtype)[1:].requires_grad_()
    assert xs.data_ptr() % 16 and ws.data_ptr() % 16 and bs.data_ptr() % 16
    check_fwd_bwd(xs, ws, bs, activation, dtype)
    xt = torch.randn(in_f, rows, device="cuda", dtype=dtype).t().requires_grad_()
    wt = (torch.randn(in_f, out_f, device="cuda", dtype=dtype) / 8).t().requires_grad_()
    check_fwd_bwd(xt, wt, None, activation, dtype)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_batch_shapes(activation):
    for shape in [(0, 48), (1, 48), (48,), (3, 5, 48)]:
        x = torch.randn(*shape, device="cuda", requires_grad=True)
        w = torch.randn(24, 48, device="cuda", requires_grad=True)
        b = torch.randn(24, device="cuda", requires_grad=True)
        check_fwd_bwd(x, w, b, activation, torch.float32)


@pytest.mark.parametrize("activation", ["gelu", "relu", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_bias_grad_split_rows(dtype, activation):
    """Enough rows that the backward prologue splits them over blocks (partial sums + finalize),
    through both its several-rows-at-a-time loop and the loop for the rows left over (relu and
    none hold 4 rows in flight, gelu 2); the bias gradient is deterministic run to run."""
    x, w, b = make(8192, 64, 1000, dtype)
    check_fwd_bwd(x, w, b, activation, dtype)
    with torch.no_grad():  # the fused backward kernel (with grad recording: the ATen ops it fuses)
        y, saved = linear_act_forward(x, w, b, activation, True)
        g = torch.randn_like(y)
        db1 = linear_act_backward(g, x, w, y, saved, activation, [False, False, True])[2]
        db2 = linear_act_backward(g, x, w, y, saved, activation, [False, False, True])[2]
    assert torch.equal(db1, db2)
    dz = {"gelu": lambda: torch.ops.aten.gelu_backward(g.double(), saved.double()),
          "relu": lambda: torch.where(y.double() > 0, g.double(), 0.0),  # threshold_backward(g, y, 0)
          "none": lambda: g.double()}[activation]()
    assert_close(db1, dz.sum(0).to(dtype), dtype, "grad_b")


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_prologue_without_bias_grad_many_rows(activation):
    """Without a bias gradient the backward prologue streams a row a thread over up to 65535 block
    rows; past that each thread takes several rows. 65535 * 64 + 100 rows of 16 fp32 columns (64
    rows a block) is just past it."""
    rows, in_f, out_f = 65535 * 64 + 100, 8, 16
    x, w, _ = make(rows, in_f, out_f, torch.float32, bias=False, requires_grad=False)
    y, saved = linear_act_forward(x, w, None, activation, True)
    g = torch.randn_like(y)
    gx, gw, _ = linear_act_backward(g, x, w, y, saved, activation, [True, True, False])
    dz = torch.where(y > 0, g, 0.0) if activation == "relu" else torch.ops.aten.gelu_backward(g, saved)
    assert_close(gx, dz @ w, torch.float32, "grad_x")
    assert_close(gw, dz.t() @ x, torch.float32, "grad_w")


@pytest.mark.parametrize("blocks_per_sm,min_rows", [(32, 1), (1, 64)])
def test_bwd_grid_switches(monkeypatch, blocks_per_sm, min_rows):
    """FASTMLP_BWD_BLOCKS_PER_SM / FASTMLP_BWD_MIN_ROWS change the prologue's row chunks (many
    small ones, or one per column range), not its results; a bad value is refused by name."""
    x, w, b = make(4096, 64, 1000, torch.bfloat16)
    with torch.no_grad():
        y, saved = linear_act_forward(x, w, b, "gelu", True)
        g = torch.randn_like(y)
        gx0, _, _ = linear_act_backward(g, x, w, y, saved, "gelu", [True, False, True])
        monkeypatch.setenv("FASTMLP_BWD_BLOCKS_PER_SM", str(blocks_per_sm))
        monkeypatch.setenv("FASTMLP_BWD_MIN_ROWS", str(min_rows))
        gx1, _, db1 = linear_act_backward(g, x, w, y, saved, "gelu", [True, False, True])
    torch.testing.assert_close(gx1, gx0, rtol=0, atol=0)  # dZ W: dZ is elementwise, the grid cannot change it
    want = torch.ops.aten.gelu_backward(g.double(), saved.double()).sum(0).to(torch.bfloat16)
    assert_close(db1, want, torch.bfloat16, "grad_b")
    monkeypatch.setenv("FASTMLP_BWD_MIN_ROWS", "0")
    with pytest.raises(ValueError, match="FASTMLP_BWD_MIN_ROWS must be a whole number from 1 to 1024, got '0'"):
        linear_act_backward(g, x, w, y, saved, "gelu", [True, False, True])


BGRAD_SHAPES = [(8192, 64, 1000), (37, 96, 10), (129, 200, 781), (256, 512, 512)]


@pytest.mark.parametrize("shape", BGRAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "silu"])
def test_bgrad_epilogue(monkeypatch, activation, dtype, shape):
    """FASTMLP_LT_BGRAD=1 (the bias gradient from the weight-gradient GEMM's BGRADB epilogue) gives
    the default path's three gradients, for every output mask that asks for dW and db; db is
    deterministic run to run and matches the fp64 column sums of dZ; through autograd it matches
    native."""
    rows, in_f, out_f = shape
    x, w, b = make(rows, in_f, out_f, dtype)
    masks = ([True, True, True], [False, True, True], [True, False, True])
    with torch.no_grad():  # the fused backward kernel (with grad recording: the ATen ops it fuses)
        y, saved = linear_act_forward(x, w, b, activation, True)
        g = torch.randn_like(y)
        want = [linear_act_backward(g, x, w, y, saved, activation, m) for m in masks]
        monkeypatch.setenv("FASTMLP_LT_BGRAD", "1")
        got = [linear_act_backward(g, x, w, y, saved, activation, m) for m in masks]
        again = linear_act_backward(g, x, w, y, saved, activation, masks[0])
    for m, gs, ws in zip(masks, got, want):
        for name, on, a, e in zip(("grad_x", "grad_w", "grad_b"), m, gs, ws):
            assert a.shape == e.shape, f"{name}, mask {m}"
            if on:
                assert_close(a, e, dtype, f"{name}, mask {m}")
    assert torch.equal(again[1], got[0][1]) and torch.equal(again[2], got[0][2]), "dW / db not deterministic"
    dz = {"none": lambda: g.double(),
          "relu": lambda: torch.where(y.double() > 0, g.double(), 0.0),  # threshold_backward(g, y, 0)
          "gelu": lambda: torch.ops.aten.gelu_backward(g.double(), saved.double()),
          "silu": lambda: torch.ops.aten.silu_backward(g.double(), saved.double())}[activation]()
    assert_close(got[0][2], dz.sum(0).to(dtype), dtype, "grad_b vs fp64")
    check_fwd_bwd(x, w, b, activation, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bgrad_epilogue_layouts(monkeypatch, dtype):
    """FASTMLP_LT_BGRAD=1 with offset views (pointers not 16-byte aligned), a transposed input, no
    bias, an empty batch and zero input features."""
    monkeypatch.setenv("FASTMLP_LT_BGRAD", "1")
    rows, in_f, out_f = 33, 65, 48
    xs = torch.randn(rows * in_f + 1, device="cuda", dtype=dtype)[1:].view(rows, in_f).requires_grad_()
    ws = (torch.randn(out_f * in_f + 3, device="cuda", dtype=dtype) / 8)[3:].view(out_f, in_f).requires_grad_()
    bs = torch.randn(out_f + 1, device="cuda", dtype=dtype)[1:].requires_grad_()
    for activation in ("none", "gelu"):
        check_fwd_bwd(xs, ws, bs, activation, dtype)
        xt = torch.randn(in_f, rows, device="cuda", dtype=dtype).t().requires_grad_()
        check_fwd_bwd(xt, ws, bs, activation, dtype)
        check_fwd_bwd(xt, ws, None, activation, dtype)
        for shape in [(0, in_f), (2, 0, in_f)]:
            check_fwd_bwd(torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True), ws, bs, activation,
                          dtype)
        x0 = torch.randn(rows, 0, device="cuda", dtype=dtype, requires_grad=True)
        w0 = torch.randn(out_f, 0, device="cuda", dtype=dtype, requires_grad=True)
        check_fwd_bwd(x0, w0, bs, activation, dtype)


def test_bgrad_epilogue_path_is_taken(monkeypatch):
    """With FASTMLP_LT_BGRAD=1 the bias gradient comes from the weight-gradient GEMM: for
    activation none the backward launches no prologue kernel of ours (by default it launches one,
    for db), and for relu the prologue still runs (for dZ). Every other BGRAD test passes on
    either path, so this is the one that fails if the epilogue is refused and the op falls back.
    In bf16, the dtype the epilogue is for (whether cuBLASLt has it for fp32 too shows in
    gpu_profile's kernel lists)."""
    x, w, b = make(256, 512, 512, torch.bfloat16, requires_grad=False)

    def kernels(activation):
        y, saved = linear_act_forward(x, w, b, activation, True)
        g = torch.randn_like(y)
        linear_act_backward(g, x, w, y, saved, activation, [True, True, True])
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            linear_act_backward(g, x, w, y, saved, activation, [True, True, True])
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                and not e.name.startswith(("Memset", "Memcpy"))]

    ours = lambda names: [k for k in names if "bwd_prologue" in k]  # noqa: E731
    # at::sum (the fallback's db); not cuBLASLt's own splitKreduce_kernel, which a GEMM may launch.
    sums = lambda names: [k for k in names if "at::native::reduce_kernel" in k]  # noqa: E731
    default = {a: kernels(a) for a in ("none", "relu")}
    monkeypatch.setenv("FASTMLP_LT_BGRAD", "1")
    bgrad = {a: kernels(a) for a in ("none", "relu")}
    assert ours(default["none"]) and ours(default["relu"]), f"default: {default}"
    assert not ours(bgrad["none"]) and not sums(bgrad["none"]), f"BGRAD, none: {bgrad['none']}"
    assert ours(bgrad["relu"]) and not sums(bgrad["relu"]), f"BGRAD, relu: {bgrad['relu']}"


def test_device_mismatch():
    w = torch.randn(8, 4, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        fastmlp.functional.linear_act(torch.randn(3, 4), w, None, "relu")
    with pytest.raises(RuntimeError, match="same device"):
        fastmlp.functional.linear_act(torch.randn(3, 4, device="cuda"), w, torch.randn(8), "relu")
    with pytest.raises(RuntimeError, match="same device"):
        linear_act_backward(torch.randn(3, 8), torch.randn(3, 4, device="cuda"), w,
                            torch.empty(0, device="cuda"), torch.empty(0, device="cuda"), "none",
                            [True, True, True])
    # A CPU backward handed a CUDA output / pre-activation (its kernel would read device memory).
    x, wc, g = torch.randn(3, 4), torch.randn(8, 4), torch.randn(3, 8)
    for act, y, saved in (("relu", torch.randn(3, 8, device="cuda"), torch.empty(0)),
                          ("gelu", torch.empty(0), torch.randn(3, 8, device="cuda"))):
        with pytest.raises(RuntimeError, match="same device"):
            linear_act_backward(g, x, wc, y, saved, act, [True, True, True])


@pytest.mark.parametrize("api", ["allow_tf32", "fp32_precision", "set_float32_matmul_precision"])
def test_tf32_follows_torch(api):
    """fp32 is IEEE unless torch would use TF32, whichever of torch's three ways set it (reading
    the legacy flag raises once the newer one was used, so the op must not read it). Each product
    is 1 + 2^-12, which TF32's 10-bit mantissa rounds to 1; every partial sum of 4096 of them is
    exact in fp32 whatever the order, so IEEE gives exactly 4097 and TF32 4096."""
    matmul = torch.backends.cuda.matmul
    x = torch.full((256, 4096), 1.0 + 2.0**-12, device="cuda")
    w = torch.ones(256, 4096, device="cuda")

    def values():
        native_z = F.linear(x, w)
        zs = {}
        for activation in ("none", "relu", "gelu_tanh"):
            y, saved = linear_act_forward(x, w, None, activation, True)
            zs[activation] = saved if activation == "gelu_tanh" else y
        return native_z, zs

    def allow(on):
        if api == "allow_tf32":
            matmul.allow_tf32 = on
        elif api == "fp32_precision":
            matmul.fp32_precision = "tf32" if on else "ieee"
        else:
            torch.set_float32_matmul_precision("high" if on else "highest")

    old_matmul_precision = torch.get_float32_matmul_precision()
    try:
        allow(False)
        _, zs = values()
        for activation, z in zs.items():
            assert torch.all(z == 4097.0), f"IEEE, {activation}: {z.flatten()[:4].tolist()}"
        allow(True)
        native_z, zs = values()
        for activation, z in zs.items():
            # TF32 allows, not requires, tensor-core kernels; where torch's own GEMM used them at
            # this shape, ours must have too.
            seen = set(z.unique().tolist())
            assert seen <= {4096.0, 4097.0}, f"TF32, {activation}: values {sorted(seen)}"
            if torch.all(native_z == 4096.0):
                assert seen == {4096.0}, f"TF32, {activation}: native used TF32, ours gave {sorted(seen)}"
    finally:
        torch.set_float32_matmul_precision(old_matmul_precision)
        matmul.fp32_precision = "ieee"


@contextlib.contextmanager
def reduction_setting(dtype, setting):
    """torch.backends.cuda.matmul.allow_{fp16,bf16}_reduced_precision_reduction for dtype set to
    setting inside the block (yields the flag's name), restored after it."""
    name = "allow_fp16_reduced_precision_reduction" if dtype == torch.float16 else "allow_bf16_reduced_precision_reduction"
    matmul = torch.backends.cuda.matmul
    old = getattr(matmul, name)
    setattr(matmul, name, setting)
    try:
        yield name
    finally:
        setattr(matmul, name, old)


@pytest.mark.parametrize("setting", [True, False, (False, False)], ids=["allowed", "no_reduced", "no_split_k"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reduced_precision_reduction_settings(dtype, setting):
    """torch.backends.cuda.matmul.allow_{fp16,bf16}_reduced_precision_reduction restrict the
    cuBLASLt algorithms the op may pick (split-K reductions in fp32 only, or no split-K): each
    setting runs and matches native under the same setting. Few rows and a long k, where the
    heuristic likes split-K."""
    with reduction_setting(dtype, setting) as name:
        x, w, b = make(16, 8192, 64, dtype, requires_grad=False)
        for activation in ("none", "gelu_tanh", "silu"):
            assert_close(fastmlp.functional.linear_act(x, w, b, activation), native(x, w, b, activation), dtype,
                         f"{activation}, {name}={setting}")


@pytest.mark.parametrize("setting", [False, (False, False)], ids=["no_reduced", "no_split_k"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reduced_precision_reduction_is_fp32(dtype, setting):
    """With reduced-precision reductions disallowed, every sum is reduced in fp32, exactly as in one
    pass: each output row is 2048 + 1 - 2048 over k = 8192 (the terms at both ends of k, so in
    different split-K slices). A split-K scheme that wrote 2048 + 1 to fp16/bf16 first would round
    it to 2048 and return 0 instead of 1. (It can catch a wrong mask only where cuBLASLt's heuristic
    would pick such a scheme unrestricted: few rows and a long k, as here.)"""
    with reduction_setting(dtype, setting) as name:
        for rows in (16, 64):
            x = torch.ones(rows, 8192, device="cuda", dtype=dtype)
            w = torch.zeros(64, 8192, device="cuda", dtype=dtype)
            w[:, 0], w[:, 1], w[:, -1] = 2048.0, 1.0, -2048.0
            for bias in (None, torch.zeros(64, device="cuda", dtype=dtype)):
                for activation in ("none", "relu", "gelu_tanh"):
                    # gelu_tanh (cuBLASLt's GELU_AUX epilogue in fp16/bf16): the saved
                    # pre-activation is exact; the output's tanh may be an approximation.
                    z = linear_act_forward(x, w, bias, activation, True)[1] if activation == "gelu_tanh" else \
                        fastmlp.functional.linear_act(x, w, bias, activation)
                    assert torch.all(z == 1), (f"{activation}, bias={bias is not None}, rows={rows}, "
                                               f"{name}={setting}: values {z.unique().tolist()}, expected 1")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_autocast_gradscaler(activation, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(FusedLinear(32, 64, activation=activation), FusedLinear(64, 10, activation="none"))
    model = model.cuda()
    ref = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU() if activation == "relu" else torch.nn.GELU(),
                              torch.nn.Linear(64, 10)).cuda()
    ref.load_state_dict({k.replace("1.", "2.", 1) if k.startswith("1.") else k: v
                         for k, v in model.state_dict().items()})
    x = torch.randn(128, 32, device="cuda")
    t = torch.randint(0, 10, (128,), device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out, out_ref = model(x), ref(x)
    assert out.dtype == dtype
    assert_close(out, out_ref, dtype, "autocast output")
    for m in (model, ref):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=dtype):
                loss = F.cross_entropy(m(x), t)
            scaler.scale(loss).backward()
            assert all(p.grad.dtype == torch.float32 for p in m.parameters())
            scaler.step(opt)
            scaler.update()
        assert torch.isfinite(loss)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.detach(), q.detach(), dtype, n)


def test_64bit_indexing_bf16():
    """rows * out_features past 2^31 in bf16 (about 20 GiB of device memory)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    out_f, in_f = 2048, 16
    rows = 2**31 // out_f + 3  # numel(y) = 2^31 + 6144
    dtype = torch.bfloat16
    x, w, b = make(rows, in_f, out_f, dtype, requires_grad=False)
    y, saved = linear_act_forward(x, w, b, "gelu", True)
    assert y.numel() > 2**31
    tail = slice(rows - 4, rows)
    assert_close(y[tail], native(x[tail], w, b, "gelu"), dtype, "y tail")
    assert_close(saved[tail], F.linear(x[tail], w, b), dtype, "saved tail")
    g = torch.ones_like(y)
    gx, gw, gb = linear_act_backward(g, x, w, y, saved, "gelu", [True, False, True])
    del y
    dz_tail = torch.ops.aten.gelu_backward(g[tail], saved[tail])
    assert_close(gx[tail], dz_tail @ w, dtype, "grad_x tail")
    want_gb = torch.ops.aten.gelu_backward(g, saved).sum(0, dtype=torch.float32).to(dtype)
    assert_close(gb, want_gb, dtype, "grad_b")


def test_cublaslt_path_is_taken(monkeypatch):
    """A plain aligned fp32 layer with bias and no activation runs a cuBLASLt GEMM with the BIAS
    epilogue and no kernel of ours, where the forced fallback (FASTMLP_CUBLASLT=0) runs at::mm and
    then our epilogue kernel for the bias. Every other test passes on either path, so this is the one that fails when cuBLASLt
    setup breaks on a device and the op quietly falls back."""
    x, w, b = make(256, 512, 512, torch.float32, requires_grad=False)

    def kernels():
        fastmlp.functional.linear_act(x, w, b, "none")
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fastmlp.functional.linear_act(x, w, b, "none")
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                and not e.name.startswith(("Memset", "Memcpy"))]

    lt = kernels()
    monkeypatch.setenv("FASTMLP_CUBLASLT", "0")
    fallback = kernels()
    # (By name, not count: the GEMM may be a split-K kernel plus its reduction on either path.)
    ours = lambda names: [k for k in names if "fwd_epilogue" in k]  # noqa: E731
    assert lt and not ours(lt), f"cuBLASLt path: {lt}"
    assert ours(fallback), f"fallback: {fallback}"


# Kernel launches per call are a performance target, measured and reported by
# bench/gpu_profile.py (results in bench/results/gpu_profile_h200.json), not asserted here.
