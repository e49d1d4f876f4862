"""Python side of the fastmlp ops: fake kernels, and decompositions for export.

The only Python file that names a C++ op. Schemas live in csrc/ops.cpp, kernels in csrc/cpu and
csrc/cuda, autocast rules in csrc/autocast.cpp, autograd in csrc/autograd.cpp (in C++ rather than
torch.library.register_autograd: the Python autograd wrapper cost more per call than a small
layer's whole forward; the numbers are in that file). The fake kernels mirror the C++ host checks
(shape and dtype only) so that eager, torch.compile and export fail alike.
"""

import math
import sys

import torch
from torch._decomp import register_decomposition
from torch._subclasses.fake_tensor import FakeTensor

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")
# Activations whose backward needs the pre-activation Z = X W^T + b.
SAVES_PREACTIVATION = frozenset({"gelu", "gelu_tanh", "silu"})

linear_act_forward = torch.ops.fastmlp.linear_act_forward.default
linear_act_backward = torch.ops.fastmlp.linear_act_backward.default

_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_FWD = "fastmlp.linear_act_forward"
_BWD = "fastmlp.linear_act_backward"


def dtensor_type():
    """torch's DTensor class once torch.distributed.tensor is loaded (no DTensor exists before), else None."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


_PLAIN = (torch.nn.Parameter, torch.Tensor)


def has_dtensor(tensors):
    """Whether any of the tensors (None allowed) is a DTensor (FSDP2's shards, tensor parallelism): the
    fused kernels have no DTensor sharding rules. Plain tensors cost one type check each."""
    for t in tensors:
        if t is not None and type(t) not in _PLAIN and isinstance(t, dtensor_type() or ()):
            return True
    return False


def check_activation(activation, op=_FWD):
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{op}: unknown activation {activation!r}; expected one of: {', '.join(ACTIVATIONS)}"
        )


def _check_floating(op, name, t):
    # Mirror of check_floating in csrc/checks.h.
    if t.dtype not in _FLOATING:
        raise TypeError(f"{op}: {name} must be a floating-point tensor (float32, float64, float16 or bfloat16), "
                        f"got {t.dtype}")


def _check_same_device(op, a_name, a, b_name, b):
    if a.device != b.device:
        raise RuntimeError(f"{op}: expected {a_name} and {b_name} on the same device, but got {a_name} on "
                           f"{a.device} and {b_name} on {b.device}")


def _check_same_dtype(op, a_name, a, b_name, b):
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: expected {a_name} and {b_name} to have the same dtype, but got {a_name}: "
                        f"{a.dtype}, {b_name}: {b.dtype} (cast them, or run under torch.autocast to mix precisions)")


def _check_linear_act_args(input, weight, bias, activation):
    """Mirror of check_linear_act_args in csrc/checks.h: the same checks in the same order, exception
    types and messages (dtypes written the torch way, torch.float32 for Float)."""
    check_activation(activation)
    for name, t in (("input", input), ("weight", weight)):
        _check_floating(_FWD, name, t)
    if weight.dim() != 2:
        raise ValueError(
            f"{_FWD}: weight must be 2-D (out_features, in_features), got a {weight.dim()}-D "
            f"tensor of shape {list(weight.shape)}"
        )
    if input.dim() < 1:
        raise ValueError(f"{_FWD}: input must have at least 1 dimension (*, in_features), got a 0-D tensor")
    torch._check_value(
        input.shape[-1] == weight.shape[1],
        lambda: f"{_FWD}: input.shape[-1] must equal in_features = weight.shape[1] = "
        f"{weight.shape[1]}, got input of shape {list(input.shape)}",
    )
    others = [("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    for name, t in others:
        if name == "bias":
            if t.dtype not in _FLOATING:
                raise TypeError(f"{_FWD}: bias must be a floating-point tensor, got {t.dtype}")
            if t.dim() != 1 or t.shape[0] != weight.shape[0]:
                raise ValueError(
                    f"{_FWD}: bias must be 1-D of shape [out_features] = [{weight.shape[0]}], got "
                    f"shape {list(t.shape)}"
                )
        _check_same_device(_FWD, "input", input, name, t)
        _check_same_dtype(_FWD, "input", input, name, t)


@torch.library.register_fake("fastmlp::linear_act_forward")
def _linear_act_forward_fake(input, weight, bias, activation, save_for_backward):
    _check_linear_act_args(input, weight, bias, activation)
    out_f = weight.shape[0]
    y = input.new_empty((*input.shape[:-1], out_f))
    if save_for_backward and activation in SAVES_PREACTIVATION:
        saved = input.new_empty((math.prod(input.shape[:-1]), out_f))
    else:
        saved = input.new_empty((0,))
    return y, saved


def _check_linear_act_backward_args(grad_output, input, weight, output, saved, activation):
    """Mirror of check_linear_act_backward_args in csrc/checks.h: the same checks in the same order,
    exception types and messages (dtypes written the torch way, torch.float32 for Float)."""
    check_activation(activation, _BWD)
    _check_floating(_BWD, "grad_output", grad_output)
    if weight.dim() != 2:
        raise ValueError(f"{_BWD}: weight must be 2-D (out_features, in_features), got a {weight.dim()}-D "
                         f"tensor of shape {list(weight.shape)}")
    _check_same_device(_BWD, "grad_output", grad_output, "weight", weight)
    _check_same_device(_BWD, "grad_output", grad_output, "input", input)
    _check_same_dtype(_BWD, "grad_output", grad_output, "weight", weight)
    _check_same_dtype(_BWD, "grad_output", grad_output, "input", input)
    out_f, in_f = weight.shape
    torch._check_value(
        grad_output.dim() >= 1 and grad_output.shape[-1] == out_f,
        lambda: f"{_BWD}: grad_output.shape[-1] must equal out_features = {out_f}, got shape {list(grad_output.shape)}",
    )
    torch._check_value(
        input.dim() >= 1 and input.shape[-1] == in_f,
        lambda: f"{_BWD}: input.shape[-1] must equal in_features = {in_f}, got shape {list(input.shape)}",
    )
    n = math.prod(input.shape[:-1]) * out_f
    torch._check_value(
        grad_output.numel() == n,
        lambda: f"{_BWD}: grad_output of shape {list(grad_output.shape)} does not match input of shape "
        f"{list(input.shape)} and out_features = {out_f}",
    )
    if activation == "relu":
        torch._check_value(output.numel() == n,
                           lambda: f"{_BWD}: relu needs the forward output, got shape {list(output.shape)}")
        _check_same_device(_BWD, "grad_output", grad_output, "output", output)
        _check_same_dtype(_BWD, "grad_output", grad_output, "output", output)
    if activation in SAVES_PREACTIVATION:
        torch._check_value(
            saved.numel() == n,
            lambda: f"{_BWD}: {activation} needs the pre-activation saved by the forward "
            f"(save_for_backward=True), got saved of shape {list(saved.shape)}",
        )
        _check_same_device(_BWD, "grad_output", grad_output, "saved", saved)
        _check_same_dtype(_BWD, "grad_output", grad_output, "saved", saved)


@torch.library.register_fake("fastmlp::linear_act_backward")
def _linear_act_backward_fake(grad_output, input, weight, output, saved, activation, output_mask):
    _check_linear_act_backward_args(grad_output, input, weight, output, saved, activation)
    empty = grad_output.new_empty((0,))
    return (
        grad_output.new_empty(input.shape) if output_mask[0] else empty,
        grad_output.new_empty(weight.shape) if output_mask[1] else empty,
        grad_output.new_empty((weight.shape[0],)) if output_mask[2] else grad_output.new_empty((0,)),
    )


# ---- dropout ----
# input * keep(seed, i) / (1 - p), the mask a counter-based hash (csrc/cpu/dropout.cpp): the same
# seed gives the same mask, and the backward is the same op on the gradient (csrc/autograd.cpp).

dropout = torch.ops.fastmlp.dropout.default


@torch.library.register_fake("fastmlp::dropout")
def _dropout_fake(input, p, seed):
    if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device.type != "cpu":
        raise ValueError(
            f"fastmlp.dropout: seed must be a one-element int64 CPU tensor, got {seed.dtype} of shape "
            f"{list(seed.shape)} on {seed.device}"
        )
    _check_floating("fastmlp.dropout", "input", input)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"fastmlp.dropout: p must be in [0, 1), got {p}")
    return torch.empty_like(input)  # the input's layout, as the CPU kernel's output


# ---- optimizers ----
# Fused multi-tensor optimizer steps (schemas and semantics in csrc/ops.cpp; front doors in
# fastmlp/optim). Mutable ops returning nothing: the fake kernels only mirror the list-length,
# shape and dtype rules of check_adamw_step_args / check_sgd_step_args in csrc/cpu/optim.cpp.

adamw_step_ = torch.ops.fastmlp.adamw_step_.default
sgd_step_ = torch.ops.fastmlp.sgd_step_.default

# Step plans (csrc/cpu/optim.cpp): a group's CPU parameters and state held in C++, so that a step
# passes scalars only and reads each p.grad there. plan.step(...) takes the op's scalar arguments
# and returns False, having changed nothing, when the general path (the op above) must run.
AdamWPlan = torch.classes.fastmlp.AdamWPlan
SGDPlan = torch.classes.fastmlp.SGDPlan


def _check_optim_lists(op, params, named_lists):
    n = len(params)
    for name, lst, optional in named_lists:
        if optional and len(lst) == 0:
            continue
        if len(lst) != n:
            raise ValueError(f"{op}: expected {name} to have {n} tensors (one per parameter), got {len(lst)}")
        for i, (p, t) in enumerate(zip(params, lst)):
            torch._check(
                t.shape == p.shape,
                lambda: f"{op}: {name}[{i}] has shape {list(t.shape)} but params[{i}] has shape {list(p.shape)}",
            )


def _check_writable(op, named_lists):
    # Mirror of check_writable in csrc/cpu/optim.cpp: at::has_internal_overlap says Yes exactly for
    # a zero stride over more than one element (an expanded tensor).
    for name, lst in named_lists:
        for i, t in enumerate(lst):
            if any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape)):
                raise ValueError(f"{op}: {name}[{i}] has elements that share memory (e.g. an expanded tensor), but "
                                 "the step writes it in place; give it memory of its own (.clone())")


@torch.library.register_fake("fastmlp::adamw_step_")
def _adamw_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params,
                     lr, lr_tensor, beta1, beta2, weight_decay, eps, amsgrad, maximize,
                     decoupled_weight_decay, grad_scale, found_inf):
    op = "fastmlp.adamw_step_"
    _check_optim_lists(op, params, [("grads", grads, False), ("exp_avgs", exp_avgs, False),
                                    ("exp_avg_sqs", exp_avg_sqs, False),
                                    ("max_exp_avg_sqs", max_exp_avg_sqs, not amsgrad),
                                    ("master_params", master_params, True)])
    if len(state_steps) != len(params):
        raise ValueError(f"{op}: expected state_steps to have {len(params)} tensors (one per parameter), "
                         f"got {len(state_steps)}")
    for p in params:
        _check_floating(op, "params", p)
    _check_writable(op, [("params", params), ("master_params", master_params)]
                    + ([("grads", grads)] if grad_scale is not None else [])
                    + [("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), ("max_exp_avg_sqs", max_exp_avg_sqs)])
    return None


_ema_update_op = torch.ops.fastmlp.ema_update_.default


def ema_update_(averages, values, weight):
    """averages[i].lerp_(values[i], weight) for every i, in one op call per device and dtype (see
    EMA). Empty lists are a no-op (the dispatcher cannot route a call without a tensor)."""
    if len(averages) == 0 and len(values) == 0:
        return None
    return _ema_update_op(averages, values, weight)


@torch.library.register_fake("fastmlp::ema_update_")
def _ema_update_fake(averages, values, weight):
    op = "fastmlp.ema_update_"
    _check_optim_lists(op, averages, [("values", values, False)])
    for a in averages:
        _check_floating(op, "averages", a)
    _check_writable(op, [("averages", averages)])
    return None


_norms_op = torch.ops.fastmlp.norms.default


def norms(tensors):
    """The L2 norm of each tensor, as one float64 tensor (accumulated in float64); an empty one for
    no tensors (the dispatcher cannot route a call without a tensor)."""
    if len(tensors) == 0:
        return torch.empty((0,), dtype=torch.float64)
    return _norms_op(tensors)


@torch.library.register_fake("fastmlp::norms")
def _norms_fake(tensors):
    for t in tensors:
        _check_floating("fastmlp.norms", "tensors", t)
    return torch.empty((len(tensors),), dtype=torch.float64, device=tensors[0].device if tensors else "cpu")


@torch.library.register_fake("fastmlp::sgd_step_")
def _sgd_step_fake(params, grads, momentum_buffers, master_params, lr, lr_tensor, momentum, dampening,
                   weight_decay, nesterov, maximize, is_first_step, grad_scale, found_inf):
    op = "fastmlp.sgd_step_"
    _check_optim_lists(op, params, [("grads", grads, False), ("momentum_buffers", momentum_buffers, True),
                                    ("master_params", master_params, True)])
    for p in params:
        _check_floating(op, "params", p)
    _check_writable(op, [("params", params), ("master_params", master_params)]
                    + ([("grads", grads)] if grad_scale is not None else [])
                    + [("momentum_buffers", momentum_buffers)])
    return None


# ---- norms ----
# Layer norm and training-mode batch norm (schemas in csrc/ops.cpp, CPU kernels in csrc/cpu/norm.cpp,
# autograd in csrc/autograd.cpp). The statistics are float32 (float64 for a float64 input).

layer_norm = torch.ops.fastmlp.layer_norm.default
layer_norm_backward = torch.ops.fastmlp.layer_norm_backward.default
batch_norm = torch.ops.fastmlp.batch_norm.default
batch_norm_backward = torch.ops.fastmlp.batch_norm_backward.default

_LN, _LN_BWD = "fastmlp.layer_norm", "fastmlp.layer_norm_backward"
_BN, _BN_BWD = "fastmlp.batch_norm", "fastmlp.batch_norm_backward"
_DTYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16"}


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_norm_param(op, name, t, input, shape, what):
    """Mirror of check_param in csrc/cpu/norm.cpp."""
    if t is None:
        return
    _check_floating(op, name, t)
    _check_same_device(op, "input", input, name, t)
    mixed = t.dtype == torch.float32 and input.dtype in (torch.float16, torch.bfloat16)
    if t.dtype != input.dtype and not mixed:
        raise TypeError(f"{op}: expected {name} to have the input's dtype ({_DTYPE_NAMES[input.dtype]}) or float32 "
                        f"with a float16/bfloat16 input, got {_DTYPE_NAMES[t.dtype]}")
    torch._check_value(list(t.shape) == list(shape),
                       lambda: f"{op}: {name} must have shape {what} = {list(shape)}, got {list(t.shape)}")


def _check_layer_norm_args(op, input, normalized_shape, weight, bias):
    _check_floating(op, "input", input)
    k = len(normalized_shape)
    if k < 1:
        raise ValueError(f"{op}: normalized_shape must have at least one size, got []")
    torch._check_value(
        input.dim() >= k and list(input.shape[input.dim() - k:]) == list(normalized_shape),
        lambda: f"{op}: input's last {k} dimension(s) must be normalized_shape = {list(normalized_shape)}, got input "
        f"of shape {list(input.shape)}")
    _check_norm_param(op, "weight", weight, input, normalized_shape, "normalized_shape")
    _check_norm_param(op, "bias", bias, input, normalized_shape, "normalized_shape")
    if weight is not None and bias is not None:
        _check_same_dtype(op, "weight", weight, "bias", bias)


def _check_norm_backward(op, grad_output, input, stats, n):
    """Mirror of check_grad_output and check_stats in csrc/cpu/norm.cpp."""
    _check_floating(op, "grad_output", grad_output)
    _check_same_device(op, "input", input, "grad_output", grad_output)
    _check_same_dtype(op, "grad_output", grad_output, "input", input)
    torch._check_value(list(grad_output.shape) == list(input.shape),
                       lambda: f"{op}: grad_output must have the input's shape {list(input.shape)}, got "
                       f"{list(grad_output.shape)}")
    acc = _stats_dtype(input.dtype)
    for name, t in stats:
        _check_same_device(op, "input", input, name, t)
        if t.dtype != acc:
            raise TypeError(f"{op}: {name} must be {_DTYPE_NAMES[acc]} (the forward's), got {_DTYPE_NAMES.get(t.dtype, t.dtype)}")
        torch._check_value(t.numel() == n, lambda: f"{op}: {name} must have {n} elements (the forward's statistics), "
                           f"got shape {list(t.shape)}")


def _grad_params(input, weight, shape, mask):
    dtype = weight.dtype if weight is not None else input.dtype
    return tuple(input.new_empty(shape, dtype=dtype) if m else input.new_empty((0,), dtype=dtype) for m in mask[1:])


@torch.library.register_fake("fastmlp::layer_norm")
def _layer_norm_fake(input, normalized_shape, weight, bias, eps):
    _check_layer_norm_args(_LN, input, normalized_shape, weight, bias)
    rows = math.prod(input.shape[:input.dim() - len(normalized_shape)])
    acc = _stats_dtype(input.dtype)
    return (input.new_empty(input.shape), input.new_empty((rows,), dtype=acc), input.new_empty((rows,), dtype=acc))


@torch.library.register_fake("fastmlp::layer_norm_backward")
def _layer_norm_backward_fake(grad_output, input, normalized_shape, mean, rstd, weight, output_mask):
    _check_layer_norm_args(_LN_BWD, input, normalized_shape, weight, None)
    rows = math.prod(input.shape[:input.dim() - len(normalized_shape)])
    _check_norm_backward(_LN_BWD, grad_output, input, (("mean", mean), ("rstd", rstd)), rows)
    dx = grad_output.new_empty(input.shape) if output_mask[0] else grad_output.new_empty((0,))
    return (dx, *_grad_params(input, weight, normalized_shape, output_mask))


def _check_batch_norm_args(op, input, weight, bias):
    _check_floating(op, "input", input)
    if input.dim() != 2:
        raise ValueError(f"{op}: input must be 2-D (batch, channels), got a {input.dim()}-D tensor of shape "
                         f"{list(input.shape)}")
    c = input.shape[1]
    _check_norm_param(op, "weight", weight, input, (c,), "[channels]")
    _check_norm_param(op, "bias", bias, input, (c,), "[channels]")
    if weight is not None and bias is not None:
        _check_same_dtype(op, "weight", weight, "bias", bias)


@torch.library.register_fake("fastmlp::batch_norm")
def _batch_norm_fake(input, weight, bias, eps):
    _check_batch_norm_args(_BN, input, weight, bias)
    c = input.shape[1]
    acc = _stats_dtype(input.dtype)
    return (input.new_empty(input.shape), *(input.new_empty((c,), dtype=acc) for _ in range(3)))


@torch.library.register_fake("fastmlp::batch_norm_backward")
def _batch_norm_backward_fake(grad_output, input, mean, invstd, weight, output_mask):
    _check_batch_norm_args(_BN_BWD, input, weight, None)
    c = input.shape[1]
    _check_norm_backward(_BN_BWD, grad_output, input, (("mean", mean), ("invstd", invstd)), c)
    dx = grad_output.new_empty(input.shape) if output_mask[0] else grad_output.new_empty((0,))
    return (dx, *_grad_params(input, weight, (c,), output_mask))


# ---- decompositions: the forward ops as the ATen ops they fuse ----
# torch.onnx.export and ExportedProgram.run_decompositions replace an op by its entry in
# torch._decomp's table, so with these a fastmlp model exports to ONNX as nn.Linear's would, and
# export_decompositions() turns an exported program into one that needs torch alone. They compute
# what the ops compute (dropout the very mask of csrc/cpu/dropout.cpp; the other ops up to summation
# order and, in float16 / bfloat16, one rounding of the pre-activation), unfused. Nothing else calls
# them: torch.compile's Inductor has a table of its own, and eager calls go to the kernels.
#
# One more reader of that table: FakeTensorMode, which with symbolic sizes (torch.compile(dynamic=
# True), torch.export with a dynamic batch) computes an op's output shapes through its decomposition
# when it has one. There each decomposition hands over to the op's fake kernel above, so that errors
# and output strides stay the op's own; the ATen ops run when a tracer is recording them, or on real
# tensors.


def _decomposing(t):
    return (not isinstance(t, FakeTensor)
            or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None)


# The activations as ATen ops (the decompositions below; FusedLinear on tensor-parallel DTensors).
ACT_FNS = {
    "none": lambda z: z,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
    "silu": torch.nn.functional.silu,
}


def _linear_act_forward_decomposition(input, weight, bias, activation, save_for_backward):
    if not _decomposing(input):
        return _linear_act_forward_fake(input, weight, bias, activation, save_for_backward)
    _check_linear_act_args(input, weight, bias, activation)
    z = torch.nn.functional.linear(input, weight, bias)
    if save_for_backward and activation in SAVES_PREACTIVATION:
        saved = z.reshape(math.prod(input.shape[:-1]), weight.shape[0])
    else:
        saved = input.new_empty((0,))
    return ACT_FNS[activation](z), saved


_U32 = 0xFFFFFFFF


def _mul_u32(x, c):
    """(x * c) mod 2^32 for int64 tensors x in [0, 2^32) and a constant c < 2^32, with every
    intermediate below 2^49 (a plain int64 product would overflow)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _U32


def _lowbias32(x):
    x = x ^ (x >> 16)
    x = _mul_u32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul_u32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep(shape, p, seed):
    """The mask of fastmlp.dropout as a bool tensor of ``shape``: the hash of csrc/cpu/dropout.cpp
    (two rounds of lowbias32 keyed by the seed's halves, of each element's row-major index) in
    int64 ATen ops."""
    i = torch.arange(math.prod(shape), dtype=torch.int64, device=seed.device).reshape(shape)
    s = seed.reshape(())
    k0, k1 = s & _U32, (s >> 32) & _U32
    key = _lowbias32(k1 ^ _mul_u32(i >> 32, 0x9E3779B9))
    h = _lowbias32(_lowbias32((i & _U32) ^ k0) ^ key)
    return h >= min(round(p * 2.0**32), _U32)


def _dropout_decomposition(input, p, seed):
    if not _decomposing(input):
        return _dropout_fake(input, p, seed)
    _dropout_fake(input, p, seed)  # the op's checks
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    keep = dropout_keep(input.shape, p, seed).to(input.device)
    # The kernel's x * (scale or 0) in float (double for float64): NaN and Inf stay NaN where dropped.
    return (input.to(acc) * (keep.to(acc) * (1.0 / (1.0 - p)))).to(input.dtype)


def _layer_norm_decomposition(input, normalized_shape, weight, bias, eps):
    if not _decomposing(input):
        return _layer_norm_fake(input, normalized_shape, weight, bias, eps)
    _check_layer_norm_args(_LN, input, normalized_shape, weight, bias)
    y, mean, rstd = torch.ops.aten.native_layer_norm.default(input, normalized_shape, weight, bias, eps)
    acc = _stats_dtype(input.dtype)
    return y, mean.reshape(-1).to(acc), rstd.reshape(-1).to(acc)


def _batch_norm_decomposition(input, weight, bias, eps):
    if not _decomposing(input):
        return _batch_norm_fake(input, weight, bias, eps)
    _check_batch_norm_args(_BN, input, weight, bias)
    acc = _stats_dtype(input.dtype)
    x = input.to(acc)
    mean = x.mean(0)
    y = (x - mean) * torch.rsqrt((x - mean).square().mean(0) + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    # The statistics the op returns carry no gradient (exported programs drop .detach(), and a running
    # estimate lerped towards a differentiable one would hold a graph): torch's functional batch norm
    # gives them so, with momentum 1 its "updated" running variance being the batch's unbiased one.
    # (Its normalised output is not used: torch.onnx translates it with the running estimates.)
    zeros = input.new_zeros(input.shape[1], dtype=acc)
    _, mean, invstd, _, unbiased_var = torch.ops.aten._native_batch_norm_legit_functional.default(
        x, None, None, zeros, zeros, True, 1.0, eps)
    return y.to(input.dtype).contiguous(), mean, invstd, unbiased_var  # (the op's output is contiguous)


DECOMPOSITIONS = {
    linear_act_forward: _linear_act_forward_decomposition,
    dropout: _dropout_decomposition,
    layer_norm: _layer_norm_decomposition,
    batch_norm: _batch_norm_decomposition,
}
for _op, _fn in DECOMPOSITIONS.items():
    register_decomposition(_op)(_fn)


def export_decompositions():
    """torch.export.default_decompositions() with fastmlp's forward ops added:
    ``ep.run_decompositions(fastmlp.export_decompositions())`` gives a program of ATen ops alone,
    which torch without fastmlp loads and runs."""
    table = torch.export.default_decompositions()
    table.update(DECOMPOSITIONS)
    return table
