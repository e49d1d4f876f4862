"""convert(): swap nn.Linear (+ activation) in an existing model for FusedLinear, in place."""

from torch import nn

from .linear import FusedLinear


def _activation_name(m):
    if type(m) is nn.ReLU:
        return "relu"
    if type(m) is nn.SiLU:
        return "silu"
    if type(m) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate)
    return None


def _fused_from(linear, activation):
    fused = FusedLinear(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        activation=activation, device="meta", dtype=linear.weight.dtype,
    )
    # Share the very same Parameter objects: optimisers, tied weights and hooks on them keep working.
    fused.weight = linear.weight
    fused.bias = linear.bias
    fused.train(linear.training)
    return fused


def convert(module: nn.Module) -> nn.Module:
    """Replace, in place, each nn.Linear followed by nn.ReLU / nn.GELU / nn.SiLU inside an
    nn.Sequential (at any depth) with one FusedLinear that shares its parameters; the
    activation's slot becomes nn.Identity, so indices and state_dict keys do not change. Every
    other plain nn.Linear becomes FusedLinear(activation="none"). Returns the module.

    Subclasses of nn.Linear (FusedLinear among them) are left as they are, since their forward
    may differ from a plain linear layer.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fastmlp.convert: module must be a torch.nn.Module, got {type(module).__name__}")
    if type(module) is nn.Linear:
        return _fused_from(module, "none")
    for parent in list(module.modules()):
        names = list(parent._modules.keys())
        for i, name in enumerate(names):
            child = parent._modules[name]
            if type(child) is not nn.Linear:
                continue
            act = None
            if isinstance(parent, nn.Sequential) and i + 1 < len(names):
                act = _activation_name(parent._modules[names[i + 1]])
            parent._modules[name] = _fused_from(child, act or "none")
            if act is not None:
                parent._modules[names[i + 1]] = nn.Identity()
    return module


__all__ = ["convert"]
