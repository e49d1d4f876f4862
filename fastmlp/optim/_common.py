"""Machinery shared by the fused optimizers: torch.optim compatibility and the cached fast path.

Each optimizer subclasses its torch.optim counterpart, so the signature, defaults, validation
errors, __setstate__ and state_dict layout are the running torch's own, and only step() is ours.
Groups carry fused=True: the state layout is torch.optim's fused=True one (step a float32 tensor on
the param's device), so torch's load_state_dict places every tensor right in both directions and a
state_dict loaded into torch.optim runs torch's fused kernels on identical state.

step() costs one C++ call per (group, device, dtype). Once the parameters of a group that get
gradients have state (a parameter that never had a gradient, e.g. in a frozen layer, has none and
stays out until it gets one), a CPU group gets a step plan (csrc/cpu/optim.cpp) that holds its
tensors and reads p.grad in C++, so a step does no per-parameter Python work at all; its state is
packed into one buffer per key (pack_state), so the plan does not touch each state tensor's
metadata either. Other groups cache the op's tensor lists and read p.grad in Python. The first
steps (while state is created lazily) and steps a plan declines take the general path through
torch's own _init_group.
"""

import collections
import functools
import inspect
import operator
from itertools import chain

import torch
from torch.optim import optimizer as _torch_optimizer

from ..ops import dtensor_type, has_dtensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class CacheEntry(collections.namedtuple(
        "CacheEntry", "group flag buckets params plan tracked untracked state version", defaults=(None, None))):
    """A group's cached fast path: the op's tensor lists (buckets) and the CPU plan (or None) for
    its `tracked` parameters, those with complete state; `untracked` are the rest, which have
    never had a gradient (frozen layers). `flag` is what changes the state's layout (amsgrad,
    momentum on or off); `params` the group's list when built; `state` and its `version` the
    optimizer state it was built from."""

    __slots__ = ()


def fused_doc(torch_cls):
    """The class docstring of fastmlp.optim.X: what differs from torch.optim.X, then torch's own."""
    name = torch_cls.__name__
    return f"""fastmlp.optim.{name}: torch.optim.{name} with its step in one fused multi-tensor kernel
    (C++ on the CPU, CUDA on GPUs) for float32, float64, float16 and bfloat16 parameters.

    A drop-in: the same arguments, defaults, errors, hooks and state_dict layout as
    torch.optim.{name}(fused=True), so a state_dict loads into either; LR schedulers and
    torch.amp.GradScaler work as with torch's (a step with inf/NaN gradients is skipped inside
    the kernel; a step taken leaves the gradients unscaled). What differs:

    - ``fused`` is always True and ``foreach`` is ignored (the fused kernel is the only path);
    - ``differentiable=True``, complex parameters and sparse gradients are refused with an error
      saying what to use instead;
    - one extra keyword, ``master_weights=False``: True keeps an fp32 copy of each float16 /
      bfloat16 parameter (state key "master_param") and fp32 state; the update runs on the copy
      and the parameter gets the rounded result, so updates smaller than the parameter's rounding
      step are not lost.

    torch.optim.{name}'s documentation follows.

    """ + (torch_cls.__doc__ or "")


def signature_with_master_weights(torch_cls):
    """torch_cls.__init__'s signature plus our keyword-only master_weights=False."""
    sig = inspect.signature(torch_cls.__init__)
    extra = inspect.Parameter("master_weights", inspect.Parameter.KEYWORD_ONLY, default=False,
                              annotation=bool)
    return sig.replace(parameters=list(sig.parameters.values()) + [extra])


def group_by_device_dtype(params, indices=None):
    """{(device, dtype): [indices]} in first-seen order (over indices, default all); a group of one
    kind is the common case."""
    buckets = {}
    for i in range(len(params)) if indices is None else indices:
        p = params[i]
        buckets.setdefault((p.device, p.dtype), []).append(i)
    return buckets


def has_duplicates(params):
    return len({id(p) for p in params}) != len(params)


