"""An exponential moving average (EMA) of a model's weights, for evaluating and shipping the average."""

import contextlib
import operator

import torch

from .. import ops
from ._common import local_shards

__all__ = ["EMA"]


class EMA:
    """An exponential moving average of ``model``'s state: every floating-point parameter and buffer
    (batch norm's running statistics too) is averaged, integer buffers (``num_batches_tracked``) are
    copied. Call ``update()`` after each optimizer step::

        ema = fastmlp.optim.EMA(model, decay=0.999)
        for x, y in batches:
            loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad(); ema.update()
        with ema.average_parameters():     # the averaged weights in the model, the trained ones back after
            evaluate(model)

    Each update does ``avg = lerp(avg, w, 1 - d)`` (= ``d * avg + (1 - d) * w``) with ``d = decay``,
    in one fastmlp.ops.ema_update_ call per device and dtype (on the CPU one parallel pass over every
    element, where torch's _foreach_lerp_ runs a parallel region per tensor; on CUDA torch's fused
    _foreach_lerp_), or with ``warmup=True`` (default)
    ``d = min(decay, (1 + t) / (10 + t))`` for the t-th update (t = 0, 1, ...), as TensorFlow's
    ExponentialMovingAverage with num_updates: early averages then follow the training instead of
    holding on to the initial weights for ~1 / (1 - decay) steps. The average starts as a copy of
    the model's state and lives on its devices, in its dtypes. ``state_dict()`` /
    ``load_state_dict()`` save and restore it exactly; ``averaged_state_dict()`` is the average as
    a state_dict of the model (``model.load_state_dict`` takes it).
    """

    def __init__(self, model, decay=0.999, warmup=True):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"EMA: model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA: decay must be a number in [0, 1) (e.g. 0.999), got {decay!r}")
        self.model, self.decay, self.warmup, self.num_updates = model, float(decay), bool(warmup), 0
        state = model.state_dict(keep_vars=True)   # the model's parameters and persistent buffers
        self._keys = list(state)
        self._slots = _slots(model, state)
        self._avg = {k: v.detach().clone() for k, v in state.items()}
        self._objs, self._groups, self._copied = [], [], []
        self._sync()

    def _live(self):
        """The model's tensors now, in state_dict order. Looked up at every use: model.to() or
        .double() give parameters new data and buffers new tensors, load_state_dict(assign=True)
        new parameters, and a copy or unpickling of the EMA a copy of the model."""
        if self._slots is not None:
            live = []
            for tensors, get, one in self._slots:
                if one:
                    live.append(get(tensors))
                else:
                    live.extend(get(tensors))
            return live
        state = self.model.state_dict(keep_vars=True)
        if list(state) != self._keys:
            raise RuntimeError("EMA: the model's state_dict keys changed since the EMA was made; make a new EMA")
        return list(state.values())

    def _sync(self, check_moved=False):
        """The model's tensors. The update's groups are rebuilt when one of them is another tensor
        than at the last rebuild or, with check_moved, has moved to another dtype or device (the
        average follows it there). An update skips that check (a Python loop over every tensor):
        the op checks dtypes and devices itself, and update() rebuilds when it refuses."""
        live = self._live()
        if (len(live) == len(self._objs) and all(map(operator.is_, live, self._objs))
                and not (check_moved and self._moved(live))):
            return live
        groups = {}
        for k, v in zip(self._keys, live):
            avg = self._avg[k]
            if avg.shape != v.shape:
                raise RuntimeError(f"EMA: the model's {k} changed shape from {tuple(avg.shape)} to {tuple(v.shape)} "
                                   "since the EMA was made; make a new EMA")
            if avg.dtype != v.dtype or avg.device != v.device:
                self._avg[k] = avg.to(device=v.device, dtype=v.dtype)
            if v.is_floating_point() or v.is_complex():
                groups.setdefault((v.device, v.dtype), []).append((k, v))
        # (average list, model list) per device and dtype: update() passes them as they are. The
        # model's own tensors, not detached views, which would miss a later `p.data = ...`.
        self._groups = [([self._avg[k] for k, _ in kv], [v for _, v in kv]) for kv in groups.values()]
        self._copied = [(self._avg[k], v) for k, v in zip(self._keys, live)
                        if not (v.is_floating_point() or v.is_complex())]
        self._objs = live
        return live

    def _moved(self, live):
        return any(self._avg[k].dtype != v.dtype or self._avg[k].device != v.device for k, v in zip(self._keys, live))

    def current_decay(self):
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self):
        """Move the average towards the model's current state by one step."""
        weight = 1.0 - self.current_decay()
        live = self._sync()
        done = 0
        try:
            for averages, values in self._groups:
                ops.ema_update_(*local_shards(averages, values), weight)
                done += 1
        except (RuntimeError, TypeError, ValueError):
            # The op checks every pair before it writes. A model tensor that kept its object but not its
            # dtype or device (model.double() or .to() set p.data) fails that check: the average follows
            # it, and the groups the op had already updated are not updated twice.
            if not self._moved(live):
                raise
            finished = {id(a) for averages, _ in self._groups[:done] for a in averages}
            self._sync(check_moved=True)
            for averages, values in self._groups:
                pairs = [(a, v) for a, v in zip(averages, values) if id(a) not in finished]
                if pairs:
                    ops.ema_update_(*local_shards([a for a, _ in pairs], [v for _, v in pairs]), weight)
        for average, value in self._copied:
            average.copy_(value)
        self.num_updates += 1

    def averaged_state_dict(self):
        """The average as a state_dict of the model (a copy)."""
        return {k: v.clone() for k, v in self._avg.items()}

    @torch.no_grad()
    def copy_to(self, model=None):
        """Load the average into ``model`` (default: the averaged model itself)."""
        (model if model is not None else self.model).load_state_dict(self._avg)

    @contextlib.contextmanager
    def average_parameters(self):
        """Within the block the model holds the averaged state; on leaving it (an exception too) the
        trained state is back, bit for bit."""
        with torch.no_grad():
            live = self._sync(check_moved=True)
            saved = [v.clone() for v in live]
            for k, v in zip(self._keys, live):
                v.copy_(self._avg[k])
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for v, kept in zip(live, saved):
                    v.copy_(kept)

    def state_dict(self):
        """decay, warmup, num_updates and the average (a copy): all an exact resume needs."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "averaged": self.averaged_state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state):
        """Restore a state_dict() of an EMA of the same model."""
        if not isinstance(state, dict) or not {"decay", "num_updates", "averaged"} <= set(state):
            raise ValueError("EMA.load_state_dict: expected the dict of EMA.state_dict() (decay, num_updates, averaged)")
        avg = state["averaged"]
        if set(avg) != set(self._avg):
            missing, extra = sorted(set(self._avg) - set(avg)), sorted(set(avg) - set(self._avg))
            what = "; ".join(f"{name} {', '.join(keys)}" for name, keys in (("missing", missing), ("unexpected", extra))
                             if keys)
            raise ValueError(f"EMA.load_state_dict: the average is of another model ({what})")
        for k, v in avg.items():
            if v.shape != self._avg[k].shape:
                raise ValueError(f"EMA.load_state_dict: {k} has shape {tuple(v.shape)}, the model's "
                                 f"{tuple(self._avg[k].shape)}")
        self._sync(check_moved=True)
        for k, v in avg.items():
            self._avg[k].copy_(v)
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])
        self.warmup = bool(state.get("warmup", True))


def _slots(model, state):
    """Where the entries of state (model.state_dict(keep_vars=True)) live, in its order: (a module's
    _parameters or _buffers dict, an itemgetter of its names there, whether it is one name), or None
    where the state_dict is not the modules' own tensors (a custom _save_to_state_dict or state_dict
    hook): the EMA then reads model.state_dict() at each use. (A module keeps those dicts for life; a
    copy of the EMA copies them with the model.)"""
    slots, found = [], []
    for prefix, module in model.named_modules(remove_duplicate=False):
        for kind in ("_parameters", "_buffers"):
            tensors = getattr(module, kind)
            names = [name for name, t in tensors.items() if t is not None and (
                kind == "_parameters" or name not in module._non_persistent_buffers_set)]
            if names:
                slots.append((tensors, operator.itemgetter(*names), len(names) == 1))
                found += [(f"{prefix}.{name}" if prefix else name, tensors[name]) for name in names]
    if [k for k, _ in found] != list(state) or any(t is not state[k] for k, t in found):
        return None
    return slots
