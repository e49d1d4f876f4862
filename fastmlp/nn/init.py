"""Initialisation for every nn.Linear in a model (FusedLinear included): xavier_, he_ (kaiming_), lsuv_."""

import math
import warnings

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
    for name, m in found:
        if "weight" not in m._parameters:
            # weight_norm / spectral_norm / parametrize: m.weight is recomputed from other
            # parameters, so writing into it would change nothing.
            raise ValueError(
                f"init: layer {name or '(the model itself)'!r} computes its weight from other parameters (a "
                "parametrization such as weight_norm or spectral_norm); initialise the model before adding it")
    return found


def _activation_after(model, linear):
    """The activation after a layer: a FusedLinear's own, else the model's ``activation``, else relu
    (an nn.Linear, or a FusedLinear("none") that convert() made of one, says nothing of what
    follows it, so both get the same answer)."""
    act = getattr(linear, "activation", None)
    if act is not None and act != "none":
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
    then, layer by layer in the order the forward calls them, the weights are rescaled (at most
    ``max_iters`` times per layer) until the layer's output (the affine output, before its
    activation) has variance 1 within ``tol`` on ``batch``. A layer called more than once is
    measured on its first call.

    Runs the model in eval mode (no dropout noise) and restores each submodule's own mode. Returns
    {layer name: output variance measured after the last rescale}, in forward order; warns about
    layers that did not reach the tolerance and about layers the forward never calls (left
    orthogonal, not in the result). Raises if a layer's output has variance 0 or is not finite.
    """
    if not 0 < tol < 1:
        raise ValueError(f"lsuv_: tol must be in (0, 1), got {tol!r}")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 0:
        raise ValueError(f"lsuv_: max_iters must be an int >= 0, got {max_iters!r}")
    layers = dict(_linears(model))
    for m in layers.values():
        nn.init.orthogonal_(m.weight)
        if m.bias is not None:
            m.bias.zero_()
    modes = [(m, m.training) for m in model.modules()]   # each its own: a frozen norm, MC dropout
    model.eval()
    variances, unconverged = {}, []
    try:
        order = _call_order(model, batch, layers)
        unused = [name for name in layers if name not in order]
        for name in order:
            m = layers[name]
            for it in range(max_iters + 1):
                var = _output_variance(model, batch, name, m)
                if abs(var - 1.0) < tol:
                    break
                if it == max_iters:
                    unconverged.append(f"{name} ({var:.3g})")
                    break
                m.weight.div_(math.sqrt(var))
            variances[name] = var
    finally:
        for m, training in modes:
            m.training = training
    if unused:
        warnings.warn(f"lsuv_: the forward on the batch never calls {', '.join(unused)}; left orthogonal "
                      "and not rescaled", UserWarning, stacklevel=3)
    if unconverged and max_iters > 0:
        warnings.warn(f"lsuv_: output variance not within {tol} of 1 after {max_iters} rescales: "
                      f"{', '.join(unconverged)} (the layer's input changes with its own weights)", UserWarning,
                      stacklevel=3)
    return variances


def _call_order(model, batch, layers):
    """Names of the layers in the order a forward on batch first calls them."""
    order = []

    def record(name):
        def hook(mod, args):
            if name not in order:
                order.append(name)
        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in layers.items()]
    try:
        model(batch)
    finally:
        for h in handles:
            h.remove()
    return order


def _output_variance(model, batch, name, m):
    """Variance of layer m's affine output on its first call in a forward on batch."""
    captured = []

    def grab(mod, args):
        if not captured:
            captured.append(args[0])

    handle = m.register_forward_pre_hook(grab)
    try:
        model(batch)
    finally:
        handle.remove()
    x = captured[0].float()
    # The affine output itself: a FusedLinear's forward returns it after its activation.
    var = F.linear(x, m.weight.float(), None if m.bias is None else m.bias.float()).var().item()
    if not math.isfinite(var):
        raise ValueError(f"lsuv_: layer {name!r} has output variance {var} on the batch: the batch or the "
                         "layers before it give NaN or Inf")
    if var == 0.0:
        raise ValueError(f"lsuv_: layer {name!r} has output variance 0 (a constant output) on the batch; LSUV "
                         "needs a batch whose inputs vary (more than one sample, not all equal)")
    return var


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
