import pytest
import torch
from torch import nn

import fastmlp
from fastmlp.nn import MLP, FusedLinear, he_, lsuv_, xavier_

ACTS = ["relu", "gelu", "gelu_tanh", "silu"]


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_impls_are_the_same_model(activation, norm):
    torch.manual_seed(1)
    a = MLP([20, 33, 17, 5], activation=activation, norm=norm, dropout=0.3, impl="torch")
    torch.manual_seed(1)
    b = MLP([20, 33, 17, 5], activation=activation, norm=norm, dropout=0.3, impl="fastmlp")
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(type(blk.linear) is FusedLinear for blk in b)
    assert all(type(blk.linear) is nn.Linear for blk in a)
    x = torch.randn(9, 20, dtype=torch.float32)
    a.eval(), b.eval()
    torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
    # Training mode too (batch norm's batch statistics), and the gradients agree. Dropout masks
    # differ by design (fastmlp.nn.Dropout hashes element indices, nn.Dropout draws Bernoulli
    # samples; tests/test_dropout.py checks ours), so this comparison runs with p = 0.
    assert isinstance(b[0].dropout, fastmlp.nn.Dropout) and type(a[0].dropout) is nn.Dropout
    for m in (*a.modules(), *b.modules()):
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    a.train(), b.train()
    ya = a(x)
    yb = b(x)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_structure_and_flatten():
    m = MLP([784, 64, 10], activation="relu", dropout=0.2, norm="layer", impl="torch")
    assert [type(x) for x in m[0]] == [nn.Linear, nn.ReLU, nn.LayerNorm, nn.Dropout]
    assert [type(x) for x in m[1]] == [nn.Linear]  # logits: no activation, norm or dropout
    m.eval()
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(m(x), m(x.flatten(1)))
    assert [n for n, _ in m.linears()] == ["0.linear", "1.linear"]


def test_torch_impl_converts_to_fused():
    torch.manual_seed(0)
    m = MLP([12, 8, 3], activation="gelu", impl="torch").eval()
    x = torch.randn(4, 12)
    ref = m(x)
    fastmlp.convert(m)
    assert type(m[0].linear) is FusedLinear and m[0].linear.activation == "gelu"
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw, match", [
    ({"widths": [10]}, "widths"),
    ({"widths": [10, 0, 2]}, "widths"),
    # Only the activations an MLP accepts are listed ("none" would make it one linear map).
    ({"widths": [10, 2], "activation": "tanh"}, "^MLP: activation must be 'relu', 'gelu', 'gelu_tanh' or 'silu', got 'tanh'$"),
    ({"widths": [10, 2], "activation": "none"}, "got 'none'$"),
    ({"widths": [10, 2], "dropout": 1.0}, "dropout"),
    ({"widths": [10, 2], "norm": "group"}, "norm"),
    ({"widths": [10, 2], "impl": "jax"}, "impl"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        MLP(**kw)


@pytest.mark.parametrize("impl", ["torch", "fastmlp"])
def test_xavier_and_he_variances(impl):
    m = MLP([400, 300, 300, 10], activation="relu", impl=impl)
    xavier_(m)
    w = m[1].linear.weight
    assert abs(w.var().item() - 2 / 600) / (2 / 600) < 0.05
    assert m[1].linear.bias.abs().max().item() == 0
    he_(m)
    assert abs(m[0].linear.weight.var().item() - 2 / 400) / (2 / 400) < 0.05
    assert abs(m[2].linear.weight.var().item() - 1 / 300) / (1 / 300) < 0.1  # logits: gain 1


@pytest.mark.parametrize("impl", ["torch", "fastmlp"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_lsuv_gives_unit_output_variance_per_layer(impl, activation):
    torch.manual_seed(0)
    m = MLP([64, 128, 96, 10], activation=activation, dropout=0.5, impl=impl)
    x = torch.randn(512, 64) * 3 + 1
    tol = 0.05
    var = lsuv_(m, x, tol=tol)
    assert list(var) == ["0.linear", "1.linear", "2.linear"]
    assert m.training  # mode restored
    # Measure independently: each layer's affine output on the same batch.
    m.eval()
    inputs = []
    hooks = [blk.linear.register_forward_pre_hook(lambda mod, a: inputs.append(a[0])) for blk in m]
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    for blk, inp in zip(m, inputs):
        out = torch.nn.functional.linear(inp, blk.linear.weight, blk.linear.bias)
        assert abs(out.var().item() - 1) < tol
    # Orthogonal start: rows of a square-ish layer stay orthogonal up to the one rescale.
    w = m[1].linear.weight
    g = w @ w.T
    torch.testing.assert_close(g / g.diagonal().mean(), torch.eye(96), atol=1e-4, rtol=0)


def test_lsuv_rejects_constant_batch():
    m = MLP([8, 4, 2], impl="torch")
    with pytest.raises(ValueError, match="variance"):
        lsuv_(m, torch.zeros(16, 8))