def distinct_runs(params):
    """The indices of params in runs that hold each tensor at most once, in list order: all first
    occurrences, then the second ones, and so on. torch.optim only warns of a parameter listed twice
    in a group and steps each occurrence in turn; one kernel call must not get a tensor twice (its
    threads would update it at once), so each run is a call of its own, one after the other."""
    if not has_duplicates(params):
        return [range(len(params))]
    runs, seen = [], {}
    for i, p in enumerate(params):
        k = seen.get(id(p), 0)
        seen[id(p)] = k + 1
        if k == len(runs):
            runs.append([])
        runs[k].append(i)
    return runs


def single_cpu_kind(kinds):
    """The (device, dtype) of kinds (group_by_device_dtype's result) when it is one CPU kind, the
    groups that get a step plan; else None."""
    if len(kinds) != 1:
        return None
    kind = next(iter(kinds))
    return kind if kind[0].type == "cpu" else None


def pick(lst, idx, n):
    """lst restricted to idx, without a copy when idx is everything."""
    if len(idx) == n:
        return lst
    return [lst[i] for i in idx]


def on_device(t, device):
    if t is None or t.device == device:
        return t
    # Non-blocking only host to device: a device-to-host copy must be complete before the CPU
    # step reads it.
    return t.to(device, non_blocking=device.type != "cpu")


def lr_args(lr, device):
    """(lr float, lr tensor or None) for the op: a device tensor lr is read on the device."""
    if isinstance(lr, torch.Tensor):
        if lr.device.type == "cpu" or device.type == "cpu":
            return float(lr), None
        return 0.0, on_device(lr, device)
    return float(lr), None


def move_step_to_fused_layout(state, p):
    """step as torch's fused=True keeps it: float32 on the param's device."""
    step = state.get("step")
    if step is None:
        return
    if not torch.is_tensor(step):
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
    elif step.dtype != torch.float32 or step.device != p.device:
        state["step"] = step.to(dtype=torch.float32, device=p.device)


def ensure_master(p, st):
    """An fp32 master copy of p in its state st (master_weights=True), made from p when there is none
    yet or the one there is not fp32: a state_dict back from an optimizer without master weights
    (torch.optim, or fastmlp's without master_weights) had it cast to p's dtype on loading and then
    left it behind, while p is the current weight."""
    master = st.get("master_param")
    if master is None or master.dtype != torch.float32:
        st["master_param"] = p.detach().float()


def fp32_originals(optimizer, state_dict, keys):
    """{param: {key: tensor}} of the saved tensors for keys, before torch's load casts them to the
    param dtype (which would round an fp32 master copy or fp32 moments to fp16/bf16)."""
    out = {}
    saved_groups = state_dict["param_groups"]
    for sg, g in zip(saved_groups, optimizer.param_groups):
        for sid, p in zip(sg["params"], g["params"]):
            st = state_dict["state"].get(sid)
            if st and p.dtype in _LOW_PRECISION:
                kept = {k: st[k] for k in keys if torch.is_tensor(st.get(k)) and st[k].dtype == torch.float32}
                if kept:
                    out[p] = kept
    return out


def _dense(t):
    """Whether t's elements fill numel() consecutive elements of memory (any dim order)."""
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.size()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def local_shards(params, *lists):
    """The op's arguments for DTensors (FSDP2's sharded parameters, their gradients and state): each
    rank's local shard, which the kernels update in place. The updates are elementwise, so every rank
    steps its own shard, as torch's fused optimizers do under DTensor; a tensor laid out unlike its
    parameter (a Partial gradient) is redistributed to the parameter's placements first. Returns
    params and each list (paired with params, or empty) in that form; lists of plain tensors as they are."""
    if not has_dtensor(params):
        return (params, *lists)
    dt = dtensor_type()

    def local(t, p):
        if not isinstance(t, dt):
            return t
        if isinstance(p, dt) and t.placements != p.placements:
            t = t.redistribute(p.device_mesh, p.placements)
        return t._local_tensor

    return ([local(p, p) for p in params], *([local(t, p) for t, p in zip(ts, params)] for ts in lists))


