"""Exporting fastmlp models: the forward ops' decompositions (fastmlp/ops.py), programs of ATen ops
alone (fastmlp.export_decompositions) and ONNX (torch.onnx.export, run in onnxruntime)."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastmlp
from fastmlp import ops
from fastmlp.nn import MLP

# Every activation and every norm once (each activation's decomposition is checked on its own above).
MODELS = [("relu", "none"), ("gelu", "batch"), ("gelu_tanh", "layer"), ("silu", "batch")]


def _fastmlp_targets(graph):
    return sorted({str(n.target) for n in graph.nodes if n.op == "call_function" and "fastmlp" in str(n.target)})


# ---- each decomposition against its op ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
def test_linear_act_decomposition_matches_the_op(dtype, activation):
    torch.manual_seed(0)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    cases = [
        (torch.randn(13, 31, dtype=dtype), torch.randn(10, 31, dtype=dtype), torch.randn(10, dtype=dtype)),
        (torch.randn(2, 3, 17, dtype=dtype), torch.randn(5, 17, dtype=dtype), None),  # 3-D, no bias
        (torch.randn(0, 8, dtype=dtype), torch.randn(4, 8, dtype=dtype), torch.randn(4, dtype=dtype)),  # empty
        (torch.randn(9, 40, dtype=dtype)[:, ::2], torch.randn(20, 7, dtype=dtype).t(), torch.randn(7, dtype=dtype)),
        (torch.randn(2, 5, dtype=dtype), torch.randn(0, 5, dtype=dtype), torch.randn(0, dtype=dtype)),  # 0 outputs
    ]
    for x, w, b in cases:
        for save in (False, True):
            y, saved = ops.linear_act_forward(x, w, b, activation, save)
            dy, dsaved = ops._linear_act_forward_decomposition(x, w, b, activation, save)
            torch.testing.assert_close(dy, y, rtol=tol, atol=tol)
            assert dsaved.shape == saved.shape and dsaved.dtype == saved.dtype
            torch.testing.assert_close(dsaved, saved, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match=r"input.shape\[-1\] must equal in_features = weight.shape\[1\] = 4"):
        ops._linear_act_forward_decomposition(torch.randn(2, 3), torch.randn(5, 4), None, activation, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dropout_decomposition_draws_the_kernels_mask(dtype):
    # The very mask, bit for bit: the hash in int64 ATen ops equals the C++ kernel's.
    cases = [((37, 53), 0.2, 123456789012345), ((5, 3, 7), 0.5, 0), ((64, 31), 0.9, 2**62 - 1), ((1000,), 1e-9, 7),
             ((0, 4), 0.3, 1), ((3, 11), 0.0, 99), ((129, 257), 0.999, -5)]
    for shape, p, seed in cases:
        x = torch.randn(shape, dtype=torch.float64).to(dtype)
        s = torch.tensor(seed, dtype=torch.int64)
        assert torch.equal(ops._dropout_decomposition(x, p, s), ops.dropout(x, p, s)), (shape, p, seed)
    x = torch.randn(60, 90, dtype=dtype)[::2, 1::3]  # non-contiguous: the mask follows row-major order
    s = torch.tensor(42, dtype=torch.int64)
    assert torch.equal(ops._dropout_decomposition(x, 0.3, s), ops.dropout(x, 0.3, s))
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0] * 50, dtype=dtype)
    assert torch.equal(ops._dropout_decomposition(special, 0.5, s).isnan(), ops.dropout(special, 0.5, s).isnan())


def test_dropout_keep_has_the_kernels_statistics():
    keep = ops.dropout_keep((1000, 1000), 0.3, torch.tensor(5, dtype=torch.int64))
    assert abs(keep.double().mean().item() - 0.7) < 0.003  # 1e6 Bernoulli(0.7) draws: sd 0.00046
    other = ops.dropout_keep((1000, 1000), 0.3, torch.tensor(6, dtype=torch.int64))
    assert abs((keep == other).double().mean().item() - (0.7**2 + 0.3**2)) < 0.003  # independent seeds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_norm_decompositions_match_the_ops(dtype):
    torch.manual_seed(0)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for shape, norm_shape in (((13, 31), (31,)), ((2, 5, 6), (5, 6)), ((0, 8), (8,))):
        x = torch.randn(shape, dtype=dtype)
        w, b = torch.randn(norm_shape, dtype=dtype), torch.randn(norm_shape, dtype=dtype)
        for args in ((x, norm_shape, w, b, 1e-5), (x, norm_shape, None, None, 1e-3)):
            for got, want in zip(ops._layer_norm_decomposition(*args), ops.layer_norm(*args)):
                assert got.shape == want.shape and got.dtype == want.dtype
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for x in (torch.randn(17, 9, dtype=dtype) * 3 + 2, torch.randn(40, 30, dtype=dtype)[::2, ::3]):
        c = x.shape[1]
        w, b = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
        for args in ((x, w, b, 1e-5), (x, None, None, 0.1)):
            for got, want in zip(ops._batch_norm_decomposition(*args), ops.batch_norm(*args)):
                assert got.shape == want.shape and got.dtype == want.dtype
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # A transposed input: the op's output is contiguous, and so is the decomposition's.
    x = torch.randn(5, 7, dtype=dtype).t()
    want = ops.batch_norm(x, None, None, 1e-5)[0].stride()
    assert ops._batch_norm_decomposition(x, None, None, 1e-5)[0].stride() == want
    with pytest.raises(ValueError, match="fastmlp.batch_norm: input must be 2-D"):
        ops._batch_norm_decomposition(torch.randn(2, 3, 4, dtype=dtype), None, None, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_norm_decompositions_take_half_inputs_as_the_ops_do(dtype):
    # Half inputs with half or float32 weights; float32 statistics.
    torch.manual_seed(0)
    x = torch.randn(33, 12).to(dtype)
    for wdtype in (dtype, torch.float32):
        w, b = torch.randn(12).to(wdtype), torch.randn(12).to(wdtype)
        for got, want in zip(ops._batch_norm_decomposition(x, w, b, 1e-5), ops.batch_norm(x, w, b, 1e-5)):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        for got, want in zip(ops._layer_norm_decomposition(x, (12,), w, b, 1e-5), ops.layer_norm(x, (12,), w, b, 1e-5)):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


# ---- whole models: programs of ATen ops alone ----

def _model(activation, norm, dropout):
    torch.manual_seed(1)
    return MLP([20, 16, 16, 5], activation=activation, norm=norm, dropout=dropout)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("activation,norm", MODELS)
def test_run_decompositions_leaves_aten_ops_alone(activation, norm, mode):
    model = getattr(_model(activation, norm, 0.25), mode)()
    program = torch.export.export(model, (torch.randn(8, 20),), dynamic_shapes={"input": {0: torch.export.Dim("b")}})
    assert _fastmlp_targets(program.graph)  # the fused ops, as exported
    plain = program.run_decompositions(fastmlp.export_decompositions())
    assert _fastmlp_targets(plain.graph) == []
    x = torch.randn(11, 20)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    torch.manual_seed(5)
    want = model(x)
    model.load_state_dict(buffers, strict=False)  # (train mode: the program's batch norm moves them too)
    torch.manual_seed(5)  # the same seed drawn inside the program: the same dropout masks
    got = plain.module()(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if mode == "train" and norm == "batch":
        for name, b in plain.module().named_buffers():
            assert not b.requires_grad, name  # running estimates carry no graph


def test_decomposed_program_runs_without_fastmlp(tmp_path):
    model = _model("gelu", "layer", 0.2).train()
    x = torch.randn(9, 20)
    program = torch.export.export(model, (x,), dynamic_shapes={"input": {0: torch.export.Dim("b")}})
    torch.export.save(program.run_decompositions(fastmlp.export_decompositions()), tmp_path / "mlp.pt2")
    torch.save(x, tmp_path / "x.pt")
    torch.manual_seed(3)
    want = model(x)
    script = ("import sys, torch\n"
              f"program = torch.export.load({str(tmp_path / 'mlp.pt2')!r}).module()\n"
              "torch.manual_seed(3)\n"
              f"torch.save(program(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})\n"
              "assert not any(m.split('.')[0] == 'fastmlp' for m in sys.modules), 'fastmlp was imported'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), want, rtol=1e-5, atol=1e-5)


def test_compiled_models_keep_the_fused_ops_and_their_errors():
    # The decompositions are for export: Inductor still calls the kernels, static or dynamic shapes, and
    # fake tensors with symbolic sizes (which would read a decomposition) still get the op's own checks.
    from torch._inductor.utils import run_and_get_code

    model = _model("gelu", "none", 0.0)
    for dynamic in (False, True):
        torch.compiler.reset()
        compiled = torch.compile(model, dynamic=dynamic)
        x = torch.randn(6, 20)
        y, code = run_and_get_code(compiled, x)
        torch.testing.assert_close(y, model(x))
        assert "fastmlp.linear_act_forward" in "\n".join(code)
    torch.compiler.reset()
    f = torch.compile(lambda x, w: ops.linear_act_forward(x, w, None, "relu", False)[0], dynamic=True, fullgraph=True)
    f(torch.randn(3, 4), torch.randn(5, 4))
    with pytest.raises(Exception, match=r"input.shape\[-1\] must equal in_features"):
        f(torch.randn(7, 3), torch.randn(5, 4))


# ---- ONNX ----

def _onnx_outputs(model, x, *more):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                dynamic_shapes={"input": {0: torch.export.Dim("batch")}})
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    name = session.get_inputs()[0].name
    return [torch.from_numpy(session.run(None, {name: t.numpy()})[0]) for t in (x, *more)]


@pytest.mark.parametrize("activation,norm", MODELS)
def test_onnx_export_runs_in_onnxruntime(activation, norm):
    model = _model(activation, norm, 0.3)
    model(torch.randn(32, 20))  # (moves batch norm's running estimates away from 0 and 1)
    model.eval()
    x, other = torch.randn(8, 20), torch.randn(1, 20)
    got, got_other = _onnx_outputs(model, x, other)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_other, model(other), rtol=1e-5, atol=1e-5)  # another batch size


@pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode:UserWarning")
def test_onnx_export_of_a_converted_model_and_in_training_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.SiLU(), nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU(approximate="tanh"),
                          nn.Linear(8, 3))
    fastmlp.convert(model)
    assert isinstance(model[0], fastmlp.FusedLinear)
    x = torch.randn(5, 12)
    (got,) = _onnx_outputs(model.eval(), x)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
    # Training mode: batch norm with the batch's statistics, dropout with fastmlp's mask on a seed drawn
    # inside the ONNX graph (so not the eager call's mask: its statistics are checked instead).
    bn = MLP([20, 16, 5], norm="batch", dropout=0.0).train()
    x = torch.randn(16, 20)
    (got,) = _onnx_outputs(bn, x)
    torch.testing.assert_close(got, bn(x).detach(), rtol=1e-5, atol=1e-5)
    drop = nn.Sequential(fastmlp.nn.Dropout(0.25)).train()
    (got,) = _onnx_outputs(drop, torch.ones(400, 500))
    assert set(got.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert abs((got == 0).double().mean().item() - 0.25) < 0.005
