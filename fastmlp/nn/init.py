"""Initialisation for every nn.Linear in a model (FusedLinear included): xavier_, he_ (kaiming_), lsuv_."""

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["xavier_", "he_", "kaiming_", "lsuv_", "init_"]

# Gains for the activation that follows a layer; GELU and SiLU are close enough to ReLU's
# (they zero most of the negative half) that He's sqrt(2) keeps the forward variance steady.
_GAIN_NONLIN = {"relu": "relu", "gelu": "relu", "gelu_tanh": "relu", "silu": "relu", "none": "linear"}


def _linears(model):
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"init: {type(model).__name__} has no nn.Linear layers to initialise")
    return found


def _activation_after(model, linear):
    act = getattr(linear, "activation", None)  # FusedLinear carries its own
    if act is not None:
        return act
    return getattr(model, "activation", "relu")


@torch.no_grad()
def xavier_(model, uniform=True):
    """Glorot: weights with variance 2 / (fan_in + fan_out), biases zero. Returns the model."""
    for _, m in _linears(model):
        (nn.init.xavier_uniform_ if uniform else nn.init.xavier_normal_)(m.weight)
        if m.bias is not None:
            m.bias.zero_()
    return model


@torch.no_grad()
def he_(model, uniform=False):
    """He / Kaiming (fan_in): weight variance 2 / fan_in before rectifying activations, 1 / fan_in
    before the logits; biases zero. Returns the model."""
    layers = _linears(model)
    for i, (_, m) in enumerate(layers):
        last = i == len(layers) - 1
        nonlin = "linear" if last else _GAIN_NONLIN.get(_activation_after(model, m), "relu")
        fn = nn.init.kaiming_uniform_ if uniform else nn.init.kaiming_normal_
        fn(m.weight, mode="fan_in", nonlinearity=nonlin)
        if m.bias is not None:
            m.bias.zero_()
    return model


kaiming_ = he_


@torch.no_grad()
def lsuv_(model, batch, tol=0.05, max_iters=10):
    """Layer-sequential unit variance (Mishkin & Matas, 2016): orthogonal weights, zero biases,
    then, layer by layer in forward order, the weights are rescaled until the layer's output (the
    affine output, before its activation) has variance 1 within ``tol`` on ``batch``.

    Runs the model in eval mode (no dropout noise) and restores its mode. Returns
    {layer name: final output variance}; raises if a layer's output is constant on the batch.
    """
    if not 0 < tol < 1:
        raise ValueError(f"lsuv_: tol must be in (0, 1), got {tol!r}")
    layers = _linears(model)
    for _, m in layers:
        nn.init.orthogonal_(m.weight)
        if m.bias is not None:
            m.bias.zero_()
    was_training = model.training
    model.eval()
    captured = {}

    def grab(mod, args):
        captured["x"] = args[0]

    variances = {}
    try:
        for name, m in layers:
            handle = m.register_forward_pre_hook(grab)
            try:
                for _ in range(max_iters + 1):
                    model(batch)
                    x = captured["x"].float()
                    # The affine output itself: a FusedLinear's forward returns it after its activation.
                    var = F.linear(x, m.weight.float(), None if m.bias is None else m.bias.float()).var().item()
                    if not math.isfinite(var) or var == 0.0:
                        raise ValueError(f"lsuv_: layer {name!r} has output variance {var} on the batch; "
                                         "LSUV needs a batch whose inputs vary (use more than one sample)")
                    if abs(var - 1.0) < tol:
                        break
                    m.weight.div_(math.sqrt(var))
                variances[name] = var
            finally:
                handle.remove()
    finally:
        model.train(was_training)
    return variances


def init_(model, method, batch=None):
    """Dispatch by name: "default" (leave torch's nn.Linear init), "xavier", "he"/"kaiming", "lsuv"
    (needs ``batch``)."""
    if method == "default":
        return model
    if method == "xavier":
        return xavier_(model)
    if method in ("he", "kaiming"):
        return he_(model)
    if method == "lsuv":
        if batch is None:
            raise ValueError("init_: 'lsuv' needs a data batch")
        lsuv_(model, batch)
        return model
    raise ValueError(f"init: unknown method {method!r}; expected 'default', 'xavier', 'he', 'kaiming' or 'lsuv'")
