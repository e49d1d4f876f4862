"""BatchNorm1d and LayerNorm: drop-ins for torch's whose CPU paths are fastmlp's norm ops."""

import torch
from torch import nn

from ..functional import batch_norm, layer_norm
from .linear import _not_scriptable, _traced_as_root

__all__ = ["BatchNorm1d", "LayerNorm"]


def _batch_norm_of(module, input):
    """nn.BatchNorm1d's forward (torch's _BatchNorm.forward, step for step: the momentum or the
    cumulative average, num_batches_tracked, batch statistics in training or without running
    estimates) over fastmlp.functional.batch_norm. One call in a torch.fx graph (see dropout.py), so
    a traced model follows .train() / .eval()."""
    module._check_input_dim(input)
    factor = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        factor = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
    use_batch_stats = module.training or (module.running_mean is None and module.running_var is None)
    track = not module.training or module.track_running_stats
    return batch_norm(input, module.running_mean if track else None, module.running_var if track else None,
                      module.weight, module.bias, use_batch_stats, factor, module.eps)


def _layer_norm_of(module, input):
    return layer_norm(input, module.normalized_shape, module.weight, module.bias, module.eps)


torch.fx.wrap("_batch_norm_of")
torch.fx.wrap("_layer_norm_of")
torch.fx.wrap("layer_norm")


class BatchNorm1d(nn.BatchNorm1d):
    """torch.nn.BatchNorm1d (same arguments, parameters, buffers and state_dict keys) whose training
    forward and backward on a float32 / float64 (batch, features) CPU input are fastmlp's batch_norm
    op (its forward and backward ops 1.5x-3.5x faster than torch's on the 2-core Xeon VM,
    bench/bench_norm.py). Other inputs, dtypes, devices and evaluation mode run torch's batch norm."""

    def forward(self, input):
        if _traced_as_root(self, input):
            return super().forward(input)   # torch's module, traced on its own as torch's is
        return _batch_norm_of(self, input)

    def __prepare_scriptable__(self):
        raise _not_scriptable(self)


class LayerNorm(nn.LayerNorm):
    """torch.nn.LayerNorm (same arguments, parameters and state_dict keys) whose forward and backward
    on float32 / float64 CPU inputs are fastmlp's layer_norm op (its forward and backward ops
    1.4x-1.8x faster than torch's on the 2-core Xeon VM, bench/bench_norm.py). Other dtypes and
    devices run torch's."""

    def forward(self, input):
        if _traced_as_root(self, input):
            return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return _layer_norm_of(self, input)

    def __prepare_scriptable__(self):
        raise _not_scriptable(self)
