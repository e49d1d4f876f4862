"""Timing protocol shared by the benchmark scripts.

Every candidate runs in this process, interleaved in rotating order, and the median of the samples
is reported, so that drift in the machine's speed hits all candidates alike. Python's cyclic
garbage collector is paused while timing (as `timeit` does): a full collection walks the ~300k
objects torch's import leaves behind (~100 ms here), and which candidate it lands in is chance.
Tensors are still freed as soon as their last reference goes.
"""

import contextlib
import gc
import math
import platform
import statistics
import time

import torch


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine_name(device):
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"{cpu_model()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def gc_paused():
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def time_interleaved(fns, device, repeats, min_sample_s=2e-3, untimed_first=False, max_inner=1000):
    """(median seconds per call of each fn, seconds each fn's 3 warm-up calls took).

    Each sample times k consecutive calls, k chosen per fn so that a sample lasts >= min_sample_s;
    with untimed_first, one untimed call precedes each sample (a warm steady state, as in a loop).
    """
    names = list(fns)
    warmup_s = {}
    for name, fn in fns.items():  # warm-up, compilation included
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        sync(device)
        warmup_s[name] = time.perf_counter() - t0
    inner = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        sync(device)
        one = max(time.perf_counter() - t0, 1e-7)
        inner[name] = max(1, min(max_inner, math.ceil(min_sample_s / one)))
    samples = {n: [] for n in names}
    with gc_paused():
        for r in range(repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                fn, k = fns[name], inner[name]
                if untimed_first:
                    fn()
                sync(device)
                t0 = time.perf_counter()
                for _ in range(k):
                    fn()
                sync(device)
                samples[name].append((time.perf_counter() - t0) / k)
    return {n: statistics.median(s) for n, s in samples.items()}, warmup_s
