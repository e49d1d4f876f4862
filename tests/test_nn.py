"""fastmlp.nn.FusedLinear and fastmlp.convert as drop-ins for nn.Linear (+ activation)."""

import io
import pickle
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmlp
from fastmlp import FusedLinear
from fastmlp.nn import MLP


def test_fused_linear_is_an_nn_linear_with_same_init_and_keys(device):
    torch.manual_seed(3)
    ref = nn.Linear(20, 7, device=device)
    torch.manual_seed(3)
    fused = FusedLinear(20, 7, activation="gelu", device=device)
    assert isinstance(fused, nn.Linear)
    assert fused.state_dict().keys() == ref.state_dict().keys()
    for k in ref.state_dict():  # the same initialisation draws
        torch.testing.assert_close(fused.state_dict()[k], ref.state_dict()[k], rtol=0, atol=0)
    assert "activation='gelu'" in repr(fused) and "in_features=20, out_features=7, bias=True" in repr(fused)


def test_state_dict_loads_both_ways(device):
    ref = nn.Linear(9, 4, bias=False, device=device)
    fused = FusedLinear(9, 4, bias=False, activation="none", device=device)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 9, device=device)
    torch.testing.assert_close(fused(x), ref(x))
    fused2 = FusedLinear(9, 4, bias=False, activation="none", device=device)
    ref.load_state_dict(fused2.state_dict())
    torch.testing.assert_close(ref(x), fused2(x))
    with pytest.raises(RuntimeError, match="Missing key"):
        FusedLinear(9, 4).load_state_dict(ref.state_dict())


def test_pickle_save_load_and_to(device):
    layer = FusedLinear(6, 5, activation="silu", device=device)
    clone = pickle.loads(pickle.dumps(layer))
    assert clone.activation == "silu"
    x = torch.randn(2, 6, device=device)
    torch.testing.assert_close(clone(x), layer(x))
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), layer(x))
    half = layer.to(torch.float64)
    assert half.weight.dtype == torch.float64 and half(x.double()).dtype == torch.float64


def test_module_matches_linear_plus_activation(device):
    for act, mod in [("relu", nn.ReLU()), ("gelu", nn.GELU()), ("gelu_tanh", nn.GELU(approximate="tanh")), ("silu", nn.SiLU()), ("none", nn.Identity())]:
        fused = FusedLinear(12, 8, activation=act, device=device)
        ref = nn.Linear(12, 8, device=device)
        ref.load_state_dict(fused.state_dict())
        x = torch.randn(5, 12, device=device)
        torch.testing.assert_close(fused(x), mod(ref(x)))


