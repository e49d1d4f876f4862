"""fastmlp.optim.SGD: torch.optim.SGD over the fused sgd_step_ op.

Same signature (plus master_weights), defaults, errors and state_dict layout ("momentum_buffer"
per parameter when momentum != 0) as torch.optim.SGD(fused=True).

The first step of a parameter seeds its momentum buffer with the gradient, as torch does; this is
decided per parameter (a parameter unfrozen later gets a fresh buffer while the others keep
theirs). A first step that GradScaler skips (found_inf) creates no buffer, as with
torch.optim.SGD, whose step GradScaler does not call then: the next step seeds it (torch's fused
SGD would keep a zero buffer, and with dampening != 0 weight that gradient by 1 - dampening).
That one check reads found_inf on the host, only while a buffer is missing.
"""

import torch

from .. import ops
from ._common import (
    FusedStep,
    local_shards,
    fused_doc,
    _LOW_PRECISION,
    distinct_runs,
    ensure_master,
    fp32_originals,
    lr_args,
    normalise_groups,
    on_device,
    pick,
    signature_with_master_weights,
)

__all__ = ["SGD"]


class SGD(FusedStep, torch.optim.SGD):
    __doc__ = fused_doc(torch.optim.SGD)

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)

    __init__.__signature__ = signature_with_master_weights(torch.optim.SGD)

    def load_state_dict(self, state_dict):
        keep = fp32_originals(self, state_dict, ("master_param", "momentum_buffer")) if self._fm_master else {}
        super().load_state_dict(state_dict)
        normalise_groups(self)
        if self._fm_master:
            for group in self.param_groups:
                for p in group["params"]:
                    st = self.state.get(p)
                    if st and p.dtype in _LOW_PRECISION:
                        for k, t in keep.get(p, {}).items():
                            st[k] = t.to(device=p.device, dtype=torch.float32, copy=True)
                        self._fm_upgrade_state(p, st)
        self._fm_cache = {}

    def _fm_upgrade_state(self, p, st):
        buf = st.get("momentum_buffer")
        if buf is not None and buf.dtype != torch.float32:
            st["momentum_buffer"] = buf.float()
        ensure_master(p, st)

    def _fm_cache_flag(self, group):
        return group["momentum"] != 0

    def _fm_plan_step(self, group, plan, grad_scale, found_inf):
        cpu = torch.device("cpu")
        lr, lr_tensor = lr_args(group["lr"], cpu)
        return plan.step(lr, lr_tensor, float(group["momentum"]), float(group["dampening"]),
                         float(group["weight_decay"]), group["nesterov"], group["maximize"],
                         on_device(grad_scale, cpu), on_device(found_inf, cpu))

    def _fm_cached_launch(self, group, buckets, grads, grad_scale, found_inf):
        n = len(grads)
        for device, idx, bp, bufs, masters in buckets:
            self._fm_launch(group, device, bp, pick(grads, idx, n), bufs, masters, False, grad_scale, found_inf)

    def _fm_step_group_general(self, group, grad_scale, found_inf):
        pw, grads, bufs = [], [], []
        # torch's own per-parameter checks (unsupported dtypes for fused=True).
        has_sparse_grad = self._init_group(group, pw, grads, bufs)
        if has_sparse_grad:
            raise RuntimeError(
                "fastmlp.optim.SGD does not support sparse gradients (e.g. from nn.Embedding(sparse=True)): its "
                "kernel is dense; use torch.optim.SGD for such parameters")
        has_momentum = group["momentum"] != 0
        if (has_momentum and found_inf is not None
                and any(self.state[p].get("momentum_buffer") is None for p in pw) and found_inf.item() != 0):
            return  # a skipped step: no buffer seeded (see the module's docstring)
        # Without momentum or a master copy a parameter has no state: no empty dict is created for it
        # (torch's SGD keeps opt.state and state_dict()["state"] empty then).
        states = [self.state[p] if has_momentum or self._fm_uses_master(p.dtype) else None for p in pw]
        for p, st in zip(pw, states):
            if self._fm_uses_master(p.dtype):
                self._fm_upgrade_state(p, st)
        # (Decided for every entry before any buffer is made: a parameter listed twice is stepped
        # twice as a first step, as torch's SGD does.)
        first = [has_momentum and st.get("momentum_buffer") is None for st in states]
        for p, st, is_first in zip(pw, states, first):
            if is_first and st.get("momentum_buffer") is None:
                dtype = torch.float32 if self._fm_uses_master(p.dtype) else p.dtype
                st["momentum_buffer"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        kinds = {}
        for k, run in enumerate(distinct_runs(pw)):
            for i in run:
                p = pw[i]
                kinds.setdefault((k, p.device, p.dtype, first[i]), []).append(i)
        for (_, device, dtype, is_first), idx in kinds.items():
            sts = [states[i] for i in idx]
            self._fm_launch(
                group, device, [pw[i] for i in idx], [grads[i] for i in idx],
                [st["momentum_buffer"] for st in sts] if has_momentum else [],
                [st["master_param"] for st in sts] if self._fm_uses_master(dtype) else [],
                is_first, grad_scale, found_inf)

    def _fm_state_keys(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _fm_buckets(self, group, params, kinds):
        has_momentum = group["momentum"] != 0
        buckets = []
        for (device, dtype), idx in kinds.items():
            bp = [params[i] for i in idx]
            bufs = [self.state[p]["momentum_buffer"] for p in bp] if has_momentum else []
            masters = [self.state[p]["master_param"] for p in bp] if self._fm_uses_master(dtype) else []
            buckets.append((device, idx, bp, bufs, masters))
        return buckets

    def _fm_make_plan(self, bucket):
        _, _, bp, bufs, masters = bucket
        return ops.SGDPlan(bp, bufs, masters)

    def _fm_launch(self, group, device, params, grads, bufs, masters, is_first, grad_scale, found_inf):
        lr, lr_tensor = lr_args(group["lr"], device)
        params, grads, bufs, masters = local_shards(params, grads, bufs, masters)
        ops.sgd_step_(
            params, grads, bufs, masters, lr, lr_tensor, float(group["momentum"]),
            float(group["dampening"]), float(group["weight_decay"]), group["nesterov"],
            group["maximize"], is_first, on_device(grad_scale, device), on_device(found_inf, device),
        )
