"""Loads the compiled extension fastmlp._C, with errors that say what to do next."""

import importlib
import sys
from pathlib import Path

import torch

_REBUILD = ("Rebuild it against the running torch from fastmlp's source:  pip install --no-build-isolation "
            "--force-reinstall --no-deps .  (or run the torch release it was built for)")


def _major_minor(v):
    return tuple(int(p) for p in v.split("+")[0].split(".")[:2])


def _source_tree_hint():
    """When fastmlp is imported from a source checkout (a setup.py beside the package) while an
    installed copy exists elsewhere: the checkout shadows it, which is the usual cause of a missing
    extension after `pip install .` (the build went to site-packages, not into the checkout)."""
    pkg = Path(__file__).resolve().parent
    if not (pkg.parent / "setup.py").is_file():
        return ""
    here = str(pkg.parent)
    for entry in sys.path:
        if not entry or Path(entry).resolve() == pkg.parent:
            continue
        other = Path(entry) / "fastmlp" / "__init__.py"
        if other.is_file() and other.resolve().parent != pkg:
            return (f" Python is importing the source tree {here} (the current directory or PYTHONPATH), "
                    f"which shadows the fastmlp installed in {entry}: run from another directory, or build "
                    f"the tree in place with  pip install --no-build-isolation -e .")
    return (f" (It was imported from the source tree {here}: build it in place with"
            f"  pip install --no-build-isolation -e .  or  python setup.py build_ext --inplace)")


def load_extension():
    try:
        from . import _build_info
    except ImportError:
        raise ImportError(
            "fastmlp's compiled extension is missing (fastmlp/_build_info.py was not generated): "
            "the package was imported from a source tree that was never built." + (_source_tree_hint() or " " + _REBUILD)
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
        hint = _source_tree_hint() if isinstance(e, ModuleNotFoundError) else ""
        if hint:
            raise ImportError(f"fastmlp's compiled extension is not in this tree ({e})." + hint) from e
        raise ImportError(
            f"fastmlp's compiled extension failed to load ({e}). It was built against torch "
            f"{built}; torch {running} is running. {_REBUILD}"
        ) from e
    return _build_info
