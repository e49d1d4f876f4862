import math

import pytest
import torch
from torch import nn

from fastmlp.monitor import AnomalyGuard, Monitor, _activation_points, layer_grad_norms, total_grad_norm
from fastmlp.nn import MLP, FusedLinear


def _step(model, opt, x, y, mon, step):
    mon.begin(step)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    mon.after_backward()
    opt.step()
    return mon.after_step()


@pytest.mark.parametrize("impl", ["torch", "fastmlp"])
def test_monitor_records(impl):
    torch.manual_seed(0)
    m = MLP([16, 32, 24, 4], activation="relu", impl=impl)
    with torch.no_grad():
        m[0].linear.bias[:5] = -1e3  # five units of layer 0 can never fire: dead ReLUs
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    mon = Monitor(m, every=2)
    w00, b00 = m[0].linear.weight.detach().clone(), m[0].linear.bias.detach().clone()
    w0, b0 = m[1].linear.weight.detach().clone(), m[1].linear.bias.detach().clone()
    rec = _step(m, opt, x, y, mon, 0)
    assert rec["step"] == 0
    assert rec["0.act/dead_frac"] == pytest.approx(5 / 32)
    assert 0 <= rec["1.act/dead_frac"] < 1
    # Update ratio and gradient norm computed by hand.
    upd = (m[1].linear.weight.detach() - w0).norm() / w0.norm()
    assert rec["1.linear/update_ratio"] == pytest.approx(upd.item(), rel=1e-5)
    # Plain SGD moved each parameter by -lr * grad, so the step reveals the layer's gradient norm.
    g = torch.cat([(m[1].linear.weight.detach() - w0).flatten(), m[1].linear.bias.detach() - b0]) / 0.1
    assert rec["1.linear/grad_norm"] == pytest.approx(g.norm().item(), rel=1e-4)
    # Activation statistics of the post-activation outputs.
    with torch.no_grad():  # the weights before the step produced the recorded activations
        h = torch.relu(nn.functional.linear(x, w00, b00))
    assert rec["0.act/act_mean"] == pytest.approx(h.mean().item(), rel=1e-4)
    assert rec["0.act/act_std"] == pytest.approx(h.std().item(), rel=1e-4)
    # Not a monitored step: nothing recorded, no hooks left behind.
    assert _step(m, opt, x, y, mon, 1) is None
    assert not any(blk.act._forward_hooks for blk in list(m)[:-1])


@pytest.mark.parametrize("impl", ["torch", "fastmlp"])
def test_activation_points_are_hidden_activations_only(impl):
    # No hidden layer: the MLP's output is the logits, not an activation (it was recorded as "/act_std").
    assert _activation_points(MLP([16, 4], activation="relu", impl=impl)) == []
    assert [n for n, _ in _activation_points(MLP([16, 8, 4], activation="gelu", impl=impl))] == ["0.act"]
    # Outside fastmlp.nn.MLP: activation modules and fused layers with an activation, by name.
    seq = nn.Sequential(FusedLinear(16, 8, activation="silu"), nn.Linear(8, 8), nn.ReLU(),
                        FusedLinear(8, 4, activation="none"))
    assert [n for n, _ in _activation_points(seq)] == ["0", "2"]
    # A module that merely happens to be named "act" does not hide the others (only fastmlp's MLP
    # names its activation slots so); a container named "act" is not taken for an activation.
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.GELU())

        def forward(self, x):
            return self.act(self.fc(x))

    seq = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), Block())
    assert [n for n, _ in _activation_points(seq)] == ["1", "2.act.1"]
    mon = Monitor(MLP([16, 4], impl=impl), every=1)
    m = mon.model
    rec = _step(m, torch.optim.SGD(m.parameters(), lr=0.1), torch.randn(8, 16), torch.randint(0, 4, (8,)), mon, 0)
    assert not [k for k in rec if k.endswith(("/act_mean", "/act_std", "/dead_frac"))]
    assert "0.linear/grad_norm" in rec


def test_grad_norm_helpers_match_torch():
    m = MLP([10, 7, 3], impl="torch")
    m(torch.randn(5, 10)).sum().backward()
    norms = layer_grad_norms(m)
    w, b = m[0].linear.weight.grad, m[0].linear.bias.grad
    assert norms["0.linear"].item() == pytest.approx(torch.cat([w.flatten(), b]).norm().item(), rel=1e-6)
    total = torch.cat([p.grad.flatten() for p in m.parameters()]).norm()
    assert total_grad_norm(m.parameters()).item() == pytest.approx(total.item(), rel=1e-6)
    # One tensor, as clip_grad_norm_ takes it; sparse gradients (an nn.Embedding(sparse=True), its
    # repeated rows summed), beside dense float64 ones; none at all.
    assert total_grad_norm(w.new_empty(0)).item() == 0.0
    assert total_grad_norm(m[0].linear.weight).item() == pytest.approx(w.norm().item(), rel=1e-6)
    emb, extra = nn.Embedding(10, 4, sparse=True), nn.Parameter(torch.randn(3, dtype=torch.float64))
    (emb(torch.tensor([1, 2, 2])).sum() + extra.sum()).backward()
    dense = torch.cat([emb.weight.grad.to_dense().flatten().double(), extra.grad])
    assert total_grad_norm([emb.weight, extra]).item() == pytest.approx(dense.norm().item(), rel=1e-12)


