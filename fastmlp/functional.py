"""Functional forms of the fused ops (like torch.nn.functional)."""

import contextlib
import numbers

import torch
import torch.nn.functional as F

from . import ops
from .ops import _FLOATING

# The norms' own kernels run for these; float16 / bfloat16 inputs run torch's norms, whose CPU kernels
# convert half types in vector registers (ours convert the input to float32 first: no faster than
# torch's at 256x512, 0.73x-1.7x over two runs).
_NORM_DTYPES = (torch.float32, torch.float64)

__all__ = ["batch_norm", "dropout", "layer_norm", "linear_act"]

_SEED_RANGE = 2**62


def linear_act(input, weight, bias=None, activation="relu"):
    """act(input @ weight.T + bias) in one fused op, with a fused backward.

    input: (*, in_features); weight: (out_features, in_features); bias: (out_features) or None;
    activation: "none", "relu", "gelu" (exact, erf), "gelu_tanh" (tanh approximation) or "silu".
    Same result as ``act(torch.nn.functional.linear(input, weight, bias))``.
    """
    if isinstance(bias, str):
        raise TypeError(f"linear_act: bias must be a Tensor or None, got the string {bias!r}; the activation is "
                        f"the 4th argument: linear_act(input, weight, bias, activation={bias!r}) or "
                        f"linear_act(input, weight, activation={bias!r})")
    if input.layout != torch.strided or weight.layout != torch.strided:
        raise TypeError(f"linear_act: input and weight must be dense tensors, got input.layout={input.layout} and "
                        f"weight.layout={weight.layout}; call .to_dense() first")
    if ops.has_dtensor((weight, input)):
        # A weight sharded by tensor parallelism (parallelize_module's ColwiseParallel / RowwiseParallel).
        ops.check_activation(activation)
        return ops.ACT_FNS[activation](F.linear(input, weight, bias))
    # save_for_backward=False: the C++ autograd kernel turns it on when a gradient can flow, so
    # inference skips writing the pre-activation.
    return ops.linear_act_forward(input, weight, bias, activation, False)[0]


def dropout(input, p=0.5, training=True, inplace=False):
    """Same arguments and result distribution as ``torch.nn.functional.dropout``.

    In training on the CPU (0 < p < 1) the mask comes from the fastmlp.dropout op: a counter-based
    hash of each element's index and a seed drawn from torch's default generator (so
    ``torch.manual_seed`` reproduces it), computed in parallel and regenerated in the backward
    instead of saved. ``inplace=True`` writes that result into ``input`` and returns it: the same
    mask as ``inplace=False`` for one seed, as torch's. Under torch.compile the seed's draw is part
    of the graph, so every call of the compiled model draws a new mask. Everywhere else (CUDA,
    p = 0 or 1, integer inputs, DTensors) this is torch's dropout.
    """
    if (training and 0.0 < p < 1.0 and input.device.type == "cpu" and input.dtype in _FLOATING
            and not ops.has_dtensor((input,))):
        seed = torch.randint(0, _SEED_RANGE, (), dtype=torch.int64, device="cpu")
        out = ops.dropout(input, float(p), seed)
        # (The op saves nothing of input, so overwriting it leaves the backward intact; a leaf that
        # requires grad is refused by copy_ as by torch's in-place dropout.)
        return input.copy_(out) if inplace else out
    return F.dropout(input, p, training, inplace)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Same arguments and result as ``torch.nn.functional.layer_norm``.

    For float32 and float64 inputs on the CPU this is fastmlp's layer_norm op (csrc/cpu/norm.cpp):
    statistics in the input's precision, each row read from memory once in the forward and once in
    the backward (which also sums the weight and bias gradients), and results that do not depend on
    the thread count. Everywhere else (float16 / bfloat16 inputs, as under autocast, CUDA and
    DTensors) this is torch's layer norm.
    """
    # (Lean on purpose: for a small layer this function's own Python is a visible part of the call.)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    if (input.is_cpu and input.dtype in _NORM_DTYPES and input.layout == torch.strided
            and not ops.has_dtensor((input, weight))):
        return ops.layer_norm(input, shape, weight, bias, eps)[0]
    return F.layer_norm(input, tuple(shape), weight, bias, eps)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Same arguments and result as ``torch.nn.functional.batch_norm``.

    In training mode on a float32 or float64 (batch, channels) CPU input this is fastmlp's
    batch_norm op: the batch's mean and variance in one parallel pass over memory (merged across
    chunks of rows in float64), normalisation in a second, a backward of two passes, and results
    that do not depend on the thread count. The running estimates, when given, move towards the
    batch's mean and unbiased variance by ``momentum``, as torch's do. Evaluation mode (the running
    estimates), other dtypes, shapes and devices, DTensors, and batches of fewer than two rows
    (torch's error for one) are torch's batch norm.
    """
    # torch's own checks, made here for every path (torch 2.11's F.batch_norm lacks the eps ones), so
    # that the fast path fails as F.batch_norm does before it touches the running estimates.
    if training and (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if (training and input.is_cpu and input.dim() == 2 and input.shape[0] > 1 and input.dtype in _NORM_DTYPES
            and input.layout == torch.strided and not ops.has_dtensor((input, weight))):
        if running_mean is not None:
            if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
                raise TypeError(f"batch_norm(): argument 'momentum' must be float, not {type(momentum).__name__}")
            for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
                if stat.numel() != input.shape[1]:
                    raise RuntimeError(f"{name} should contain {input.shape[1]} elements not {stat.numel()}")
                if stat.dtype != input.dtype:  # (torch refuses them too: "mixed dtype (CPU)")
                    raise RuntimeError(f"{name} must have the input's dtype {input.dtype}, got {stat.dtype}")
        y, mean, _, unbiased_var = ops.batch_norm(input, weight, bias, eps)
        moving = [(stat, batch) for stat, batch in ((running_mean, mean), (running_var, unbiased_var)) if stat is not None]
        if moving:
            stats, batch = [s for s, _ in moving], [b.detach().to(s.dtype) for s, b in moving]
            # A no_grad block only where a running estimate requires grad: torch.export records one as a
            # node its .pt2 loader cannot rebuild.
            with torch.no_grad() if any(s.requires_grad for s in stats) else contextlib.nullcontext():
                if torch.compiler.is_exporting():  # torch.onnx has no translation of the foreach op
                    for stat, b in zip(stats, batch):
                        stat.lerp_(b, momentum)
                else:
                    torch._foreach_lerp_(stats, batch, momentum)
        return y
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
