"""fastmlp.optim.EMA and its kernel, fastmlp.ema_update_, against torch's lerp and a float64 reference."""

import copy
from pathlib import Path

import pytest
import torch

from fastmlp import ops
from fastmlp.nn import MLP
from fastmlp.optim import EMA
from fastmlp.train import Trainer
from fastmlp.train.engine import BEST, CHECKPOINT, evaluation_sums
from fastmlp.train.evaluate import evaluate_run, export_model, load_model, report
from test_data import real_data_dir
from test_train import _dying, cfg_small, synthetic, two_way_split

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def lists(device, dtype, seed=0):
    """Averages and values of odd sizes: empty, tiny, one split across threads, a transposed one."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(0,), (3,), (70001,), (129, 257)]
    avg = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    val = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    avg.append(torch.randn(65, 33, generator=g).to(device, dtype).t())  # non-contiguous, dense
    val.append(torch.randn(33, 65, generator=g).to(device, dtype))      # another layout than its average
    return avg, val


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight", [0.001, 0.3, 0.7, 1.0])  # both forms of torch's lerp (w < 0.5 and not)
def test_op_matches_torch_lerp(device, dtype, weight):
    avg, val = lists(device, dtype)
    ref = [a.clone().lerp_(v, weight) for a, v in zip(avg, val)]
    ops.ema_update_(avg, val, weight)
    for a, r in zip(avg, ref):
        assert a.stride() == r.stride()  # written in place, layout kept
        torch.testing.assert_close(a, r)  # (torch's vectorised lerp uses FMAs: an ulp apart at most)


def test_op_checks_and_opcheck(device):
    avg, val = lists(device, torch.float32)
    torch.library.opcheck(torch.ops.fastmlp.ema_update_.default, (avg, val, 0.1))
    op = "fastmlp.ema_update_"
    with pytest.raises(ValueError, match=f"{op}: expected values to have 5 tensors"):
        ops.ema_update_(avg, val[:4], 0.1)
    with pytest.raises(ValueError, match=rf"{op}: values\[2\] has shape \[70000\] but params\[2\] has shape \[70001\]"):
        ops.ema_update_(avg, val[:2] + [val[2][:-1]] + val[3:], 0.1)
    with pytest.raises(TypeError, match=rf"{op}: values\[1\] has dtype Double, expected Float"):
        ops.ema_update_(avg, [val[0], val[1].double(), *val[2:]], 0.1)
    with pytest.raises(ValueError, match=f"{op}: weight must be in \\[0, 1\\], got 1.5"):
        ops.ema_update_(avg, val, 1.5)
    with pytest.raises(TypeError, match=f"{op}: averages must be a floating-point tensor"):
        ops.ema_update_([torch.zeros(3, dtype=torch.long, device=device)], [torch.zeros(3, device=device)], 0.1)
    with pytest.raises(ValueError, match=rf"{op}: averages\[0\] has elements that share memory"):
        ops.ema_update_([torch.zeros(1, device=device).expand(4)], [torch.zeros(4, device=device)], 0.1)


def model_with_buffers(device, dtype=torch.float32):
    torch.manual_seed(0)
    return MLP([784, 32, 16, 10], activation="relu", norm="batch").to(device, dtype)


def train_a_bit(model, steps, seed):
    """Move the weights and the batch norm statistics as training would."""
    g = torch.Generator().manual_seed(seed)
    dev, dt = next(model.parameters()).device, next(model.parameters()).dtype
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(dev, dt), alpha=0.01)
            model(torch.randn(8, 784, generator=g).to(dev, dt))


@pytest.mark.parametrize("warmup", [True, False])
def test_average_matches_a_float64_reference(device, warmup):
    model = model_with_buffers(device)
    ema = EMA(model, decay=0.9, warmup=warmup)
    ref = {k: v.double().clone() for k, v in model.state_dict().items()}
    for t in range(30):
        train_a_bit(model, 1, seed=t)
        d = min(0.9, (1 + t) / (10 + t)) if warmup else 0.9
        assert ema.current_decay() == pytest.approx(d)
        ema.update()
        for k, v in model.state_dict().items():
            ref[k] = d * ref[k] + (1 - d) * v.double() if v.is_floating_point() else v.double().clone()
    avg = ema.averaged_state_dict()
    assert avg.keys() == ref.keys() and ema.num_updates == 30
    for k, v in avg.items():
        if k.endswith("num_batches_tracked"):
            assert v.dtype == torch.long and int(v) == 30  # copied, not averaged
        else:
            torch.testing.assert_close(v.double(), ref[k], rtol=1e-5, atol=1e-6)
    # The averaged running statistics belong to the averaged model: they are not the live ones.
    assert not torch.equal(avg["0.norm.running_mean"], model.state_dict()["0.norm.running_mean"])


def test_average_parameters_swaps_in_and_restores_bit_for_bit(device):
    model = model_with_buffers(device)
    ema = EMA(model, decay=0.5)
    train_a_bit(model, 3, seed=1)
    ema.update()
    train_a_bit(model, 3, seed=2)
    trained = copy.deepcopy(model.state_dict())
    x = torch.randn(16, 784, device=device)
    model.eval()
    with ema.average_parameters() as m:
        assert m is model
        for k, v in model.state_dict().items():
            assert torch.equal(v, ema.averaged_state_dict()[k])
        averaged_out = model(x)
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="in the block"):
        with ema.average_parameters():
            raise RuntimeError("in the block")
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    other = model_with_buffers(device).eval()
    ema.copy_to(other)
    assert torch.equal(other(x), averaged_out)


def test_state_dict_resumes_the_same_average(device):
    model = model_with_buffers(device)
    ema = EMA(model, decay=0.99)
    train_a_bit(model, 2, seed=0)
    ema.update()
    saved_model, saved_ema = copy.deepcopy(model.state_dict()), copy.deepcopy(ema.state_dict())
    for t in range(5):
        train_a_bit(model, 1, seed=10 + t)
        ema.update()

    model2 = model_with_buffers(device)
    model2.load_state_dict(saved_model)
    ema2 = EMA(model2, decay=0.5, warmup=False)  # its settings come from the state too
    ema2.load_state_dict(saved_ema)
    for t in range(5):
        train_a_bit(model2, 1, seed=10 + t)
        ema2.update()
    assert (ema2.decay, ema2.warmup, ema2.num_updates) == (0.99, True, 6)
    assert all(torch.equal(v, ema2.averaged_state_dict()[k]) for k, v in ema.averaged_state_dict().items())
    with pytest.raises(ValueError, match=r"the average is of another model \(unexpected 0.norm.bias, 0.norm.num_b"):
        EMA(MLP([784, 32, 16, 10]).to(device)).load_state_dict(saved_ema)
    with pytest.raises(ValueError, match="expected the dict of EMA.state_dict()"):
        ema2.load_state_dict({"averaged": {}})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_average_in_the_models_dtype(device, dtype):
    model = model_with_buffers(device, dtype)
    ema = EMA(model, decay=0.9, warmup=False)
    before = ema.averaged_state_dict()
    train_a_bit(model, 1, seed=3)
    ema.update()
    for k, v in ema.averaged_state_dict().items():
        assert v.dtype == model.state_dict()[k].dtype and v.device == model.state_dict()[k].device
        if v.is_floating_point():
            ref = before[k].clone().lerp_(model.state_dict()[k], 0.1)
            torch.testing.assert_close(v, ref)


def test_follows_the_models_tensors_when_they_are_replaced():
    # The EMA looks the model's tensors up at each use: load_state_dict(assign=True) (new
    # parameters), p.data = ... (new data), .double() (new data and dtype: the average follows),
    # and a copy or unpickling of the EMA (a copy of the model).
    import pickle

    def fresh():
        torch.manual_seed(0)
        m = MLP([4, 5, 3], norm="batch")
        return m, EMA(m, decay=0.5, warmup=False)

    def expect(ema, before, model):
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                torch.testing.assert_close(ema.averaged_state_dict()[k], (0.5 * before[k].to(v.dtype) + 0.5 * v), msg=k)

    m, ema = fresh()
    before = ema.averaged_state_dict()
    m.load_state_dict({k: v + 1 if v.is_floating_point() else v for k, v in m.state_dict().items()}, assign=True)
    ema.update()
    expect(ema, before, m)
    with ema.average_parameters():
        torch.testing.assert_close(m.state_dict()["0.linear.weight"], ema.averaged_state_dict()["0.linear.weight"])

    m, ema = fresh()
    before = ema.averaged_state_dict()
    m[0].linear.weight.data = torch.full_like(m[0].linear.weight, 3.0)
    ema.update()
    expect(ema, before, m)

    m, ema = fresh()
    before = ema.averaged_state_dict()
    m.double()
    ema.update()
    assert ema.averaged_state_dict()["0.linear.weight"].dtype == torch.float64
    expect(ema, before, m)

    for copy_fn in (copy.deepcopy, lambda e: pickle.loads(pickle.dumps(e))):
        m, ema = fresh()
        clone = copy_fn(ema)
        before = clone.averaged_state_dict()
        with torch.no_grad():
            clone.model[0].linear.weight.fill_(5.0)
        clone.update()
        expect(clone, before, clone.model)
        assert torch.equal(ema.averaged_state_dict()["0.linear.weight"], before["0.linear.weight"])

    # Two groups (float32, float64); the second moves to float32 under the same Parameter objects,
    # so the op refuses it after the first group was updated: every average moves exactly once.
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2).double())
    ema = EMA(m, decay=0.5, warmup=False)
    before = ema.averaged_state_dict()
    m[1].float()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update()
    expect(ema, before, m)
    assert all(v.dtype == torch.float32 for v in ema.averaged_state_dict().values())

    m, ema = fresh()
    m[0].linear.weight = torch.nn.Parameter(torch.zeros(6, 4))
    with pytest.raises(RuntimeError, match=r"0.linear.weight changed shape from \(5, 4\) to \(6, 4\)"):
        ema.update()


@pytest.mark.parametrize("decay", [1.0, -0.1, True, "0.9", float("nan")])
def test_bad_decay_is_refused(decay):
    with pytest.raises(ValueError, match=r"EMA: decay must be a number in \[0, 1\) \(e.g. 0.999\)"):
        EMA(torch.nn.Linear(2, 2), decay=decay)
    with pytest.raises(TypeError, match="EMA: model must be a torch.nn.Module, got dict"):
        EMA({}, decay=0.9)


# ---- in the trainer ------------------------------------------------------------------------------
def test_trainer_evaluates_and_saves_the_average(tmp_path):
    data = two_way_split()
    s = Trainer(cfg_small(tmp_path, epochs=2, ema=0.9, val_split=0.25, lr=0.02), data=data).fit()
    run = Path(s["run_dir"])
    ck = torch.load(run / CHECKPOINT, weights_only=False)
    assert ck["ema"]["num_updates"] == s["steps"] and ck["ema"]["decay"] == 0.9
    avg, trained = ck["ema"]["averaged"], ck["model"]
    assert avg.keys() == trained.keys() and any(not torch.equal(avg[k], trained[k]) for k in avg)
    # The test accuracy of the last epoch is that of the averaged weights; load_model gives them.
    model = load_model(run)
    for k, v in model.mlp.state_dict().items():
        assert torch.equal(v, avg[k])
    correct, loss, _ = evaluation_sums(model.mlp, data.test.batches(4096), torch.device("cpu"), None)
    assert int(correct) / len(data.test) == s["final_test_acc"]
    # export ships the average too: the program's logits are the averaged model's.
    images = torch.rand(5, 1, 28, 28)
    program = torch.export.load(export_model(run)).module()
    torch.testing.assert_close(program(images), model(images.reshape(5, 784)))
    r = evaluate_run(run, data_dir=real_data_dir(), plots=False)
    assert r["ema"] == 0.9 and f"{run} (checkpoint.pt, the moving average of the weights (--ema 0.9)): " in report(r)
    # best.pt holds the averaged weights of its epoch (here the only one).
    s = Trainer(cfg_small(tmp_path, epochs=1, ema=0.9, val_split=0.25, lr=0.02, name="one"), data=data).fit()
    best = torch.load(Path(s["run_dir"]) / BEST, weights_only=False)
    avg = torch.load(Path(s["run_dir"]) / CHECKPOINT, weights_only=False)["ema"]["averaged"]
    assert best["epoch"] == 1 and all(torch.equal(v, avg[k]) for k, v in best["model"].items())
    assert load_model(s["run_dir"], weights="best").mlp.state_dict().keys() == avg.keys()


@pytest.mark.parametrize("impl", ["torch", "fastmlp"])
def test_resume_with_ema_is_bitwise(tmp_path, impl):
    data = synthetic()
    full = Trainer(cfg_small(tmp_path, epochs=3, name="full", impl=impl, ema=0.95), data=data).fit()
    part = Trainer(cfg_small(tmp_path, epochs=3, name="part", impl=impl, ema=0.95, checkpoint_every=5), data=data)
    _dying(part, 13)  # mid-epoch 2, three steps after the step-10 checkpoint
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    s = Trainer.resume(part.run_dir, data=data).fit()
    assert [h["test_acc"] for h in s["history"]] == [h["test_acc"] for h in full["history"]]
    assert [h["test_loss"] for h in s["history"]] == [h["test_loss"] for h in full["history"]]
    a = torch.load(Path(full["run_dir"]) / CHECKPOINT, weights_only=False)["ema"]
    b = torch.load(Path(s["run_dir"]) / CHECKPOINT, weights_only=False)["ema"]
    assert a["num_updates"] == b["num_updates"] == 24
    assert all(torch.equal(v, b["averaged"][k]) for k, v in a["averaged"].items())