def _replay(m, x, y):
    def run():
        m.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        return loss
    return run


@pytest.mark.parametrize("impl", ["torch", "fastmlp"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_guard_names_layer_with_nan_weight(impl, layer):
    torch.manual_seed(0)
    m = MLP([12, 16, 16, 3], activation="gelu", impl=impl)
    with torch.no_grad():
        m[layer].linear.weight[2, 3] = float("nan")
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))
    guard = AnomalyGuard(m)
    loss = _replay(m, x, y)()
    assert not guard.check(loss, total_grad_norm(m.parameters()))
    err = guard.error(17, _replay(m, x, y), checkpoint="runs/x/checkpoint.pt")
    assert err.step == 17 and err.layer == f"{layer}.linear" and err.where == "forward output"
    assert "step 17" in str(err) and f"'{layer}.linear'" in str(err) and "runs/x/checkpoint.pt" in str(err)


def test_guard_names_bad_input_batch():
    m = MLP([6, 5, 2], impl="torch")
    x, y = torch.randn(4, 6), torch.randint(0, 2, (4,))
    x[1, 2] = float("inf")
    layer, where = AnomalyGuard(m).locate(_replay(m, x, y))
    assert layer == "0.linear" and "batch" in where


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class NanInBackward(nn.Module):
    def forward(self, x):
        return _NanGrad.apply(x)


def test_guard_finds_backward_only_nan():
    torch.manual_seed(0)
    m = MLP([6, 5, 4, 2], impl="torch")
    m[1].add_module("poison", NanInBackward())  # after block 1's activation: forward is clean
    x, y = torch.randn(4, 6), torch.randint(0, 2, (4,))
    loss = _replay(m, x, y)()
    assert torch.isfinite(loss)
    assert not AnomalyGuard.check(loss, total_grad_norm(m.parameters()))
    layer, where = AnomalyGuard(m).locate(_replay(m, x, y))
    assert layer == "1.poison" and "gradient" in where


def test_guard_with_in_place_activations():
    # A full backward hook's output view may not be modified in place (nn.ReLU(inplace=True)): the
    # guard replays with hooks on the gradients instead, and still names the layer.
    torch.manual_seed(0)
    x, y = torch.randn(4, 6), torch.randint(0, 2, (4,))
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 2))
    with torch.no_grad():
        m[0].weight[0, 0] = float("nan")
    assert AnomalyGuard(m).locate(_replay(m, x, y)) == ("0", "forward output")
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), NanInBackward(), nn.Linear(5, 2))
    assert AnomalyGuard(m).locate(_replay(m, x, y)) == ("2", "gradient of its input")
    assert not any(mod._forward_hooks or mod._backward_hooks for mod in m.modules())


def test_monitor_hooks_never_linger_and_models_without_linears():
    m = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    mon = Monitor(m, every=1)
    mon.begin(0)
    with pytest.raises(RuntimeError):
        m(torch.randn(3, 7))           # a step that failed in its forward
    for s in range(1, 4):
        mon.begin(s)                   # each begin clears what the last one left
    assert len(m[1]._forward_hooks) == 1
    with mon:
        pass
    assert not m[1]._forward_hooks     # close() (also on leaving a with block)
    # No nn.Linear at all: the record holds the step and the activations.
    conv = nn.Sequential(nn.Conv1d(1, 1, 1), nn.ReLU())
    with Monitor(conv, every=1) as mon:
        mon.begin(0)
        conv(torch.randn(4, 1, 5)).sum().backward()
        mon.after_backward()
        rec = mon.after_step()
    assert rec["step"] == 0 and set(rec) == {"step", "1/act_mean", "1/act_std", "1/dead_frac"}


def test_guard_check_passes_finite():
    assert AnomalyGuard.check(torch.tensor(1.0), torch.tensor(3.0))
    assert not AnomalyGuard.check(torch.tensor(float("inf")), torch.tensor(3.0))
    assert AnomalyGuard.check(1.0, 3.0) and not AnomalyGuard.check(1.0, float("nan"))   # Python numbers too
    assert not AnomalyGuard.check(torch.tensor(1.0), torch.tensor(float("nan")))


def _huge_replay(m, x, y, scale):
    def run():
        m.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(m(x), y) * scale
        loss.backward()
        return loss
    return run


