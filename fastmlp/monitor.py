"""Training diagnostics usable from any loop: per-layer statistics and a NaN/Inf guard.

    mon = Monitor(model, every=50)           guard = AnomalyGuard(model)
    for step, (x, y) in enumerate(batches):
        mon.begin(step)                      # hooks only on monitored steps
        loss = loss_fn(model(x), y); loss.backward()
        mon.after_backward()                 # before any gradient clipping: norms as computed
        if not guard.check(loss, grad_norm): # one scalar read per step
            raise guard.error(step, lambda: loss_fn(model(x), y).backward())
        opt.step()
        rec = mon.after_step()               # dict of floats on monitored steps, else None

Everything is kept on the device and read back once per monitored step. The activation hooks live
from begin() to after_backward() of a monitored step; begin() clears any a failed step left, and
mon.close() (or leaving ``with Monitor(model) as mon:``) removes them.
"""

import warnings

import torch
from torch import nn

from . import ops

_NORM_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

__all__ = ["Monitor", "AnomalyGuard", "AnomalyError", "layer_grad_norms", "total_grad_norm"]

_ACTS = (nn.ReLU, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid)


def _linear_layers(model):
    if hasattr(model, "linears"):
        return list(model.linears())
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _activation_points(model):
    """[(name, module)] whose forward output is a hidden activation. In fastmlp.nn.MLP that is each
    block's "act" slot (an nn.Identity after a FusedLinear, so the fused output passes through it);
    elsewhere, activation modules and FusedLinear layers with a fused activation: leaf modules only,
    so a container that merely records its activation's name (an MLP without hidden layers, whose
    output is the logits) is not taken for one."""
    from .nn.mlp import MLP  # noqa: PLC0415  (fastmlp.nn imports this module's package first)

    if isinstance(model, MLP):
        return [(f"{name}.act", block.act) for name, block in model._modules.items() if "act" in block._modules]
    points = []
    for name, m in model.named_modules():
        if next(m.children(), None) is not None:
            continue
        if isinstance(m, _ACTS) or getattr(m, "activation", "none") not in ("none", None):
            points.append((name, m))
    return points


def _norm(grads):
    # Accumulated in float64: the sum of squares of finite fp32 gradients overflows fp32 once they
    # reach ~1e19, and a diverging run gets there long before any gradient is Inf. fastmlp.ops.norms does
    # it in one pass on the CPU (torch's _foreach_norm with dtype=float64 copies each gradient to
    # float64 first: 1 ms of a 15 ms step for the default MLP); gradients on several devices, sparse
    # ones, or of a dtype it does not take go through torch.
    if len({g.device for g in grads}) == 1 and all(g.dtype in _NORM_DTYPES and g.layout == torch.strided
                                                   for g in grads):
        return torch.linalg.vector_norm(ops.norms(grads))
    # A sparse gradient's norm is that of its (coalesced) values, which _foreach_norm takes in float64.
    dense = [g if g.layout == torch.strided else g.coalesce().values() if g.layout == torch.sparse_coo
             else g.to_dense() for g in grads]
    norms = torch._foreach_norm(dense, 2, dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack([n.to(dense[0].device) for n in norms]))


def layer_grad_norms(model):
    """{layer name: L2 norm of the gradients of its parameters}, as 0-d float64 device tensors (no sync)."""
    out = {}
    for name, m in _linear_layers(model):
        grads = [p.grad for p in m.parameters() if p.grad is not None]
        if grads:
            out[name] = _norm(grads)
    return out