def quickstart_mlp():
    """The PyTorch quickstart model, written the ordinary way."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, 512), nn.ReLU(),
        nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, 10),
    )


def test_convert_quickstart_mlp_matches_outputs_gradients_and_keys(device):
    torch.manual_seed(0)
    model = quickstart_mlp().to(device)
    ref = quickstart_mlp().to(device)
    ref.load_state_dict(model.state_dict())
    keys = list(model.state_dict().keys())
    params_before = [id(p) for p in model.parameters()]
    out = fastmlp.convert(model)
    assert out is model
    assert list(model.state_dict().keys()) == keys
    assert [id(p) for p in model.parameters()] == params_before  # the same Parameter objects
    assert [type(m).__name__ for m in model] == ["Flatten", "FusedLinear", "Identity", "FusedLinear", "Identity", "FusedLinear"]
    assert [m.activation for m in model if isinstance(m, FusedLinear)] == ["relu", "relu", "none"]
    x = torch.randn(16, 1, 28, 28, device=device)
    torch.testing.assert_close(model(x), ref(x))
    model(x).square().sum().backward()
    ref(x).square().sum().backward()
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad)


def test_convert_nested_and_every_activation_kind():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)  # not in a Sequential: becomes activation "none"
            self.body = nn.Sequential(nn.Linear(8, 8), nn.GELU(approximate="tanh"), nn.Sequential(nn.Linear(8, 8), nn.SiLU()))

        def forward(self, x):
            return self.body(self.proj(x))

    model = nn.Sequential(Block(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.Tanh())
    ref = nn.Sequential(Block(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.Tanh())
    ref.load_state_dict(model.state_dict())
    fastmlp.convert(model)
    assert model[0].proj.activation == "none"
    assert model[0].body[0].activation == "gelu_tanh" and isinstance(model[0].body[1], nn.Identity)
    assert model[0].body[2][0].activation == "silu"
    assert model[1].activation == "gelu" and isinstance(model[2], nn.Identity)
    assert model[3].activation == "none" and isinstance(model[4], nn.Tanh)  # unsupported activation kept
    x = torch.randn(4, 8)
    torch.testing.assert_close(model(x), ref(x))
    assert model.state_dict().keys() == ref.state_dict().keys()


def test_convert_keeps_what_users_attach_and_layers_it_cannot_share():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Linear(3, 2))
    # A layer whose weight is a buffer (no Parameter to share) stays as it is, with a warning...
    w = model[3].weight.detach().clone()
    del model[3].weight
    model[3].register_buffer("weight", w)
    # ...and what a user attached to a converted layer comes along.
    model[2].tag = "head"
    model[2].register_buffer("mask", torch.ones(3, 5))
    model[2].register_buffer("scratch", torch.zeros(1), persistent=False)
    model[2].scale = nn.Parameter(torch.ones(3))
    model[2].adapter = nn.Linear(5, 3, bias=False)
    # Layers with a forward of their own (a wrapper set on the instance, as accelerate's hooks do;
    # Module.compile()) would keep running it, skipping the folded activation: they stay too.
    model = nn.Sequential(*model, nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.GELU())
    model[4].forward = lambda t, old=model[4].forward: old(t)
    model[6].compile(backend="eager")
    keys = list(model.state_dict())
    x = torch.randn(6, 4)
    want = model(x)
    with pytest.warns(UserWarning, match=r"^fastmlp.convert: 3, 4, 6 kept as they were.*not an nn.Parameter"):
        fastmlp.convert(model)
    assert model[0].activation == "relu" and isinstance(model[2], FusedLinear) and type(model[3]) is nn.Linear
    assert type(model[4]) is type(model[6]) is nn.Linear and type(model[5]) is nn.ReLU and type(model[7]) is nn.GELU
    assert model[2].tag == "head" and model[2].scratch.shape == (1,) and model[2].adapter.weight.shape == (3, 5)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), want)


def test_convert_changes_nothing_when_a_replacement_fails(monkeypatch):
    import sys

    convert_module = sys.modules["fastmlp.nn.convert"]  # (fastmlp.nn.convert is the function)

    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.SiLU(), nn.Linear(3, 2))
    before = list(model)
    real, calls = convert_module._fused_from, []

    def fails_on_the_third(linear, act):
        calls.append(act)
        if len(calls) == 3:
            raise RuntimeError("cannot build this one")
        return real(linear, act)

    monkeypatch.setattr(convert_module, "_fused_from", fails_on_the_third)
    with pytest.raises(RuntimeError, match="cannot build this one"):
        fastmlp.convert(model)
    assert list(model) == before  # the very same modules: nothing converted


def test_convert_keeps_modules_with_hooks_and_their_hooks_firing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.SiLU(),
                          nn.Linear(8, 3))
    ref = nn.Sequential(*[type(m)() if not isinstance(m, nn.Linear) else nn.Linear(m.in_features, m.out_features)
                          for m in model])
    ref.load_state_dict(model.state_dict())
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(("linear0 out", o.detach().clone())))
    model[3].register_forward_pre_hook(lambda m, i: seen.append(("gelu in", i[0].detach().clone())))
    with pytest.warns(UserWarning, match=r"0, 3 kept as they were, since they have hooks"):
        fastmlp.convert(model)
    assert type(model[0]) is nn.Linear and isinstance(model[1], nn.ReLU)  # hooked linear: untouched
    assert isinstance(model[2], FusedLinear) and model[2].activation == "none" and isinstance(model[3], nn.GELU)
    assert model[4].activation == "silu" and isinstance(model[5], nn.Identity)  # no hooks: fused
    x = torch.randn(5, 6)
    torch.testing.assert_close(model(x), ref(x))
    z0 = F.linear(x, ref[0].weight, ref[0].bias)
    z2 = F.linear(torch.relu(z0), ref[2].weight, ref[2].bias)
    assert [k for k, _ in seen] == ["linear0 out", "gelu in"]
    torch.testing.assert_close(seen[0][1], z0)
    torch.testing.assert_close(seen[1][1], z2)  # the activation still sees the pre-activation
    lin = nn.Linear(3, 2)
    lin.register_forward_hook(lambda m, i, o: None)
    with pytest.warns(UserWarning, match="kept as they were"):
        assert fastmlp.convert(lin) is lin


def test_convert_folds_only_where_the_sequential_runs_its_children_in_order():
    # A Sequential subclass with its own forward may read the pre-activation (a residual here):
    # folding the ReLU into the layer would change its output. Its linear still becomes "none".
    class PreActResidual(nn.Sequential):
        def forward(self, x):
            h = self[0](x)
            return self[1](h) + h

    torch.manual_seed(0)
    model = nn.Sequential(PreActResidual(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 8), nn.ReLU())
    ref = nn.Sequential(PreActResidual(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 8), nn.ReLU())
    ref.load_state_dict(model.state_dict())
    fastmlp.convert(model)
    assert model[0][0].activation == "none" and isinstance(model[0][1], nn.ReLU)
    assert model[1].activation == "relu" and isinstance(model[2], nn.Identity)  # plain Sequential: folded
    x = torch.randn(5, 8)
    torch.testing.assert_close(model(x), ref(x))
    # A forward replaced on the instance is not Sequential's either.
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    seq.forward = types.MethodType(lambda self, x: self[0](x) - self[1](self[0](x)), seq)
    x = torch.randn(3, 4)
    expect = seq(x)
    fastmlp.convert(seq)
    assert seq[0].activation == "none" and isinstance(seq[1], nn.ReLU)
    torch.testing.assert_close(seq(x), expect)
    # fastmlp's MLP has a forward of its own, but its blocks are plain Sequentials: still folded.
    mlp = fastmlp.nn.MLP([6, 5, 3], impl="torch")
    fastmlp.convert(mlp)
    assert mlp[0].linear.activation == "relu"


def test_convert_keeps_shared_layers_shared_and_identity_in_the_models_mode():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin).eval()
    fastmlp.convert(model)
    assert isinstance(model[0], FusedLinear) and model[0] is model[2]  # one module, as before
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    fastmlp.convert(model)
    assert isinstance(model[1], nn.Identity) and not any(m.training for m in model.modules())


def _fx_models(impl):
    torch.manual_seed(0)
    return {
        "FusedLinear": FusedLinear(6, 4, activation="gelu"),
        "MLP": MLP([12, 8, 8, 3], activation="silu", dropout=0.2, impl=impl).eval(),
        "converted": fastmlp.convert(nn.Sequential(nn.Linear(12, 5), nn.ReLU(), nn.Dropout(0.1), nn.Linear(5, 2))).eval(),
    }


@pytest.mark.parametrize("impl", ["fastmlp", "torch"])
def test_torch_fx_symbolic_trace(impl):
    # FX-based tools (graph rewrites, feature extractors) trace fastmlp models: each fused op is one
    # call in the graph (its input checks branch on the input, which FX cannot trace), and the
    # traced module computes what the model does.
    for name, m in _fx_models(impl).items():
        gm = torch.fx.symbolic_trace(m)
        x = torch.randn(3, 2, 3, 2) if name == "MLP" else torch.randn(3, 6 if name == "FusedLinear" else 12)
        assert torch.equal(gm(x), m(x)), name
        called = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        if name != "MLP" or impl == "fastmlp":
            assert fastmlp.functional.linear_act in called, (name, called)
    # A model traced in training follows .train() / .eval() afterwards, as with nn.Dropout (an FX
    # leaf module): dropout is one call taking the module, which reads its flag when called.
    m = MLP([12, 16, 3], dropout=0.5, impl=impl)
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(64, 12)
    assert not torch.equal(gm(x), gm(x))  # a new mask per call
    gm.eval(), m.eval()
    assert torch.equal(gm(x), m(x))
    # Traced on its own (the root), its flag is a constant of the graph, as for nn.Dropout.
    for drop in (fastmlp.nn.Dropout(0.5), nn.Dropout(0.5)):
        gm = torch.fx.symbolic_trace(drop).eval()
        assert set(gm(torch.ones(1000)).unique().tolist()) == {0.0, 2.0}, type(drop)


def test_torchvision_feature_extractor():
    try:  # (a torchvision built for another torch fails at import with a RuntimeError)
        from torchvision.models.feature_extraction import create_feature_extractor
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"needs a working torchvision: {e}")
    m = _fx_models("fastmlp")["MLP"]
    features = create_feature_extractor(m, return_nodes={"0": "h0", "1": "h1"})
    x = torch.randn(4, 12)
    out = features(x)
    assert torch.equal(out["h1"], m[1](m[0](x)))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_jit_script_and_sparse_input_get_clear_errors():
    with pytest.raises(RuntimeError, match="torch.jit.script does not support fastmlp's FusedLinear.*torch.jit.trace"):
        torch.jit.script(nn.Sequential(FusedLinear(3, 2)))
    with pytest.raises(RuntimeError, match="does not support fastmlp's Dropout"):
        torch.jit.script(nn.Sequential(nn.Linear(3, 3), fastmlp.nn.Dropout(0.1)))
    with pytest.raises(TypeError, match=r"input and weight must be dense tensors, got input.layout=torch.sparse_coo"):
        fastmlp.functional.linear_act(torch.eye(3).to_sparse(), torch.randn(2, 3))


def test_convert_swaps_dropout_for_fastmlps_unless_asked_not_to():
    torch.manual_seed(0)
    shared = nn.Dropout(0.3)

    class MyDropout(nn.Dropout):  # a subclass may do more: kept
        pass

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), shared, nn.Linear(8, 8), shared, nn.Dropout(0.5, inplace=True),
                          MyDropout(0.1), nn.Dropout2d(0.1), nn.Sequential(nn.Dropout(0.2).eval()))
    model[5].tag = "kept along"
    keys = list(model.state_dict())
    fastmlp.convert(model)
    assert type(model[2]) is fastmlp.nn.Dropout and model[2] is model[4] and model[2].p == 0.3  # still one module
    assert type(model[5]) is fastmlp.nn.Dropout and model[5].inplace and model[5].tag == "kept along"
    assert type(model[6]) is MyDropout and type(model[7]) is nn.Dropout2d
    assert type(model[8][0]) is fastmlp.nn.Dropout and not model[8][0].training and model[5].training
    assert list(model.state_dict()) == keys
    x = torch.randn(64, 8)
    out = model[2](x)  # training: each element dropped or scaled by 1 / (1 - p), as nn.Dropout does
    assert torch.all((out == 0) | torch.isclose(out, x / 0.7)) and 0 < (out == 0).float().mean() < 0.6
    ref = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 8))
    ref.load_state_dict({k: v for k, v in model.state_dict().items()})
    torch.testing.assert_close(model[:4].eval()(x), ref.eval()(x))  # in eval mode dropout is the identity
    kept = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3))
    fastmlp.convert(kept, dropout=False)
    assert type(kept[1]) is nn.Dropout and isinstance(kept[0], FusedLinear)
    hooked = nn.Sequential(nn.Dropout(0.1))
    hooked[0].register_forward_hook(lambda m, i, o: None)
    with pytest.warns(UserWarning, match="fastmlp.convert: 0 kept as they were.*nn.Linear, nn.Dropout or norm with hooks"):
        fastmlp.convert(hooked)
    assert type(hooked[0]) is nn.Dropout
    root = fastmlp.convert(nn.Dropout(0.25))
    assert type(root) is fastmlp.nn.Dropout and root.p == 0.25


def test_convert_plain_linear_and_bad_argument():
    lin = nn.Linear(3, 2)
    fused = fastmlp.convert(lin)
    assert isinstance(fused, FusedLinear) and fused.weight is lin.weight
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        fastmlp.convert("not a module")


@pytest.mark.parametrize("fourth", ["cpu", "cuda:0", torch.device("cpu"), torch.float16])
def test_fused_linear_positional_device_gets_a_hint(fourth):
    # nn.Linear(in, out, bias, device, dtype): written the nn.Linear way, the device lands in activation.
    with pytest.raises(ValueError, match=r"activation \(the 4th argument\) got .* pass device= and dtype= by keyword"):
        FusedLinear(3, 4, True, fourth)
    with pytest.raises(ValueError, match="unknown activation 'tanh'; expected one of: none, relu"):
        FusedLinear(3, 4, True, "tanh")