def test_grad_norm_of_huge_finite_gradients_is_finite():
    # A diverging run: every gradient finite (~1e25) but the sum of their squares is far past
    # float32's range. The guard must not call that a non-finite gradient.
    torch.manual_seed(0)
    m = MLP([12, 16, 3], impl="fastmlp")
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))
    loss = _huge_replay(m, x, y, 1e25)()
    grads = [p.grad for p in m.parameters()]
    assert all(torch.isfinite(g).all() for g in grads)
    assert not torch.isfinite(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))  # fp32 overflows
    norm = total_grad_norm(m.parameters())
    want = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    assert math.isfinite(norm.item()) and norm.item() == pytest.approx(want, rel=1e-6)
    assert all(math.isfinite(v.item()) for v in layer_grad_norms(m).values())
    assert AnomalyGuard.check(loss, norm)


def test_guard_explains_an_overflowed_norm():
    # torch.nn.utils.clip_grad_norm_ sums squares in fp32, so with clipping on the norm the guard
    # sees can overflow while every value is finite: the message says so instead of blaming a layer.
    torch.manual_seed(0)
    m = MLP([12, 16, 3], impl="torch")
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))
    err = AnomalyGuard(m).error(5, _huge_replay(m, x, y, 1e25))
    assert err.layer is None
    msg = str(err)
    assert msg.startswith("non-finite loss or gradient at step 5: the gradient norm overflowed") and "lower the learning rate" in msg
    assert "first appeared in" not in msg and "not reproduced" not in msg


def test_guard_blames_the_lr_when_a_growing_loss_overflows():
    # Logits of +-2e38 are finite, and so are their softmax and every gradient, but the cross-entropy
    # (logsumexp minus the target's logit) overflows: the loss is the first non-finite value.
    m = MLP([2, 2], impl="torch")
    with torch.no_grad():
        m[0].linear.weight.copy_(torch.tensor([[1e38, 0.0], [-1e38, 0.0]]))
        m[0].linear.bias.zero_()
    x, y = torch.tensor([[2.0, 0.0]]), torch.tensor([1])
    guard = AnomalyGuard(m)
    diverging = [2.3, 2.1, 2.4, 9.0, 80.0, 3e3, 4e5]  # the steps before, oldest first
    err = guard.error(9, _replay(m, x, y), recent_losses=diverging)
    assert err.layer is None and all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert str(err) == ("non-finite loss or gradient at step 9: it first appeared in the loss (every layer's output "
                        "was finite), which rose from 2.1 to 4e+05 over the last 6 steps: the learning rate is likely "
                        "too high.")
    # A loss that was steady (or no history, or a near-zero loss wobbling) points at the labels and loss inputs.
    for steady in ([2.3, 2.2, 2.25, 2.1], [], [1e-6, 2e-6, 5e-5], [2.0, float("nan"), float("inf")]):
        msg = str(guard.error(9, _replay(m, x, y), recent_losses=steady))
        assert "check the labels and the loss inputs" in msg and "learning rate" not in msg


# ---- fastmlp.norms: the gradient norms' kernel ---------------------------------------------------
def _norm_inputs(device, dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).to(device, dtype) for s in [(0,), (3,), (40001,), (129, 257)]] + \
        [torch.randn(65, 33, generator=g).to(device, dtype).t(), torch.randn(8, 6, generator=g).to(device, dtype)[:, ::2]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_norms_match_a_float64_reference(device, dtype):
    from fastmlp import ops

    ts = _norm_inputs(device, dtype)
    got = ops.norms(ts)
    ref = torch.stack([t.double().square().sum().sqrt() for t in ts])
    assert got.dtype == torch.float64 and got.shape == (len(ts),) and got.device == ts[0].device
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    torch.library.opcheck(torch.ops.fastmlp.norms.default, (ts,))


def test_norms_do_not_overflow_propagate_nan_and_ignore_the_thread_count(device):
    from fastmlp import ops

    big = torch.full((1000,), 1e20, device=device)  # finite fp32 whose squares overflow fp32
    assert ops.norms([big]).item() == pytest.approx(1e20 * math.sqrt(1000))
    bad = torch.ones(50000, device=device)
    bad[31337] = float("nan")
    inf = torch.ones(3, device=device)
    inf[1] = float("inf")
    out = ops.norms([bad, inf, torch.ones(4, device=device)])
    assert math.isnan(out[0]) and math.isinf(out[1]) and out[2] == 2.0
    ts = _norm_inputs(device, torch.float32) + [torch.randn(300000, device=device)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.norms(ts)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(ops.norms(ts), one)
    finally:
        torch.set_num_threads(threads)


def test_norms_errors():
    from fastmlp import ops

    assert ops.norms([]).shape == (0,)
    ops.ema_update_([], [], 0.5)   # empty lists: nothing to do (the dispatcher cannot route them)
    with pytest.raises(TypeError, match=r"fastmlp.norms: tensors must be a floating-point tensor"):
        ops.norms([torch.ones(3), torch.ones(3, dtype=torch.long)])
