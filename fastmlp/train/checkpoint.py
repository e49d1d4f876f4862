"""Atomic file writes and checkpoints: a crash or SIGKILL leaves either the old file or the new one."""

import json
import os
import random
import re
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_save", "rng_state", "set_rng_state", "load_checkpoint",
           "CheckpointError", "interrupts_deferred", "remove_stale_temp_files"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_umask()  # mkstemp makes 0600 files; run folders are meant to be shared like any other output


def _atomic(path, write):
    path = Path(path)
    if not path.parent.is_dir():  # (else mkstemp's error names the temp file, not the file asked for)
        raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist")
    # The temp name is .<name>.<8 random chars>.tmp; remove_stale_temp_files matches exactly that.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path, data):
    _atomic(path, lambda f: f.write(data))


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


@contextmanager
def interrupts_deferred():
    """Hold a Ctrl-C (SIGINT) or a SIGTERM until the block ends, then deliver it to the handler it was
    meant for (Python's default for SIGINT raises KeyboardInterrupt there; for SIGTERM it ends the
    process, once the block is done). Main thread only, where Python runs signal handlers; elsewhere,
    and for a signal ignored or not handled by Python, the block runs as is."""
    if threading.current_thread() is threading.main_thread():
        prevs = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        prevs = {sig: prev for sig, prev in prevs.items() if prev not in (signal.SIG_IGN, None)}
    else:
        prevs = {}
    held = []
    for sig in prevs:
        signal.signal(sig, lambda signum, frame: held.append((signum, frame)))
    try:
        yield
    finally:
        for sig, prev in prevs.items():
            signal.signal(sig, prev)
    if held:
        signum, frame = held[0]
        if callable(prevs[signum]):
            prevs[signum](signum, frame)
        else:  # SIG_DFL: as the signal would have
            signal.raise_signal(signum)


def atomic_save(obj, path):
    # torch.save's zip writer turns an exception raised inside it (a KeyboardInterrupt from Ctrl-C)
    # into RuntimeError("unexpected pos ..."), so Ctrl-C (and SIGTERM) is held until the file is complete.
    with interrupts_deferred():
        _atomic(path, lambda f: torch.save(obj, f))


def remove_stale_temp_files(folder, names):
    """Delete the temp files _atomic leaves for ``names`` (e.g. checkpoint.pt) in folder when a
    SIGKILL lands mid-write: .<name>.<8 chars of mkstemp>.tmp, nothing else. Returns the removed paths."""
    pattern = re.compile("|".join(rf"\.{re.escape(n)}\.[a-z0-9_]{{8}}\.tmp" for n in names))
    removed = []
    for p in Path(folder).iterdir():
        if pattern.fullmatch(p.name) and p.is_file():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


VERSION = 1  # the checkpoint format written by _save_checkpoint; bump when an entry changes meaning
_KEYS = ("version", "config", "model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step_in_epoch",
         "global_step", "history", "epoch_losses", "epoch_time")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from; the message names the file and what is wrong with it."""


def load_checkpoint(path):
    """The checkpoint dict at path, checked to be a fastmlp training checkpoint of this format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:
        # Our own checkpoints hold RNG states and Python objects (config dict, history), hence weights_only=False.
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"--resume: {path} is not a readable fastmlp checkpoint ({e})") from e
    need = ("--resume needs the checkpoint.pt that `fastmlp train` writes (config, weights, optimizer and RNG "
            "state together)")
    if not isinstance(ck, dict):
        raise CheckpointError(f"--resume: {path} is not a fastmlp training checkpoint: it holds a "
                              f"{type(ck).__name__}; {need}")
    if "version" not in ck or "config" not in ck:
        kind = "a model state_dict (weights only)" if ck and all(isinstance(v, torch.Tensor) for v in ck.values()) \
            else "a dict without 'version' and 'config' entries"
        raise CheckpointError(f"--resume: {path} is not a fastmlp training checkpoint: it holds {kind}; {need}")
    if ck["version"] != VERSION:
        raise CheckpointError(f"--resume: {path} was saved by an incompatible version of fastmlp (checkpoint format "
                              f"{ck['version']!r}; this version reads format {VERSION}); start a new run, or resume "
                              "with the fastmlp version that wrote it")
    missing = [k for k in _KEYS if k not in ck]
    if missing:
        raise CheckpointError(f"--resume: {path} is not a complete fastmlp checkpoint: it lacks {', '.join(missing)}")
    return ck