def pack_state(params, state, keys):
    """Moves each key's state tensors of params into one buffer, in order, as views of it.

    The CPU step plans read a packed slot through one storage and per-parameter offsets instead of
    touching every state tensor's metadata at every step (csrc/cpu/optim.cpp, Packed). Values,
    shapes and strides are unchanged and state[p][key] stays a tensor of its own shape, so
    state_dict() and torch.optim see the usual layout (a saved state_dict stores the shared buffer
    once). Keys whose tensors are missing, of mixed dtype or device, not dense or in shared memory
    stay as they are.
    """
    for key in keys:
        ts = [state[p].get(key) for p in params]
        if not ts or any(not torch.is_tensor(t) for t in ts):
            continue
        dtype, device = ts[0].dtype, ts[0].device
        if any(t.dtype != dtype or t.device != device or not _dense(t) or t.is_shared() for t in ts):
            continue  # (state in shared memory, e.g. stepped by several processes, stays where it is)
        if all(t.untyped_storage().data_ptr() == ts[0].untyped_storage().data_ptr() for t in ts):
            continue  # already one buffer
        # The buffer's pages are only committed as they are written, and each old tensor is freed
        # once copied (the caller holds no other reference), so memory never holds two copies.
        flat = torch.empty(sum(t.numel() for t in ts), dtype=dtype, device=device)
        offset = 0
        for i, p in enumerate(params):
            t, ts[i] = ts[i], None
            state[p][key] = flat.as_strided(t.size(), t.stride(), offset).copy_(t)
            offset += t.numel()
        del t


class _Version:
    __slots__ = ("n",)

    def __init__(self):
        self.n = 0


class _Counting:
    """dict's mutating methods, each first counting one change in self._fm_version (written out
    with super() calls, which torch.compile traces: a user's compiled code may edit the state)."""

    __slots__ = ()

    def __setitem__(self, key, value):
        self._fm_version.n += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._fm_version.n += 1
        super().__delitem__(key)

    def __ior__(self, other):
        self._fm_version.n += 1
        return super().__ior__(other)

    def clear(self):
        self._fm_version.n += 1
        super().clear()

    def pop(self, *args):
        self._fm_version.n += 1
        return super().pop(*args)

    def popitem(self):
        self._fm_version.n += 1
        return super().popitem()

    def setdefault(self, *args):
        self._fm_version.n += 1
        return super().setdefault(*args)

    def update(self, *args, **kwargs):
        self._fm_version.n += 1
        super().update(*args, **kwargs)


class ParamState(_Counting, dict):
    """One parameter's optimizer state: a dict that counts its changes in its optimizer's state
    version, so a cached step (plan or tensor lists) never keeps using a tensor the user replaced
    or deleted (opt.state[p]["exp_avg"] = ..., del, clear()). Pickles, deep-copies and saves as a
    plain dict, so state_dicts and checkpoints hold only builtin types."""

    __slots__ = ("_fm_version",)

    def __reduce__(self):
        return dict, (dict(self),)


class _ParamStateFactory:
    __slots__ = ("version",)

    def __init__(self, version):
        self.version = version

    def __call__(self):
        st = ParamState()
        st._fm_version = self.version
        return st


