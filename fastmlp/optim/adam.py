"""fastmlp.optim.Adam and AdamW: torch.optim's Adam/AdamW over the fused adamw_step_ op.

Drop-ins: same signature (plus the opt-in keyword master_weights), defaults, errors and
state_dict layout as torch.optim.Adam/AdamW(fused=True); a state_dict moves between the two
freely. Adam is the L2 mode of the same kernel (decoupled_weight_decay=False).

master_weights=True keeps an fp32 copy of every fp16/bf16 parameter (state key "master_param")
and fp32 moments; the update runs on the copy and the parameter receives the rounded result, so
small updates are not lost to fp16/bf16 rounding.
"""

import torch

from .. import ops
from ._common import (
    FusedStep,
    local_shards,
    fused_doc,
    _LOW_PRECISION,
    ensure_master,
    fp32_originals,
    distinct_runs,
    group_by_device_dtype,
    lr_args,
    move_step_to_fused_layout,
    normalise_groups,
    on_device,
    pick,
    signature_with_master_weights,
)

__all__ = ["Adam", "AdamW"]

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class _Bucket:
    """The op's tensor lists for the parameters of one group on one (device, dtype)."""

    __slots__ = ("device", "idx", "params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps", "masters")

    def __init__(self, device, idx, params, state, amsgrad, master):
        self.device = device
        self.idx = idx
        self.params = [params[i] for i in idx]
        sts = [state[p] for p in self.params]
        self.exp_avgs = [s["exp_avg"] for s in sts]
        self.exp_avg_sqs = [s["exp_avg_sq"] for s in sts]
        self.max_exp_avg_sqs = [s["max_exp_avg_sq"] for s in sts] if amsgrad else []
        self.steps = [s["step"] for s in sts]
        self.masters = [s["master_param"] for s in sts] if master else []


class _FusedAdamBase(FusedStep):
    _fm_decoupled = False

    def load_state_dict(self, state_dict):
        keep = fp32_originals(self, state_dict, ("master_param",) + _MOMENTS) if self._fm_master else {}
        super().load_state_dict(state_dict)
        normalise_groups(self)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st:
                    move_step_to_fused_layout(st, p)
                    if self._fm_master and p.dtype in _LOW_PRECISION:
                        for k, t in keep.get(p, {}).items():
                            st[k] = t.to(device=p.device, dtype=torch.float32, copy=True)
                        self._fm_upgrade_state(p, st)
        self._fm_cache = {}

    def _fm_upgrade_state(self, p, st):
        for k in _MOMENTS:
            if k in st and st[k].dtype != torch.float32:
                st[k] = st[k].float()
        ensure_master(p, st)

    def _fm_cache_flag(self, group):
        return group["amsgrad"]

    def _fm_cached_launch(self, group, buckets, grads, grad_scale, found_inf):
        n = len(grads)
        for b in buckets:
            self._fm_launch(group, b.device, b.params, pick(grads, b.idx, n), b.exp_avgs, b.exp_avg_sqs,
                            b.max_exp_avg_sqs, b.steps, b.masters, grad_scale, found_inf)

    def _fm_step_group_general(self, group, grad_scale, found_inf):
        pw, grads, m, v, vmax, steps = [], [], [], [], [], []
        # torch's own lazy state init, placement and errors (sparse grads, unsupported dtypes).
        self._init_group(group, pw, grads, m, v, vmax, steps)
        for p in pw:  # a counter set by hand (float64, on the CPU for a CUDA param) as the op takes it
            move_step_to_fused_layout(self.state[p], p)
        amsgrad = group["amsgrad"]
        for (device, dtype), idx in (kind for run in distinct_runs(pw)
                                     for kind in group_by_device_dtype(pw, run).items()):
            bp = pick(pw, idx, len(pw))
            sts = [self.state[p] for p in bp]
            masters = []
            if self._fm_uses_master(dtype):
                for p, st in zip(bp, sts):
                    self._fm_upgrade_state(p, st)
                masters = [st["master_param"] for st in sts]
            self._fm_launch(group, device, bp, pick(grads, idx, len(pw)),
                            [st["exp_avg"] for st in sts], [st["exp_avg_sq"] for st in sts],
                            [st["max_exp_avg_sq"] for st in sts] if amsgrad else [],
                            [st["step"] for st in sts], masters, grad_scale, found_inf)

    def _fm_state_keys(self, group):
        return ("exp_avg", "exp_avg_sq", "step") + (("max_exp_avg_sq",) if group["amsgrad"] else ())

    def _fm_buckets(self, group, params, kinds):
        return [_Bucket(device, idx, params, self.state, group["amsgrad"], self._fm_uses_master(dtype))
                for (device, dtype), idx in kinds.items()]

    def _fm_make_plan(self, b):
        return ops.AdamWPlan(b.params, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs, b.steps, b.masters)

    def _fm_plan_step(self, group, plan, grad_scale, found_inf):
        cpu = torch.device("cpu")
        beta1, beta2 = group["betas"]
        lr, lr_tensor = lr_args(group["lr"], cpu)
        return plan.step(lr, lr_tensor, float(beta1), float(beta2), float(group["weight_decay"]),
                         float(group["eps"]), group["maximize"],
                         group.get("decoupled_weight_decay", self._fm_decoupled),
                         on_device(grad_scale, cpu), on_device(found_inf, cpu))

    def _fm_launch(self, group, device, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                   masters, grad_scale, found_inf):
        beta1, beta2 = group["betas"]
        lr, lr_tensor = lr_args(group["lr"], device)
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters = local_shards(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters)
        ops.adamw_step_(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, masters, lr, lr_tensor,
            float(beta1), float(beta2), float(group["weight_decay"]), float(group["eps"]),
            group["amsgrad"], group["maximize"],
            group.get("decoupled_weight_decay", self._fm_decoupled),
            on_device(grad_scale, device), on_device(found_inf, device),
        )


class Adam(_FusedAdamBase, torch.optim.Adam):
    __doc__ = fused_doc(torch.optim.Adam)

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)

    __init__.__signature__ = signature_with_master_weights(torch.optim.Adam)


class AdamW(_FusedAdamBase, torch.optim.AdamW):
    __doc__ = fused_doc(torch.optim.AdamW)
    _fm_decoupled = True

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)

    __init__.__signature__ = signature_with_master_weights(torch.optim.AdamW)
