"""Loads the compiled extension fastmlp._C, with errors that say what to do next."""

import importlib

import torch

_REBUILD = "Rebuild it against the running torch:  pip install --no-build-isolation --force-reinstall --no-deps ."


def _major_minor(v):
    return tuple(int(p) for p in v.split("+")[0].split(".")[:2])


def load_extension():
    try:
        from . import _build_info
    except ImportError:
        raise ImportError(
            "fastmlp's compiled extension is missing (fastmlp/_build_info.py was not generated): "
            "the package was imported from a source tree that was never built. " + _REBUILD
        ) from None
    built, running = _build_info.TORCH_VERSION, torch.__version__
    if _major_minor(built) != _major_minor(running):
        raise ImportError(
            f"fastmlp was built against torch {built}, but torch {running} is running; the "
            f"compiled extension is not compatible across torch releases. {_REBUILD}"
        )
    try:
        importlib.import_module("fastmlp._C")
    except (ImportError, OSError) as e:
        raise ImportError(
            f"fastmlp's compiled extension failed to load ({e}). It was built against torch "
            f"{built}; torch {running} is running. {_REBUILD}"
        ) from e
    return _build_info