class OptimizerState(_Counting, collections.defaultdict):
    """optimizer.state (a defaultdict(dict) in torch.optim) whose parameter states are ParamState
    dicts sharing one change counter with it: assigning, deleting or clearing a parameter's state,
    or the whole of it, counts too. A cached step is used only while the counter is where it was
    when the cache was built; reading state costs nothing extra. Pickles as torch's own
    defaultdict(dict) of plain dicts."""

    __slots__ = ("_fm_version",)

    def __init__(self, items=()):
        super().__init__()
        self._fm_version = _Version()
        # Not a bound method of self: that would be a reference cycle, and a replaced state (with all
        # its tensors) would then live until the cyclic garbage collector ran.
        self.default_factory = _ParamStateFactory(self._fm_version)
        for k, v in dict(items).items():
            dict.__setitem__(self, k, self.adopt(v))

    def adopt(self, st):
        """st as a ParamState counting into this state's version (the same object when it is)."""
        if type(st) is ParamState and st._fm_version is self._fm_version:
            return st
        if not isinstance(st, dict):
            return st
        out = self.default_factory()
        dict.update(out, st)
        return out

    def __reduce__(self):
        return collections.defaultdict, (dict,), None, None, iter((k, dict(v) if isinstance(v, dict) else v)
                                                                  for k, v in self.items())


def track_state(optimizer, params):
    """Makes optimizer.state an OptimizerState and the states of params ParamState dicts of it
    (the same tensors; only dicts that were not yet tracked are replaced)."""
    state = optimizer.state
    if type(state) is not OptimizerState:
        state = optimizer.state = OptimizerState(state)
    for p in params:
        st = dict.get(state, p)
        if st is not None and (type(st) is not ParamState or st._fm_version is not state._fm_version):
            dict.__setitem__(state, p, state.adopt(st))


def normalise_groups(optimizer):
    """Flags of our layout after a load (the state_dict may come from torch's for-loop)."""
    for group in optimizer.param_groups:
        group["fused"] = True
        group["foreach"] = None
        group["differentiable"] = False
    optimizer._step_supports_amp_scaling = True


def health_check(optimizer):
    # torch >= 2.5 names it _accelerator_graph_capture_health_check; older ones _cuda_...
    check = getattr(optimizer, "_accelerator_graph_capture_health_check", None) or getattr(
        optimizer, "_cuda_graph_capture_health_check", None)
    if check is not None:
        check()


def _same_objects(a, b):
    """Whether sequences a and b hold the very same objects, in order (never calls Tensor.__eq__)."""
    return len(a) == len(b) and all(map(operator.is_, a, b))