def total_grad_norm(parameters):
    """L2 norm over all gradients as a 0-d float64 tensor on their device (no sync); 0 when none
    exist. Infinite only when a gradient is (float64 does not overflow on finite fp32/fp16/bf16).
    parameters: an iterable of tensors or a single tensor, as for clip_grad_norm_."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    return _norm(grads)


class Monitor:
    """Per-layer gradient norm, update-to-weight ratio, activation mean/std and the fraction of dead
    units (a unit whose output is <= 0 for every sample of the batch: a dead ReLU, or a GELU/SiLU
    unit stuck in its flat negative half), every ``every`` steps.

    after_step() returns {"step": s, "<layer>/grad_norm": ..., "<layer>/update_ratio": ...,
    "<act>/act_mean", "<act>/act_std", "<act>/dead_frac"} on monitored steps, else None.

    "<layer>/grad_norm" is the norm of the gradients as they stand at after_backward(): the Trainer
    calls it before gradient clipping (and after fp16 unscaling), so the per-layer norms are the
    unclipped ones, like the total grad_norm it logs (the norm clip_grad_norm_ returns).
    """

    def __init__(self, model, every=50):
        if not isinstance(every, int) or every < 0:
            raise ValueError(f"Monitor: every must be an int >= 0 (0 = off), got {every!r}")
        self.model, self.every = model, every
        self.layers = _linear_layers(model)
        self.points = _activation_points(model)
        self._step = None
        self._handles = []
        self._acts = {}
        self._grads = None
        self._before = None

    @property
    def instrumenting(self):
        """Whether this step's forward hooks are installed (between begin and after_backward)."""
        return bool(self._handles)

    def wants(self, step):
        """Whether step is one the monitor records (every ``every``-th, from step 0)."""
        return self.every > 0 and step % self.every == 0

    def begin(self, step):
        """Call before the forward of ``step``: on a recorded step, installs the activation hooks
        (removing any a failed step left behind)."""
        self._remove_hooks()
        self._step = step if self.wants(step) else None
        if self._step is None:
            return
        self._acts = {}
        for name, m in self.points:
            self._handles.append(m.register_forward_hook(self._act_hook(name)))

    def _act_hook(self, name):
        def hook(mod, args, out):
            with torch.no_grad():
                o = out.detach().float().reshape(-1, out.shape[-1])
                self._acts[name] = torch.stack([o.mean(), o.std(), (~(o > 0).any(0)).float().mean()])
        return hook

    def after_backward(self):
        """Call after the backward (before clipping and the optimizer step): removes the hooks,
        takes the per-layer gradient norms and keeps the weights to measure the update against."""
        if self._step is None:
            return
        self._remove_hooks()
        self._grads = layer_grad_norms(self.model)
        self._before = [m.weight.detach().clone() for _, m in self.layers]

    def _remove_hooks(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def close(self):
        """Remove every hook and forget the step in progress (also on leaving a ``with Monitor(...)``)."""
        self._remove_hooks()
        self._step, self._before, self._grads, self._acts = None, None, None, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def after_step(self):
        """Call after the optimizer step: the step's record ({"step", "<layer>/grad_norm",
        "<layer>/update_ratio", "<point>/act_mean" ...}) on a recorded step, else None."""
        if self._step is None or self._before is None:
            return None
        device = self._before[0].device if self._before else next(
            (t.device for t in self._acts.values()), torch.device("cpu"))
        names, vals = ["step"], [torch.tensor(float(self._step), device=device)]
        for (name, m), w0 in zip(self.layers, self._before):
            w0f = w0.float()
            ratio = torch.linalg.vector_norm(m.weight.detach().float() - w0f) / torch.linalg.vector_norm(w0f).clamp_min(1e-12)
            if name in self._grads:
                names.append(f"{name}/grad_norm"); vals.append(self._grads[name])
            names.append(f"{name}/update_ratio"); vals.append(ratio)
        for name, t in self._acts.items():
            names += [f"{name}/act_mean", f"{name}/act_std", f"{name}/dead_frac"]
            vals += list(t.unbind())
        floats = torch.stack([v.float().to(device) for v in vals]).tolist()  # the one sync
        self._step, self._before, self._grads, self._acts = None, None, None, {}
        rec = dict(zip(names, floats))
        rec["step"] = int(rec["step"])
        return rec


class AnomalyError(RuntimeError):
    """A NaN or Inf in the loss or gradients; ``step`` and ``layer`` say where it first appeared."""

    def __init__(self, message, step=None, layer=None, where=None):
        super().__init__(message)
        self.step, self.layer, self.where = step, layer, where


def _finite(t):
    return bool(torch.isfinite(t).all())


def _divergence(losses, window=20, factor=10.0):
    """Words for a loss that grew at least factor-fold over the last window steps (finite ones;
    losses below 1e-3 count as 1e-3, so a near-zero loss wobbling is no growth); else None."""
    w = [float(v) for v in list(losses)[-window:]]
    w = [v for v in w if v == v and abs(v) != float("inf")]
    if len(w) < 2:
        return None
    low = min(range(len(w)), key=w.__getitem__)
    if w[-1] < factor * max(w[low], 1e-3):
        return None
    return f"rose from {w[low]:.3g} to {w[-1]:.3g} over the last {len(w) - low} steps"


class AnomalyGuard:
    """Cheap on the hot path: check() reads one boolean built from the loss and a gradient-norm
    scalar. Only after a detection does locate() replay the step with hooks on every leaf module and
    every parameter, to name the first layer whose output (forward) or gradient (backward) is not finite."""

    def __init__(self, model):
        self.model = model

    @staticmethod
    def check(loss, grad_norm=None):
        """Whether the loss (and the total gradient norm, if given) are finite: one host sync."""
        vals = torch.as_tensor(loss).detach().float().reshape(1)
        if grad_norm is not None:
            vals = torch.cat([vals, torch.as_tensor(grad_norm).detach().float().reshape(1).to(vals.device)])
        return bool(torch.isfinite(vals).all())

    def locate(self, replay, recent_losses=()):
        """Runs ``replay()`` (forward and backward of the offending step, on the unchanged parameters)
        under hooks. Returns (layer name, where) for the first non-finite value, or (None, reason).
        recent_losses: the losses of the steps before, oldest first, to tell a diverging loss."""
        try:
            return self._locate(replay, recent_losses, full_backward_hooks=True)
        except RuntimeError as e:
            if "BackwardHookFunction" not in str(e):
                raise
            # A module's full backward hook wraps its output in a view, which an in-place module after
            # it (nn.ReLU(inplace=True)) may not modify; the replay failed in its forward, before any
            # backward. Again with hooks on the outputs' gradients instead.
            return self._locate(replay, recent_losses, full_backward_hooks=False)

    def _locate(self, replay, recent_losses, full_backward_hooks):
        events = []
        handles = []
        leaves = [(n, m) for n, m in self.model.named_modules() if n and not list(m.children())]

        def fwd(name):
            def hook(mod, args, out):
                if events:
                    return
                ins = [a for a in args if torch.is_tensor(a)]
                if ins and not all(_finite(a) for a in ins) and not any(e for e in events):
                    events.append((name, "forward input (the batch itself)" if mod is leaves[0][1] else "forward input"))
                elif torch.is_tensor(out) and not _finite(out):
                    events.append((name, "forward output"))
                elif not full_backward_hooks:
                    for t, where in [(a, "gradient of its input") for a in ins] + [(out, "gradient of its output")]:
                        if torch.is_tensor(t) and t.requires_grad:
                            alive.append(t)   # (its id stays its own until the replay ends)
                            handles.append(t.register_hook(tensor_grad(id(t), name, where)))
            return hook

        alive = []
        grad_events = []  # without full backward hooks: (tensor, layer, where) of non-finite gradients, in time order

        def tensor_grad(key, name, where):
            def hook(g):
                if not _finite(g):
                    grad_events.append((key, name, where))
            return hook

        def bwd(name):
            def hook(mod, grad_in, grad_out):
                if events:
                    return
                if any(g is not None and not _finite(g) for g in grad_out):
                    events.append((name, "gradient of its output"))
                elif any(g is not None and not _finite(g) for g in grad_in):
                    events.append((name, "gradient of its input"))
            return hook

        def pgrad(name, pname, key):
            def hook(g):
                if not full_backward_hooks:
                    if not _finite(g):
                        grad_events.append((key, name, f"gradient of {pname}"))
                elif not events and not _finite(g):
                    events.append((name, f"gradient of {pname}"))
            return hook

        try:
            for n, m in leaves:
                handles.append(m.register_forward_hook(fwd(n)))
                if full_backward_hooks:
                    handles.append(m.register_full_backward_hook(bwd(n)))
                for pn, p in m.named_parameters(recurse=False):
                    if p.requires_grad:
                        handles.append(p.register_hook(pgrad(n, pn, id(p))))
            with warnings.catch_warnings():
                # The first layer's input needs no gradient; torch warns that its hook sees outputs only.
                warnings.simplefilter("ignore", UserWarning)
                loss = replay()
            if not events and grad_events:
                # The first tensor whose gradient was not finite, named by its last consumer in the
                # forward (the first backward to see it, which made it non-finite), else its producer.
                first = [e for e in grad_events if e[0] == grad_events[0][0]]
                inputs = [e for e in first if e[2] == "gradient of its input"]
                events.append((inputs or first)[-1 if inputs else 0][1:])
            if not events and loss is not None and not _finite(loss.detach()):
                growth = _divergence(recent_losses)
                if growth:
                    return None, (f"it first appeared in the loss (every layer's output was finite), which {growth}: "
                                  "the learning rate is likely too high")
                return None, ("it first appeared in the loss (every layer's output was finite: check the labels "
                              "and the loss inputs)")
        finally:
            for h in handles:
                h.remove()
        if events:
            return events[0]
        params = [p for p in self.model.parameters() if p.grad is not None]
        if params and torch.isfinite(total_grad_norm(params)):
            # Every value finite in float64, so what the caller saw was a gradient norm taken in
            # the gradients' own precision (torch.nn.utils.clip_grad_norm_ sums squares in fp32).
            big = max((float(p.grad.detach().abs().max()) for p in params if p.grad.numel()), default=0.0)
            return None, (f"the gradient norm overflowed although every loss, activation and gradient was "
                          f"finite on replay (largest |gradient| {big:.3g}): the loss is diverging; lower "
                          f"the learning rate")
        return None, "it did not happen again on replay (a non-deterministic op?)"

    def error(self, step, replay, context="", checkpoint=None, recent_losses=()):
        """The AnomalyError for a detection at ``step``; ``replay`` and ``recent_losses`` as in locate()."""
        layer, where = self.locate(replay, recent_losses)
        where_s = f"first appeared in layer '{layer}' ({where})" if layer else where
        msg = f"non-finite loss or gradient at step {step}{context}: {where_s}."
        if checkpoint:
            msg += f" Training stopped; the last good checkpoint is kept at {checkpoint}."
        return AnomalyError(msg, step=step, layer=layer, where=where)


