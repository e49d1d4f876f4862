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
    assert m(torch.randn(0, 1, 28, 28)).shape == (0, 10)
    assert [n for n, _ in m.linears()] == ["0.linear", "1.linear"]
    # A (batch, tokens, features) input is flattened per sample too: said in the error, with the fix.
    with pytest.raises(ValueError, match=r"a sample of shape \[5, 784\] has 3920 values where widths\[0\] = 784; "
                                         r"for an MLP applied along the last dimension.*nn.Sequential"):
        m(torch.randn(2, 5, 784))


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
    ({"widths": [10, 2], "dropout": "0.2"}, "^MLP: dropout must be a number in \\[0, 1\\), got '0.2'$"),
    ({"widths": 10}, "^MLP: widths must list at least two positive ints"),
    ({"widths": [10, 2.0]}, "widths"),
    ({"widths": [10, True]}, "widths"),
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


def test_widths_accept_numpy_and_tensor_ints():
    np = pytest.importorskip("numpy")
    assert MLP(np.array([6, 5, 3])).widths == [6, 5, 3]
    assert MLP(torch.tensor([6, 5, 3])).widths == [6, 5, 3]
    assert all(type(w) is int for w in MLP((np.int64(4), 2)).widths)


def test_he_gives_the_same_init_before_and_after_convert():
    # convert() turns a linear it cannot fuse into FusedLinear("none"): like the nn.Linear it was,
    # it says nothing of what follows, so He keeps the ReLU gain for it (it read "none" as linear).
    def model():
        return nn.Sequential(nn.Linear(400, 300), nn.Dropout(0.1), nn.ReLU(), nn.Linear(300, 10))

    torch.manual_seed(0)
    plain = he_(model())
    torch.manual_seed(0)
    converted = he_(fastmlp.convert(model()))
    assert converted[0].activation == "none"
    torch.testing.assert_close(converted[0].weight, plain[0].weight)
    assert abs(plain[0].weight.var().item() - 2 / 400) / (2 / 400) < 0.05


@pytest.mark.parametrize("init", [he_, xavier_, lambda m: lsuv_(m, torch.randn(8, 3))])
def test_init_refuses_parametrized_weights(init):
    # weight_norm computes .weight from other parameters: writing into it would change nothing.
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.utils.parametrizations.weight_norm(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="layer '2' computes its weight from other parameters"):
        init(model)


class _OutOfOrder(nn.Module):
    """fc2 is registered first but called second; 'head' is never called."""

    def __init__(self):
        super().__init__()
        self.fc2 = nn.Linear(50, 40)
        self.head = nn.Linear(7, 3)
        self.fc1 = nn.Linear(20, 50)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_lsuv_follows_the_forward_order_and_reports_what_it_reached():
    torch.manual_seed(0)
    m = _OutOfOrder()
    x = torch.randn(256, 20) * 3 + 1
    with pytest.warns(UserWarning, match="never calls head; left orthogonal"):
        var = lsuv_(m, x, tol=0.02)
    assert list(var) == ["fc1", "fc2"]
    z1 = m.fc1(x)
    z2 = m.fc2(torch.relu(z1))
    assert abs(z1.var().item() - 1) < 0.02 and abs(z2.var().item() - 1) < 0.02
    assert var["fc2"] == pytest.approx(z2.var().item(), rel=1e-5)  # what was measured, not a stale value


def test_lsuv_max_iters_reports_the_last_measurement_and_warns_when_short():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    x = torch.randn(128, 20) * 5
    var = lsuv_(m, x, max_iters=0)  # measure only: nothing rescaled, no warning
    assert var["0"] == pytest.approx(m[0](x).var().item(), rel=1e-5) and var["0"] > 2
    # A layer whose input scales with its own weight: each rescale by s moves its output by s^2,
    # so it never converges (its variance flips between v and 1/v), and says so.
    class SelfScaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(20, 30)

        def forward(self, x):
            return self.fc(x * self.fc.weight.norm())

    m = SelfScaled()
    with pytest.warns(UserWarning, match=r"not within 0.05 of 1 after 3 rescales: fc \("):
        lsuv_(m, x, max_iters=3)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_iters must be an int >= 0"):
            lsuv_(m, x, max_iters=bad)


def test_lsuv_names_nan_batches():
    with pytest.raises(ValueError, match="give NaN or Inf"):
        lsuv_(MLP([8, 4, 2], impl="torch"), torch.full((16, 8), float("nan")))


def test_lsuv_gives_each_submodule_its_own_mode_back():
    # A frozen batch norm in a training model, Monte Carlo dropout in an eval one: lsuv_ runs in eval
    # mode and leaves every module's flag as it found it, not the root's.
    m = MLP([8, 16, 4], norm="batch", dropout=0.5)
    m[0].norm.eval()
    lsuv_(m, torch.randn(64, 8))
    assert m.training and not m[0].norm.training and m[0].dropout.training and m[1].training
    m.eval()
    m[0].dropout.train()
    lsuv_(m, torch.randn(64, 8))
    assert not m.training and m[0].dropout.training and not m[0].norm.training


@pytest.mark.parametrize("impl", ["fastmlp", "torch"])
def test_slices_are_mlps_of_the_same_blocks(impl):
    # As nn.Sequential's: the same modules under their names; mlp[:-1] drops the head.
    torch.manual_seed(0)
    m = MLP([12, 8, 6, 3], norm="layer", impl=impl).eval()
    body, tail = m[:-1], m[1:]
    assert type(body) is MLP and body.widths == [12, 8, 6] and tail.widths == [8, 6, 3]
    assert body[0] is m[0] and body[1] is m[1] and tail[1] is m[2]
    assert list(tail.state_dict()) == [k for k in m.state_dict() if not k.startswith("0.")]
    assert [name for name, _ in tail.linears()] == ["1.linear", "2.linear"]
    x = torch.randn(5, 1, 3, 4)   # flattened to 12 per sample, as by the whole MLP
    torch.testing.assert_close(tail(m[:1](x)), m(x))
    torch.testing.assert_close(m[2](body(x)), m(x))
    assert (body.activation, body.impl, body.norm) == (m.activation, m.impl, m.norm)
    assert len(m[3:]) == 0 and torch.equal(m[3:](x), x)   # empty, as an empty nn.Sequential
    assert m[-1] is m[2]