class FusedStep:
    """step() shared by the fused optimizers: one op call per (group, device, dtype) bucket, with
    GradScaler's grad_scale / found_inf (set on the optimizer by GradScaler, as for torch's fused
    optimizers) passed into the kernel. Subclasses implement _fm_step_group; the per-group tensor
    lists cached in _fm_cache are dropped whenever the groups change or the optimizer is unpickled."""

    def __init__(self, params, *args, master_weights=False, **kwargs):
        name = type(self).__name__
        if kwargs.get("differentiable"):
            raise RuntimeError(
                f"fastmlp.optim.{name}: differentiable=True is not supported (the fused step updates the "
                f"parameters outside autograd); use torch.optim.{name}(..., differentiable=True)")
        if kwargs.get("fused") and kwargs.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")  # torch's error, as torch
        # foreach / fused choose torch's implementation; ours is always the fused kernel, and
        # fused=True is the state layout we keep.
        kwargs.pop("foreach", None)
        kwargs["fused"] = True
        self._fm_master = bool(master_weights)
        self._fm_cache = {}
        super().__init__(params, *args, **kwargs)
        # Counting from the start (track_state would swap it in at the first step).
        self.state = OptimizerState(self.state)

    def __getstate__(self):
        # torch.optim pickles defaults, state and param_groups only; master_weights changes the
        # state's layout, so a copy must keep it.
        return {**super().__getstate__(), "_fm_master": self._fm_master}

    def __setstate__(self, state):
        super().__setstate__(state)  # (load_state_dict too: it sets the loaded state through here)
        self.__dict__.setdefault("_fm_master", False)
        self._fm_cache = {}
        if type(self.state) is not OptimizerState:
            self.state = OptimizerState(self.state)

    def state_dict(self):
        # Plain dicts, as torch.optim's: a ParamState would pickle as a call to dict, which
        # torch.load(weights_only=True) refuses.
        sd = super().state_dict()
        sd["state"] = {k: dict(v) if isinstance(v, ParamState) else v for k, v in sd["state"].items()}
        return sd

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._fm_cache = {}
        for i, p in enumerate(self.param_groups[-1]["params"]):
            if p.is_complex():
                # (torch's fused=True check would only say so at the first step, naming fused.)
                self.param_groups.pop()
                name = type(self).__name__
                raise ValueError(
                    f"fastmlp.optim.{name}: parameter {i} of the group is complex ({p.dtype}); the fused kernels "
                    f"take real floating-point parameters: use torch.optim.{name} for complex ones, or "
                    "optimise torch.view_as_real(p)")

    def _fm_step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        health_check(self)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._fm_step_groups(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        return loss

    @torch.compiler.disable
    def _fm_step_groups(self, grad_scale, found_inf):
        # Under torch.compile this runs as in eager mode (one graph break): each group is one op
        # call either way, and dynamo mis-traced the Python around the calls. With several groups
        # one frame stepped another group's tensors: the cache's id(group) became a constant, and
        # state read through self.state[p] after _init_group came from the first group's entries.
        if len(self._fm_cache) > len(self.param_groups):
            # A group removed from param_groups (or replaced by another dict): its entry holds its
            # tensors and the plan, which torch.optim would free with the group.
            live = {id(g) for g in self.param_groups}
            self._fm_cache = {k: v for k, v in self._fm_cache.items() if k in live}
        for group in self.param_groups:
            self._fm_step_group(group, grad_scale, found_inf)

    @functools.wraps(_fm_step)
    def step(self, *args, **kwargs):
        # torch.optim wraps every optimizer's step (Optimizer._patch_step_function) in a
        # record_function for the profiler plus the step pre/post hooks. That wrapper runs right
        # after the memory-heavy update, when Python's own code and objects are out of the caches:
        # measured here (200 x 64x64 AdamW, interleaved) it took ~180 us of a 600 us step. This
        # step is marked as already hooked, so torch leaves it alone, and does the same things
        # only when they can have an effect: the record_function while a profiler is running, the
        # hooks when any are registered (same order, same arguments, same return contract).
        pre = self._optimizer_step_pre_hooks
        post = self._optimizer_step_post_hooks
        if type(self).step is not FusedStep.step:
            # A subclass with a step of its own, calling this one: torch wrapped that step (it is not
            # marked hooked), so its wrapper has run the hooks, as for a subclass of torch's Adam.
            return self._fm_step(*args, **kwargs)
        if not (pre or post or _torch_optimizer._global_optimizer_pre_hooks
                or _torch_optimizer._global_optimizer_post_hooks or torch.autograd._profiler_enabled()):
            # (_optimizer_step_code, the profiler's Python-tracer hook, only matters while profiling.)
            return self._fm_step(*args, **kwargs)
        args = (self,) + args
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
            for pre_hook in chain(_torch_optimizer._global_optimizer_pre_hooks.values(), pre.values()):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if isinstance(result, tuple) and len(result) == 2:
                        args, kwargs = result
                    else:
                        raise RuntimeError(
                            f"<function {type(self).__name__}.step> must return None or a tuple of (new_args, "
                            f"new_kwargs), but got {result}.")
            out = type(self)._fm_step(*args, **kwargs)
            self._optimizer_step_code()
            for post_hook in chain(post.values(), _torch_optimizer._global_optimizer_post_hooks.values()):
                post_hook(self, args, kwargs)
            return out

    step.hooked = True  # torch.optim.Optimizer._patch_step_function: do not wrap again
    step.__name__, step.__qualname__ = "step", "FusedStep.step"   # (functools.wraps named it _fm_step)

    def _fm_uses_master(self, dtype):
        return self._fm_master and dtype in _LOW_PRECISION

    def _fm_build_cache(self, group):
        """The group's CacheEntry: tensor lists per (device, dtype) and, for a CPU group, a step plan,
        over the parameters whose state is complete (the subclass's _fm_state_keys, plus the fp32
        master copy where master weights are on); nothing when none is. Where a parameter needs no
        state at all (SGD without momentum), those with a gradient now (it was just stepped) count
        as complete, so a frozen one stays out as it does elsewhere."""
        keys = self._fm_state_keys(group)
        params, untracked = [], []
        for p in group["params"]:
            st = self.state.get(p, {})
            master = self._fm_uses_master(p.dtype)
            complete = all(st.get(k) is not None for k in keys) and (not master or "master_param" in st) and (
                bool(keys) or master or p.grad is not None)
            (params if complete else untracked).append(p)
        if not params or has_duplicates(group["params"]) or has_dtensor(params):
            # (A parameter listed twice takes the general path, see distinct_runs; so do DTensors,
            # whose local shards it passes to the op, see local_shards.)
            return
        kinds = group_by_device_dtype(params)
        cpu = single_cpu_kind(kinds)
        if cpu is not None:
            # Packed before the buckets hold the state tensors, so each old one is freed as soon
            # as it is copied (no second copy of the whole state at any time).
            pack_state(params, self.state, keys + (("master_param",) if self._fm_uses_master(cpu[1]) else ()))
        buckets = self._fm_buckets(group, params, kinds)
        plan = self._fm_make_plan(buckets[0]) if cpu is not None else None
        self._fm_cache[id(group)] = CacheEntry(group, self._fm_cache_flag(group), buckets, tuple(group["params"]),
                                               plan, tuple(params), tuple(untracked))

    def _fm_step_group(self, group, grad_scale, found_inf):
        """One group: its CPU step plan, else the cached tensor lists, else the general path.

        The cache (a CacheEntry, built by _fm_build_cache for the parameters with state) is used
        while the group, its flag and its parameters are those it was built for, and the state and
        its version (see OptimizerState, changed whenever the user replaces, deletes or clears any
        of it) too; a gradient on an untracked parameter (a layer unfrozen) sends the step to the
        general path, which creates its state, and the cache is rebuilt. A plan that declines (a
        missing grad, an odd layout) and a missing grad on the cached path both fall back to the
        general path, which has torch's own per-parameter logic and errors. The plan writes the
        tensors' memory from C++, outside autograd, so only the op paths need no_grad (the plan
        skips its cost).
        """
        params = group["params"]
        cached = self._fm_cache.get(id(group))
        if (cached is None or cached.group is not group or cached.flag != self._fm_cache_flag(group)
                or cached.state is not self.state or cached.version != self.state._fm_version.n
                or not _same_objects(cached.params, params)
                or (cached.untracked and any(p.grad is not None for p in cached.untracked))):
            cached = None
        plan = cached.plan if cached is not None else None
        if plan is not None and self._fm_plan_step(group, plan, grad_scale, found_inf):
            return
        with torch.no_grad():
            if cached is not None and plan is None:
                grads = [p.grad for p in cached.tracked]
                if not any(g is None for g in grads):
                    try:
                        self._fm_cached_launch(group, cached.buckets, grads, grad_scale, found_inf)
                        return
                    except RuntimeError:
                        # A sparse grad is refused by the op before anything changes; the general
                        # path raises torch's own error for it.
                        if not any(g.is_sparse for g in grads):
                            raise
            self._fm_step_group_general(group, grad_scale, found_inf)
        # Rebuilt with no other reference to the state tensors left (the general step's lists, the
        # old cache entry and its plan), so that packing the state for a CPU plan frees each old
        # state tensor as soon as it is copied.
        cached = plan = None
        self._fm_cache.pop(id(group), None)
        track_state(self, params)
        self._fm_build_cache(group)
        entry = self._fm_cache.get(id(group))
        if entry is not None:
            # Valid for these very parameters (a group's list can be edited in place), while the
            # state is this object and unchanged since now (packing included).
            self._fm_cache[id(group)] = entry._replace(state=self.state, version=self.state._fm_version.n)
