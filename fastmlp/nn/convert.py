"""convert(): swap nn.Linear (+ activation) in an existing model for FusedLinear, in place."""

import warnings

from torch import nn

from .dropout import Dropout
from .norm import BatchNorm1d, LayerNorm
from .linear import FusedLinear


def _activation_name(m):
    if type(m) is nn.ReLU:
        return "relu"
    if type(m) is nn.SiLU:
        return "silu"
    if type(m) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate)
    return None


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def _has_hooks(m):
    """Whether m has hooks of its own (forward, backward, state_dict), which a replacement module
    would not run."""
    return any(getattr(m, d, None) for d in _HOOK_DICTS)


def _runs_in_order(parent):
    """Whether parent feeds each child's output to the next child and nothing else: nn.Sequential's
    own forward. Only there may an activation be folded into the linear layer before it; a subclass
    with a forward of its own (a residual block reading the pre-activation, say), or one whose forward
    was replaced on the instance, is not assumed to."""
    return (isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward
            and "forward" not in vars(parent))


def _plain(m):
    """Whether m has no hooks of its own and runs its class's forward. A forward set on the instance
    (a wrapper, as accelerate's hooks install) or a per-module compile() would keep calling the old
    forward on a replacement."""
    own = vars(m)
    return not _has_hooks(m) and "forward" not in own and own.get("_compiled_call_impl") is None


def _convertible(linear):
    """Whether a fused layer can stand in for linear: a plain module (see _plain) holding its weight
    and bias as Parameters (or no bias), which the fused layer shares."""
    return (_plain(linear) and isinstance(linear.weight, nn.Parameter)
            and (linear.bias is None or isinstance(linear.bias, nn.Parameter)))


def _carry(old, new, skip=()):
    """Whatever else the user attached to old comes along to new: attributes, extra parameters,
    buffers (persistent or not) and submodules, so the state_dict keeps its keys."""
    for key, value in vars(old).items():
        if key not in vars(new):
            vars(new)[key] = value
    for name, p in old._parameters.items():
        if name not in skip:
            new._parameters[name] = p
    new._buffers.update(old._buffers)
    new._non_persistent_buffers_set |= old._non_persistent_buffers_set
    new._modules.update(old._modules)
    return new


def _dropout_from(drop):
    new = Dropout(drop.p, drop.inplace)
    new.train(drop.training)
    return _carry(drop, new)


def _norm_from(norm):
    """fastmlp's BatchNorm1d / LayerNorm for torch's: the same module state (parameters, running
    estimates, num_batches_tracked, eps, momentum, training mode...), its containers copied so that
    the two modules do not share them."""
    new = object.__new__(BatchNorm1d if type(norm) is nn.BatchNorm1d else LayerNorm)
    vars(new).update({k: type(v)(v) if isinstance(v, (dict, set)) else v for k, v in vars(norm).items()})
    return new


# The modules convert() swaps one for one (same state, same forward): {torch's class: (flag, maker)}.
_SWAPS = {nn.Dropout: ("dropout", _dropout_from), nn.BatchNorm1d: ("norm", _norm_from),
          nn.LayerNorm: ("norm", _norm_from)}


def _fused_from(linear, activation):
    fused = FusedLinear(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        activation=activation, device="meta", dtype=linear.weight.dtype,
    )
    # Share the very same Parameter objects: optimisers, tied weights and hooks on them keep working.
    fused.weight = linear.weight
    fused.bias = linear.bias
    fused.train(linear.training)
    return _carry(linear, fused, skip=("weight", "bias"))


