"""Timing protocol shared by the benchmark scripts.

Every candidate runs in this process, interleaved in rotating order, and the median of the samples
is reported, so that drift in the machine's speed hits all candidates alike. Python's cyclic
garbage collector is paused while timing (as `timeit` does): a full collection walks the ~300k
objects torch's import leaves behind (~100 ms here), and which candidate it lands in is chance.
Tensors are still freed as soon as their last reference goes.
"""

import contextlib
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
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


def _git_commit():
    """The checkout's commit (+ "-dirty" with uncommitted changes), or None outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


# What the source digest covers: the code a benchmark's numbers depend on. Built files
# (fastmlp/_C*.so, fastmlp/_build_info.py) and caches are left out.
SOURCE_DIRS = ("csrc", "fastmlp", "bench")
SOURCE_SUFFIXES = (".py", ".cpp", ".h", ".cu", ".cuh", ".sh")


def source_digest(root=None):
    """sha256 over the paths and contents of the source files (SOURCE_DIRS, plus setup.py), in
    path order: which code produced a result, also where git is missing or reports a commit other
    than the files' (a device's copy of the working tree). `python -c "import sys;
    sys.path.insert(0, 'bench'); import common; print(common.source_digest())"` in a checkout
    says whether it holds the same code."""
    import hashlib

    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = [os.path.join(root, "setup.py")] if os.path.isfile(os.path.join(root, "setup.py")) else []
    for top in SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            files += [os.path.join(dirpath, f) for f in filenames
                      if f.endswith(SOURCE_SUFFIXES) and f != "_build_info.py"]
    h = hashlib.sha256()
    for path in sorted(os.path.relpath(f, root).replace(os.sep, "/") for f in files):
        with open(os.path.join(root, path), "rb") as f:
            data = f.read()
        h.update(f"{path}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def portable_arg(arg, root=None):
    """A command-line argument as a results file records it: an absolute path becomes relative to
    the checkout when inside it, else its file name (where a run wrote its output, e.g. a device's
    $OUT, means nothing on another machine); also after `--option=`."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    prefix, sep, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    if not os.path.isabs(value):
        return arg
    rel = os.path.relpath(value, root)
    value = rel if not rel.startswith("..") else os.path.basename(value.rstrip(os.sep)) or value
    return prefix + sep + value


def run_info(script, argv):
    """What a rerun needs to know: the command (script and its arguments, argv None meaning this
    process's own), code and build, versions, threads, when."""
    import fastmlp

    try:
        from fastmlp import _build_info as build
        build = {k: getattr(build, k) for k in ("TORCH_VERSION", "WITH_CUDA", "CUDA_ARCH_LIST") if hasattr(build, k)}
    except ImportError:
        build = None
    return {
        "command": shlex.join(["python", f"bench/{os.path.basename(script)}"]
                              + [portable_arg(a) for a in (sys.argv[1:] if argv is None else argv)]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fastmlp": fastmlp.__version__, "git_commit": _git_commit(), "source_digest": source_digest(),
        "build": build,
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "FASTMLP_NATIVE") if k in os.environ},
    }


def write_json(path, payload, script, argv, complete=True):
    """payload plus "complete" and run_info(script, argv) under "run", written to path (its folder
    created) through a temp file and a rename, so the file is never half-written.

    complete=False marks a partial file: the scripts rewrite it after every measured row, so a run
    stopped by a time limit (each step of bench/gpu_check.sh has one) keeps what it measured."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump({**payload, "complete": complete, "run": run_info(script, argv)}, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if complete:
        print(f"wrote {path}")


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


MIN_REPEATS = 20


def add_repeats_arg(parser, default=25):
    """--repeats: the samples per candidate whose median a script reports."""
    parser.add_argument("--repeats", type=int, default=default,
                        help=f"timed samples per candidate, at least {MIN_REPEATS} (the median is reported)")


def check_repeats(parser, args):
    if args.repeats < MIN_REPEATS:
        parser.error(f"--repeats must be at least {MIN_REPEATS} (the protocol takes the median of >= {MIN_REPEATS} "
                     "samples)")


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