def convert(module: nn.Module, dropout: bool = True, norm: bool = True) -> nn.Module:
    """Replace, in place, each nn.Linear followed by nn.ReLU / nn.GELU / nn.SiLU inside an
    nn.Sequential (at any depth) with one FusedLinear that shares its parameters; the
    activation's slot becomes nn.Identity, so indices and state_dict keys do not change. Every
    other plain nn.Linear becomes FusedLinear(activation="none"). With dropout=True (default) every
    plain nn.Dropout becomes fastmlp.nn.Dropout with the same p, inplace and mode: the same
    distribution, a mask computed in parallel on the CPU (elsewhere torch's dropout runs), but not
    the same mask as torch's for one seed; dropout=False keeps torch's. With norm=True (default)
    every plain nn.BatchNorm1d and nn.LayerNorm becomes fastmlp.nn.BatchNorm1d / LayerNorm holding
    the same parameters and buffers (fastmlp's norm kernels on the CPU, torch's elsewhere);
    norm=False keeps torch's. Returns the module.

    Folding assumes each nn.Sequential runs its children in order, as its own forward does:
    subclasses that define another forward only get their linear layers converted, and code that
    calls a Sequential's linear layer on its own (``seq[0](x)``) after convert() gets the
    activated output. A linear layer used in several places stays one shared module where it
    becomes the same fused layer.

    Subclasses of nn.Linear, nn.Dropout and the norms (FusedLinear among them) are left as they are, since
    their forward may differ from the plain module's. Modules with hooks of their own (forward, backward,
    state_dict) keep them and keep running them: an nn.Linear with hooks stays as it is, and an
    activation with hooks is not folded into the layer before it (that layer still becomes
    FusedLinear(activation="none")); a warning names them. Register hooks after convert() to get
    the fused layer. Hooks on the parameters themselves always keep working (they are shared).
    A layer whose weight or bias is not an nn.Parameter (made a buffer, say), or with a forward of
    its own (assigned on the instance, or set by Module.compile()), is kept too, with the same
    warning. What else a converted layer carries (attributes, extra parameters, buffers,
    submodules) moves to its fused layer, so state_dict keys do not change. All replacements are
    built before any is made: if one fails, the model is left as it was.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fastmlp.convert: module must be a torch.nn.Module, got {type(module).__name__}")
    flags = {"dropout": dropout, "norm": norm}

    def swap_of(m):
        """The maker of m's replacement when m is a module convert() swaps one for one, else None."""
        flag, maker = _SWAPS.get(type(m), (None, None))
        return maker if flag is not None and flags[flag] else None

    if type(module) is nn.Linear or swap_of(module) is not None:
        if not (_convertible(module) if type(module) is nn.Linear else _plain(module)):
            _warn_kept(["(the module itself)"])
            return module
        return _fused_from(module, "none") if type(module) is nn.Linear else swap_of(module)(module)
    hooked = []
    made = {}  # (id(linear), activation) -> its FusedLinear: a layer used twice stays one module
    # Every replacement is made before any is applied: should building one fail, the model is
    # left as it was, not half converted.
    edits = []
    for prefix, parent in list(module.named_modules()):
        names = list(parent._modules.keys())
        for i, name in enumerate(names):
            child = parent._modules[name]
            maker = swap_of(child)
            if maker is not None:
                if not _plain(child):
                    hooked.append(f"{prefix}.{name}" if prefix else name)
                    continue
                key = (id(child), "swap")
                if key not in made:
                    made[key] = maker(child)
                edits.append((parent, name, made[key]))
                continue
            if type(child) is not nn.Linear:
                continue
            if not _convertible(child):
                hooked.append(f"{prefix}.{name}" if prefix else name)
                continue
            act = None
            if _runs_in_order(parent) and i + 1 < len(names):
                nxt = parent._modules[names[i + 1]]
                act = _activation_name(nxt)
                if act is not None and _has_hooks(nxt):
                    hooked.append(f"{prefix}.{names[i + 1]}" if prefix else names[i + 1])
                    act = None
            key = (id(child), act or "none")
            if key not in made:
                made[key] = _fused_from(child, act or "none")
            edits.append((parent, name, made[key]))
            if act is not None:
                identity = nn.Identity()
                identity.train(nxt.training)
                edits.append((parent, names[i + 1], identity))
    for parent, name, new in edits:
        parent._modules[name] = new
    if hooked:
        _warn_kept(hooked)
    return module


def _warn_kept(names):
    warnings.warn(
        f"fastmlp.convert: {', '.join(names)} kept as they were, since they have hooks that a fused "
        "layer would not run (an nn.Linear, nn.Dropout or norm with hooks is not converted; an activation with hooks "
        "is not fused into the layer before it), or a weight or bias that is not an nn.Parameter, which a fused "
        "layer cannot share, or a forward of their own (set on the instance, or Module.compile()). Register "
        "hooks (or compile) after convert() to get the fused layers.",
        UserWarning, stacklevel=3)


__all__ = ["convert"]
